using System.Security.Cryptography;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using OpenVLA.Policy;
using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.Tests;

/// <summary>
/// The committed default policy (models/openvla-small-tabletop) and its GPTQ int4 copy (models/openvla-small-tabletop-int4):
/// they load as OpenVLA checkpoints, their files are the ones their model cards describe, and the float one really
/// controls the simulated robot.
/// </summary>
[Collection("MuJoCo")]
public sealed partial class DefaultModelTests
{
    static readonly string ModelDir = Path.Combine(TestPaths.RepoRoot, "models", "openvla-small-tabletop");
    static readonly string Int4Dir = ModelDir + "-int4";

    [Theory]
    [InlineData("openvla-small-tabletop")]
    [InlineData("openvla-small-tabletop-int4")]
    public void Loads_as_an_OpenVLA_checkpoint_with_the_tabletop_statistics(string model)
    {
        using var policy = VlaPolicy.Load(Path.Combine(TestPaths.RepoRoot, "models", model));

        var d = policy.Description;
        Assert.Equal(112, d.ImageSize);
        Assert.Equal(7, d.ActionDim);
        Assert.Equal(["tabletop"], d.UnnormStats.Keys);
        Assert.Equal(2, policy.Checkpoint.Config.VisionTowers.Count); // fused DINOv2-style + SigLIP-style towers
        // The first frame of a pick-up episode: the expert starts with the gripper open and a step of at most 2 cm.
        var episode = TabletopTasks.Get("pick_up").Sample(TabletopTasks.EpisodeSeed(7, "pick_up", 0));
        byte[] pixels;
        using (var env = new TabletopEnv(112)) { env.Reset(episode.Layout); pixels = env.Render(); }
        var p = policy.Predict(new VlaObservation([new RgbImage(112, 112, pixels)], episode.Instruction));
        Assert.Equal(7, p.Action.Length);
        int pad = policy.Checkpoint.Config.Text.PadTokenId; // = the tokenizer's vocabulary; the action bins are its last 256 ids
        Assert.All(p.ActionTokenIds, t => Assert.InRange(t, pad - 256, pad - 1));
        Assert.All(p.Action[..3], v => Assert.InRange(v, -0.0201f, 0.0201f)); // un-normalized with the training statistics
        Assert.Equal([0f, 0f, 0f], p.Action[3..6]);                            // the data never rotates
        Assert.InRange(p.Action[6], 0.9f, 1.0f);                                 // open, as every demonstration starts
    }

    [Theory]
    [InlineData("openvla-small-tabletop")]
    [InlineData("openvla-small-tabletop-int4")]
    public void Every_file_matches_the_hash_in_the_model_card(string model)
    {
        var dir = Path.Combine(TestPaths.RepoRoot, "models", model);
        var card = File.ReadAllText(Path.Combine(dir, "README.md"));
        var listed = FileRow().Matches(card).ToDictionary(m => m.Groups[1].Value, m => (Bytes: long.Parse(m.Groups[2].Value), Sha: m.Groups[3].Value));

        var files = Directory.EnumerateFiles(dir).Select(Path.GetFileName).Where(n => n is not ("README.md" or "training.png")).Order().ToList();
        Assert.Equal(files, listed.Keys.Order());
        foreach (var name in files)
        {
            var path = Path.Combine(dir, name!);
            Assert.Equal(listed[name!].Bytes, new FileInfo(path).Length);
            using var stream = File.OpenRead(path);
            Assert.Equal(listed[name!].Sha, Convert.ToHexStringLower(SHA256.HashData(stream)));
        }
        Assert.Contains("model.safetensors", files);
        Assert.Contains("dataset_statistics.json", files);
        Assert.Contains("tokenizer.model", files);
    }

    /// <summary>The int4 copy is the default model's weights quantized by GPTQ and nothing else: pre-quantized int4 in
    /// groups of 128 over every covered module, a GPTQ calibration record, and byte for byte the float model's statistics,
    /// tokenizer, preprocessing and decoding.</summary>
    [Fact]
    public void The_int4_copy_is_the_default_model_quantized_by_gptq()
    {
        using var policy = VlaPolicy.Load(Int4Dir);
        Assert.Equal("int4-g128", policy.Checkpoint.Config.StoredQuantization!.Name);
        Assert.True(policy.Checkpoint.Config.StoredQuantization.IncludeVision);
        var calibration = policy.Checkpoint.Config.Raw["quantization_config"]!["calibration"]!;
        Assert.Equal("gptq", calibration["method"]!.GetValue<string>());
        Assert.Equal(128, calibration["samples"]!.GetValue<int>());
        foreach (var name in new[] { "dataset_statistics.json", "tokenizer.model", "preprocessor_config.json", "generation_config.json" })
            Assert.Equal(File.ReadAllBytes(Path.Combine(ModelDir, name)), File.ReadAllBytes(Path.Combine(Int4Dir, name)));
        var floatConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(ModelDir, "config.json")))!.AsObject();
        var int4Config = JsonNode.Parse(File.ReadAllText(Path.Combine(Int4Dir, "config.json")))!.AsObject();
        int4Config.Remove("quantization_config");
        Assert.True(JsonNode.DeepEquals(floatConfig, int4Config));
    }

    /// <summary>
    /// `eval` with no --policy runs the default model at its own resolution (112 px, not the 224 px default of the
    /// scripted expert), with the decoding its generation_config.json states (sampling, temperature 0.8), and really
    /// controls the robot: with seed 7 it succeeds at least once in the first five trials of pick_up and of
    /// place_on_plate. Over gRPC it succeeded in 48 of 50 pick_up and 49 of 50 place_on_plate trials (model card), so five
    /// failures in a row on either task would mean a broken model or pipeline, not bad luck.
    /// </summary>
    [Fact]
    public void Eval_without_a_policy_runs_the_default_model_and_succeeds_on_two_tasks()
    {
        using var dir = new TestPaths.TempDir();
        var run = CliRunner.Run("eval", "--tasks", "pick_up,place_on_plate", "--trials-per-task", "5", "--seed", "7",
            "--workers", "2", "--out", dir.Path, "--json"); // two single-threaded workers: no OpenMP contention with other tests

        Assert.True(run.ExitCode == 0, run.Stderr);
        Assert.Contains("using the default model openvla-small-tabletop", run.Stderr);
        var results = JsonNode.Parse(File.ReadAllText(Path.Combine(dir.Path, "results.json")))!;
        Assert.Equal(112, results["image_size"]!.GetValue<int>());
        Assert.EndsWith("models/openvla-small-tabletop", results["policy"]!.GetValue<string>());
        Assert.Contains("decoding sample:temperature=0.8,top_k=50,top_p=1", results["policy_settings"]!.GetValue<string>());
        var episodes = results["episodes"]!.AsArray();
        Assert.Equal(10, episodes.Count);
        foreach (var task in new[] { "pick_up", "place_on_plate" })
        {
            var ofTask = episodes.Where(e => e!["task_id"]!.GetValue<string>() == task).ToList();
            Assert.Equal(5, ofTask.Count);
            Assert.True(ofTask.Any(e => e!["success"]!.GetValue<bool>()),
                $"{task}: no success in trials 0-4: " + string.Join(", ", ofTask.Select(e => $"{e!["steps"]} steps")));
        }
    }

    [GeneratedRegex(@"^\| `([^`]+)` \| (\d+) \| `([0-9a-f]{64})` \|$", RegexOptions.Multiline)]
    private static partial Regex FileRow();
}
