// Module fields in this folder keep the Hugging Face / timm key names (snake_case) so that the registered state dict
// matches checkpoint keys with no renaming table.
#pragma warning disable IDE1006
using TorchSharp;
using OpenVLA.Policy.Quantization;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;
using F = TorchSharp.torch.nn.functional;

namespace OpenVLA.Policy.Model;

/// <summary>How a model's parameters are created: dtype and device. Parameters start uninitialised
/// (torch.empty) and are filled from the checkpoint, so a 7B model wastes no time on random init.</summary>
public sealed record ModelPrecision(ScalarType DType, Device Device)
{
    public static ModelPrecision Cpu(ScalarType dtype) => new(dtype, CPU);
    // Detached from any dispose scope the caller may be in: parameters live as long as the model.
    internal Parameter Empty(params long[] shape) => new(torch.empty(shape, DType, Device).DetachFromDisposeScope(), requires_grad: false);
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
    Scalar? _loraScalingScalar;
    double _loraDropout;
    Generator? _dropoutGenerator;
    QuantizedWeight? _quantized;

    public Linear(int inFeatures, int outFeatures, bool hasBias, ModelPrecision p) : base(nameof(Linear))
    {
        weight = p.Empty(outFeatures, inFeatures);
        bias = hasBias ? p.Empty(outFeatures) : null;
        InFeatures = inFeatures;
        OutFeatures = outFeatures;
        RegisterComponents();
    }

    public long InFeatures { get; }
    public long OutFeatures { get; }
    public bool HasLora => lora_A is not null;
    public double LoraScaling => _loraScaling;
    /// <summary>The int8/int4 weight when this layer is quantized (then <see cref="weight"/> is an empty placeholder).</summary>
    public QuantizedWeight? Quantized => _quantized;

    /// <summary>Replaces the float weight by its quantized form and frees the float copy.</summary>
    public void Quantize(QuantizationOptions options) => SetQuantized(QuantizedWeight.Quantize(weight, options));

    public void SetQuantized(QuantizedWeight q)
    {
        if (q.OutFeatures != OutFeatures || q.InFeatures != InFeatures)
            throw new ArgumentException($"quantized weight [{q.OutFeatures}, {q.InFeatures}] does not fit a [{OutFeatures}, {InFeatures}] layer");
        _quantized?.Dispose();
        _quantized = q;
        var old = weight;
        weight = new Parameter(torch.empty(0, old.dtype, old.device).DetachFromDisposeScope(), requires_grad: false);
        _internal_params.Remove("weight");
        old.Dispose();
    }

    /// <summary>Bytes of weight storage (float weight or quantized form, plus bias).</summary>
    public long WeightBytes => (_quantized?.ByteSize ?? weight.NumberOfElements * weight.ElementSize)
        + (bias is null ? 0 : bias.NumberOfElements * bias.ElementSize);

    /// <summary>Sees every input of <see cref="forward"/> (calibration: <see cref="Quantization.HessianAccumulator"/>); null
    /// normally.</summary>
    public Action<Tensor>? InputObserver { get; set; }

    public override Tensor forward(Tensor x)
    {
        InputObserver?.Invoke(x);
        var y = _quantized is null ? F.linear(x, weight, bias)
            // Training on a quantized base: the packed kernels have no derivative; this gives the input its gradient.
            : x.requires_grad && torch.is_grad_enabled() ? QuantizedLinearFunction.Apply(x, _quantized, bias)
            : _quantized.Forward(x, bias);
        if (lora_A is null || lora_B is null) return y;
        using var scope = NewDisposeScope();
        var h = x.to(ScalarType.Float32);
        if (_loraDropout > 0 && training)
        {
            // Inverted dropout as F.dropout, but drawn from the generator given to AttachLora rather than the
            // process-wide one, so a training run's masks depend on its own seed alone.
            var keep = torch.empty_like(h).bernoulli_(1 - _loraDropout, _dropoutGenerator);
            h = h * keep / (1 - _loraDropout);
        }
        var delta = lora_B.forward(lora_A.forward(h)).mul(_loraScalingScalar!);
        return y.add(delta.to(y.dtype), KeptScalars.One).MoveToOuterDisposeScope();
    }

    /// <summary>Adds a trainable adapter of rank <paramref name="rank"/>; the base weight and bias stop requiring grad.
    /// <paramref name="generator"/> draws A's init and, in training mode, the dropout masks (null: the global generator).</summary>
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
        _loraScalingScalar = _loraScaling.ToScalar();
        _loraDropout = dropout;
        _dropoutGenerator = generator;
    }

    /// <summary>The weight with the adapter folded in, W + (alpha/r)·B·A computed in float32 and rounded once to the
    /// weight's dtype, as a new tensor (the layer is unchanged); a copy of W when there is no adapter.</summary>
    public Tensor MergedWeight()
    {
        if (_quantized is not null) throw new InvalidOperationException("this layer's weight is quantized; load the base unquantized to merge or save it");
        using var noGrad = torch.no_grad();
        if (lora_A is null || lora_B is null) return weight.detach().clone();
        using var scope = NewDisposeScope();
        var delta = lora_B.weight.matmul(lora_A.weight) * _loraScaling;
        return (weight.to(ScalarType.Float32) + delta).to(weight.dtype).MoveToOuterDisposeScope();
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) { _quantized?.Dispose(); _loraScalingScalar?.Dispose(); }
        base.Dispose(disposing);
    }

    /// <summary>Folds the adapter into the base weight (<see cref="MergedWeight"/>) and removes it.</summary>
    public void MergeLora()
    {
        if (lora_A is null || lora_B is null) return;
        if (_quantized is not null) throw new InvalidOperationException("merge LoRA into a float base, then quantize");
        using (torch.no_grad())
        using (var merged = MergedWeight())
            weight.copy_(merged);
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
    readonly Scalar _eps;

    public RMSNorm(int dim, double eps, ModelPrecision p) : base(nameof(RMSNorm))
    {
        weight = p.Empty(dim);
        _eps = eps.ToScalar();
        RegisterComponents();
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) _eps.Dispose();
        base.Dispose(disposing);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var dtype = x.dtype;
        var h = x.to(ScalarType.Float32);
        var variance = h.square().mean([-1], keepdim: true);
        h = h * rsqrt(variance.add(_eps, KeptScalars.One));
        return (weight * h.to(dtype)).MoveToOuterDisposeScope();
    }
}
