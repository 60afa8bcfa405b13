using OpenVLA.Policy.Model;
using OpenVLA.Policy.Quantization;
using OpenVLA.Tests.Policy;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.Quantization;

/// <summary>GPTQ (<see cref="Gptq"/>) and the input statistics it is calibrated on.</summary>
public sealed class GptqTests
{
    /// <summary>Inputs whose features are strongly correlated, as a network's activations are: most of their energy in k/4
    /// directions (x = z·A with z [rows, k/4]) plus a little independent noise.</summary>
    static Tensor CorrelatedInputs(long rows, long k, int seed)
    {
        var g = new Generator((ulong)seed);
        var mix = randn(k / 4, k, generator: g) / Math.Sqrt(k / 4);
        return randn(rows, k / 4, generator: g).matmul(mix) + randn(rows, k, generator: g) * 0.1;
    }

    static Tensor SecondMoment(Tensor x) => (x.to(ScalarType.Float64).t().matmul(x.to(ScalarType.Float64))) / x.shape[0];

    [Theory]
    [InlineData("int4", true, false)]
    [InlineData("int4", false, false)]
    [InlineData("int4", true, true)]
    [InlineData("int8", true, false)]
    [InlineData("int8", true, true)]
    public void WithUncorrelatedInputsItIsRoundToNearest(string mode, bool searchRange, bool actOrder)
    {
        // A diagonal H leaves no other column to take a column's error, so each weight goes to its nearest level with the
        // same group ranges as round-to-nearest, in either column order.
        var m = mode == "int4" ? QuantMode.Int4 : QuantMode.Int8;
        var w = randn(24, 96, generator: new Generator(3)) * 0.05;
        var h = diag(rand(96, generator: new Generator(4), dtype: ScalarType.Float64) + 0.1);
        var gptq = Gptq.Quantize(w, h, m, 32, searchRange, actOrder: actOrder);
        var rtn = WeightQuantizer.Quantize(w, m, 32, searchRange);
        Assert.True(Tensors.Identical(rtn.Q, gptq.Q));
        Assert.True(Tensors.Identical(rtn.Scale, gptq.Scale));
        if (m == QuantMode.Int4) Assert.True(Tensors.Identical(rtn.Zero!, gptq.Zero!));
    }

    /// <summary>
    /// GPTQ as the paper first states it, one column at a time with the inverse Hessian downdated after each (no Cholesky,
    /// no lazy blocks), int4 with min–max group ranges fitted when a group is reached, in float64. Returns the levels.
    /// </summary>
    static Tensor ReferenceLevels(Tensor weight, Tensor hessian, int groupSize, long[] order, Tensor? staticScale, Tensor? staticZero)
    {
        long n = weight.shape[0], k = weight.shape[1];
        var w = weight.to(ScalarType.Float64).clone();
        var h = hessian.clone();
        h += eye(k, dtype: ScalarType.Float64) * (0.01 * h.diagonal().mean().item<double>());
        var hinv = linalg.inv(h);
        var levels = zeros(n, k, ScalarType.Float64);
        var remaining = order.ToList();
        Tensor scale = null!, zero = null!;
        foreach (long j in order)
        {
            remaining.Remove(j);
            if (staticScale is not null) { scale = staticScale.select(1, j / groupSize).to(ScalarType.Float64); zero = staticZero!.select(1, j / groupSize).to(ScalarType.Float64); }
            else if (j % groupSize == 0)
            {
                var g = w.narrow(1, j, groupSize).to(ScalarType.Float32);
                var (mn, mx) = (g.amin([1]), g.amax([1]));
                var s = ((mx - mn) * 1.0 / 15).clamp_min(1e-12).to(ScalarType.BFloat16).to(ScalarType.Float32);
                scale = s.to(ScalarType.Float64);
                zero = (mn * 1.0 + 8 * s).to(ScalarType.BFloat16).to(ScalarType.Float64);
            }
            var x = w.select(1, j);
            var q = ((x - zero) / scale + 8).round().clamp(0, 15);
            levels.select(1, j).copy_(q);
            var e = (x - ((q - 8) * scale + zero)) / hinv[j, j];
            foreach (long c in remaining) w.select(1, c).sub_(e * hinv[j, c]);
            hinv = hinv - hinv[.., j].unsqueeze(1).matmul(hinv[j].unsqueeze(0)) / hinv[j, j];
        }
        return levels;
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void LazyBlocksAndTheCholeskyFactorGiveTheColumnByColumnResult(bool actOrder)
    {
        var w = randn(12, 96, generator: new Generator(5)) * 0.05;
        var h = SecondMoment(CorrelatedInputs(400, 96, seed: 6));
        // Blocks of 32 over groups of 16: three blocks, each with two groups, so both the in-block and the cross-block
        // updates are exercised.
        var gptq = Gptq.Quantize(w, h, QuantMode.Int4, 16, searchRange: false, blockSize: 32, compute: ScalarType.Float64, actOrder: actOrder);
        long[] order = actOrder ? h.diagonal().argsort(descending: true).data<long>().ToArray() : Enumerable.Range(0, 96).Select(i => (long)i).ToArray();
        Tensor? s = null, z = null;
        if (actOrder)
        {
            var rtn = WeightQuantizer.Quantize(w, QuantMode.Int4, 16, searchRange: false);
            (s, z) = (rtn.Scale.to(ScalarType.Float32), rtn.Zero!.to(ScalarType.Float32));
        }
        var expected = ReferenceLevels(w, h, 16, order, s, z).to(ScalarType.Byte);
        Assert.True(Tensors.Identical(expected, WeightQuantizer.UnpackNibbles(gptq.Q, 96)));
    }

    [Theory]
    [InlineData("int4", false)]
    [InlineData("int4", true)]
    [InlineData("int8", true)]
    public void CorrelatedInputsLoseMuchLessOutputThanRoundToNearest(string mode, bool actOrder)
    {
        var m = mode == "int4" ? QuantMode.Int4 : QuantMode.Int8;
        var x = CorrelatedInputs(2048, 128, seed: 7);
        var h = SecondMoment(x);
        var w = randn(64, 128, generator: new Generator(8)) * 0.05;
        var gptq = WeightQuantizer.Dequantize(Gptq.Quantize(w, h, m, 32, actOrder: actOrder));
        var rtn = WeightQuantizer.Dequantize(WeightQuantizer.Quantize(w, m, 32));
        double gptqError = Gptq.RelativeOutputError(w, gptq, h), rtnError = Gptq.RelativeOutputError(w, rtn, h);
        // The reported error is the output's: ‖x(W − Ŵ)ᵀ‖² / ‖xWᵀ‖² on the calibration rows.
        var xd = x.to(ScalarType.Float64);
        double direct = (xd.matmul((gptq - w).t().to(ScalarType.Float64)).square().sum() / xd.matmul(w.t().to(ScalarType.Float64)).square().sum()).item<double>();
        Assert.Equal(direct, gptqError, 1e-9);
        Assert.True(gptqError < 0.3 * rtnError, $"GPTQ {gptqError:e3} vs round-to-nearest {rtnError:e3}");
    }

    [Fact]
    public void AnInputTheCalibrationNeverExcitesGetsZeroWeight()
    {
        var x = CorrelatedInputs(500, 64, seed: 9);
        x.select(1, 5).zero_();
        var h = SecondMoment(x);
        var w = randn(16, 64, generator: new Generator(10)) * 0.05;
        var int8 = WeightQuantizer.Dequantize(Gptq.Quantize(w, h, QuantMode.Int8, 0));
        Assert.True(int8.select(1, 5).eq(0).all().item<bool>());
        var p4 = Gptq.Quantize(w, h, QuantMode.Int4, 32);
        var int4 = WeightQuantizer.Dequantize(p4);
        Assert.True(int4.isfinite().all().item<bool>());
        // Zero is not a level of an asymmetric group, but the nearest level is within half a step of it.
        var step = p4.Scale.to(ScalarType.Float32).select(1, 0);
        Assert.True((int4.select(1, 5).abs() <= step * 0.5 + 1e-6).all().item<bool>());
    }

    [Fact]
    public void TheAccumulatorSeesEveryRowALinearLayerIsGiven()
    {
        using var layer = new Linear(6, 4, true, new ModelPrecision(ScalarType.Float32, CPU));
        using var acc = new HessianAccumulator(6);
        layer.InputObserver = acc.Add;
        var a = randn(2, 5, 6, generator: new Generator(11));
        var b = randn(3, 6, generator: new Generator(12));
        using (no_grad()) { layer.forward(a); layer.forward(b); }
        Assert.Equal(13, acc.Rows);
        var rows = cat([a.reshape(-1, 6), b], 0);
        Assert.True(acc.Mean().allclose(SecondMoment(rows), rtol: 1e-12, atol: 1e-12));
        Assert.Throws<InvalidOperationException>(() => new HessianAccumulator(3).Mean());
    }
}
