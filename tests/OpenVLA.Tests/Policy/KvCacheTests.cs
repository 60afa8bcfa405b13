using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.Policy;

public class KvCacheTests
{
    [Fact]
    public void CachedDecodingEqualsFullRecomputation()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp.Path, "tiny", seed: 11, ScalarType.Float32);
        using var policy = VlaPolicy.Load(tmp.Path);
        var lm = policy.Model.language_model;
        using var noGrad = torch.no_grad();
        var gen = new Generator(7);
        var x = randn([2, 12, lm.Config.HiddenSize], generator: gen);

        // All 12 positions at once.
        using var full = lm.NewCache(2, 12, [0, 0]);
        var expected = lm.Step(x, full);

        // 9 positions, then 3 single-token steps reading the cache.
        using var cache = lm.NewCache(2, 12, [0, 0]);
        var parts = new List<Tensor> { lm.Step(x.narrow(1, 0, 9), cache) };
        for (int i = 9; i < 12; i++) parts.Add(lm.Step(x.narrow(1, i, 1), cache));
        var incremental = cat(parts, 1);

        Assert.Equal(12, cache.Length);
        Assert.True(incremental.allclose(expected, rtol: 1e-5, atol: 1e-5), $"max diff {(incremental - expected).abs().max().item<float>()}");
        var logitsA = lm.Logits(expected.narrow(1, 11, 1)).argmax(-1);
        var logitsB = lm.Logits(incremental.narrow(1, 11, 1)).argmax(-1);
        Assert.True(Tensors.Identical(logitsA, logitsB));
    }

    [Fact]
    public void LeftPaddedRowMatchesTheSameSequenceUnpadded()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp.Path, "tiny", seed: 12, ScalarType.Float32);
        using var policy = VlaPolicy.Load(tmp.Path);
        var lm = policy.Model.language_model;
        using var noGrad = torch.no_grad();
        var x = randn([1, 6, lm.Config.HiddenSize], generator: new Generator(3));

        using var plain = lm.NewCache(1, 7, [0]);
        var expected = lm.Step(x, plain);
        var nextExpected = lm.Step(x.narrow(1, 5, 1), plain);

        // Same 6 tokens after 3 padding positions (zeros): positions restart at 0 after the pad, pads are masked out.
        var padded = cat([zeros([1, 3, lm.Config.HiddenSize]), x], 1);
        using var cache = lm.NewCache(1, 10, [3]);
        var got = lm.Step(padded, cache).narrow(1, 3, 6);
        var next = lm.Step(x.narrow(1, 5, 1), cache);
        Assert.True(got.allclose(expected, rtol: 1e-5, atol: 1e-5));
        Assert.True(next.allclose(nextExpected, rtol: 1e-5, atol: 1e-5));
    }
}
