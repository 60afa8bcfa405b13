using System.Collections.Concurrent;
using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Quantization;

/// <summary>
/// A linear weight [N out, K in] held in int8 or int4 with its scales, multiplied through ATen's weight-only CPU kernels
/// (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, reached through TorchScript since TorchSharp does not bind
/// them) with bf16 activations. For many rows at once (prefill, ViT tokens) those kernels are slower than a bf16 GEMM,
/// so each layer times both paths for the row count it meets and keeps the faster (<see cref="KernelChoice"/>).
/// </summary>
public sealed class QuantizedWeight : IDisposable
{
    public QuantMode Mode { get; }
    public long OutFeatures { get; }
    public long InFeatures { get; }
    public int GroupSize { get; }

    // int8: Q [N, K] int8, Scale [N] bf16.   int4: Q = kernel-layout packed uint8 [N, K/2], ScaleZero [K/gs, N, 2] bf16.
    readonly Tensor _q;
    readonly Tensor _scale;

    QuantizedWeight(QuantMode mode, long n, long k, int groupSize, Tensor q, Tensor scale)
    {
        Mode = mode; OutFeatures = n; InFeatures = k; GroupSize = groupSize;
        _q = q.DetachFromDisposeScope();
        _scale = scale.DetachFromDisposeScope();
    }

    public long ByteSize => _q.NumberOfElements * _q.ElementSize + _scale.NumberOfElements * _scale.ElementSize;

    /// <summary>Quantizes a float weight [N, K] (any float dtype, any device).</summary>
    public static QuantizedWeight Quantize(Tensor weight, QuantizationOptions options)
    {
        using var scope = NewDisposeScope();
        var parts = WeightQuantizer.Quantize(weight, options.ModeFor(weight.shape[0], weight.shape[1]), options.GroupSize, options.SearchRange);
        return FromPortable(parts, weight.device);
    }

    /// <summary>Builds the kernel layout from the portable (checkpoint) representation.</summary>
    public static QuantizedWeight FromPortable(PortableQuantized p, Device device)
    {
        using var scope = NewDisposeScope();
        if (p.Mode == QuantMode.Int8)
            return new QuantizedWeight(QuantMode.Int8, p.OutFeatures, p.InFeatures, 0, p.Q.to(device), p.Scale.to(ScalarType.BFloat16, device));
        var q = WeightQuantizer.UnpackNibbles(p.Q, p.InFeatures).to(ScalarType.Int32, device);  // [N, K] values 0..15
        var packed = QuantKernels.ConvertInt4(q);
        // [N, G] scale and zero → [G, N, 2] as the kernel wants.
        var sz = stack([p.Scale, p.Zero!], 2).transpose(0, 1).contiguous().to(ScalarType.BFloat16, device);
        return new QuantizedWeight(QuantMode.Int4, p.OutFeatures, p.InFeatures, p.GroupSize, packed, sz);
    }

    /// <summary>x [..., K] → [..., N]. bf16 activations take the fast kernels; float32 activations take the kernels'
    /// exact (slow, scalar) path, which tests use as the reference.</summary>
    public Tensor Forward(Tensor x, Tensor? bias)
    {
        using var scope = NewDisposeScope();
        var shape = x.shape;
        var x2 = x.reshape(-1, InFeatures).contiguous();
        if (x2.dtype != ScalarType.BFloat16 && x2.dtype != ScalarType.Float32) x2 = x2.to(ScalarType.BFloat16);
        long rows = x2.shape[0];
        var y = KernelChoice.UsePacked(this, rows, x2) ? Packed(x2) : Dequantized(x2);
        if (bias is not null) y = y + bias.to(y.dtype);
        var outShape = shape.ToArray();
        outShape[^1] = OutFeatures;
        return y.view(outShape).to(x.dtype).MoveToOuterDisposeScope();
    }

    internal Tensor Packed(Tensor x2)
    {
        // The kernels want scales in the activation dtype.
        using var scale = x2.dtype == _scale.dtype ? null : _scale.to(x2.dtype);
        return Mode == QuantMode.Int8
            ? QuantKernels.Int8Mm(x2, _q, scale ?? _scale)
            : QuantKernels.Int4Mm(x2, _q, GroupSize, scale ?? _scale);
    }

    internal Tensor Dequantized(Tensor x2)
    {
        using var w = Dequantize(x2.dtype);
        return nn.functional.linear(x2, w);
    }

    /// <summary>The float weight [N, K] this represents (exactly what the kernels compute with, up to bf16 rounding).</summary>
    public Tensor Dequantize(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        if (Mode == QuantMode.Int8) return (_q.to(dtype) * _scale.to(dtype).unsqueeze(1)).MoveToOuterDisposeScope();
        // Multiplying the identity through the int4 kernel reads its own layout back: exact, since each output element
        // is one (q − 8)·scale + zero term computed by the kernel itself.
        var eye = torch.eye(InFeatures, dtype: ScalarType.BFloat16, device: _q.device);
        return QuantKernels.Int4Mm(eye, _q, GroupSize, _scale).t().contiguous().to(dtype).MoveToOuterDisposeScope();
    }

    public void Dispose() { _q.Dispose(); _scale.Dispose(); }
}

/// <summary>Per shape and row count, whichever of the packed kernel and dequantize-then-GEMM measured faster.</summary>
internal static class KernelChoice
{
    static readonly ConcurrentDictionary<(QuantMode, long, long, int, long), bool> Choices = new();

    public static bool UsePacked(QuantizedWeight w, long rows, Tensor x2)
    {
        // ATen's _weight_int8pack_mm reads past the rows when the input width is not a multiple of 16 and more than one
        // row comes in (measured: K = 8, 24, 40, 90 crash the process with 17+ rows; 16, 32, 48, 64, 96 are fine).
        if (w.Mode == QuantMode.Int8 && w.InFeatures % 16 != 0) return false;
        if (rows <= 8) return true; // decode steps: the packed GEMV reads 2–4× fewer bytes, never slower
        // The CPU int4 layout is blocked (not plain nibbles), so dequantizing it costs a whole GEMM through the kernel
        // (Dequantize multiplies the identity): int4 always takes the packed kernel.
        if (w.Mode == QuantMode.Int4) return true;
        long bucket = 1L << (int)Math.Ceiling(Math.Log2(rows));
        return Choices.GetOrAdd((w.Mode, w.OutFeatures, w.InFeatures, w.GroupSize, bucket), _ => Measure(w, x2));
    }

    static bool Measure(QuantizedWeight w, Tensor x2)
    {
        double Time(Func<Tensor> f)
        {
            f().Dispose();
            var best = double.MaxValue;
            for (int i = 0; i < 2; i++)
            {
                var sw = Stopwatch.StartNew();
                f().Dispose();
                best = Math.Min(best, sw.Elapsed.TotalMilliseconds);
            }
            return best;
        }
        return Time(() => w.Packed(x2)) <= Time(() => w.Dequantized(x2));
    }
}
