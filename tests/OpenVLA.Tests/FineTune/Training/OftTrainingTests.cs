using System.Text.Json.Nodes;
using OpenVLA.FineTune.Data;
using OpenVLA.FineTune.Training;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Preprocessing;
using OpenVLA.Tests.FineTune;
using TorchSharp;

namespace OpenVLA.Tests.FineTune.Training;

/// <summary>OpenVLA-OFT training data and `finetune --oft` end to end: chunk targets, proprio, two cameras, L1 loss,
/// exact resume, and outputs in openvla-oft's file layout that predict loads unchanged.</summary>
public class OftTrainingTests
{
    [Fact]
    public void Chunks_hold_the_next_actions_and_episodes_end_where_a_whole_chunk_does()
    {
        using var dir = new TempDir();
        int[] lengths = [5, 8, 3, 6];
        TestDatasets.WriteLeRobot(dir.Path, lengths);
        using var data = VlaDataset.Open(dir.Path);
        var stats = data.ComputeStatistics();
        var normalizer = stats.Action;
        var options = new StreamOptions { ShuffleBufferSize = 4, Seed = 5, ActionChunk = 4, Repeat = false };
        var samples = new TrainingStream(data, data.UsableEpisodes, stats, options).ToList();
        // openvla-oft (traj_transforms.chunk_act_obs) keeps the steps with K−1 actions ahead: 2 + 5 + 0 + 3.
        Assert.Equal(10, samples.Count);
        Assert.Equal(lengths.SelectMany((n, e) => Enumerable.Range(0, Math.Max(0, n - 3)).Select(t => (e, t))).Order(),
            samples.Select(s => (s.EpisodeIndex, s.StepIndex)).Order());
        foreach (var s in samples)
        {
            Assert.Equal(4, s.NormalizedChunk!.Length);
            for (int k = 0; k < 4; k++) Assert.Equal(normalizer.Normalize(TestDatasets.Action(s.EpisodeIndex, s.StepIndex + k)), s.NormalizedChunk[k]);
            Assert.Equal(s.NormalizedAction, s.NormalizedChunk[0]);
            Assert.Equal(3, s.NormalizedProprio!.Length);
        }

        // A resumed chunked stream hands out exactly what the uninterrupted one does.
        var endless = options with { Repeat = true };
        var uninterrupted = new TrainingStream(data, data.UsableEpisodes, stats, endless).Take(17).ToList();
        var head = new TrainingStream(data, data.UsableEpisodes, stats, endless);
        var first = head.Take(7).ToList();
        var rest = new TrainingStream(data, data.UsableEpisodes, stats, endless, first[^1].CursorAfter).Take(10).ToList();
        Assert.Equal(uninterrupted.Select(s => (s.EpisodeIndex, s.StepIndex)), first.Concat(rest).Select(s => (s.EpisodeIndex, s.StepIndex)));
        Assert.Equal(uninterrupted[12].NormalizedChunk, rest[5].NormalizedChunk);

        // Episodes shorter than a chunk everywhere: a clear error.
        Assert.Throws<DatasetException>(() => new TrainingStream(data, [2], stats, options));
    }

    static string[] Common(TestPaths.TempDir tmp, string data, string run) =>
        ["finetune", "--base", tmp["base"], "--dataset", data, "--out", tmp[run], "--dtype", "f32", "--full", "--lr", "3e-3", "--batch-size", "4",
         "--eval-steps", "6", "--save-steps", "6", "--held-out-fraction", "0.25", "--shuffle-buffer", "32", "--threads", "1", "--json",
         "--oft", "--action-chunk", "4", "--proprio", "--image-keys", "observation.images.image,observation.images.wrist_image"];

    [Fact]
    public void Finetune_oft_trains_resumes_exactly_and_writes_a_checkpoint_predict_loads()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["base"], "tiny", 3, torch.ScalarType.Float32);
        TestDatasets.WriteLeRobot(tmp["data"], [9, 9, 9, 9, 9, 9, 9, 9], wrist: true);

        var straight = CliRunner.Run([.. Common(tmp, tmp["data"], "a"), "--max-steps", "12"]);
        Assert.True(straight.ExitCode == 0, straight.Stderr);
        Assert.Contains("OpenVLA-OFT, chunks of 4×7, 2 camera(s), 3-D proprio, L1 loss; new head", straight.Stderr);
        var stopped = CliRunner.Run([.. Common(tmp, tmp["data"], "b"), "--max-steps", "6"]);
        Assert.True(stopped.ExitCode == 0, stopped.Stderr);
        var resumed = CliRunner.Run([.. Common(tmp, tmp["data"], "b"), "--max-steps", "12", "--resume"]);
        Assert.True(resumed.ExitCode == 0, resumed.Stderr);

        static List<JsonNode> Log(string run, string split) => File.ReadAllLines(Path.Combine(run, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!)
            .Where(e => e["split"]!.GetValue<string>() == split).ToList();
        var a = Log(tmp["a"], "train");
        var b = Log(tmp["b"], "train");
        Assert.Equal(12, a.Count);
        // Bit-identical: every step's loss and gradient norm after the resume equal the uninterrupted run's.
        Assert.Equal(a.Select(e => e["loss"]!.GetValue<double>()), b.Select(e => e["loss"]!.GetValue<double>()));
        Assert.Equal(a.Select(e => e["grad_norm"]!.GetValue<double>()), b.Select(e => e["grad_norm"]!.GetValue<double>()));
        var evals = Log(tmp["a"], "eval");
        Assert.True(evals[^1]["l1_loss"]!.GetValue<double>() < evals[0]["l1_loss"]!.GetValue<double>(), "held-out L1 did not fall");
        Assert.Null(evals[0]["action_accuracy"]);   // no tokens to count

        // openvla-oft's layout: DDP-prefixed keys, the head in bf16, the projector in f32, an "oft" block in config.json.
        string checkpoint = JsonNode.Parse(straight.Stdout)!["checkpoint"]!.GetValue<string>();
        string model = Path.Combine(checkpoint, "model");
        var head = TorchStateDict.Load(Path.Combine(model, "action_head--latest_checkpoint.pt"));
        Assert.Contains("module.model.fc1.weight", head.Keys);
        Assert.Equal([64L, 64 * 7], head["module.model.fc1.weight"].Shape);
        Assert.Equal("Float", head["module.model.fc1.weight"].DType);   // the run's precision (f32 here)
        var projector = TorchStateDict.Load(Path.Combine(model, "proprio_projector--latest_checkpoint.pt"));
        Assert.Equal([64L, 3], projector["module.fc1.weight"].Shape);
        Assert.Equal("Float", projector["module.fc1.weight"].DType);
        Assert.True(File.Exists(Path.Combine(checkpoint, "action_head--12_checkpoint.pt")));
        var oft = JsonNode.Parse(File.ReadAllText(Path.Combine(model, "config.json")))!["oft"]!;
        Assert.Equal(4, oft["action_chunk"]!.GetValue<int>());
        Assert.Equal(3, oft["proprio_dim"]!.GetValue<int>());

        // predict loads it as any OFT checkpoint: two cameras, the proprio, a chunk of 4.
        var frame = tmp["frame.png"];
        OpenCvSharp.Cv2.ImWrite(frame, new OpenCvSharp.Mat(56, 56, OpenCvSharp.MatType.CV_8UC3, new OpenCvSharp.Scalar(40, 120, 200)));
        var predict = CliRunner.Run("predict", "--checkpoint", model, "--image", frame, "--image", frame, "--proprio", "1,0.5,2",
            "--instruction", "put the block 1 in the bowl", "--json");
        Assert.True(predict.ExitCode == 0, predict.Stderr);
        Assert.Equal(4, JsonNode.Parse(predict.Stdout)!["actions"]!.AsArray().Count);
    }

    [Fact]
    public void Finetune_oft_reads_rlds_with_lora_and_refuses_options_that_do_not_fit()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["base"], "tiny", 3, torch.ScalarType.Float32);
        RldsWriter.WriteDataset(tmp["rlds"], "toy", TestDatasets.RldsEpisodes([8, 8, 8, 8, 8, 8], wrist: true), shards: 2, gzip: false);
        File.WriteAllText(tmp["rlds.json"], """{"image_keys": ["image", "wrist_image"], "proprio_key": "state"}""");
        var noKey = CliRunner.Run(["finetune", "--base", tmp["base"], "--dataset", tmp["rlds"], "--out", tmp["run0"], "--oft", "--proprio", "--max-steps", "1"]);
        Assert.Equal(2, noKey.ExitCode);
        Assert.Contains("names no proprio key", noKey.Stderr);
        string[] args = ["finetune", "--base", tmp["base"], "--dataset", tmp["rlds"], "--dataset-config", tmp["rlds.json"], "--out", tmp["run"], "--dtype", "f32", "--lora-rank", "4",
            "--lr", "3e-3", "--batch-size", "2", "--max-steps", "4", "--eval-steps", "4", "--save-steps", "4", "--held-out-fraction", "0.34",
            "--shuffle-buffer", "16", "--threads", "1", "--json", "--oft", "--action-chunk", "3", "--proprio"];
        var run = CliRunner.Run(args);
        Assert.True(run.ExitCode == 0, run.Stderr);
        Assert.Contains("chunks of 3×7, 2 camera(s), 2-D proprio", run.Stderr);
        string model = Path.Combine(JsonNode.Parse(run.Stdout)!["checkpoint"]!.GetValue<string>(), "model");
        Assert.True(File.Exists(Path.Combine(model, "action_head--latest_checkpoint.pt")));   // LoRA runs write the merged model

        // A LoRA run resumes exactly too: the adapters from adapter/, the head and projector from the step's .pt files.
        string[] Split(string run, int steps) =>
            [.. args.Select((a, i) => a == tmp["run"] ? tmp[run] : i > 0 && args[i - 1] == "--max-steps" ? steps.ToString() : a)];
        Assert.Equal(0, CliRunner.Run(Split("half", 2)).ExitCode);
        var resumed = CliRunner.Run([.. Split("half", 4), "--resume"]);
        Assert.True(resumed.ExitCode == 0, resumed.Stderr);
        static IEnumerable<double> Losses(string dir) => File.ReadAllLines(Path.Combine(dir, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!)
            .Where(e => e["split"]!.GetValue<string>() == "train").Select(e => e["loss"]!.GetValue<double>());
        Assert.Equal(Losses(tmp["run"]), Losses(tmp["half"]));

        var noOft = CliRunner.Run(["finetune", "--base", tmp["base"], "--dataset", tmp["rlds"], "--out", tmp["run2"], "--proprio", "--max-steps", "1"]);
        Assert.Equal(2, noOft.ExitCode);
        Assert.Contains("add --oft", noOft.Stderr);
    }

    [Fact]
    public void The_dry_run_plans_an_oft_run()
    {
        JsonNode Plan(params string[] extra)
        {
            var r = CliRunner.Run(["finetune", "--dry-run", "--preset", "openvla-7b", "--batch-size", "2", "--grad-checkpointing", "--json", .. extra]);
            Assert.True(r.ExitCode == 0, r.Stderr);
            return JsonNode.Parse(r.Stdout)!;
        }
        var plain = Plan();
        var oft = Plan("--oft", "--proprio", "--image-keys", "primary,wrist");
        // Two cameras (512 image tokens), 56 placeholders, the stop and proprio tokens; the head and projector (~168 M params) in full.
        Assert.Equal(2 * 256 + 1 + 32 + 56 + 1, oft["sequence_length"]!.GetValue<long>());
        Assert.InRange(oft["trainable_parameters"]!.GetValue<long>() - plain["trainable_parameters"]!.GetValue<long>(), 165_000_000L, 170_000_000L);
        Assert.True(oft["peak_bytes"]!.GetValue<long>() > plain["peak_bytes"]!.GetValue<long>());
        Assert.Contains(oft["resident"]!.AsArray(), i => i!["name"]!.GetValue<string>().StartsWith("OFT head"));
    }

    [Fact]
    public void Freeze_vision_keeps_the_towers_as_loaded()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["base"], "tiny", 3, torch.ScalarType.Float32);
        TestDatasets.WriteLeRobot(tmp["data"], [9, 9, 9, 9, 9, 9], wrist: true);
        var run = CliRunner.Run([.. Common(tmp, tmp["data"], "run"), "--max-steps", "3", "--freeze-vision"]);
        Assert.True(run.ExitCode == 0, run.Stderr);
        string model = Path.Combine(JsonNode.Parse(run.Stdout)!["checkpoint"]!.GetValue<string>(), "model");
        using var before = SafetensorsFile.Open(Path.Combine(tmp["base"], "model.safetensors"));
        using var after = SafetensorsFile.Open(Path.Combine(model, "model.safetensors"));
        foreach (var name in new[] { "vision_backbone.featurizer.blocks.0.attn.qkv.weight", "vision_backbone.fused_featurizer.patch_embed.proj.weight" })
        {
            using var a = before.Load(name);
            using var b = after.Load(name);
            Assert.True(a.eq(b).all().item<bool>(), $"{name} changed");
        }
        using var p0 = before.Load("projector.fc1.weight");
        using var p1 = after.Load("projector.fc1.weight");
        Assert.False(p0.eq(p1).all().item<bool>(), "the projector should train");
    }

    [Fact]
    public void Cached_vision_features_give_the_chunks_the_frames_give()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["base"], "oft-tiny", 3, torch.ScalarType.Float32);
        using var policy = VlaPolicy.Load(tmp["base"]);
        var model = policy.Model;
        var spec = model.Oft!;
        var objective = OftObjective.ForCheckpoint(policy.Checkpoint, policy.Tokenizer, spec);
        var rng = new Random(5);
        RgbImage Frame() { var px = new byte[40 * 40 * 3]; rng.NextBytes(px); return new RgbImage(40, 40, px); }
        float[] Values(int n) => Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        var examples = Enumerable.Range(0, 7).Select(i => new TrainingExample(Frame(), i % 2 == 0 ? "pick up the cube" : "push the block left", Values(spec.ActionDim), "toy")
        {
            ExtraImages = Enumerable.Range(1, spec.NumImages - 1).Select(_ => Frame()).ToArray(),
            NormalizedChunk = Enumerable.Range(0, spec.ActionChunk).Select(_ => Values(spec.ActionDim)).ToArray(),
            NormalizedProprio = spec.ProprioDim > 0 ? Values(spec.ProprioDim) : null,
        }).ToList();

        using var cache = VisionFeatureCache.Build(model, ImagePreprocessor.ForCheckpoint(policy.Checkpoint), examples, spec.NumImages, batchSize: 3);
        Assert.Equal(7, cache.Rows);
        Assert.Equal(7L * spec.NumImages * model.Config.NumPatches * model.Config.VisionDim * 2, cache.Bytes);
        Assert.All(cache.Examples, e => Assert.Same(VisionFeatureCache.NoImage, e.Image));
        Assert.Equal(examples.Select(e => e.Instruction), cache.Examples.Select(e => e.Instruction));

        using var noGrad = torch.no_grad();
        using var frames = objective.Build(examples, torch.CPU, torch.ScalarType.Float32);
        using var cached = objective.Build(cache.Examples, torch.CPU, torch.ScalarType.Float32);
        Assert.Equal(3, cached.Pixels.dim());
        using var fromFrames = model.PredictChunk(frames.Pixels, frames.Ids, frames.Placeholder, frames.Valid, frames.PromptLengths, frames.Proprio);
        using var fromCache = model.PredictChunk(cached.Pixels, cached.Ids, cached.Placeholder, cached.Valid, cached.PromptLengths, cached.Proprio);
        // The only difference is float16 storage of the features (11 significant bits).
        double scale = fromFrames.abs().max().item<float>();
        double diff = (fromFrames - fromCache).abs().max().item<float>();
        Assert.True(diff <= 2e-3 * Math.Max(scale, 1), $"cached features moved the chunk by {diff} (scale {scale})");
        Assert.Equal(objective.Forward(model, frames).Value, objective.Forward(model, cached).Value, 3);

        // A batch that mixes cached rows and frames is refused, not half-read.
        Assert.Throws<ArgumentException>(() => objective.Build([examples[0], cache.Examples[1]], torch.CPU, torch.ScalarType.Float32));
        Assert.Throws<ArgumentException>(() => objective.Build([cache.Examples[0], examples[1]], torch.CPU, torch.ScalarType.Float32));
    }

    [Fact]
    public void Finetune_with_a_vision_cache_trains_keeps_the_towers_and_resumes_exactly()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["base"], "tiny", 3, torch.ScalarType.Float32);
        TestDatasets.WriteLeRobot(tmp["data"], [9, 9, 9, 9, 9, 9, 9, 9], wrist: true);
        string[] Cached(string run, int steps) => [.. Common(tmp, tmp["data"], run), "--vision-cache", "2", "--max-steps", steps.ToString()];

        var straight = CliRunner.Run(Cached("a", 12));
        Assert.True(straight.ExitCode == 0, straight.Stderr);
        // 6 training episodes of 9 steps, chunks of 4: 6 samples each, two passes.
        Assert.Contains("vision cache 72 rows", straight.Stderr);
        Assert.Equal(0, CliRunner.Run(Cached("b", 6)).ExitCode);
        var resumed = CliRunner.Run([.. Cached("b", 12), "--resume"]);
        Assert.True(resumed.ExitCode == 0, resumed.Stderr);

        static List<JsonNode> Log(string run, string split) => File.ReadAllLines(Path.Combine(run, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!)
            .Where(e => e["split"]!.GetValue<string>() == split).ToList();
        Assert.Equal(Log(tmp["a"], "train").Select(e => e["loss"]!.GetValue<double>()), Log(tmp["b"], "train").Select(e => e["loss"]!.GetValue<double>()));
        Assert.Equal(Log(tmp["a"], "train").Select(e => e["grad_norm"]!.GetValue<double>()), Log(tmp["b"], "train").Select(e => e["grad_norm"]!.GetValue<double>()));
        var evals = Log(tmp["a"], "eval");   // held out from frames, through the towers
        Assert.True(evals[^1]["l1_loss"]!.GetValue<double>() < evals[0]["l1_loss"]!.GetValue<double>(), "held-out L1 did not fall");

        string model = Path.Combine(JsonNode.Parse(straight.Stdout)!["checkpoint"]!.GetValue<string>(), "model");
        using var before = SafetensorsFile.Open(Path.Combine(tmp["base"], "model.safetensors"));
        using var after = SafetensorsFile.Open(Path.Combine(model, "model.safetensors"));
        foreach (var (name, trains) in new[] { ("vision_backbone.featurizer.blocks.0.attn.qkv.weight", false), ("projector.fc1.weight", true) })
        {
            using var a = before.Load(name);
            using var b = after.Load(name);
            Assert.True(a.eq(b).all().item<bool>() != trains, $"{name} {(trains ? "did not train" : "changed")}");
        }

        var bad = CliRunner.Run([.. Common(tmp, tmp["data"], "c"), "--vision-cache=-1", "--max-steps", "2"]);
        Assert.Equal(2, bad.ExitCode);
        Assert.Contains("--vision-cache must be 0", bad.Stderr);
    }
}
