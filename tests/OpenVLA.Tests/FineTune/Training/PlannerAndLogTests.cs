using OpenVLA.FineTune.Training;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;

namespace OpenVLA.Tests.FineTune.Training;

public class PlannerAndLogTests
{
    static VlaConfig Config(string preset) =>
        VlaConfig.Parse(CheckpointMaker.ConfigJson(CheckpointPreset.Get(preset), torch.ScalarType.BFloat16), preset);

    [Fact]
    public void SevenBillionBudgetFromTheConfigAlone()
    {
        var plan = MemoryPlanner.Plan(Config("openvla-7b"), new TrainerOptions { BatchSize = 1 }, weightBytesPerElement: 2);
        // Weights inference builds: 7.541 B params minus the never-run last ViT blocks, final norms and SigLIP attn_pool
        // (12.6 M + 15.9 M + 15.1 M).
        long weights = plan.Resident[0].Bytes;
        Assert.InRange(weights / 2, 7_490_000_000L, 7_510_000_000L);
        // LoRA r=32 on every built linear: LLM 32 × 2,498,560 + projector 1,019,904 + DINOv2 23 × 524,288 + SigLIP 26 × 570,368.
        Assert.Equal(32L * 2_498_560 + 1_019_904 + 23L * 524_288 + 26L * 570_368, plan.TrainableParameters);
        // Checkpointing shrinks the per-sample activations by an order of magnitude.
        Assert.True(plan.ActivationsPerSample > 8 * (plan.ActivationsPerSampleCheckpointed + 2 * plan.RecomputeWorkspace));
        var full = MemoryPlanner.Plan(Config("openvla-7b"), new TrainerOptions { Full = true, BatchSize = 1 }, 2);
        Assert.Equal(8 * weights, full.ResidentBytes);   // per param: bf16 weight 2 + bf16 grad 2 + moments 8 + f32 master 4 bytes
    }

    [Fact]
    public void MetricsLogTruncatesAndPlots()
    {
        using var tmp = new TestPaths.TempDir();
        var log = new MetricsLog(tmp["metrics.jsonl"]);
        for (int s = 1; s <= 6; s++) log.Append(new StepMetrics(s, "train", 3.0 / s, 0.1 * s, 0.5 / s, 5e-4, 1.0, 10, s));
        log.Append(new StepMetrics(5, "eval", 0.9, 0.4, 0.2, 5e-4, double.NaN, 20, 5));
        Assert.Null(log.Read()[^1]["grad_norm"]);   // an evaluation has no gradient: null, not NaN (invalid JSON)
        log.TruncateAfter(4);
        Assert.Equal([1L, 2, 3, 4], log.Read().Select(e => e["step"]!.GetValue<long>()));
        log.Plot(tmp["metrics.png"]);
        var png = File.ReadAllBytes(tmp["metrics.png"]);
        Assert.True(png.Length > 1000);
        Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G' }, png[..4]);
    }
}
