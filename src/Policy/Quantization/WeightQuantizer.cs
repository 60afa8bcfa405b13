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
    /// <param name="searchRange">int4: the least-squared-error range of <see cref="ClipSearch"/> per group (default), or
    /// the group's min–max (13× faster).</param>
    public static PortableQuantized Quantize(Tensor weight, QuantMode mode, int groupSize, bool searchRange = true)
    {
        using var scope = NewDisposeScope();
        long n = weight.shape[0], k = weight.shape[1];
        var w = weight.to(ScalarType.Float32);
        if (mode == QuantMode.Int8)
        {
            // Symmetric per output channel: scale = max|w| / 127, q = round(w / scale) ∈ [−127, 127].
            // The scale is rounded to bf16 first, since the kernel multiplies by the bf16 value.
            var channelScale = Int8RowScale(w);
            var q = (w / channelScale.unsqueeze(1)).round().clamp(-127, 127).to(ScalarType.Int8);
            return Keep(new PortableQuantized(mode, n, k, 0, q, channelScale.to(ScalarType.BFloat16), null));
        }
        if (mode != QuantMode.Int4) throw new ArgumentException("nothing to quantize for mode None");
        if (k % groupSize != 0) throw new PolicyInputException($"int4 group size {groupSize} does not divide the input width {k}");
        // Asymmetric per group: 16 levels span the group's range; zero is the value of level 8 (the kernel's offset). The
        // range is the group's [min, max] scaled towards 0 by the factor of ClipSearch with the least squared error.
        var qs = new List<Tensor>();
        var scales = new List<Tensor>();
        var zeros = new List<Tensor>();
        for (long row = 0; row < n; row += RowsPerChunk)
        {
            using var chunkScope = NewDisposeScope();
            long rows = Math.Min(RowsPerChunk, n - row);
            var g = w.narrow(0, row, rows).view(rows, k / groupSize, groupSize);
            var (q, scale, zero) = Int4Groups(g, ClipFactors(searchRange));
            qs.Add(q.view(rows, k).MoveToOuterDisposeScope());
            scales.Add(scale.MoveToOuterDisposeScope());
            zeros.Add(zero.MoveToOuterDisposeScope());
        }
        var q4 = cat(qs, 0).to(ScalarType.Byte);
        return Keep(new PortableQuantized(mode, n, k, groupSize, PackNibbles(q4), cat(scales, 0).to(ScalarType.BFloat16), cat(zeros, 0).to(ScalarType.BFloat16)));
    }

    /// <summary>
    /// Factors the int4 range search tries on each group's [min, max]: 1 (min–max, which loses no value to clipping) down
    /// to 0.7 in steps of 0.03. Clipping the few extreme weights of a group buys finer levels for all the others; on the
    /// default model's language model this cut the mean action error against bf16 by 42% (docs/benchmarks.md).
    /// </summary>
    public static readonly double[] ClipSearch = Enumerable.Range(0, 11).Select(i => 1 - 0.03 * i).ToArray();

    /// <summary>The range factors int4 tries: all of <see cref="ClipSearch"/>, or 1 alone (min–max).</summary>
    internal static double[] ClipFactors(bool searchRange) => searchRange ? ClipSearch : ClipSearch[..1];

    /// <summary>int8's per-output-channel scale, max|w| / 127 rounded to bf16 (the kernel multiplies by the bf16 value), as
    /// float32 [N].</summary>
    internal static Tensor Int8RowScale(Tensor w) =>
        (w.abs().amax([1]) / 127).clamp_min(1e-12).to(ScalarType.BFloat16).to(ScalarType.Float32);

    /// <summary>Rows quantized at a time, bounding the search's float32 temporaries (a few copies of this many rows).</summary>
    const long RowsPerChunk = 1024;

    /// <summary>Levels, scale and zero for groups g [rows, groups, size], with the least-squared-error range of the factors.</summary>
    internal static (Tensor Q, Tensor Scale, Tensor Zero) Int4Groups(Tensor g, double[] factors)
    {
        var min = g.amin([2]);
        var max = g.amax([2]);
        (Tensor Q, Tensor Scale, Tensor Zero, Tensor Error) Try(double factor)
        {
            // The scale and zero are rounded to bf16 first so the levels computed here are the ones the kernel reconstructs.
            var scale = ((max - min) * factor / 15).clamp_min(1e-12).to(ScalarType.BFloat16).to(ScalarType.Float32);
            var zero = (min * factor + 8 * scale).to(ScalarType.BFloat16).to(ScalarType.Float32);
            var q = ((g - zero.unsqueeze(2)) / scale.unsqueeze(2) + 8).round().clamp(0, 15);
            var error = ((q - 8) * scale.unsqueeze(2) + zero.unsqueeze(2) - g).square().sum([2]);
            return (q, scale, zero, error);
        }
        var best = Try(factors[0]);
        foreach (double factor in factors.Skip(1))
        {
            // One candidate's temporaries at a time: the kept four tensors move out of the scope, the rest are freed.
            using var scope = NewDisposeScope();
            var c = Try(factor);
            var better = c.Error < best.Error;   // strictly: ties keep the wider range
            var next = (where(better.unsqueeze(2), c.Q, best.Q).MoveToOuterDisposeScope(), where(better, c.Scale, best.Scale).MoveToOuterDisposeScope(),
                where(better, c.Zero, best.Zero).MoveToOuterDisposeScope(), where(better, c.Error, best.Error).MoveToOuterDisposeScope());
            best.Q.Dispose(); best.Scale.Dispose(); best.Zero.Dispose(); best.Error.Dispose();
            best = next;
        }
        return (best.Q, best.Scale, best.Zero);
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
