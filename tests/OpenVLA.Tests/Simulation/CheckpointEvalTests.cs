using System.Text.Json;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;

namespace OpenVLA.Tests.Simulation;

public class CheckpointEvalTests
{
    [Fact]
    public void RandomWeightModelIsEvaluatedEndToEndThroughTheCli()
    {
        using var ckpt = new TestPaths.TempDir();
        using var outDir = new TestPaths.TempDir();
        CheckpointMaker.Write(ckpt.Path, "tiny", seed: 1, torch.ScalarType.BFloat16);
        var r = CliRunner.Run("eval", "--suite", "tabletop", "--policy", "checkpoint:" + ckpt.Path, "--tasks", "move_side",
            "--trials-per-task", "1", "--image-size", "56", "--unnorm-key", "sim_tabletop", "--out", outDir.Path, "--json");
        Assert.True(r.ExitCode == 0, r.Stderr);
        using var doc = JsonDocument.Parse(r.Stdout);
        var root = doc.RootElement;
        Assert.Equal(1, root.GetProperty("overall").GetProperty("trials").GetInt32());
        var task = root.GetProperty("tasks")[0];
        Assert.Equal("move_side", task.GetProperty("task").GetString());
        // The random model acted on every step it was given, so its latency was measured step by step.
        Assert.True(root.GetProperty("policy_latency").GetProperty("steps").GetInt64() > 0);
        if (task.GetProperty("success").GetProperty("successes").GetInt32() == 0)
            Assert.Equal(JsonValueKind.Null, task.GetProperty("mean_steps_successful").ValueKind);
        Assert.True(File.Exists(Path.Combine(outDir.Path, "results.json")));
        Assert.True(File.Exists(Path.Combine(outDir.Path, "success.png")));
    }

    [Fact]
    public void CheckpointPolicyWithoutUnnormKeyOnAMultiDatasetModelIsAUsageError()
    {
        using var ckpt = new TestPaths.TempDir();
        CheckpointMaker.Write(ckpt.Path, "tiny", seed: 1, torch.ScalarType.BFloat16);
        using var outDir = new TestPaths.TempDir();
        var r = CliRunner.Run("eval", "--policy", "checkpoint:" + ckpt.Path, "--tasks", "move_side", "--trials-per-task", "1",
            "--image-size", "56", "--out", outDir.Path);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("bridge_orig, sim_tabletop", r.Stderr);
    }
}
