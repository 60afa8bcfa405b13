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

/// <summary>
/// A linear layer y = x·Wᵀ (+ b) whose weight is stored [out, in], as nn.Linear and the checkpoints store it.
/// Optionally carries a LoRA adapter with PEFT's names and semantics: y += dropout(x)·Aᵀ·Bᵀ·(alpha/r), A [r, in] drawn
/// N(0, 1/r²) (PEFT "gaussian"), B [out, r] zero, both kept in float32 as master weights whatever the base precision.
/// </summary>
public sealed class Linear : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    public Parameter? bias;
    public Linear? lora_A;
    public Linear? lora_B;
    double _loraScaling;
    double _loraDropout;

    public Linear(int inFeatures, int outFeatures, bool hasBias, ModelPrecision p) : base(nameof(Linear))
    {
        weight = p.Empty(outFeatures, inFeatures);
        bias = hasBias ? p.Empty(outFeatures) : null;
        RegisterComponents();
    }

    public long InFeatures => weight.shape[1];
    public long OutFeatures => weight.shape[0];
    public bool HasLora => lora_A is not null;
    public double LoraScaling => _loraScaling;

    public override Tensor forward(Tensor x)
    {
        var y = F.linear(x, weight, bias);
        if (lora_A is null || lora_B is null) return y;
        using var scope = NewDisposeScope();
        var h = x.to(ScalarType.Float32);
        if (_loraDropout > 0 && training) h = F.dropout(h, _loraDropout, training: true);
        var delta = lora_B.forward(lora_A.forward(h)) * _loraScaling;
        return (y + delta.to(y.dtype)).MoveToOuterDisposeScope();
    }

    /// <summary>Adds a trainable adapter of rank <paramref name="rank"/>; the base weight and bias stop requiring grad.</summary>
    public void AttachLora(int rank, double alpha, double dropout, Generator? generator = null)
    {
        if (lora_A is not null) throw new InvalidOperationException("this layer already has a LoRA adapter");
        var f32 = new ModelPrecision(ScalarType.Float32, weight.device);
        var a = new Linear((int)InFeatures, rank, false, f32);
        var b = new Linear(rank, (int)OutFeatures, false, f32);
        using (torch.no_grad())
        {
            a.weight.normal_(0, 1.0 / rank, generator);
            b.weight.zero_();
        }
        a.weight.requires_grad = true;
        b.weight.requires_grad = true;
        weight.requires_grad = false;
        if (bias is not null) bias.requires_grad = false;
        lora_A = a;
        lora_B = b;
        register_module("lora_A", a);
        register_module("lora_B", b);
        _loraScaling = alpha / rank;
        _loraDropout = dropout;
    }

    /// <summary>Folds the adapter into the base weight (W += (alpha/r)·B·A, computed in float32) and removes it.</summary>
    public void MergeLora()
    {
        if (lora_A is null || lora_B is null) return;
        using (torch.no_grad())
        using (var scope = NewDisposeScope())
        {
            var delta = lora_B.weight.matmul(lora_A.weight) * _loraScaling;
            weight.copy_((weight.to(ScalarType.Float32) + delta).to(weight.dtype));
        }
        lora_A.Dispose();
        lora_B.Dispose();
        lora_A = null;
        lora_B = null;
        // RegisterComponents registered nothing under these names at construction; drop the late registrations.
        _internal_submodules.Remove("lora_A");
        _internal_submodules.Remove("lora_B");
    }
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
