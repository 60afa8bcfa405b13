using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Preprocessing;
using OpenVLA.Simulation.Tabletop;
using TorchSharp;

namespace OpenVLA.Cli;

/// <summary>predict, make-checkpoint, demo: the verbs of the policy core.</summary>
internal static class PolicyVerbs
{
    public static IEnumerable<Command> Create() => [Predict(), MakeCheckpoint(), Demo()];

    static Command Predict()
    {
        var checkpoint = new Option<string?>("--checkpoint") { Description = $"Hugging Face OpenVLA or OpenVLA-OFT checkpoint directory (default: the embedded {DefaultModel.Name})" };
        var image = new Option<string[]>("--image")
        {
            Description = "camera frame (PNG or JPEG); repeat it for a model with several cameras, third-person first (OFT: --image full.png --image wrist.png)",
            Required = true,
        };
        var proprio = new Option<string?>("--proprio") { Description = "OpenVLA-OFT: the robot's proprioceptive state, comma-separated, in the dataset's units" };
        var instruction = new Option<string>("--instruction") { Description = "what the robot should do", Required = true };
        var unnormKey = new Option<string?>("--unnorm-key") { Description = "dataset statistics to un-normalize with (required when the checkpoint has several)" };
        var centerCrop = new Option<bool>("--center-crop") { Description = "center crop (area 0.9) for checkpoints trained with image augmentation" };
        var model = new ModelOptions();
        var json = new Option<bool>("--json") { Description = "print one JSON object" };
        var cmd = new Command("predict", "Predict an action (OpenVLA) or a chunk of actions (OpenVLA-OFT) from frames and an instruction, offline.")
            { checkpoint, image, proprio, instruction, unnormKey, centerCrop, json };
        model.AddTo(cmd);
        cmd.SetAction(r =>
        {
            var options = model.Read(r, r.GetValue(centerCrop));
            var frames = r.GetValue(image)!.Select(ImageDecoder.Load).ToArray();
            var state = r.GetValue(proprio) is string text ? ParseVector(text, "--proprio") : null;
            using var policy = VlaPolicy.Load(DefaultModel.Resolve(r.GetValue(checkpoint)), options);
            if (state is not null && policy.Description.ProprioDim == 0)
                throw new UsageException("--proprio given, but this model takes no proprioceptive state");
            var p = policy.Predict(new VlaObservation(frames, r.GetValue(instruction)!, r.GetValue(unnormKey), state));
            if (r.GetValue(json)) Console.WriteLine(PredictionJson(p).ToJsonString());
            else
            {
                string Vec(float[] v) => "[" + string.Join(", ", v.Select(x => x.ToString("0.#####"))) + "]";
                if (p.ChunkLength == 1) Console.WriteLine($"action ({p.UnnormKey}): {Vec(p.Action)}");
                else
                {
                    Console.WriteLine($"actions ({p.UnnormKey}, chunk of {p.ChunkLength}):");
                    for (int k = 0; k < p.ChunkLength; k++) Console.WriteLine($"  {k}: {Vec(p.Actions[k])}");
                }
                if (p.ActionTokenIds.Length > 0) Console.WriteLine($"tokens: [{string.Join(", ", p.ActionTokenIds)}]");
                var t = p.Timings;
                Console.WriteLine(p.ActionTokenIds.Length > 0 || p.ChunkLength == 1
                    ? $"ms: preprocess {t.PreprocessMs:0.0}, vision {t.VisionMs:0.0}, prefill {t.PrefillMs:0.0}, decode {t.DecodeMs:0.0}, total {t.TotalMs:0.0}"
                    : $"ms: preprocess {t.PreprocessMs:0.0}, vision {t.VisionMs:0.0}, language model {t.PrefillMs:0.0}, action head {t.DecodeMs:0.0}, total {t.TotalMs:0.0}");
            }
            return CliExit.Ok;
        });
        return cmd;
    }

    /// <summary>"v1,v2,..." → floats; anything else (empty items, words, NaN, infinities) is the user's error.</summary>
    internal static float[] ParseVector(string text, string option)
    {
        var items = text.Split(',', StringSplitOptions.TrimEntries);
        var values = new float[items.Length];
        for (int i = 0; i < items.Length; i++)
            if (!float.TryParse(items[i], System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out values[i]) || !float.IsFinite(values[i]))
                throw new UsageException($"{option}: '{items[i]}' (item {i + 1}) is not a finite number");
        return values;
    }

    /// <summary>The predict contract: one object with the chunk ("actions", "normalized_actions"), its first action
    /// ("action"), prompt ids, unnorm_key and timings_ms; a token head (plain OpenVLA) adds "normalized_action" and
    /// "action_token_ids".</summary>
    public static JsonObject PredictionJson(ActionPrediction p)
    {
        JsonArray Row(float[] v) => new(v.Select(x => (JsonNode)x).ToArray());
        JsonArray Rows(float[][] m) => new(m.Select(r => (JsonNode)Row(r)).ToArray());
        var o = new JsonObject
        {
            ["actions"] = Rows(p.Actions),
            ["normalized_actions"] = Rows(p.NormalizedActions),
            ["action"] = Row(p.Action),
        };
        if (p.ActionTokenIds.Length > 0 || p.ChunkLength == 1)
        {
            o["normalized_action"] = Row(p.NormalizedAction);
            o["action_token_ids"] = new JsonArray(p.ActionTokenIds.Select(v => (JsonNode)v).ToArray());
        }
        o["prompt_token_ids"] = new JsonArray(p.PromptTokenIds.Select(v => (JsonNode)v).ToArray());
        o["unnorm_key"] = p.UnnormKey;
        o["timings_ms"] = new JsonObject
        {
            ["preprocess"] = Math.Round(p.Timings.PreprocessMs, 3), ["vision"] = Math.Round(p.Timings.VisionMs, 3),
            ["prefill"] = Math.Round(p.Timings.PrefillMs, 3), ["decode"] = Math.Round(p.Timings.DecodeMs, 3),
            ["total"] = Math.Round(p.Timings.TotalMs, 3),
        };
        return o;
    }

    static Command MakeCheckpoint()
    {
        var preset = new Option<string>("--preset") { Description = $"sizes: {string.Join(" | ", CheckpointPreset.Names)}", Required = true };
        var outDir = new Option<string>("--out") { Description = "directory to write", Required = true };
        var seed = new Option<int>("--seed") { Description = "random seed of the weights", DefaultValueFactory = _ => 0 };
        var dtype = new Option<string>("--dtype") { Description = "stored precision: bf16 or f32", DefaultValueFactory = _ => "bf16" };
        var shardMb = new Option<long>("--max-shard-mb") { Description = "shard size limit in MB (HF default 5000)", DefaultValueFactory = _ => 5000 };
        var patchSize = new Option<int?>("--patch-size")
        {
            Description = "both towers' patch size in pixels, for the presets with our own tower sizes (default: the preset's; e.g. 14 on small gives 8x8 image tokens per tower instead of 4x4)",
        };
        var cmd = new Command("make-checkpoint", "Write a random-weight checkpoint in the Hugging Face OpenVLA layout.")
            { preset, outDir, seed, dtype, shardMb, patchSize };
        cmd.SetAction(r =>
        {
            var type = r.GetValue(dtype) switch
            {
                "bf16" => torch.ScalarType.BFloat16,
                "f32" => torch.ScalarType.Float32,
                var other => throw new UsageException($"unknown --dtype '{other}' (valid: bf16, f32)"),
            };
            if (r.GetValue(shardMb) <= 0) throw new UsageException("--max-shard-mb must be positive");
            var name = r.GetValue(preset)!;
            var sizes = CheckpointPreset.Get(name); // validates the name (and the patch size) before anything is written
            if (r.GetValue(patchSize) is int patch) sizes = sizes.WithPatchSize(patch);
            using var progress = new ConsoleProgress($"make-checkpoint {name}");
            CheckpointMaker.Write(r.GetValue(outDir)!, sizes, r.GetValue(seed), type, r.GetValue(shardMb) * 1_000_000, progress);
            Console.WriteLine(Path.GetFullPath(r.GetValue(outDir)!));
            return CliExit.Ok;
        });
        return cmd;
    }

    static Command Demo()
    {
        var cmd = new Command("demo", "Predict one action with the default model from a rendered frame of the tabletop simulation.");
        cmd.SetAction(_ =>
        {
            var dir = DefaultModel.Resolve(null);
            using var policy = VlaPolicy.Load(dir);
            int size = policy.Checkpoint.Config.ImageSize;
            var task = TabletopTasks.All[0];
            var episode = task.Sample(TabletopTasks.EpisodeSeed(7, task.Id, 0));
            byte[] pixels;
            using (var env = new TabletopEnv(size)) { env.Reset(episode.Layout); pixels = env.Render(); }
            var p = policy.Predict(new VlaObservation([new RgbImage(size, size, pixels)], episode.Instruction));
            Console.WriteLine($"instruction: {episode.Instruction} (first frame of a {task.Id} episode, {size}x{size})");
            Console.WriteLine(PredictionJson(p).ToJsonString(new JsonSerializerOptions { WriteIndented = false }));
            return CliExit.Ok;
        });
        return cmd;
    }
}
