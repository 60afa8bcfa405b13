using System.Text.Json.Nodes;
using OpenVLA.FineTune.Data;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Tests.FineTune;
using TorchSharp;

namespace OpenVLA.Tests.FineTune.Training;

/// <summary>The `finetune` verb end to end on a LeRobot dataset written by the test: train, evaluate, save, resume, predict.</summary>
public class FineTuneCommandTests
{
    [Fact]
    public void FineTunesALeRobotDatasetAndThePolicyLoadsTheResult()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["base"], "tiny", 3, torch.ScalarType.Float32);
        TestDatasets.WriteLeRobot(tmp["data"], [8, 8, 8, 8, 8, 8]);
        string[] common = ["finetune", "--base", tmp["base"], "--dataset", tmp["data"], "--out", tmp["run"], "--dtype", "f32",
            "--lora-rank", "4", "--lr", "5e-3", "--batch-size", "4", "--eval-steps", "10", "--save-steps", "15", "--merge",
            "--held-out-fraction", "0.34", "--shuffle-buffer", "64", "--threads", "1", "--json"];

        var first = CliRunner.Run([.. common, "--max-steps", "15"]);
        Assert.True(first.ExitCode == 0, first.Stderr);
        var summary = JsonNode.Parse(first.Stdout)!;
        string checkpoint = summary["checkpoint"]!.GetValue<string>();
        Assert.EndsWith("step-0000015", checkpoint);
        Assert.True(File.Exists(Path.Combine(checkpoint, "adapter", "adapter_model.safetensors")));
        Assert.True(File.Exists(Path.Combine(tmp["run"], "metrics.png")));
        Assert.True(File.Exists(Path.Combine(tmp["run"], "dataset_statistics.json")));
        Assert.Contains("step 15/15", first.Stderr);

        // Without --resume an existing run is refused; with it, training continues at step 16.
        var refused = CliRunner.Run([.. common, "--max-steps", "30"]);
        Assert.Equal(2, refused.ExitCode);
        Assert.Contains("--resume", refused.Stderr);
        var second = CliRunner.Run([.. common, "--max-steps", "30", "--resume"]);
        Assert.True(second.ExitCode == 0, second.Stderr);
        Assert.Contains("resumed from", second.Stderr);

        var log = File.ReadAllLines(Path.Combine(tmp["run"], "metrics.jsonl")).Select(l => JsonNode.Parse(l)!).ToList();
        var train = log.Where(e => e["split"]!.GetValue<string>() == "train").Select(e => e["step"]!.GetValue<long>()).ToList();
        Assert.Equal(Enumerable.Range(1, 30).Select(i => (long)i), train);
        var evals = log.Where(e => e["split"]!.GetValue<string>() == "eval").ToList();
        Assert.Equal([0L, 10, 15, 20, 30], evals.Select(e => e["step"]!.GetValue<long>()));
        Assert.True(evals[^1]["loss"]!.GetValue<double>() < evals[0]["loss"]!.GetValue<double>(), "held-out loss did not improve");
        // Every held-out score also says how much the policy looks at the frame (the loss with frames swapped).
        Assert.All(evals, e => Assert.True(double.IsFinite(e["shuffled_image_loss"]!.GetValue<double>())));
        Assert.Matches(@"eval @ step 15: loss \d\.\d{4} action accuracy \d\.\d{3} L1 \d\.\d{4} vision gain -?\d\.\d{4} \(", first.Stderr);

        // The merged checkpoint predicts with the dataset's statistics.
        string merged = Path.Combine(JsonNode.Parse(second.Stdout)!["checkpoint"]!.GetValue<string>(), "model");
        var frame = tmp["frame.png"];
        OpenCvSharp.Cv2.ImWrite(frame, new OpenCvSharp.Mat(56, 56, OpenCvSharp.MatType.CV_8UC3, new OpenCvSharp.Scalar(40, 120, 200)));
        var predict = CliRunner.Run("predict", "--checkpoint", merged, "--image", frame, "--instruction", "put the block 1 in the bowl", "--json");
        Assert.True(predict.ExitCode == 0, predict.Stderr);
        Assert.Equal(7, JsonNode.Parse(predict.Stdout)!["action"]!.AsArray().Count);
    }

    [Fact]
    public void DryRunPrintsTheBudgetWithoutACheckpoint()
    {
        var r = CliRunner.Run("finetune", "--dry-run", "--preset", "openvla-7b", "--batch-size", "2", "--grad-checkpointing", "--json");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var plan = JsonNode.Parse(r.Stdout)!;
        Assert.True(plan["gradient_checkpointing"]!.GetValue<bool>());
        Assert.InRange(plan["peak_bytes"]!.GetValue<long>(), 15L << 30, 24L << 30);

        var bad = CliRunner.Run("finetune", "--dry-run", "--preset", "tiny", "--lora-rank", "0");
        Assert.Equal(2, bad.ExitCode);
        Assert.Contains("--lora-rank", bad.Stderr);
    }

    [Fact]
    public void FullTrainingWithAnAuxiliaryHeadAndRandomShiftLogsItsLossAndRefusesIncompleteOptions()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["base"], "tiny", 3, torch.ScalarType.Float32);
        TestDatasets.WriteLeRobot(tmp["data"], [6, 6, 6]);
        string[] common = ["finetune", "--base", tmp["base"], "--dataset", tmp["data"], "--out", tmp["run"], "--full", "--batch-size", "2",
            "--max-steps", "4", "--eval-steps", "4", "--save-steps", "4", "--held-out-fraction", "0.34", "--shuffle-buffer", "16", "--threads", "1"];

        var noKeys = CliRunner.Run([.. common, "--aux-weight", "1"]);
        Assert.Equal(2, noKeys.ExitCode);
        Assert.Contains("--aux-weight needs targets", noKeys.Stderr);
        var noWeight = CliRunner.Run([.. common, "--aux-keys", "observation.state"]);
        Assert.Equal(2, noWeight.ExitCode);
        Assert.Contains("--aux-keys needs --aux-weight", noWeight.Stderr);
        var missing = CliRunner.Run([.. common, "--aux-weight", "1", "--aux-keys", "observation.environment_state"]);
        Assert.Equal(2, missing.ExitCode);
        Assert.Contains("has no aux key 'observation.environment_state'", missing.Stderr);

        var negativeShift = CliRunner.Run([.. common, "--random-shift", "-1"]);
        Assert.Equal(2, negativeShift.ExitCode);
        Assert.Contains("--random-shift must be 0 or more", negativeShift.Stderr);
        var twoAugmentations = CliRunner.Run([.. common, "--random-shift", "2", "--image-aug"]);
        Assert.Equal(2, twoAugmentations.ExitCode);
        Assert.Contains("pick one", twoAugmentations.Stderr);

        var run = CliRunner.Run([.. common, "--aux-weight", "0.5", "--aux-keys", "observation.state", "--random-shift", "2"]);
        Assert.True(run.ExitCode == 0, run.Stderr);
        Assert.Matches(@"eval @ step 4: loss \d\.\d{4} .* aux \d+\.\d{4} \(", run.Stderr);
        var log = File.ReadAllLines(Path.Combine(tmp["run"], "metrics.jsonl")).Select(l => JsonNode.Parse(l)!).ToList();
        Assert.All(log, e => Assert.True(e["aux_loss"]!.GetValue<double>() >= 0));
        Assert.True(File.Exists(Path.Combine(tmp["run"], "step-0000004", "training_state", "aux_head.safetensors")));
    }

    [Fact]
    public void RepeatedDatasetsTrainOnTheirUnionOrAMixtureAndMixedLayoutsAreRefused()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["base"], "tiny", 3, torch.ScalarType.Float32);
        TestDatasets.WriteLeRobot(tmp["demos"], [6, 6, 6]);
        TestDatasets.WriteLeRobot(tmp["dagger"], [5, 5]);
        string[] common = ["finetune", "--base", tmp["base"], "--full", "--batch-size", "2", "--max-steps", "1",
            "--eval-steps", "1", "--save-steps", "1", "--held-out-fraction", "0.2", "--shuffle-buffer", "8", "--threads", "1"];

        var run = CliRunner.Run([.. common, "--out", tmp["run"], "--dataset", tmp["demos"], "--dataset", tmp["dagger"]]);
        Assert.True(run.ExitCode == 0, run.Stderr);
        Assert.Contains("finetune: demos (lerobot, 2 datasets): 4 training / 1 held-out episodes, 28 steps", run.Stderr);
        var stats = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp["run"], "dataset_statistics.json")))!;
        Assert.Equal(28, stats["demos"]!["num_transitions"]!.GetValue<long>());

        var weighted = CliRunner.Run([.. common, "--out", tmp["run3"], "--dataset", tmp["demos"], "--dataset", tmp["dagger"], "--dataset-weights", "1,2.5"]);
        Assert.True(weighted.ExitCode == 0, weighted.Stderr);
        Assert.Contains("finetune: demos (lerobot, 2 datasets, mixture 1:2.5): 4 training / 1 held-out episodes, 28 steps", weighted.Stderr);
        var uneven = CliRunner.Run([.. common, "--out", tmp["run4"], "--dataset", tmp["demos"], "--dataset", tmp["dagger"], "--dataset-weights", "1"]);
        Assert.Equal(2, uneven.ExitCode);
        Assert.Contains("--dataset-weights gives 1 weight(s) for 2 --dataset; give one per dataset, in order", uneven.Stderr);
        var negative = CliRunner.Run([.. common, "--out", tmp["run5"], "--dataset", tmp["demos"], "--dataset", tmp["dagger"], "--dataset-weights", "1,-2"]);
        Assert.Equal(2, negative.ExitCode);
        Assert.Contains("--dataset-weights: '-2' is not a positive number", negative.Stderr);

        RldsWriter.WriteDataset(tmp["oxe"], "oxe", TestDatasets.RldsEpisodes([2]));
        var mixed = CliRunner.Run([.. common, "--out", tmp["run2"], "--dataset", tmp["demos"], "--dataset", tmp["oxe"]]);
        Assert.Equal(2, mixed.ExitCode);
        Assert.True(mixed.Stderr.Contains($"datasets to combine must have one layout; {tmp["demos"]} is lerobot, {tmp["oxe"]} is rlds"), mixed.Stderr);
    }
}
