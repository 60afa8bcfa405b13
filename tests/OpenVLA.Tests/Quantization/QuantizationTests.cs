using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Quantization;
using OpenVLA.Tests.Policy;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.Quantization;

public class QuantizationTests
{
    [Fact]
    public void Int8RoundTripErrorIsAtMostHalfAStepPerChannel()
    {
        var w = randn(64, 96, generator: new Generator(1)) * 0.05;
        var q = WeightQuantizer.Quantize(w, QuantMode.Int8, 0);
        Assert.Equal(ScalarType.Int8, q.Q.dtype);
        Assert.True(q.Q.abs().max().item<sbyte>() <= 127);
        var err = (WeightQuantizer.Dequantize(q) - w).abs();
        var step = q.Scale.to(ScalarType.Float32).unsqueeze(1);
        // round(w/s)·s is within s/2 of w; the bf16-rounded scale lets the largest |w| clamp by at most 0.4 % more.
        Assert.True((err <= step * 0.51).all().item<bool>(), $"max err/step {(err / step).max().item<float>()}");
    }

    [Theory]
    [InlineData(32)]
    [InlineData(64)]
    [InlineData(128)]
    public void Int4ErrorIsHalfAStepInsideTheRangeAndNoWorseThanMinMaxPerGroup(int groupSize)
    {
        var w = randn(48, 256, generator: new Generator(2)) * 0.05 + 0.01;
        var q = WeightQuantizer.Quantize(w, QuantMode.Int4, groupSize);
        Assert.Equal([48L, 128L], q.Q.shape); // two 4-bit values per byte
        Assert.Equal([48L, 256L / groupSize], q.Scale.shape);
        var g = w.view(48, -1, groupSize);
        var err = (WeightQuantizer.Dequantize(q).view(48, -1, groupSize) - g).abs();
        var scale = q.Scale.to(ScalarType.Float32).unsqueeze(2);
        var zero = q.Zero!.to(ScalarType.Float32).unsqueeze(2);
        // Inside the chosen range (levels 0..15 around zero = level 8): half a level, plus the bf16 rounding of the stored
        // zero point (|zero|·2⁻⁸). Outside it the weight is clipped to the end level.
        var inside = (g >= zero - 8 * scale) & (g <= zero + 7 * scale);
        var bound = scale * 0.5 + zero.abs() / 256 + 1e-6;
        Assert.True((err <= bound).logical_or(inside.logical_not()).all().item<bool>(), $"max err/step {(err / scale).max().item<float>()}");
        var clippedBound = (g - (zero + 7 * scale)).clamp_min(0) + (zero - 8 * scale - g).clamp_min(0) + bound;
        Assert.True((err <= clippedBound).all().item<bool>());

        // The min–max range by hand: no group's squared error may exceed it (the search starts from it).
        var min = g.amin([2], keepdim: true);
        var mmScale = ((g.amax([2], keepdim: true) - min) / 15).to(ScalarType.BFloat16).to(ScalarType.Float32);
        var mmZero = (min + 8 * mmScale).to(ScalarType.BFloat16).to(ScalarType.Float32);
        var mm = ((g - mmZero) / mmScale + 8).round().clamp(0, 15);
        var mmErr = ((mm - 8) * mmScale + mmZero - g).square().sum([2]);
        var searchErr = err.square().sum([2]);
        Assert.True((searchErr <= mmErr * (1 + 1e-5) + 1e-12).all().item<bool>());
        Assert.True(searchErr.sum().item<float>() < 0.95f * mmErr.sum().item<float>(), "Gaussian groups gain from clipping their extremes");

        // Without the search, the levels are min–max's exactly.
        var plain = WeightQuantizer.Quantize(w, QuantMode.Int4, groupSize, searchRange: false);
        Assert.True(Tensors.Identical(((mm - 8) * mmScale + mmZero).view(48, 256), WeightQuantizer.Dequantize(plain)));
    }

    [Fact]
    public void NibblePackingRoundTripsAndPutsEvenFeaturesInTheLowNibble()
    {
        var q = tensor(new byte[] { 1, 15, 0, 7, 9, 2 }).view(1, 6);
        var packed = WeightQuantizer.PackNibbles(q);
        Assert.Equal(new byte[] { 1 + 15 * 16, 0 + 7 * 16, 9 + 2 * 16 }, packed.data<byte>().ToArray());
        Assert.True(Tensors.Identical(q, WeightQuantizer.UnpackNibbles(packed, 6)));
    }

    [Theory]
    [InlineData("int8")]
    [InlineData("int4")]
    public void PackedKernelAndDequantizedGemmAgree(string mode)
    {
        var options = QuantizationOptions.Parse(mode, 32);
        var w = randn(96, 128, generator: new Generator(3)) * 0.05;
        using var qw = QuantizedWeight.Quantize(w, options);
        var x = randn(5, 128, generator: new Generator(4)).to(ScalarType.BFloat16);
        var reference = nn.functional.linear(x.to(ScalarType.Float32), WeightQuantizer.Dequantize(WeightQuantizer.Quantize(w, options.Mode, 32)));
        var packed = qw.Packed(x).to(ScalarType.Float32);
        var dequant = qw.Dequantized(x).to(ScalarType.Float32);
        // Both use the same quantized weight; they differ only by bf16 arithmetic (relative ~2⁻⁸).
        double Rel(Tensor a) => ((a - reference).norm() / reference.norm()).item<float>();
        Assert.InRange(Rel(packed), 0, 1e-2);
        Assert.InRange(Rel(dequant), 0, 1e-2);
        // Dequantize() reads the kernel's own layout back exactly.
        Assert.True(qw.Dequantize(ScalarType.Float32).allclose(WeightQuantizer.Dequantize(WeightQuantizer.Quantize(w, options.Mode, 32)), rtol: 1e-2, atol: 1e-3));
    }

    /// <summary>Rewrites every covered linear weight of a tiny f32 checkpoint so the chosen scheme represents it exactly.</summary>
    static void MakeExactlyRepresentable(string dir, QuantMode mode, int groupSize)
    {
        var path = Path.Combine(dir, "model.safetensors");
        var tensors = new Dictionary<string, Tensor>();
        var options = new QuantizationOptions(mode, groupSize);
        var config = VlaConfig.Load(Path.Combine(dir, "config.json"));
        var linear = CheckpointLayout.Enumerate(config)
            .Where(s => s.UsedByInference && s.Shape.Length == 2 && !s.Name.EndsWith("embed_tokens.weight") && options.Covers(s.Name)).Select(s => s.Name).ToHashSet();
        var gen = new Generator(9);
        using (var st = SafetensorsFile.Open(path))
            foreach (var name in st.Tensors.Keys)
            {
                var t = st.Load(name);
                if (linear.Contains(name))
                {
                    long n = t.shape[0], k = t.shape[1];
                    double s = Math.Pow(2, -Math.Ceiling(Math.Log2(Math.Sqrt(k))) - 3); // a power of two ≈ 1/(8√k)
                    if (mode == QuantMode.Int8)
                    {
                        var q = randint(-127, 128, [n, k], generator: gen).to(ScalarType.Float32);
                        q.select(1, 0).fill_(127); // every row reaches ±127, so scale = s exactly
                        t = q * s;
                    }
                    else
                    {
                        var q = randint(0, 16, [n, k / groupSize, groupSize], generator: gen).to(ScalarType.Float32);
                        q.select(2, 0).fill_(0);   // every group spans all 16 levels
                        q.select(2, 1).fill_(15);
                        t = ((q - 8) * s).view(n, k); // scale s, zero 0
                    }
                }
                tensors[name] = t;
            }
        SafetensorsWriter.Write(path, tensors);
    }

    [Theory]
    [InlineData("int8")]
    [InlineData("int4")]
    public void QuantizedPathGivesTheF32TokensOnExactlyRepresentableWeights(string mode)
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp.Path, "tiny", seed: 21, ScalarType.Float32);
        MakeExactlyRepresentable(tmp.Path, mode == "int8" ? QuantMode.Int8 : QuantMode.Int4, 32);
        using var reference = VlaPolicy.Load(tmp.Path, new PolicyOptions { DType = "f32" });
        // f32 activations run the quantized kernels' exact path, so any difference would come from the quantized weights.
        using var quantized = VlaPolicy.Load(tmp.Path, new PolicyOptions { Quantize = mode, GroupSize = 32, DType = "f32" });
        Assert.Equal(mode == "int8" ? "int8" : "int4-g32", quantized.Description.Quantization);

        // The quantized layers hold exactly the reference weights.
        var name = "language_model.model.layers.1.mlp.up_proj";
        var refLin = (Linear)reference.Model.named_modules().Single(m => m.name == name).module;
        var qLin = (Linear)quantized.Model.named_modules().Single(m => m.name == name).module;
        Assert.NotNull(qLin.Quantized);
        Assert.True(Tensors.Identical(refLin.weight, qLin.Quantized!.Dequantize(ScalarType.Float32)));

        for (int seed = 0; seed < 3; seed++)
        {
            var obs = new VlaObservation([Frames.Noise(56, seed)], "put the green cube on the plate", "sim_tabletop");
            Assert.Equal(reference.Predict(obs).ActionTokenIds, quantized.Predict(obs).ActionTokenIds);
        }
    }

    [Theory]
    [InlineData("int8")]
    [InlineData("int4")]
    public void PreQuantizedCheckpointRoundTripsAndIsSmaller(string mode)
    {
        using var src = new TestPaths.TempDir();
        using var dst = new TestPaths.TempDir();
        CheckpointMaker.Write(src.Path, "tiny", seed: 4, ScalarType.BFloat16, maxShardBytes: 300_000);
        var options = QuantizationOptions.Parse(mode, 32);
        QuantizedCheckpointWriter.Write(src.Path, dst.Path, options);

        var stored = VlaConfig.Load(dst["config.json"]).StoredQuantization;
        Assert.Equal(options, stored);
        // Covered linear weights are stored in their portable int form; everything else is copied unchanged.
        var tensors = new Dictionary<string, SafetensorInfo>();
        foreach (var f in Directory.GetFiles(dst.Path, "model-*.safetensors"))
        {
            using var st = SafetensorsFile.Open(f);
            foreach (var (k, v) in st.Tensors) tensors[k] = v;
        }
        var up = "language_model.model.layers.0.mlp.up_proj"; // [128 out, 64 in]
        if (mode == "int8")
        {
            Assert.Equal("I8", tensors[up + ".weight"].DType); Assert.Equal(new long[] { 128, 64 }, tensors[up + ".weight"].Shape);
            Assert.Equal("BF16", tensors[up + ".weight_scale"].DType); Assert.Equal(new long[] { 128 }, tensors[up + ".weight_scale"].Shape);
        }
        else
        {
            Assert.Equal("U8", tensors[up + ".weight"].DType); Assert.Equal(new long[] { 128, 32 }, tensors[up + ".weight"].Shape);
            Assert.Equal("BF16", tensors[up + ".weight_zero"].DType); Assert.Equal(new long[] { 128, 2 }, tensors[up + ".weight_zero"].Shape);
        }
        Assert.Equal("BF16", tensors["language_model.model.embed_tokens.weight"].DType);
        Assert.Equal("BF16", tensors["vision_backbone.fused_featurizer.attn_pool.q.weight"].DType); // unused: copied as is

        using var fromBf16 = VlaPolicy.Load(src.Path, new PolicyOptions { Quantize = mode, GroupSize = 32 });
        using var preQuantized = VlaPolicy.Load(dst.Path);
        Assert.Equal(options.Name, preQuantized.Description.Quantization);
        var lin = (Linear)preQuantized.Model.named_modules().Single(m => m.name == "projector.fc1").module;
        var lin2 = (Linear)fromBf16.Model.named_modules().Single(m => m.name == "projector.fc1").module;
        Assert.True(Tensors.Identical(lin.Quantized!.Dequantize(ScalarType.Float32), lin2.Quantized!.Dequantize(ScalarType.Float32)));
        var obs = new VlaObservation([Frames.Noise(56, 3)], "push the red cube to the left", "bridge_orig");
        Assert.Equal(fromBf16.Predict(obs).ActionTokenIds, preQuantized.Predict(obs).ActionTokenIds);

        var e = Assert.Throws<CheckpointException>(() => VlaPolicy.Load(dst.Path, new PolicyOptions { Quantize = mode == "int8" ? "int4" : "int8", GroupSize = 32 }));
        Assert.Contains("pre-quantized", e.Message);
        // How the ranges were found is not stored, so asking for min–max ranges does not refuse a stored checkpoint.
        using var minMax = VlaPolicy.Load(dst.Path, new PolicyOptions { Quantize = mode, GroupSize = 32, Int4RangeSearch = false });
        Assert.Equal(options.Name, minMax.Description.Quantization);
    }

    [Fact]
    public void QuantizedWeightsTakeAQuarterToAHalfOfTheBytes()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp.Path, "tiny", seed: 4, ScalarType.BFloat16);
        using var bf16 = VlaPolicy.Load(tmp.Path, new PolicyOptions { DType = "bf16" });
        using var int8 = VlaPolicy.Load(tmp.Path, new PolicyOptions { Quantize = "int8" });
        using var int4 = VlaPolicy.Load(tmp.Path, new PolicyOptions { Quantize = "int4", GroupSize = 32 });
        long projector = bf16.WeightBytesByComponent()["projector"];
        // projector: fc1 96→384, fc2 384→64, fc3 64→64 weights (bf16 → 1 byte + a bf16 scale per row) and bf16 biases.
        long weights = 96 * 384 + 384 * 64 + 64 * 64, rows = 384 + 64 + 64;
        Assert.Equal(2 * weights + 2 * rows, projector);
        Assert.Equal(weights + 2 * rows + 2 * rows, int8.WeightBytesByComponent()["projector"]);
        Assert.Equal(weights / 2 + 2 * (2 * weights / 32) + 2 * rows, int4.WeightBytesByComponent()["projector"]);
    }

    [Theory]
    [InlineData("int8")]
    [InlineData("int4")]
    public void QuantizedBatchEqualsSinglePredictions(string mode)
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp.Path, "tiny", seed: 8, ScalarType.BFloat16);
        using var policy = VlaPolicy.Load(tmp.Path, new PolicyOptions { Quantize = mode, GroupSize = 32, DType = "f32" });
        var observations = new[] { "pick up the red cube", "stack the green block on the blue block", "move left" }
            .Select((text, i) => new VlaObservation([Frames.Noise(56, i)], text, "sim_tabletop")).ToList();
        var batch = policy.PredictBatch(observations);
        for (int i = 0; i < observations.Count; i++) Assert.Equal(policy.Predict(observations[i]).ActionTokenIds, batch[i].ActionTokenIds);
    }

    [Fact]
    public void Int4LayerWhoseWidthTheGroupDoesNotDivideIsStoredInt8()
    {
        var options = QuantizationOptions.Parse("int4", 128);
        Assert.Equal(QuantMode.Int8, options.ModeFor(1152, 4304)); // SigLIP So400m mlp.fc2 input width
        Assert.Equal(QuantMode.Int4, options.ModeFor(4096, 4096));
        using var q = QuantizedWeight.Quantize(randn(16, 4304 / 4, generator: new Generator(1)).repeat(1, 4), options);
        Assert.Equal(QuantMode.Int8, q.Mode);
    }

    [Theory]
    [InlineData("int8")]
    [InlineData("int4")]
    public void GoldenCheckpointWithWidthsNotMultipleOf16QuantizesAndPredicts(string mode)
    {
        // Widths 24, 36, 60, 90: the int8 kernel crashes the process on those with many rows, so they must take the
        // dequantize path; int4 groups of 32 do not divide them either, so they fall back to int8.
        using var policy = VlaPolicy.Load(TestPaths.Fixture("openvla-golden", "checkpoint"), new PolicyOptions { Quantize = mode, GroupSize = 32 });
        var observations = GoldenModelTests.Cases().Select(c =>
            new VlaObservation([GoldenModelTests.ReadPng(TestPaths.Fixture("openvla-golden", c.Image))], c.Instruction, c.UnnormKey)).ToList();
        var batch = policy.PredictBatch(observations);
        Assert.All(batch, p => Assert.Equal(7, p.ActionTokenIds.Length));
    }

    [Fact]
    public void UnknownModesAndBadGroupSizesAreInputErrors()
    {
        Assert.Contains("valid: none, int8, int4", Assert.Throws<PolicyInputException>(() => QuantizationOptions.Parse("fp4")).Message);
        Assert.Contains("32, 64, 128 or 256", Assert.Throws<PolicyInputException>(() => QuantizationOptions.Parse("int4", 48)).Message);
        Assert.Equal(ScalarType.BFloat16, new PolicyOptions { Quantize = "int8" }.ScalarType); // quantized defaults to bf16
        Assert.Equal(ScalarType.Float32, new PolicyOptions().ScalarType);
    }
}
