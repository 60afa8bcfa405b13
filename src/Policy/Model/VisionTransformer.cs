// Field names follow timm / Hugging Face keys (see Layers.cs).
#pragma warning disable IDE1006
using OpenVLA.Policy.Checkpoint;
using TorchSharp;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;
using F = TorchSharp.torch.nn.functional;

namespace OpenVLA.Policy.Model;

/// <summary>timm PatchEmbed: a Conv2d with kernel = stride = patch size, flattened row-major to tokens.</summary>
public sealed class PatchEmbed : nn.Module<Tensor, Tensor>
{
    public Conv2dWeights proj;

    public PatchEmbed(VitConfig c, ModelPrecision p) : base(nameof(PatchEmbed))
    {
        proj = new Conv2dWeights(3, c.EmbedDim, c.PatchSize, p);
        RegisterComponents();
    }

    public override Tensor forward(Tensor pixels)
    {
        using var scope = NewDisposeScope();
        var x = proj.forward(pixels);                    // [B, D, gh, gw]
        return x.flatten(2).transpose(1, 2).MoveToOuterDisposeScope(); // [B, gh·gw, D]
    }
}

/// <summary>The Conv2d of the patch embedding (weight [D, 3, p, p], bias [D]), stride = kernel.</summary>
public sealed class Conv2dWeights : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    public Parameter bias;
    readonly long _stride;

    public Conv2dWeights(int inChannels, int outChannels, int kernel, ModelPrecision p) : base("Conv2d")
    {
        weight = p.Empty(outChannels, inChannels, kernel, kernel);
        bias = p.Empty(outChannels);
        _stride = kernel;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => F.conv2d(x, weight, bias, strides: [_stride, _stride]);
}

/// <summary>timm Attention: fused qkv (rows [Q; K; V], head-major), softmax(QKᵀ/√d)V, output projection.</summary>
public sealed class VitAttention : nn.Module<Tensor, Tensor>
{
    public Linear qkv;
    public Linear proj;
    readonly int _heads;

    public VitAttention(VitConfig c, ModelPrecision p) : base(nameof(VitAttention))
    {
        qkv = new Linear(c.EmbedDim, 3 * c.EmbedDim, true, p);
        proj = new Linear(c.EmbedDim, c.EmbedDim, true, p);
        _heads = c.NumHeads;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], n = x.shape[1], d = x.shape[2];
        var qkvOut = qkv.forward(x).reshape(b, n, 3, _heads, d / _heads).permute(2, 0, 3, 1, 4);
        var o = F.scaled_dot_product_attention(qkvOut[0], qkvOut[1], qkvOut[2]);
        return proj.forward(o.transpose(1, 2).reshape(b, n, d)).MoveToOuterDisposeScope();
    }
}

/// <summary>timm Mlp: fc1 → exact-erf GELU → fc2.</summary>
public sealed class VitMlp : nn.Module<Tensor, Tensor>
{
    public Linear fc1;
    public Linear fc2;

    public VitMlp(VitConfig c, ModelPrecision p) : base(nameof(VitMlp))
    {
        fc1 = new Linear(c.EmbedDim, c.MlpHiddenDim, true, p);
        fc2 = new Linear(c.MlpHiddenDim, c.EmbedDim, true, p);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var h = F.gelu(fc1.forward(x));
        return fc2.forward(h);
    }
}

/// <summary>DINOv2 LayerScale; the HF conversion renamed timm's `gamma` to `scale_factor`.</summary>
public sealed class LayerScale : nn.Module<Tensor, Tensor>
{
    public Parameter scale_factor;

    public LayerScale(int dim, ModelPrecision p) : base(nameof(LayerScale))
    {
        scale_factor = p.Empty(dim);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => x * scale_factor;
}

/// <summary>Pre-norm ViT block: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x))). With FiLM (OpenVLA-OFT+,
/// film_vit_wrapper.py) the block also holds `scale` and `shift` (llm → vision) and modulates between the two halves:
/// x = x·(1 + scale(l)) + shift(l), l the average language embedding of the row.</summary>
public sealed class VitBlock : nn.Module<Tensor, Tensor>
{
    public LayerNorm norm1;
    public VitAttention attn;
    public LayerScale? ls1;
    public LayerNorm norm2;
    public VitMlp mlp;
    public LayerScale? ls2;
    public Linear? scale;
    public Linear? shift;

    public VitBlock(VitConfig c, ModelPrecision p, int? filmDim = null) : base(nameof(VitBlock))
    {
        norm1 = new LayerNorm(c.EmbedDim, 1e-6, p);
        attn = new VitAttention(c, p);
        norm2 = new LayerNorm(c.EmbedDim, 1e-6, p);
        mlp = new VitMlp(c, p);
        if (c.LayerScale) { ls1 = new LayerScale(c.EmbedDim, p); ls2 = new LayerScale(c.EmbedDim, p); }
        if (filmDim is int llm) { scale = new Linear(llm, c.EmbedDim, true, p); shift = new Linear(llm, c.EmbedDim, true, p); }
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => Forward(x, null);

    /// <summary>x [B, N, D]; <paramref name="language"/> [B, llm], the average language embedding (FiLM blocks only).</summary>
    public Tensor Forward(Tensor x, Tensor? language)
    {
        using var scope = NewDisposeScope();
        var a = attn.forward(norm1.forward(x));
        x = x.add(ls1 is null ? a : ls1.forward(a), KeptScalars.One);
        if (scale is not null && shift is not null)
        {
            if (language is null) throw new InvalidOperationException("a FiLM block needs the average language embedding");
            var gamma = scale.forward(language.to(x.dtype)).unsqueeze(1);
            var beta = shift.forward(language.to(x.dtype)).unsqueeze(1);
            x = x.mul(gamma.add(KeptScalars.One)).add(beta, KeptScalars.One);
        }
        var m = mlp.forward(norm2.forward(x));
        x = x.add(ls2 is null ? m : ls2.forward(m), KeptScalars.One);
        return x.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// A timm VisionTransformer as the OpenVLA backbone uses it: patch tokens + position embeddings, then the class and
/// register tokens prepended without position embedding (DINOv2 `no_embed_class`), blocks up to the second-to-last, no
/// final norm, prefix tokens dropped. Only the blocks that inference runs are built; the last block, `norm` and SigLIP's
/// `attn_pool` stay in the checkpoint unread.
/// </summary>
public sealed class VisionTransformer : nn.Module<Tensor, Tensor>
{
    public Parameter? cls_token;
    public Parameter? reg_token;
    public Parameter pos_embed;
    public PatchEmbed patch_embed;
    public nn.Module<Tensor, Tensor> blocks;
    readonly VitConfig _config;
    readonly VitBlock[] _blocks;

    /// <summary>Wraps each block's forward when set (e.g. gradient checkpointing during training): receives the block,
    /// its input and the plain run, returns the block output. Null runs the blocks directly.</summary>
    public Func<VitBlock, Tensor, Func<Tensor, Tensor>, Tensor>? BlockRunner { get; set; }

    public IReadOnlyList<VitBlock> Blocks => _blocks;

    public VisionTransformer(VitConfig c, ModelPrecision p, int? filmDim = null) : base(nameof(VisionTransformer))
    {
        _config = c;
        if (c.ClassToken) cls_token = p.Empty(1, 1, c.EmbedDim);
        if (c.NumRegisterTokens > 0) reg_token = p.Empty(1, c.NumRegisterTokens, c.EmbedDim);
        pos_embed = p.Empty(1, c.NumPatches, c.EmbedDim);
        patch_embed = new PatchEmbed(c, p);
        _blocks = Enumerable.Range(0, c.FeatureBlockIndex + 1).Select(_ => new VitBlock(c, p, filmDim)).ToArray();
        blocks = nn.Sequential(_blocks.Select((blk, i) => (i.ToString(), (nn.Module<Tensor, Tensor>)blk)).ToArray());
        RegisterComponents();
    }

    /// <summary>pixels [B, 3, H, W] → patch features [B, numPatches, D] of the second-to-last block.</summary>
    public override Tensor forward(Tensor pixels) => Forward(pixels, null);

    /// <summary>As <see cref="forward"/>, with the average language embedding [B, llm] that FiLM blocks need.</summary>
    public Tensor Forward(Tensor pixels, Tensor? language)
    {
        using var scope = NewDisposeScope();
        var x = patch_embed.forward(pixels).add(pos_embed, KeptScalars.One);
        long b = x.shape[0];
        var prefix = new List<Tensor>();
        if (cls_token is not null) prefix.Add(cls_token.expand(b, -1, -1));
        if (reg_token is not null) prefix.Add(reg_token.expand(b, -1, -1));
        if (prefix.Count > 0) x = cat([.. prefix, x], 1);
        if (BlockRunner is null && language is null) x = blocks.forward(x);
        else foreach (var block in _blocks) x = BlockRunner is null ? block.Forward(x, language) : BlockRunner(block, x, h => block.Forward(h, language));
        return x.narrow(1, _config.NumPrefixTokens, _config.NumPatches).contiguous().MoveToOuterDisposeScope();
    }
}

/// <summary>DINOv2 (`featurizer`, pixel channels 0–2) and SigLIP (`fused_featurizer`, channels 3–5), features
/// concatenated per patch: [B, N, 1024] ⊕ [B, N, 1152] → [B, N, 2176] for openvla-7b. Several cameras (OpenVLA-OFT) come
/// as 6 channels each, [B, 6·C, H, W]; each camera's patches follow the previous camera's: [B, C·N, D].</summary>
public sealed class FusedVisionBackbone : nn.Module<Tensor, Tensor>
{
    public VisionTransformer featurizer;
    public VisionTransformer fused_featurizer;

    public FusedVisionBackbone(VlaConfig c, ModelPrecision p, int? filmDim = null) : base(nameof(FusedVisionBackbone))
    {
        featurizer = new VisionTransformer(c.VisionTowers[0], p, filmDim);
        fused_featurizer = new VisionTransformer(c.VisionTowers[1], p, filmDim);
        RegisterComponents();
    }

    public override Tensor forward(Tensor pixelValues) => Forward(pixelValues, null);

    /// <summary>pixel values [B, 6·C, H, W] → [B, C·N, D]; <paramref name="language"/> [B, llm] for FiLM towers.</summary>
    public Tensor Forward(Tensor pixelValues, Tensor? language)
    {
        using var scope = NewDisposeScope();
        long b = pixelValues.shape[0], channels = pixelValues.shape[1];
        if (channels % 6 != 0) throw new ArgumentException($"pixel values need 6 channels per camera, got {channels}");
        long cameras = channels / 6;
        // The cameras of a row go through the towers as rows of one batch (what the reference does one camera at a
        // time): every operation is per row, so the result is the same.
        var pixels = cameras == 1 ? pixelValues : pixelValues.reshape(b * cameras, 6, pixelValues.shape[2], pixelValues.shape[3]);
        var lang = language is null || cameras == 1 ? language : language.repeat_interleave(cameras, dim: 0);
        var dino = featurizer.Forward(pixels.narrow(1, 0, 3), lang);
        var siglip = fused_featurizer.Forward(pixels.narrow(1, 3, 3), lang);
        var features = cat([dino, siglip], 2);
        return (cameras == 1 ? features : features.reshape(b, cameras * features.shape[1], features.shape[2])).MoveToOuterDisposeScope();
    }
}

/// <summary>`fused-gelu-mlp`: fc1 (vision → 4·vision) → GELU → fc2 (→ llm) → GELU → fc3 (llm → llm).</summary>
public sealed class Projector : nn.Module<Tensor, Tensor>
{
    public Linear fc1;
    public Linear fc2;
    public Linear fc3;

    public Projector(VlaConfig c, ModelPrecision p) : base(nameof(Projector))
    {
        int v = c.VisionDim, llm = c.Text.HiddenSize;
        fc1 = new Linear(v, 4 * v, true, p);
        fc2 = new Linear(4 * v, llm, true, p);
        fc3 = new Linear(llm, llm, true, p);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return fc3.forward(F.gelu(fc2.forward(F.gelu(fc1.forward(x))))).MoveToOuterDisposeScope();
    }
}
