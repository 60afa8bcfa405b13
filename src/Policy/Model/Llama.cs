// Field names follow Hugging Face LlamaForCausalLM keys (see Layers.cs).
#pragma warning disable IDE1006
using OpenVLA.Policy.Checkpoint;
using TorchSharp;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;
using F = TorchSharp.torch.nn.functional;

namespace OpenVLA.Policy.Model;

/// <summary>
/// A key/value cache allocated once for a whole generation: [batch, kv heads, capacity, head dim] per layer.
/// Each step writes its keys/values in place (no concatenation, no re-allocation per token).
/// Rows may be left-padded: <see cref="PadLengths"/> gives, per row, how many leading positions hold no token.
/// </summary>
public sealed class KvCache : IDisposable
{
    public Tensor[] Keys { get; }
    public Tensor[] Values { get; }
    public int Capacity { get; }
    public int Length { get; internal set; }
    public long[] PadLengths { get; }
    internal Tensor? KeyValid { get; } // [B, 1, 1, Capacity] bool, null when no row is padded

    public KvCache(LlamaConfig c, int batch, int capacity, long[] padLengths, ScalarType dtype, Device device)
    {
        Capacity = capacity;
        PadLengths = padLengths;
        Keys = new Tensor[c.NumHiddenLayers];
        Values = new Tensor[c.NumHiddenLayers];
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            Keys[i] = torch.empty([batch, c.NumKeyValueHeads, capacity, c.HeadDim], dtype, device);
            Values[i] = torch.empty([batch, c.NumKeyValueHeads, capacity, c.HeadDim], dtype, device);
        }
        if (padLengths.Any(p => p > 0))
        {
            using var pos = arange(capacity, device: device).view(1, capacity);
            using var pads = tensor(padLengths, device: device).view(batch, 1);
            KeyValid = pos.ge(pads).view(batch, 1, 1, capacity);
        }
    }

    public void Dispose()
    {
        foreach (var t in Keys) t.Dispose();
        foreach (var t in Values) t.Dispose();
        KeyValid?.Dispose();
    }
}

/// <summary>Rotary position embedding tables (HF rotate_half convention), computed once in float64 for all positions.</summary>
public sealed class RotaryEmbedding : IDisposable
{
    readonly Tensor _cos, _sin; // [maxPositions, headDim]

    public RotaryEmbedding(LlamaConfig c, ScalarType dtype, Device device)
    {
        int dim = c.HeadDim;
        using var scope = NewDisposeScope();
        var invFreq = 1.0 / pow(c.RopeTheta, arange(0, dim, 2, ScalarType.Float64) / dim);
        var freqs = outer(arange(c.MaxPositionEmbeddings, ScalarType.Float64), invFreq);
        var emb = cat([freqs, freqs], -1);
        // Tables live as long as the model, outside any caller's dispose scope.
        _cos = emb.cos().to(dtype, device).DetachFromDisposeScope();
        _sin = emb.sin().to(dtype, device).DetachFromDisposeScope();
    }

    /// <summary>positions [B, L] → (cos, sin) [B, 1, L, headDim].</summary>
    public (Tensor Cos, Tensor Sin) Gather(Tensor positions)
    {
        long b = positions.shape[0], l = positions.shape[1];
        var flat = positions.reshape(-1);
        return (_cos.index_select(0, flat).view(b, 1, l, -1), _sin.index_select(0, flat).view(b, 1, l, -1));
    }

    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        using var scope = NewDisposeScope();
        long half = x.shape[^1] / 2;
        var rotated = cat([-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
        return (x * cos).add(rotated * sin, KeptScalars.One).MoveToOuterDisposeScope();
    }

    public void Dispose() { _cos.Dispose(); _sin.Dispose(); }
}

public sealed class Embedding : nn.Module<Tensor, Tensor>
{
    public Parameter weight;

    public Embedding(int vocab, int dim, ModelPrecision p) : base(nameof(Embedding))
    {
        weight = p.Empty(vocab, dim);
        RegisterComponents();
    }

    /// <summary>ids [B, L] (int64) → [B, L, dim].</summary>
    public override Tensor forward(Tensor ids)
    {
        using var flat = ids.reshape(-1);
        using var rows = weight.index_select(0, flat);
        return rows.view(ids.shape[0], ids.shape[1], -1);
    }
}

public sealed class LlamaAttention : nn.Module
{
    public Linear q_proj;
    public Linear k_proj;
    public Linear v_proj;
    public Linear o_proj;
    readonly LlamaConfig _c;

    public LlamaAttention(LlamaConfig c, ModelPrecision p) : base(nameof(LlamaAttention))
    {
        _c = c;
        int kv = c.NumKeyValueHeads * c.HeadDim;
        q_proj = new Linear(c.HiddenSize, c.HiddenSize, false, p);
        k_proj = new Linear(c.HiddenSize, kv, false, p);
        v_proj = new Linear(c.HiddenSize, kv, false, p);
        o_proj = new Linear(c.HiddenSize, c.HiddenSize, false, p);
        RegisterComponents();
    }

    /// <summary>Attention over the cache (inference) or, with no cache, over these positions alone (training).</summary>
    public Tensor Forward(Tensor x, Tensor cos, Tensor sin, KvCache? cache, int layer, Tensor? mask)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], l = x.shape[1];
        int start = cache?.Length ?? 0, hd = _c.HeadDim;
        var q = q_proj.forward(x).view(b, l, _c.NumAttentionHeads, hd).transpose(1, 2);
        var k = k_proj.forward(x).view(b, l, _c.NumKeyValueHeads, hd).transpose(1, 2);
        var v = v_proj.forward(x).view(b, l, _c.NumKeyValueHeads, hd).transpose(1, 2);
        q = RotaryEmbedding.Apply(q, cos, sin);
        k = RotaryEmbedding.Apply(k, cos, sin);
        Tensor keys = k, values = v;
        if (cache is not null)
        {
            cache.Keys[layer].narrow(2, start, l).copy_(k);
            cache.Values[layer].narrow(2, start, l).copy_(v);
            keys = cache.Keys[layer].narrow(2, 0, start + l);
            values = cache.Values[layer].narrow(2, 0, start + l);
        }
        int groups = _c.NumAttentionHeads / _c.NumKeyValueHeads;
        if (groups > 1)
        {
            keys = keys.repeat_interleave(groups, dim: 1);
            values = values.repeat_interleave(groups, dim: 1);
        }
        if (mask is null && l > 1 && start != 0) throw new InvalidOperationException("a multi-token step on a non-empty cache needs an explicit mask");
        // No padding: a prefill from an empty cache is plainly causal, a one-token step sees everything cached.
        Tensor o = mask is not null
            ? F.scaled_dot_product_attention(q, keys, values, attn_mask: mask)
            : F.scaled_dot_product_attention(q, keys, values, is_casual: l > 1 && start == 0);
        return o_proj.forward(o.transpose(1, 2).reshape(b, l, -1)).MoveToOuterDisposeScope();
    }
}

public sealed class LlamaMLP : nn.Module<Tensor, Tensor>
{
    public Linear gate_proj;
    public Linear up_proj;
    public Linear down_proj;

    public LlamaMLP(LlamaConfig c, ModelPrecision p) : base(nameof(LlamaMLP))
    {
        gate_proj = new Linear(c.HiddenSize, c.IntermediateSize, false, p);
        up_proj = new Linear(c.HiddenSize, c.IntermediateSize, false, p);
        down_proj = new Linear(c.IntermediateSize, c.HiddenSize, false, p);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return down_proj.forward(F.silu(gate_proj.forward(x)) * up_proj.forward(x)).MoveToOuterDisposeScope();
    }
}

public sealed class LlamaDecoderLayer : nn.Module
{
    public RMSNorm input_layernorm;
    public LlamaAttention self_attn;
    public RMSNorm post_attention_layernorm;
    public LlamaMLP mlp;

    public LlamaDecoderLayer(LlamaConfig c, ModelPrecision p) : base(nameof(LlamaDecoderLayer))
    {
        input_layernorm = new RMSNorm(c.HiddenSize, c.RmsNormEps, p);
        self_attn = new LlamaAttention(c, p);
        post_attention_layernorm = new RMSNorm(c.HiddenSize, c.RmsNormEps, p);
        mlp = new LlamaMLP(c, p);
        RegisterComponents();
    }

    public Tensor Forward(Tensor x, Tensor cos, Tensor sin, KvCache? cache, int layer, Tensor? mask)
    {
        using var scope = NewDisposeScope();
        x = x.add(self_attn.Forward(input_layernorm.forward(x), cos, sin, cache, layer, mask), KeptScalars.One);
        x = x.add(mlp.forward(post_attention_layernorm.forward(x)), KeptScalars.One);
        return x.MoveToOuterDisposeScope();
    }
}

public sealed class LlamaModel : nn.Module
{
    public Embedding embed_tokens;
    public nn.Module layers;
    public RMSNorm norm;
    internal readonly LlamaDecoderLayer[] Layers;

    public LlamaModel(LlamaConfig c, ModelPrecision p) : base(nameof(LlamaModel))
    {
        embed_tokens = new Embedding(c.VocabSize, c.HiddenSize, p);
        Layers = Enumerable.Range(0, c.NumHiddenLayers).Select(_ => new LlamaDecoderLayer(c, p)).ToArray();
        layers = nn.ModuleList(Layers);
        norm = new RMSNorm(c.HiddenSize, c.RmsNormEps, p);
        RegisterComponents();
    }
}

/// <summary>
/// Llama-2 decoder (HF LlamaForCausalLM): RMSNorm pre-norm, RoPE, SDPA attention, SwiGLU MLP, untied lm_head.
/// <see cref="Step"/> runs any number of new positions on top of a <see cref="KvCache"/> and returns the final hidden
/// states; the caller projects only the positions it needs through <see cref="Logits"/>.
/// </summary>
public sealed class LlamaForCausalLM : nn.Module
{
    public LlamaModel model;
    public Linear lm_head;
    readonly LlamaConfig _c;
    readonly RotaryEmbedding _rope;

    public LlamaForCausalLM(LlamaConfig c, ModelPrecision p) : base(nameof(LlamaForCausalLM))
    {
        _c = c;
        model = new LlamaModel(c, p);
        lm_head = new Linear(c.HiddenSize, c.VocabSize, false, p);
        _rope = new RotaryEmbedding(c, p.DType, p.Device);
        RegisterComponents();
    }

    public LlamaConfig Config => _c;

    public Tensor Embed(Tensor ids) => model.embed_tokens.forward(ids);

    public KvCache NewCache(int batch, int capacity, long[] padLengths)
    {
        var w = lm_head.weight;
        return new KvCache(_c, batch, capacity, padLengths, w.dtype, w.device);
    }

    /// <summary>inputs [B, L, H] at the next L positions of <paramref name="cache"/> → normed hidden states [B, L, H].</summary>
    public Tensor Step(Tensor inputsEmbeds, KvCache cache)
    {
        using var scope = NewDisposeScope();
        long b = inputsEmbeds.shape[0], l = inputsEmbeds.shape[1];
        int start = cache.Length;
        if (start + l > cache.Capacity) throw new InvalidOperationException($"KV cache overflow: {start}+{l} > {cache.Capacity}");
        if (start + l > _c.MaxPositionEmbeddings)
            throw new PolicyInputException($"sequence of {start + l} tokens exceeds max_position_embeddings {_c.MaxPositionEmbeddings}");
        var device = inputsEmbeds.device;

        var steps = arange(start, start + l, device: device).view(1, l);
        var pads = tensor(cache.PadLengths, device: device).view(b, 1);
        var positions = steps.sub(pads).clamp_min(KeptScalars.Zero);
        var (cos, sin) = _rope.Gather(positions);

        Tensor? mask = null;
        if (cache.KeyValid is not null)
        {
            // A query sees a key when the key is a real token at or before it; a padded query sees itself, so no
            // softmax row is empty (its output is never used).
            var keyPos = arange(start + l, device: device).view(1, 1, 1, start + l);
            var queryPos = steps.view(1, 1, l, 1);
            var causal = keyPos.le(queryPos);
            mask = (causal & cache.KeyValid.narrow(3, 0, start + l)) | keyPos.eq(queryPos);
        }
        var x = inputsEmbeds;
        for (int i = 0; i < model.Layers.Length; i++) x = model.Layers[i].Forward(x, cos, sin, cache, i, mask);
        cache.Length = start + (int)l;
        return model.norm.forward(x).MoveToOuterDisposeScope();
    }

    public Tensor Logits(Tensor hidden) => lm_head.forward(hidden);

    /// <summary>
    /// Forward without a cache: inputs [B, L, H] with right padding, <paramref name="valid"/> [B, L] bool marking
    /// real positions (null: all real). Positions run 0..L−1 as in Hugging Face; a query attends to real keys at or before
    /// it, or, with <paramref name="causal"/> false, to every real key (OpenVLA-OFT's parallel decoding: the forked
    /// transformers' LlamaSdpaAttention replaces the causal mask by its last row, docs/oft.md).
    /// <paramref name="layerRunner"/> lets the caller wrap each decoder layer (e.g. gradient checkpointing).
    /// Returns normed hidden states [B, L, H].
    /// </summary>
    public Tensor Forward(Tensor inputsEmbeds, Tensor? valid, Func<LlamaDecoderLayer, Tensor, Func<Tensor, Tensor>, Tensor>? layerRunner = null, bool causal = true)
    {
        long b = inputsEmbeds.shape[0], l = inputsEmbeds.shape[1];
        if (l > _c.MaxPositionEmbeddings) throw new PolicyInputException($"sequence of {l} tokens exceeds max_position_embeddings {_c.MaxPositionEmbeddings}");
        var device = inputsEmbeds.device;
        // The rotary tables and the mask the layer closures capture belong to the caller's dispose scope, not this
        // method's: a gradient-checkpointing runner re-runs the layers during backward, after this method has returned.
        Tensor cos, sin;
        Tensor? mask = null;
        using (var tables = NewDisposeScope())
        {
            var positions = arange(l, device: device).view(1, l).expand(b, l);
            (cos, sin) = _rope.Gather(positions);
            cos.MoveToOuterDisposeScope();
            sin.MoveToOuterDisposeScope();
            if (valid is not null)
            {
                var pos = arange(l, device: device);
                var seen = causal ? pos.view(1, 1, 1, l).le(pos.view(1, 1, l, 1)) & valid.view(b, 1, 1, l) : valid.view(b, 1, 1, l);
                mask = (seen | pos.view(1, 1, 1, l).eq(pos.view(1, 1, l, 1))).MoveToOuterDisposeScope();
            }
            else if (!causal) mask = ones([1, 1, 1, l], ScalarType.Bool, device).MoveToOuterDisposeScope();   // everything sees everything
        }
        using var scope = NewDisposeScope();
        var x = inputsEmbeds;
        foreach (var layer in model.Layers)
        {
            Tensor Run(Tensor h) => layer.Forward(h, cos, sin, null, 0, mask);
            x = layerRunner is null ? Run(x) : layerRunner(layer, x, Run);
        }
        return model.norm.forward(x).MoveToOuterDisposeScope();
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) _rope.Dispose();
        base.Dispose(disposing);
    }
}
