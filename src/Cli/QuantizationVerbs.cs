using System.CommandLine;
using System.Text.Json.Nodes;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Preprocessing;
using OpenVLA.Policy.Quantization;
using TorchSharp;

namespace OpenVLA.Cli;

/// <summary>
/// quantize (write a pre-quantized checkpoint), convert (change the stored float precision) and fidelity (compare
/// none/int8/int4 on the same observations).
/// </summary>
internal static class QuantizationVerbs
{
    public static IEnumerable<Command> Create() => [Quantize(), Convert(), Fidelity()];

    static Command Convert()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "bf16/f32 Hugging Face OpenVLA checkpoint directory", Required = true };
        var outDir = new Option<string>("--out") { Description = "directory for the converted checkpoint", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "stored precision: bf16 or f32", Required = true };
        var decode = new Option<string?>("--decode")
        {
            Description = "record the checkpoint's decoding in generation_config.json (greedy | sample[:T][,top_k=K][,top_p=P][,gripper=greedy]); default: keep the source's",
        };
        var cmd = new Command("convert",
            "Write a copy of a checkpoint in another float precision (e.g. a full training run's f32 weights as bf16, as published checkpoints are).")
            { checkpoint, outDir, dtype, decode };
        cmd.SetAction(r =>
        {
            var decoding = r.GetValue(decode) is { } d ? ActionDecoding.Parse(d) : null;
            if (decoding?.Mode == DecodingMode.Expected)
                throw new UsageException("--decode expected has no generation_config.json form (do_sample covers greedy and sampling only)");
            var source = VlaCheckpoint.Open(DefaultModel.Resolve(r.GetValue(checkpoint)!));
            var stored = PolicyOptions.ParseDType(r.GetValue(dtype)!);
            if (source.Config.StoredQuantization is not null) throw new UsageException("--checkpoint is pre-quantized; convert needs a bf16/f32 checkpoint");
            // Load in f32 and round once to the stored precision.
            using var model = new OpenVlaModel(source.Config, ModelPrecision.Cpu(torch.ScalarType.Float32));
            WeightLoader.Load(model, source);
            string outPath = r.GetValue(outDir)!;
            CheckpointWriter.Write(outPath, source, model, stored, datasetStatistics: null);
            // A fine-tune's statistics live in dataset_statistics.json, which our loader (like the reference's
            // deploy script) prefers; transformers' predict_action reads config.json's norm_stats, so the copy carries the
            // statistics the checkpoint really un-normalizes with in both places.
            var statsPath = Path.Combine(outPath, "dataset_statistics.json");
            if (File.Exists(statsPath))
            {
                var configPath = Path.Combine(outPath, "config.json");
                var config = JsonNode.Parse(File.ReadAllText(configPath))!.AsObject();
                config["norm_stats"] = JsonNode.Parse(File.ReadAllText(statsPath));
                File.WriteAllText(configPath, config.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
            }
            decoding?.WriteGenerationConfig(Path.Combine(outPath, "generation_config.json"));
            Console.WriteLine(Path.GetFullPath(outPath));
            return CliExit.Ok;
        });
        return cmd;
    }

    static Command Quantize()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "bf16/f32 Hugging Face OpenVLA checkpoint directory", Required = true };
        var outDir = new Option<string>("--out") { Description = "directory for the pre-quantized checkpoint", Required = true };
        var mode = new Option<string>("--mode") { Description = "int8 or int4", Required = true };
        var groupSize = new Option<int>("--group-size") { Description = "int4 group size: 32, 64, 128 or 256", DefaultValueFactory = _ => 128 };
        var keepVision = new Option<bool>("--keep-vision-float") { Description = "leave the vision towers unquantized" };
        var minMax = new Option<bool>("--int4-minmax") { Description = "int4: each group's min–max range instead of the least-error one (13x faster, less accurate)" };
        var calibration = new Option<string[]>("--calibration")
        {
            Description = "GPTQ: calibrate on frames of this LeRobot/RLDS dataset (repeat to combine datasets) instead of rounding each weight to nearest",
            AllowMultipleArgumentsPerToken = true,
        };
        var samples = new Option<int>("--calibration-samples") { Description = "GPTQ: frames drawn at random from the calibration data", DefaultValueFactory = _ => 128 };
        var damp = new Option<double>("--damp") { Description = "GPTQ: added to each Hessian's diagonal, as a fraction of its mean", DefaultValueFactory = _ => 0.01 };
        var columnOrder = new Option<string>("--column-order")
        {
            Description = "GPTQ: act (inputs with the most energy first; int4 keeps its stored groups) or natural",
            DefaultValueFactory = _ => "act",
        };
        var seed = new Option<int>("--seed") { Description = "GPTQ: which frames are drawn", DefaultValueFactory = _ => 0 };
        var unnormKey = new Option<string?>("--unnorm-key") { Description = "GPTQ: dataset statistics to run the calibration with (checkpoints with several)" };
        var device = new Option<string>("--device") { Description = "GPTQ: where the calibration and the quantization run (cpu, cuda, cuda:N)", DefaultValueFactory = _ => "cpu" };
        var cmd = new Command("quantize", "Write a pre-quantized copy of a checkpoint (loads without materialising float weights), by round-to-nearest or, with --calibration, GPTQ.")
            { checkpoint, outDir, mode, groupSize, keepVision, minMax, calibration, samples, damp, columnOrder, seed, unnormKey, device };
        cmd.SetAction(r =>
        {
            string source = DefaultModel.Resolve(r.GetValue(checkpoint)!);
            var options = QuantizationOptions.Parse(r.GetValue(mode)!, r.GetValue(groupSize), !r.GetValue(keepVision), !r.GetValue(minMax));
            var datasets = r.GetValue(calibration) ?? [];
            if (datasets.Length == 0 && new Option[] { samples, damp, columnOrder, seed, unnormKey, device }.FirstOrDefault(o => r.GetResult(o) is { Implicit: false }) is { } gptqOnly)
                throw new UsageException($"{gptqOnly.Name} applies to GPTQ: add --calibration DATASET (without it, quantize rounds to nearest)");
            if (datasets.Length == 0)
            {
                using var progress = new ConsoleProgress($"quantize {options.Name}");
                QuantizedCheckpointWriter.Write(source, r.GetValue(outDir)!, options, progress);
            }
            else
            {
                bool actOrder = r.GetValue(columnOrder) switch
                {
                    "act" => true,
                    "natural" => false,
                    var o => throw new UsageException($"--column-order must be act or natural, got '{o}'"),
                };
                if (r.GetValue(samples) < 1) throw new UsageException($"--calibration-samples must be at least 1, got {r.GetValue(samples)}");
                var observations = CalibrationFrames.Draw(datasets, r.GetValue(samples), r.GetValue(seed), r.GetValue(unnormKey));
                CalibrationResult result;
                using (var progress = new ConsoleProgress($"calibrate {options.Name} on {observations.Count} frames"))
                    result = CalibratedQuantizer.Run(source, observations, options, r.GetValue(damp), actOrder, device: r.GetValue(device)!, progress: progress);
                var record = new JsonObject
                {
                    ["method"] = "gptq",
                    ["damp"] = r.GetValue(damp),
                    ["samples"] = observations.Count,
                    ["seed"] = r.GetValue(seed),
                    ["datasets"] = new JsonArray(datasets.Select(d => (JsonNode)DirectoryName(d)).ToArray()),
                    ["column_order"] = actOrder ? "act-order, static groups" : "natural",
                    ["hessians"] = "float model",
                };
                using (var progress = new ConsoleProgress($"write {options.Name}"))
                    QuantizedCheckpointWriter.Write(source, r.GetValue(outDir)!, options, progress, result.Weights, record);
                PrintCalibration(result);
            }
            Console.WriteLine(Path.GetFullPath(r.GetValue(outDir)!));
            return CliExit.Ok;
        });
        return cmd;
    }

    /// <summary>A directory's own name, also when given with a trailing slash or as ".".</summary>
    static string DirectoryName(string dir) => Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(dir)));

    /// <summary>The layers' relative output errors on the calibration frames, by layer kind (the name's last part).</summary>
    static void PrintCalibration(CalibrationResult result)
    {
        Console.WriteLine($"GPTQ on {result.Observations} frames, {result.Layers.Count} layers ({result.Passes} calibration pass(es)); relative output error on the calibration inputs:");
        Console.WriteLine($"{"layer kind",-14} {"layers",6} {"round-to-nearest",17} {"GPTQ",10} {"change",8}");
        string Kind(string name) => name[..^".weight".Length].Split('.')[^1];
        foreach (var g in result.Layers.GroupBy(l => Kind(l.Name)).Append(result.Layers.GroupBy(_ => "all").Single()))
        {
            double rtn = g.Average(l => l.RoundToNearestError), gptq = g.Average(l => l.GptqError);
            Console.WriteLine($"{g.Key,-14} {g.Count(),6} {rtn,17:0.000e+00} {gptq,10:0.000e+00} {(rtn > 0 ? gptq / rtn - 1 : 0),8:+0%;-0%;0%}");
        }
    }

    static Command Fidelity()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "bf16/f32 checkpoint directory", Required = true };
        var images = new Option<string>("--images") { Description = "directory of PNG/JPEG frames", Required = true };
        var instructions = new Option<string[]>("--instruction") { Description = "instruction(s) to pair with every frame", Required = true, AllowMultipleArgumentsPerToken = true };
        var unnormKey = new Option<string?>("--unnorm-key") { Description = "dataset statistics to un-normalize with" };
        var groupSize = new Option<int>("--group-size") { Description = "int4 group size", DefaultValueFactory = _ => 128 };
        var keepVision = new Option<bool>("--keep-vision-float") { Description = "quantize the language model and projector only, as serve --keep-vision-float" };
        var limit = new Option<int>("--limit") { Description = "at most this many frames", DefaultValueFactory = _ => 100 };
        var json = new Option<bool>("--json") { Description = "print one JSON object" };
        var quantized = new Option<string[]>("--quantized")
        {
            Description = "also compare these pre-quantized copies of the checkpoint (e.g. `quantize --calibration` output), named by directory",
            AllowMultipleArgumentsPerToken = true,
        };
        var cmd = new Command("fidelity", "Run the same observations through f32, bf16, int8 and int4 (searched and min–max ranges) and compare tokens and actions with bf16.")
            { checkpoint, images, instructions, unnormKey, groupSize, keepVision, limit, json, quantized };
        cmd.SetAction(r =>
        {
            string source = DefaultModel.Resolve(r.GetValue(checkpoint)!);
            var dir = r.GetValue(images)!;
            if (!Directory.Exists(dir)) throw new UsageException($"--images directory '{dir}' does not exist");
            var files = Directory.EnumerateFiles(dir).Where(f => f.EndsWith(".png", StringComparison.OrdinalIgnoreCase)
                || f.EndsWith(".jpg", StringComparison.OrdinalIgnoreCase) || f.EndsWith(".jpeg", StringComparison.OrdinalIgnoreCase))
                .Order(StringComparer.Ordinal).Take(r.GetValue(limit)).ToList();
            if (files.Count == 0) throw new UsageException($"no PNG/JPEG frames in '{dir}'");
            var observations = files.SelectMany(f => r.GetValue(instructions)!.Select(i => new VlaObservation([ImageDecoder.Load(f)], i, r.GetValue(unnormKey)))).ToList();
            bool vision = !r.GetValue(keepVision);
            string suffix = vision ? "" : "-lm";
            // Greedy whatever the checkpoint's generation_config.json says: sampled tokens would differ by chance, and this
            // compares the numerics.
            var greedy = new PolicyOptions { Decoding = "greedy" };
            var variants = new (string Name, PolicyOptions Options)[]
            {
                ("f32", greedy with { DType = "f32" }),
                ("bf16", greedy with { DType = "bf16" }),
                ("int8" + suffix, greedy with { Quantize = "int8", QuantizeVision = vision }),
                ($"int4-g{r.GetValue(groupSize)}{suffix}", greedy with { Quantize = "int4", GroupSize = r.GetValue(groupSize), QuantizeVision = vision }),
                ($"int4-g{r.GetValue(groupSize)}-minmax{suffix}", greedy with { Quantize = "int4", GroupSize = r.GetValue(groupSize), QuantizeVision = vision, Int4RangeSearch = false }),
            };
            var stored = (r.GetValue(quantized) ?? []).Select(d => (Name: DirectoryName(d), Dir: d)).ToList();
            foreach (var (name, d) in stored)
            {
                if (VlaCheckpoint.Open(d).Config.StoredQuantization is null) throw new UsageException($"--quantized {d} is not a pre-quantized checkpoint");
                if (variants.Any(v => v.Name == name) || stored.Count(s => s.Name == name) > 1) throw new UsageException($"--quantized: two variants are named '{name}'");
            }
            var runs = variants.Select(v => (v.Name, Dir: source, v.Options))
                .Concat(stored.Select(s => (s.Name, s.Dir, Options: greedy))).ToList();
            var results = new Dictionary<string, List<ActionPrediction>>();
            using (var progress = new ConsoleProgress("fidelity"))
            {
                int done = 0;
                foreach (var (name, variantDir, options) in runs)
                {
                    using var policy = VlaPolicy.Load(variantDir, options);
                    results[name] = [];
                    foreach (var batch in observations.Chunk(8))
                    {
                        results[name].AddRange(policy.PredictBatch(batch));
                        progress.Report((double)(done += batch.Length) / (observations.Count * runs.Count));
                    }
                }
            }
            var report = FidelityReport.Compare(results["bf16"], results);
            if (r.GetValue(json)) Console.WriteLine(report.ToJsonString());
            else
            {
                Console.WriteLine($"{observations.Count} observations ({files.Count} frames x {r.GetValue(instructions)!.Length} instructions), compared with bf16:");
                Console.WriteLine($"{"variant",-20} {"token agreement",16} {"max |Δa|",10} {"mean |Δa|",10}");
                foreach (var (name, v) in report)
                    Console.WriteLine($"{name,-20} {v!["token_agreement"]!.GetValue<double>(),15:P2} {v["max_abs_action_diff"]!.GetValue<double>(),10:0.00000} {v["mean_abs_action_diff"]!.GetValue<double>(),10:0.00000}");
            }
            return CliExit.Ok;
        });
        return cmd;
    }
}

/// <summary>Token agreement and action differences of several runs against a reference run of the same observations.</summary>
public static class FidelityReport
{
    public static JsonObject Compare(IReadOnlyList<ActionPrediction> reference, IReadOnlyDictionary<string, List<ActionPrediction>> runs)
    {
        var report = new JsonObject();
        foreach (var (name, run) in runs)
        {
            long same = 0, total = 0;
            double max = 0, sum = 0;
            for (int i = 0; i < reference.Count; i++)
                for (int d = 0; d < reference[i].ActionTokenIds.Length; d++)
                {
                    total++;
                    if (reference[i].ActionTokenIds[d] == run[i].ActionTokenIds[d]) same++;
                    double diff = Math.Abs(reference[i].Action[d] - run[i].Action[d]);
                    max = Math.Max(max, diff);
                    sum += diff;
                }
            report[name] = new JsonObject
            {
                ["token_agreement"] = total == 0 ? 1.0 : (double)same / total,
                ["max_abs_action_diff"] = max,
                ["mean_abs_action_diff"] = total == 0 ? 0 : sum / total,
                ["observations"] = reference.Count,
            };
        }
        return report;
    }
}
