using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Quantization;

/// <summary>
/// The second moment of a linear layer's inputs over calibration data, H = E[x xᵀ] [K, K] in float64: what GPTQ weighs
/// a weight error by (the layer's output error for a weight error D is tr(D H Dᵀ)). Rows are every token position the
/// layer saw, prompt and decoded alike.
/// </summary>
public sealed class HessianAccumulator : IDisposable
{
    readonly Tensor _sum;

    public HessianAccumulator(long inFeatures, Device? device = null)
    {
        InFeatures = inFeatures;
        _sum = zeros([inFeatures, inFeatures], ScalarType.Float64, device ?? CPU).DetachFromDisposeScope();
    }

    public long InFeatures { get; }
    /// <summary>Input rows accumulated so far.</summary>
    public long Rows { get; private set; }

    /// <summary>Adds the rows of x [..., K].</summary>
    public void Add(Tensor x)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var m = x.detach().reshape(-1, InFeatures).to(ScalarType.Float64, _sum.device);
        _sum.add_(m.t().matmul(m));
        Rows += m.shape[0];
    }

    /// <summary>E[x xᵀ] over the rows added (a new tensor).</summary>
    public Tensor Mean()
    {
        if (Rows == 0) throw new InvalidOperationException("no calibration rows reached this layer");
        return _sum / Rows;
    }

    public void Dispose() => _sum.Dispose();
}

/// <summary>
/// GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
/// quantizes a weight one input column at a time and spreads each column's rounding error over the columns not yet
/// quantized, in proportion to how the calibration inputs correlate them (the inverse of H), so that the layer's output
/// rather than its weights stays close. The result has exactly the format of round-to-nearest
/// (<see cref="WeightQuantizer"/>): same levels, scales and zeros, same kernels, same checkpoint tensors. Only which
/// level each weight takes differs.
/// <para>This is the paper's lazy-batch form with the Cholesky factor of H⁻¹. Columns go in their natural order, with int4
/// group ranges fitted when the quantizer reaches a group, on the weights as updated so far; or, with act-order, in
/// decreasing input energy, with the stored groups' ranges fitted up front (static groups).</para>
/// </summary>
public static class Gptq
{
    /// <summary>
    /// Quantizes weight [N, K] against input second moment <paramref name="hessian"/> [K, K].
    /// </summary>
    /// <param name="damp">Added to H's diagonal as a fraction of its mean diagonal (the paper's 1%): keeps the inverse
    /// well conditioned when some input directions are (nearly) never excited by the calibration data.</param>
    /// <param name="searchRange">int4: fit each group's range by <see cref="WeightQuantizer.ClipSearch"/> (as
    /// round-to-nearest does by default) or take its min–max.</param>
    /// <param name="blockSize">Columns updated eagerly before the rest get the block's error in one product (a multiple of
    /// the group size); changes speed, not the result beyond float rounding.</param>
    /// <param name="compute">Float32 (default) or Float64 (tests compare against an unbatched reference in float64).</param>
    public static PortableQuantized Quantize(Tensor weight, Tensor hessian, QuantMode mode, int groupSize, bool searchRange = true,
        double damp = 0.01, int blockSize = 128, ScalarType compute = ScalarType.Float32, bool actOrder = false)
    {
        if (mode == QuantMode.None) throw new ArgumentException("nothing to quantize for mode None");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long n = weight.shape[0], k = weight.shape[1];
        if (hessian.shape[0] != k || hessian.shape[1] != k)
            throw new ArgumentException($"the Hessian is [{string.Join(", ", hessian.shape)}], expected [{k}, {k}] for a weight of {k} inputs");
        if (mode == QuantMode.Int4 && k % groupSize != 0) throw new PolicyInputException($"int4 group size {groupSize} does not divide the input width {k}");
        if (mode == QuantMode.Int4) blockSize = (Math.Max(blockSize, groupSize) + groupSize - 1) / groupSize * groupSize;

        var w = weight.to(compute).clone();
        var h = hessian.to(ScalarType.Float64).clone();
        // Inputs the calibration never excited carry no information: their weights are set to zero (they cannot change
        // the output on such data) and their diagonal to 1 so H stays invertible.
        var dead = h.diagonal().eq(0);
        if (dead.any().item<bool>())
        {
            h.add_(diag(dead.to(ScalarType.Float64)));
            w.masked_fill_(dead.unsqueeze(0), 0);
        }
        // Act-order: the columns with the largest input energy first, while the error can still go to many others. int4's
        // groups stay the natural runs of GroupSize inputs the format stores (static groups: their ranges are fitted on
        // the unquantized weight up front), so the order changes which levels are chosen, not the format.
        Tensor? perm = null, staticScale = null, staticZero = null;
        if (actOrder)
        {
            perm = h.diagonal().argsort(descending: true);
            if (mode == QuantMode.Int4)
            {
                var (_, s0, z0) = WeightQuantizer.Int4Groups(w.to(ScalarType.Float32).view(n, k / groupSize, groupSize),
                    WeightQuantizer.ClipFactors(searchRange));
                staticScale = s0.to(compute); staticZero = z0.to(compute);
            }
            w = w.index_select(1, perm);
            h = h.index_select(0, perm).index_select(1, perm);
        }
        var permuted = perm?.data<long>().ToArray();
        var u = UpperCholeskyOfInverse(h, damp).to(compute);

        // int8's per-row scale comes from the whole row up front (it has no groups), as round-to-nearest's.
        Tensor? rowScale = mode == QuantMode.Int8 ? WeightQuantizer.Int8RowScale(w).to(compute) : null;
        var levels = empty([n, k], compute);
        var scales = new List<Tensor>();
        var zeros = new List<Tensor>();
        Tensor? scale = rowScale, zero = null;

        for (long b = 0; b < k; b += blockSize)
        {
            using var blockScope = NewDisposeScope();
            long count = Math.Min(blockSize, k - b);
            var w1 = w.narrow(1, b, count).clone();
            var err1 = empty([n, count], compute);
            var u1 = u.narrow(0, b, count).narrow(1, b, count);
            for (long i = 0; i < count; i++)
            {
                long col = b + i;
                if (staticScale is not null)
                {
                    long group = permuted![col] / groupSize;
                    scale = staticScale.select(1, group);
                    zero = staticZero!.select(1, group);
                }
                else if (mode == QuantMode.Int4 && col % groupSize == 0)
                {
                    var (_, s, z) = WeightQuantizer.Int4Groups(w1.narrow(1, i, groupSize).to(ScalarType.Float32).unsqueeze(1),
                        WeightQuantizer.ClipFactors(searchRange));
                    scale = s.to(compute).MoveToOuterDisposeScope();
                    zero = z.to(compute).MoveToOuterDisposeScope();
                    scales.Add(scale); zeros.Add(zero);
                    scale = scale.squeeze(1); zero = zero.squeeze(1);
                }
                var x = w1.select(1, i);
                Tensor q, dq;
                if (mode == QuantMode.Int8)
                {
                    q = (x / scale!).round().clamp(-127, 127);
                    dq = q * scale!;
                }
                else
                {
                    q = ((x - zero!) / scale! + 8).round().clamp(0, 15);
                    dq = (q - 8) * scale! + zero!;
                }
                levels.select(1, permuted?[col] ?? col).copy_(q);
                var e = (x - dq) / u1[i, i];
                w1.narrow(1, i, count - i).sub_(e.unsqueeze(1) * u1[i].narrow(0, i, count - i).unsqueeze(0));
                err1.select(1, i).copy_(e);
            }
            if (b + count < k)
                w.narrow(1, b + count, k - b - count).sub_(err1.matmul(u.narrow(0, b, count).narrow(1, b + count, k - b - count)));
        }

        PortableQuantized result = mode == QuantMode.Int8
            ? new(mode, n, k, 0, levels.to(ScalarType.Int8), rowScale!.to(ScalarType.BFloat16), null)
            : new(mode, n, k, groupSize, WeightQuantizer.PackNibbles(levels.to(ScalarType.Byte)),
                (staticScale ?? cat(scales, 1)).to(ScalarType.BFloat16), (staticZero ?? cat(zeros, 1)).to(ScalarType.BFloat16));
        result.Q.MoveToOuterDisposeScope();
        result.Scale.MoveToOuterDisposeScope();
        result.Zero?.MoveToOuterDisposeScope();
        return result;
    }

    /// <summary>U upper triangular with H⁻¹ = Uᵀ U, after damping H. A Hessian that is still not positive definite (a
    /// degenerate calibration) is damped ten times harder, twice, before giving up.</summary>
    static Tensor UpperCholeskyOfInverse(Tensor h, double damp)
    {
        double meanDiag = h.diagonal().mean().item<double>();
        for (int attempt = 0; attempt < 3; attempt++, damp *= 10)
        {
            using var scope = NewDisposeScope();
            var damped = h + eye(h.shape[0], dtype: ScalarType.Float64, device: h.device) * (damp * meanDiag);
            var (l, info) = linalg.cholesky_ex(damped);
            if (info.item<int>() != 0) continue;
            var inverse = l.cholesky_inverse();
            var (lu, info2) = linalg.cholesky_ex(inverse);
            if (info2.item<int>() != 0) continue;
            return lu.t().contiguous().MoveToOuterDisposeScope();
        }
        throw new PolicyInputException("GPTQ: the calibration inputs' second moment is not positive definite even with damping; use more or more varied calibration samples");
    }

    /// <summary>
    /// The layer's output error on the calibration inputs relative to its output: tr(D H Dᵀ) / tr(W H Wᵀ) with D the
    /// quantized weight minus the float one. What GPTQ minimises; reported per layer by `openvla quantize --calibration`.
    /// </summary>
    public static double RelativeOutputError(Tensor weight, Tensor quantized, Tensor hessian)
    {
        using var scope = NewDisposeScope();
        var w = weight.to(ScalarType.Float64);
        var d = quantized.to(ScalarType.Float64) - w;
        var h = hessian.to(ScalarType.Float64);
        double num = (d.matmul(h) * d).sum().item<double>();
        double den = (w.matmul(h) * w).sum().item<double>();
        return den > 0 ? num / den : 0;
    }
}
