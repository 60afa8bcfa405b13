using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Quantization;

/// <summary>
/// A quantized weight in the portable form stored in pre-quantized checkpoints (docs/quantization.md):
/// int8: Q int8 [N, K], Scale [N] with W ≈ Q·Scale.
/// int4: Q uint8 [N, K/2] nibble-packed (input feature 2j in the low nibble, 2j+1 in the high one, values 0..15),
/// Scale and Zero [N, K/GroupSize] with W ≈ (Q − 8)·Scale + Zero.
/// </summary>
public sealed record PortableQuantized(QuantMode Mode, long OutFeatures, long InFeatures, int GroupSize, Tensor Q, Tensor Scale, Tensor? Zero);

public static class WeightQuantizer
{
    public static PortableQuantized Quantize(Tensor weight, QuantMode mode, int groupSize)
    {
        using var scope = NewDisposeScope();
        long n = weight.shape[0], k = weight.shape[1];
        var w = weight.to(ScalarType.Float32);
        if (mode == QuantMode.Int8)
        {
            // Symmetric per output channel: scale = max|w| / 127, q = round(w / scale) ∈ [−127, 127].
            // The scale is rounded to bf16 first, since the kernel multiplies by the bf16 value.
            var channelScale = (w.abs().amax([1]) / 127).clamp_min(1e-12).to(ScalarType.BFloat16).to(ScalarType.Float32);
            var q = (w / channelScale.unsqueeze(1)).round().clamp(-127, 127).to(ScalarType.Int8);
            return Keep(new PortableQuantized(mode, n, k, 0, q, channelScale.to(ScalarType.BFloat16), null));
        }
        if (mode != QuantMode.Int4) throw new ArgumentException("nothing to quantize for mode None");
        if (k % groupSize != 0) throw new PolicyInputException($"int4 group size {groupSize} does not divide the input width {k}");
        // Asymmetric per group: the group's [min, max] spans 16 levels; zero is the value of level 8 (the kernel's offset).
        var g = w.view(n, k / groupSize, groupSize);
        var min = g.amin([2]);
        var max = g.amax([2]);
        // The scale is rounded to bf16 first so the levels computed here are the ones the kernel will reconstruct.
        var scale = ((max - min) / 15).clamp_min(1e-12).to(ScalarType.BFloat16).to(ScalarType.Float32);
        var zero = (min + 8 * scale).to(ScalarType.BFloat16).to(ScalarType.Float32);
        var q4 = ((g - zero.unsqueeze(2)) / scale.unsqueeze(2) + 8).round().clamp(0, 15).to(ScalarType.Byte).view(n, k);
        return Keep(new PortableQuantized(mode, n, k, groupSize, PackNibbles(q4), scale.to(ScalarType.BFloat16), zero.to(ScalarType.BFloat16)));
    }

    static PortableQuantized Keep(PortableQuantized p)
    {
        p.Q.MoveToOuterDisposeScope();
        p.Scale.MoveToOuterDisposeScope();
        p.Zero?.MoveToOuterDisposeScope();
        return p;
    }

    /// <summary>The float weight a portable quantized tensor stands for.</summary>
    public static Tensor Dequantize(PortableQuantized p, ScalarType dtype = ScalarType.Float32)
    {
        using var scope = NewDisposeScope();
        if (p.Mode == QuantMode.Int8) return (p.Q.to(dtype) * p.Scale.to(dtype).unsqueeze(1)).MoveToOuterDisposeScope();
        var q = UnpackNibbles(p.Q, p.InFeatures).to(ScalarType.Float32).view(p.OutFeatures, -1, p.GroupSize);
        var w = (q - 8) * p.Scale.to(ScalarType.Float32).unsqueeze(2) + p.Zero!.to(ScalarType.Float32).unsqueeze(2);
        return w.view(p.OutFeatures, p.InFeatures).to(dtype).MoveToOuterDisposeScope();
    }

    /// <summary>uint8 [N, K] values 0..15 → [N, K/2], feature 2j low nibble, 2j+1 high nibble.</summary>
    public static Tensor PackNibbles(Tensor q)
    {
        using var scope = NewDisposeScope();
        var pairs = q.to(ScalarType.Int32).view(q.shape[0], -1, 2);
        return (pairs.select(2, 0) + pairs.select(2, 1) * 16).to(ScalarType.Byte).MoveToOuterDisposeScope();
    }

    public static Tensor UnpackNibbles(Tensor packed, long k)
    {
        using var scope = NewDisposeScope();
        var p = packed.to(ScalarType.Int32);
        var low = p.remainder(16);
        var high = p.div(16, rounding_mode: RoundingMode.floor);
        return stack([low, high], 2).view(packed.shape[0], k).to(ScalarType.Byte).MoveToOuterDisposeScope();
    }
}
