// Module fields in this folder keep the Hugging Face / timm key names (snake_case) so that the registered state dict
// matches checkpoint keys with no renaming table.
#pragma warning disable IDE1006
using TorchSharp;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;
using F = TorchSharp.torch.nn.functional;

namespace OpenVLA.Policy.Model;

/// <summary>How a model's parameters are created: dtype and device. Parameters start uninitialised
/// (torch.empty) and are filled from the checkpoint, so a 7B model wastes no time on random init.</summary>
public sealed record ModelPrecision(ScalarType DType, Device Device)
{
    public static ModelPrecision Cpu(ScalarType dtype) => new(dtype, CPU);
    internal Parameter Empty(params long[] shape) => new(torch.empty(shape, DType, Device), requires_grad: false);
}

/// <summary>A linear layer y = x·Wᵀ (+ b) whose weight is stored [out, in], as nn.Linear and the checkpoints store it.</summary>
public sealed class Linear : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    public Parameter? bias;

    public Linear(int inFeatures, int outFeatures, bool hasBias, ModelPrecision p) : base(nameof(Linear))
    {
        weight = p.Empty(outFeatures, inFeatures);
        bias = hasBias ? p.Empty(outFeatures) : null;
        RegisterComponents();
    }

    public long InFeatures => weight.shape[1];
    public long OutFeatures => weight.shape[0];

    public override Tensor forward(Tensor x) => F.linear(x, weight, bias);
}

/// <summary>LayerNorm with affine parameters (timm ViTs use eps 1e-6).</summary>
public sealed class LayerNorm : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    public Parameter bias;
    readonly double _eps;
    readonly long[] _shape;

    public LayerNorm(int dim, double eps, ModelPrecision p) : base(nameof(LayerNorm))
    {
        weight = p.Empty(dim);
        bias = p.Empty(dim);
        _eps = eps;
        _shape = [dim];
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => F.layer_norm(x, _shape, weight, bias, _eps);
}

/// <summary>Llama RMSNorm, computed in float32 and cast back, as Hugging Face LlamaRMSNorm does.</summary>
public sealed class RMSNorm : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    readonly double _eps;

    public RMSNorm(int dim, double eps, ModelPrecision p) : base(nameof(RMSNorm))
    {
        weight = p.Empty(dim);
        _eps = eps;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var dtype = x.dtype;
        var h = x.to(ScalarType.Float32);
        var variance = h.pow(2).mean([-1], keepdim: true);
        h = h * rsqrt(variance + _eps);
        return (weight * h.to(dtype)).MoveToOuterDisposeScope();
    }
}
