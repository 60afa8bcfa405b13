// Field names follow the openvla-oft state-dict keys (prismatic/models/action_heads.py, projectors.py).
#pragma warning disable IDE1006
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace OpenVLA.Policy.Model;

/// <summary>openvla-oft ProprioProjector: fc1 (proprio → llm) → exact-erf GELU → fc2 (llm → llm); one token per row.</summary>
public sealed class ProprioProjector : nn.Module<Tensor, Tensor>
{
    public Linear fc1;
    public Linear fc2;

    public ProprioProjector(int proprioDim, int llmDim, ModelPrecision p) : base(nameof(ProprioProjector))
    {
        fc1 = new Linear(proprioDim, llmDim, true, p);
        fc2 = new Linear(llmDim, llmDim, true, p);
        RegisterComponents();
    }

    /// <summary>normalized proprio [B, P] → [B, llm].</summary>
    public override Tensor forward(Tensor proprio)
    {
        using var scope = NewDisposeScope();
        return fc2.forward(F.gelu(fc1.forward(proprio))).MoveToOuterDisposeScope();
    }
}

/// <summary>openvla-oft MLPResNetBlock: x + ReLU(Linear(LayerNorm(x))) ("ffn" = Sequential(LayerNorm, Linear, ReLU)).</summary>
public sealed class MlpResNetBlock : nn.Module<Tensor, Tensor>
{
    public nn.Module ffn;
    readonly nn.Module<Tensor, Tensor>[] _ffn;   // [LayerNorm, Linear]: an array, so only "ffn" registers them

    public MlpResNetBlock(int dim, ModelPrecision p) : base(nameof(MlpResNetBlock))
    {
        _ffn = [new LayerNorm(dim, 1e-5, p), new Linear(dim, dim, true, p)];
        ffn = nn.ModuleList(_ffn);   // keys ffn.0.*, ffn.1.* (ffn.2 is the ReLU, without parameters)
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return x.add(F.relu(_ffn[1].forward(_ffn[0].forward(x))), KeptScalars.One).MoveToOuterDisposeScope();
    }
}

/// <summary>openvla-oft MLPResNet: LayerNorm → fc1 → ReLU → blocks → LayerNorm → fc2 (PyTorch LayerNorm eps 1e-5).</summary>
public sealed class MlpResNet : nn.Module<Tensor, Tensor>
{
    public LayerNorm layer_norm1;
    public Linear fc1;
    public nn.Module mlp_resnet_blocks;
    public LayerNorm layer_norm2;
    public Linear fc2;
    readonly MlpResNetBlock[] _blocks;

    public MlpResNet(int numBlocks, int inputDim, int hiddenDim, int outputDim, ModelPrecision p) : base(nameof(MlpResNet))
    {
        layer_norm1 = new LayerNorm(inputDim, 1e-5, p);
        fc1 = new Linear(inputDim, hiddenDim, true, p);
        _blocks = Enumerable.Range(0, numBlocks).Select(_ => new MlpResNetBlock(hiddenDim, p)).ToArray();
        mlp_resnet_blocks = nn.ModuleList(_blocks);
        layer_norm2 = new LayerNorm(hiddenDim, 1e-5, p);
        fc2 = new Linear(hiddenDim, outputDim, true, p);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        x = F.relu(fc1.forward(layer_norm1.forward(x)));
        foreach (var block in _blocks) x = block.forward(x);
        return fc2.forward(layer_norm2.forward(x)).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// openvla-oft L1RegressionActionHead: the final hidden states of the chunk's action_dim·chunk positions, grouped per
/// action ([B, chunk·A, H] → [B, chunk, A·H]), through a 2-block MLP-ResNet to [B, chunk, A] normalized actions.
/// </summary>
public sealed class L1RegressionActionHead : nn.Module<Tensor, Tensor>
{
    public MlpResNet model;
    public int ActionDim { get; }

    public L1RegressionActionHead(int llmDim, int actionDim, ModelPrecision p) : base(nameof(L1RegressionActionHead))
    {
        ActionDim = actionDim;
        model = new MlpResNet(2, llmDim * actionDim, llmDim, actionDim, p);
        RegisterComponents();
    }

    /// <summary>actions' hidden states [B, chunk·A, H] → normalized chunk [B, chunk, A].</summary>
    public override Tensor forward(Tensor actionHidden)
    {
        long b = actionHidden.shape[0], positions = actionHidden.shape[1];
        if (positions % ActionDim != 0) throw new ArgumentException($"{positions} action positions are not a whole number of {ActionDim}-D actions");
        using var grouped = actionHidden.reshape(b, positions / ActionDim, -1);
        return model.forward(grouped);
    }
}
