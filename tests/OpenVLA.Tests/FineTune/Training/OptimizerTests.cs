using OpenVLA.FineTune.Training;
using TorchSharp;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;

namespace OpenVLA.Tests.FineTune.Training;

public class OptimizerTests
{
    [Fact]
    public void MatchesTorchAdamWWithTorchDefaults()
    {
        var init = randn([5, 3], generator: new Generator(1));
        var ours = new Parameter(init.clone());
        var theirs = new Parameter(init.clone());
        using var adam = new AdamW([("w", ours)], new AdamW.Settings(LearningRate: 0.01));
        // torch.optim.AdamW defaults: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01 (TorchSharp's own defaults differ).
        var reference = torch.optim.AdamW([theirs], lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01);
        for (int step = 0; step < 5; step++)
        {
            var target = randn([5, 3], generator: new Generator((ulong)(10 + step)));
            foreach (var p in new[] { ours, theirs })
            {
                var loss = (p - target).pow(2).sum();
                loss.backward();
            }
            adam.Update(0.01);
            adam.ZeroGrad();
            reference.step();
            reference.zero_grad();
        }
        Assert.True(ours.allclose(theirs, rtol: 1e-6, atol: 1e-7), $"max diff {(ours - theirs).abs().max().item<float>()}");
    }

    [Fact]
    public void Bf16ParameterUpdatesThroughAFloat32Master()
    {
        var p = new Parameter(full([4], 1f, ScalarType.BFloat16));
        using var adam = new AdamW([("w", p)], new AdamW.Settings(LearningRate: 1e-4, WeightDecay: 0));
        for (int i = 0; i < 3; i++)
        {
            p.grad = ones([4], ScalarType.BFloat16);
            adam.Update(1e-4);
        }
        // 3 steps of −1e-4 each: below bf16's resolution at 1.0 (2^-7), so a bf16-only update would stay at 1.
        using var tmp = new TestPaths.TempDir();
        adam.Save(tmp["opt.safetensors"]);
        using var st = OpenVLA.Policy.Checkpoint.SafetensorsFile.Open(tmp["opt.safetensors"]);
        Assert.Equal(1 - 3e-4, st.Load("w.master")[0].item<float>(), 6);
        Assert.Equal(1f, p[0].to(ScalarType.Float32).item<float>());
    }

    [Fact]
    public void ScheduleWarmsUpThenHoldsOrDecays()
    {
        var constant = new LearningRateSchedule("constant", 1e-3, WarmupSteps: 4, TotalSteps: 100);
        Assert.Equal(0.25e-3, constant.At(0), 12);
        Assert.Equal(1e-3, constant.At(3), 12);
        Assert.Equal(1e-3, constant.At(99), 12);
        var cosine = new LearningRateSchedule("cosine", 1e-3, WarmupSteps: 0, TotalSteps: 100);
        Assert.Equal(1e-3, cosine.At(0), 12);
        Assert.Equal(0.5e-3, cosine.At(50), 12);
        Assert.Equal(0, cosine.At(100), 12);
    }
}
