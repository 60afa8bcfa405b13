using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.FineTune.Data;
using OpenVLA.FineTune.Training;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Preprocessing;
using OpenVLA.Policy.Quantization;
using OpenVLA.Policy.Tokenization;
using TorchSharp;

namespace OpenVLA.Cli;

/// <summary>finetune, merge and finetune-benchmark: the verbs of the LoRA / full fine-tuning tool.</summary>
internal static class FineTuneVerbs
{
    public static IEnumerable<Command> Create() => [Finetune(), Merge(), Benchmark()];

    /// <summary>The options that describe a training run, shared by finetune and finetune-benchmark (defaults: finetune.py).</summary>
    internal sealed class TrainingOptions
    {
        public Option<bool> Full { get; } = new("--full") { Description = "train every parameter instead of LoRA adapters (from-scratch training of small models)" };
        public Option<bool> FreezeVision { get; } = new("--freeze-vision") { Description = "keep both vision towers frozen (no adapters or updates there, no backward through them)" };
        public Option<string> TargetModules { get; } = new("--target-modules") { Description = "LoRA targets: all-linear, or comma-separated module names/paths (q_proj,v_proj,...)", DefaultValueFactory = _ => PeftAdapter.AllLinear };
        public Option<int> Rank { get; } = new("--lora-rank") { Description = "LoRA rank r", DefaultValueFactory = _ => 32 };
        public Option<double?> Alpha { get; } = new("--lora-alpha") { Description = "LoRA alpha (default min(r, 16), as finetune.py)" };
        public Option<double> Dropout { get; } = new("--lora-dropout") { Description = "LoRA dropout", DefaultValueFactory = _ => 0.0 };
        public Option<double> LearningRate { get; } = new("--lr") { Description = "peak learning rate (AdamW)", DefaultValueFactory = _ => 5e-4 };
        public Option<double> WeightDecay { get; } = new("--weight-decay") { Description = "AdamW decoupled weight decay (torch default)", DefaultValueFactory = _ => 0.01 };
        public Option<string> Schedule { get; } = new("--schedule") { Description = "learning-rate schedule: constant or cosine", DefaultValueFactory = _ => "constant" };
        public Option<int> Warmup { get; } = new("--warmup-steps") { Description = "linear warm-up steps", DefaultValueFactory = _ => 0 };
        public Option<int> MaxSteps { get; } = new("--max-steps") { Description = "optimizer steps", DefaultValueFactory = _ => 200_000 };
        public Option<int> BatchSize { get; } = new("--batch-size") { Description = "examples per micro-batch", DefaultValueFactory = _ => 16 };
        public Option<int> Accumulation { get; } = new("--grad-accumulation") { Description = "micro-batches per optimizer step", DefaultValueFactory = _ => 1 };
        public Option<double> MaxGradNorm { get; } = new("--max-grad-norm") { Description = "clip the global gradient norm (0: off, as finetune.py)", DefaultValueFactory = _ => 1.0 };
        public Option<bool> Checkpointing { get; } = new("--grad-checkpointing") { Description = "recompute decoder layers and ViT blocks in backward (less memory, ~1.3x compute)" };
        public Option<ulong> Seed { get; } = new("--seed") { Description = "seed of adapter init, dropout and data order", DefaultValueFactory = _ => 7UL };
        public Option<string?> DType { get; } = new("--dtype") { Description = "weight precision: bf16 or f32 (default bf16 for LoRA, f32 for --full)" };
        public Option<string> Quantize { get; } = new("--quantize") { Description = "QLoRA-style frozen base: none or int8 (weight-only, per channel; CPU kernels)", DefaultValueFactory = _ => "none" };
        public Option<string> Device { get; } = new("--device") { Description = "TorchSharp device (cpu, cuda, cuda:N)", DefaultValueFactory = _ => "cpu" };
        public Option<int?> Threads { get; } = new("--threads") { Description = "CPU threads (default: one per core)" };

        public void AddTo(Command command)
        {
            foreach (var o in new Option[] { Full, FreezeVision, TargetModules, Rank, Alpha, Dropout, LearningRate, WeightDecay, Schedule, Warmup, MaxSteps,
                         BatchSize, Accumulation, MaxGradNorm, Checkpointing, Seed, DType, Quantize, Device, Threads })
                command.Options.Add(o);
        }

        public TrainerOptions Read(ParseResult r)
        {
            int rank = r.GetValue(Rank);
            var targets = r.GetValue(TargetModules)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            var options = new TrainerOptions
            {
                Full = r.GetValue(Full), FreezeVision = r.GetValue(FreezeVision),
                Lora = new LoraSettings(rank, r.GetValue(Alpha) ?? LoraSettings.DefaultAlpha(rank), r.GetValue(Dropout), targets),
                Optimizer = new AdamW.Settings(LearningRate: r.GetValue(LearningRate), WeightDecay: r.GetValue(WeightDecay)),
                Schedule = r.GetValue(Schedule)!,
                WarmupSteps = r.GetValue(Warmup),
                MaxSteps = r.GetValue(MaxSteps),
                BatchSize = r.GetValue(BatchSize),
                GradAccumulation = r.GetValue(Accumulation),
                MaxGradNorm = r.GetValue(MaxGradNorm),
                GradientCheckpointing = r.GetValue(Checkpointing),
                Seed = r.GetValue(Seed),
            };
            if (rank < 1) throw new UsageException($"--lora-rank must be at least 1, got {rank}");
            if (options.Lora.Dropout is < 0 or >= 1) throw new UsageException($"--lora-dropout must be in [0, 1), got {options.Lora.Dropout}");
            try { options.Validate(); }
            catch (ArgumentException e) { throw new UsageException(e.Message); }
            if (r.GetValue(Threads) is int n)
            {
                if (n <= 0) throw new UsageException("--threads must be positive");
                torch.set_num_threads(n);
            }
            return options;
        }

        public torch.ScalarType WeightType(ParseResult r)
        {
            if (Quantization(r).Mode != QuantMode.None)
            {
                // The int8 kernels take bf16 activations (their f32 path is a slow reference).
                if (r.GetValue(DType) is { } d && PolicyOptions.ParseDType(d) != torch.ScalarType.BFloat16) throw new UsageException("--quantize int8 trains with bf16 activations; drop --dtype f32");
                return torch.ScalarType.BFloat16;
            }
            return PolicyOptions.ParseDType(r.GetValue(DType) ?? (r.GetValue(Full) ? "f32" : "bf16"));
        }

        public QuantizationOptions Quantization(ParseResult r) => r.GetValue(Quantize) switch
        {
            "none" => QuantizationOptions.None,
            "int8" => QuantizationOptions.Parse("int8"),
            "int4" => throw new UsageException("--quantize int4 is not supported for training (its backward would rebuild every weight through the kernel); use int8"),
            var other => throw new UsageException($"unknown --quantize '{other}' (valid: none, int8)"),
        };

        /// <summary>The trainer, with its option conflicts (e.g. --merge on a quantized base) reported as usage errors.</summary>
        public static Trainer NewTrainer(OpenVlaModel model, VlaCheckpoint checkpoint, VlaTokenizer tokenizer, TrainerOptions options, string outDir, JsonObject stats,
            ArrayStatistics? auxStatistics = null)
        {
            try { return new Trainer(model, checkpoint, tokenizer, options, outDir, stats, auxStatistics); }
            catch (ArgumentException e) { throw new UsageException(e.Message); }
        }

        public torch.Device TorchDevice(ParseResult r) => PolicyOptions.ParseDevice(r.GetValue(Device)!);
    }

    static Command Finetune()
    {
        var training = new TrainingOptions();
        var baseDir = new Option<string?>("--base") { Description = "base Hugging Face OpenVLA checkpoint directory (for --full from scratch: a random-weight one from make-checkpoint)" };
        var dataset = new Option<string[]>("--dataset")
        {
            Description = "LeRobot v2.1 or RLDS (TFRecord) dataset: a directory, a TFDS root (newest version), or a LeRobot repo id ORG/NAME in $HF_LEROBOT_HOME; " +
                          "repeat it to train on the union of several of one layout (e.g. demos and DAgger rollouts)",
            AllowMultipleArgumentsPerToken = false,
        };
        var dataDir = new Option<string?>("--data-dir") { Description = "TFDS data_dir: each --dataset is a dataset name under it (DIR/NAME/VERSION)" };
        var datasetVersion = new Option<string?>("--dataset-version") { Description = "TFDS version folder to read (e.g. 1.0.0); default: the newest" };
        var datasetConfig = new Option<string?>("--dataset-config") { Description = "per-dataset mapping JSON (keys, gripper convention, normalization mask); default: the layout's defaults" };
        var datasetFormat = new Option<string?>("--dataset-format") { Description = "lerobot or rlds (default: detected)" };
        var datasetWeights = new Option<string?>("--dataset-weights")
        {
            Description = "with several --dataset: a mixture, one positive weight per dataset (e.g. 1,3: the second's frames three times as often as the first's); default: each in proportion to its size",
        };
        var outDir = new Option<string?>("--out") { Description = "run directory: step-N/ checkpoints, metrics.jsonl, metrics.png, dataset_statistics.json" };
        var saveSteps = new Option<int>("--save-steps") { Description = "save every N optimizer steps (and at the end)", DefaultValueFactory = _ => 5000 };
        var evalSteps = new Option<int>("--eval-steps") { Description = "evaluate on the held-out split every N steps (and at the end); 0: only at the end", DefaultValueFactory = _ => 500 };
        var evalExamples = new Option<int>("--eval-examples") { Description = "held-out examples scored per evaluation", DefaultValueFactory = _ => 256 };
        var heldOut = new Option<double>("--held-out-fraction") { Description = "share of episodes held out for evaluation", DefaultValueFactory = _ => 0.05 };
        var shuffle = new Option<int>("--shuffle-buffer") { Description = "steps in the shuffle buffer (reference 100000; memory: that many encoded frames)", DefaultValueFactory = _ => 10_000 };
        var imageAug = new Option<bool>("--image-aug") { Description = "OpenVLA image augmentation (random resized crop 90% area, colour jitter); predict with --center-crop afterwards" };
        var randomShift = new Option<int>("--random-shift") { Description = "augmentation: translate each frame by up to N pixels (border repeated); needs nothing at inference", DefaultValueFactory = _ => 0 };
        var merge = new Option<bool>("--merge") { Description = "also write the merged Hugging Face checkpoint at every save (LoRA)" };
        var keep = new Option<int>("--keep-checkpoints") { Description = "checkpoints kept on disk (the reference keeps the latest)", DefaultValueFactory = _ => 1 };
        var resume = new Option<bool>("--resume") { Description = "continue from the latest checkpoint in --out exactly where it stopped" };
        var dryRun = new Option<bool>("--dry-run") { Description = "print the memory budget for these options and exit" };
        var preset = new Option<string?>("--preset") { Description = $"with --dry-run and no --base: plan for a preset ({string.Join(" | ", CheckpointPreset.Names)})" };
        var promptTokens = new Option<int>("--prompt-tokens") { Description = "with --dry-run: prompt length in tokens", DefaultValueFactory = _ => 32 };
        var json = new Option<bool>("--json") { Description = "machine-readable output (the plan with --dry-run, a summary otherwise)" };
        var auxWeight = new Option<double>("--aux-weight") { Description = "weight of an auxiliary loss: a linear head on the image tokens regresses --aux-keys (standardized); for training from scratch, never exported", DefaultValueFactory = _ => 0.0 };
        var auxKeys = new Option<string?>("--aux-keys") { Description = "LeRobot vector keys the auxiliary head regresses, comma-separated (e.g. observation.state,observation.environment_state); default: the dataset config's aux_keys" };
        var oft = new Option<bool>("--oft")
        {
            Description = "train OpenVLA-OFT: a chunk of continuous actions per frame in one bidirectional pass, an L1-regression MLP-ResNet head (new heads start as openvla-oft initializes them); the output loads in predict/serve/eval as an OFT checkpoint",
        };
        var actionChunk = new Option<int?>("--action-chunk") { Description = "OFT: actions per chunk, default 8 (the last K−1 steps of each episode are not samples, as in openvla-oft)" };
        var proprio = new Option<bool>("--proprio") { Description = "OFT: give the model the robot's state (the dataset's proprio key, normalized like the actions) through a proprio projector" };
        var imageKeys = new Option<string?>("--image-keys")
        {
            Description = "cameras, comma-separated, third-person first (e.g. observation.images.image,observation.images.wrist_image); default: the dataset config's",
        };
        var visionCache = new Option<int>("--vision-cache")
        {
            Description = "freeze the vision towers and run them once: N passes over the training frames (each with its own augmentation draw) are encoded " +
                          "up front and kept in memory as float16 features, and the steps train projector, language model and heads on them (implies --freeze-vision; not for FiLM)",
            DefaultValueFactory = _ => 0,
        };
        var cmd = new Command("finetune", "Fine-tune an OpenVLA checkpoint with LoRA (or train it in full) on a robot dataset.")
            { baseDir, dataset, datasetConfig, datasetFormat, datasetWeights, outDir, saveSteps, evalSteps, evalExamples, heldOut, shuffle, imageAug, randomShift, merge, keep, resume, dryRun, preset, promptTokens, json, auxWeight, auxKeys,
              oft, actionChunk, proprio, imageKeys, visionCache, dataDir, datasetVersion };
        training.AddTo(cmd);
        cmd.SetAction(r =>
        {
            bool trainOft = r.GetValue(oft);
            var options = training.Read(r) with
            {
                SaveSteps = r.GetValue(saveSteps), EvalSteps = r.GetValue(evalSteps), EvalExamples = r.GetValue(evalExamples),
                // An OFT run always writes the merged model: that directory (with the head files) is what predict loads.
                Merge = r.GetValue(merge) || trainOft, KeepCheckpoints = r.GetValue(keep), AuxWeight = r.GetValue(auxWeight),
            };
            int cachePasses = r.GetValue(visionCache);
            if (cachePasses < 0) throw new UsageException($"--vision-cache must be 0 (off) or a number of passes, not {cachePasses}");
            if (cachePasses > 0) options = options with { FreezeVision = true };
            int chunk = r.GetValue(actionChunk) ?? 8;
            if (!trainOft && (r.GetValue(proprio) || r.GetValue(actionChunk) is not null))
                throw new UsageException("--action-chunk and --proprio train OpenVLA-OFT models: add --oft");
            if (chunk is < 1 or > 256) throw new UsageException($"--action-chunk must be 1..256, got {chunk}");
            try { options.Validate(); }
            catch (ArgumentException e) { throw new UsageException(e.Message); }
            int shift = r.GetValue(randomShift);
            if (shift < 0) throw new UsageException($"--random-shift must be 0 or more pixels, not {shift}");
            if (shift > 0 && r.GetValue(imageAug)) throw new UsageException("--random-shift and --image-aug are alternatives: pick one");
            var dtype = training.WeightType(r);
            int elementBytes = dtype == torch.ScalarType.Float32 ? 4 : 2;

            if (r.GetValue(dryRun))
            {
                VlaConfig config;
                string what;
                if (r.GetValue(baseDir) is { } b) { config = VlaCheckpoint.Open(DefaultModel.Resolve(b, "--base")).Config; what = b; }
                else if (r.GetValue(preset) is { } p) { config = VlaConfig.Parse(CheckpointMaker.ConfigJson(CheckpointPreset.Get(p), dtype), p); what = p; }
                else throw new UsageException("--dry-run needs --base DIR or --preset NAME");
                // OFT without a dataset: 7-D actions and, with --proprio, LIBERO's 8-D state; cameras from --image-keys (default 1).
                OftSpec? plannedOft = trainOft
                    ? new OftSpec(chunk, 7, r.GetValue(proprio) ? 8 : 0, r.GetValue(imageKeys)?.Split(',', StringSplitOptions.RemoveEmptyEntries).Length ?? 1,
                        false, BoundsNormalization.Q99, "(planned)", null, null, "dry run")
                    : null;
                var budget = MemoryPlanner.Plan(config, options, elementBytes, r.GetValue(promptTokens), training.Quantization(r), plannedOft);
                string mode = options.Full ? "full training" : $"LoRA r={options.Lora.Rank} alpha={options.Lora.Alpha} {string.Join(",", options.Lora.TargetModules)}";
                if (plannedOft is not null) mode += $", OFT chunks of {chunk}, {plannedOft.NumImages} camera(s){(plannedOft.ProprioDim > 0 ? ", 8-D proprio" : "")}";
                if (training.Quantization(r).Mode != QuantMode.None) mode += ", int8 base";
                PrintPlan(budget, $"memory plan: {what}, {mode}, {MemoryPlanner.Precision(elementBytes)} weights, batch {options.BatchSize}, " +
                                $"gradient checkpointing {(options.GradientCheckpointing ? "on" : "off")}", r.GetValue(json));
                return CliExit.Ok;
            }

            string basePath = DefaultModel.Resolve(r.GetValue(baseDir) ?? throw new UsageException("--base is required (a Hugging Face OpenVLA checkpoint directory)"), "--base");
            string[] datasetPaths = r.GetValue(dataset) is { Length: > 0 } given ? given : throw new UsageException("--dataset is required");
            double[]? mixture = null;
            if (r.GetValue(datasetWeights) is { } weightText)
            {
                var parts = weightText.Split(',', StringSplitOptions.TrimEntries);
                mixture = parts.Select(p => double.TryParse(p, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var w) && double.IsFinite(w) && w > 0
                    ? w : throw new UsageException($"--dataset-weights: '{p}' is not a positive number")).ToArray();
                if (mixture.Length != datasetPaths.Length)
                    throw new UsageException($"--dataset-weights gives {mixture.Length} weight(s) for {datasetPaths.Length} --dataset; give one per dataset, in order");
            }
            string runDir = r.GetValue(outDir) ?? throw new UsageException("--out is required");
            if (r.GetValue(shuffle) < 1) throw new UsageException("--shuffle-buffer must be at least 1");
            string? latest = FineTuneVerbs.ResumePoint(runDir, r.GetValue(resume), "checkpoint");
            ProcessMemory.LimitHeapFragmentation();

            var checkpoint = VlaCheckpoint.Open(basePath);
            var tokenizer = VlaTokenizer.Load(checkpoint.TokenizerPath);
            var datasetMapping = r.GetValue(datasetConfig) is { } cfg ? DatasetConfig.Load(cfg) : null;
            if (r.GetValue(auxKeys) is { } keys)
            {
                if (options.AuxWeight == 0) throw new UsageException("--aux-keys needs --aux-weight above 0");
                datasetMapping = (datasetMapping ?? new DatasetConfig()) with
                {
                    AuxKeys = keys.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries),
                };
            }
            if (r.GetValue(imageKeys) is { } cameraKeys)
                datasetMapping = (datasetMapping ?? new DatasetConfig()) with
                {
                    ImageKeys = cameraKeys.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries),
                };
            if (options.AuxWeight > 0 && datasetMapping?.AuxKeys is null)
                throw new UsageException("--aux-weight needs targets: --aux-keys (e.g. observation.state,observation.environment_state) or aux_keys in --dataset-config");
            using var data = VlaDataset.Open(datasetPaths, datasetMapping, r.GetValue(datasetFormat),
                locator: new DatasetLocator(r.GetValue(dataDir), r.GetValue(datasetVersion)));
            var stats = data.ComputeStatistics();
            var split = data.SplitEpisodes(r.GetValue(heldOut), options.Seed);
            int imageSize = checkpoint.Config.ImageSize;
            int streamChunk = trainOft ? chunk : 1;
            var streamOptions = new StreamOptions
            {
                Seed = options.Seed, ShuffleBufferSize = r.GetValue(shuffle), ImageSize = imageSize,
                Augmentation = r.GetValue(imageAug) ? ImageAugmentation.OpenVla : shift > 0 ? new RandomShift(shift) : null,
                DatasetWeights = mixture, ActionChunk = streamChunk,
            };
            IExampleSource source = new StreamExampleSource(cursor => new TrainingStream(data, split.Train, stats, streamOptions, cursor));
            var heldOutExamples = StreamExampleSource.HeldOut(data, split.HeldOut, stats, imageSize, options.EvalExamples, options.Seed, streamChunk);
            var statistics = JsonNode.Parse(DatasetStatistics.ToJson([stats]))!.AsObject();
            Console.Error.WriteLine($"finetune: {data.Name} ({data.Format}{(datasetPaths.Length > 1 ? $", {datasetPaths.Length} datasets" : "")}" +
                                    $"{(mixture is null ? "" : $", mixture {string.Join(":", mixture)}")}): {split.Train.Count} training / {split.HeldOut.Count} held-out episodes, {data.StepCount} steps");

            // OFT: continue an OFT base's head, or start new components as openvla-oft does.
            OftWeights? baseOft = trainOft && OftSpec.IsOft(basePath, checkpoint.Config)
                ? OftWeights.Read(basePath, checkpoint.Config, checkpoint.NormStats.Keys, new OftOverrides(chunk, data.Config.ImageKeys?.Count)) : null;
            OftSpec? spec = null;
            if (trainOft)
            {
                int cameras = data.Config.ImageKeys?.Count ?? 1;
                if (r.GetValue(proprio) && data.Config.ProprioKey is null)
                    throw new UsageException($"--proprio: {data.Name} names no proprio key (set proprio_key in --dataset-config, e.g. \"state\" for RLDS)");
                int proprioDim = r.GetValue(proprio) ? stats.Proprio.Dim : 0;
                spec = baseOft?.Spec ?? new OftSpec(chunk, stats.Action.Dim, proprioDim, cameras, false, BoundsNormalization.Q99, "(new)", proprioDim > 0 ? "(new)" : null, null, "finetune --oft");
                if (spec.ActionDim != stats.Action.Dim || spec.ProprioDim != proprioDim || spec.NumImages != cameras || spec.ActionChunk != chunk)
                    throw new UsageException($"the base's OFT head predicts chunks of {spec.ActionChunk}×{spec.ActionDim} from {spec.NumImages} camera(s) and a {spec.ProprioDim}-D proprio; these options ask for {chunk}×{stats.Action.Dim}, {cameras}, {proprioDim}");
                if (spec.UseFilm) throw new UsageException("training FiLM models is not supported yet");
            }
            if (cachePasses > 0 && options.AuxWeight > 0) throw new UsageException("--vision-cache and --aux-weight: the aux head trains the towers it reads; drop one");
            using var model = new OpenVlaModel(checkpoint.Config, new ModelPrecision(dtype, training.TorchDevice(r)), spec);
            WeightLoader.Load(model, checkpoint, training.Quantization(r), spec is null ? null : OpenVlaModel.IsOftComponent);
            if (baseOft is not null) baseOft.Fill(model, []);
            else if (spec is not null) OftWeights.InitializeNew(model, new torch.Generator(options.Seed ^ 0x0F7));
            using var trainer = TrainingOptions.NewTrainer(model, checkpoint, tokenizer, options, runDir, statistics, stats.Aux);
            stats.SaveTo(runDir);
            using var cache = cachePasses == 0 ? null : CacheVision(model, checkpoint, data, split.Train, stats, streamOptions, spec?.NumImages ?? 1, cachePasses);
            if (cache is not null) source = new InMemoryExampleSource(cache.Examples, options.Seed);
            if (latest is not null && r.GetValue(resume))
            {
                trainer.Resume(latest, source);
                Console.Error.WriteLine($"finetune: resumed from {latest} at step {trainer.Step}");
            }
            var plan = MemoryPlanner.Plan(checkpoint.Config, options, elementBytes, quantization: training.Quantization(r), oft: spec);
            if (spec is not null)
                Console.Error.WriteLine($"finetune: OpenVLA-OFT, chunks of {spec.ActionChunk}×{spec.ActionDim}, {spec.NumImages} camera(s), " +
                                        $"{(spec.ProprioDim > 0 ? $"{spec.ProprioDim}-D proprio" : "no proprio")}, L1 loss; {(baseOft is null ? "new head" : "the base's head")}");
            Console.Error.WriteLine($"finetune: {(options.Full ? "full training" : $"LoRA on {trainer.AdaptedModules.Count} layers")}, " +
                                    $"{trainer.TrainableParameters / 1e6:0.##} M trainable parameters, planned peak {MemoryPlanner.Gb(plan.PeakBytes)}");

            string? lastSave = latest;
            StepMetrics? lastEval = null;
            using (var progress = new TrainingProgress(options.MaxSteps, 10))
            {
                void Evaluate()
                {
                    if (heldOutExamples.Count == 0) return;
                    lastEval = trainer.Evaluate(heldOutExamples);
                    trainer.Metrics.Append(lastEval);
                    progress.Note($"eval @ step {lastEval.Step}: loss {lastEval.Loss:0.0000}" + (double.IsFinite(lastEval.ActionAccuracy) ? $" action accuracy {lastEval.ActionAccuracy:0.000}" : "") + $" L1 {lastEval.L1:0.0000}"
                        + (double.IsFinite(lastEval.VisionGain) ? $" vision gain {lastEval.VisionGain:0.0000}" : "")
                        + (double.IsFinite(lastEval.AuxLoss) ? $" aux {lastEval.AuxLoss:0.0000}" : "") + $" ({heldOutExamples.Count} held-out examples)");
                }
                void Save()
                {
                    lastSave = trainer.Save(source, Path.GetFullPath(basePath));
                    trainer.Metrics.Plot(Path.Combine(runDir, MetricsLog.PlotFileName));
                    progress.Note($"saved {lastSave}");
                }
                if (trainer.Step == 0) Evaluate();
                while (trainer.Step < options.MaxSteps)
                {
                    var m = trainer.TrainStep(source);
                    trainer.Metrics.Append(m);
                    progress.Report(m);
                    bool last = trainer.Step == options.MaxSteps;
                    if (last || options.EvalSteps > 0 && trainer.Step % options.EvalSteps == 0) Evaluate();
                    if (last || options.SaveSteps > 0 && trainer.Step % options.SaveSteps == 0) Save();
                }
            }
            var summary = new JsonObject
            {
                ["out"] = Path.GetFullPath(runDir), ["checkpoint"] = lastSave is null ? null : Path.GetFullPath(lastSave), ["steps"] = trainer.Step,
                ["eval"] = lastEval?.ToJson(),
            };
            if (r.GetValue(json)) Console.WriteLine(summary.ToJsonString());
            else Console.WriteLine(lastSave is null ? Path.GetFullPath(runDir) : Path.GetFullPath(lastSave));
            if (r.GetValue(imageAug)) Console.Error.WriteLine("finetune: trained with --image-aug: predict and serve with --center-crop");
            return CliExit.Ok;
        });
        return cmd;
    }

    /// <summary>--vision-cache: <see cref="VisionFeatureCache.FromPasses"/> with a progress bar and a summary line.</summary>
    static VisionFeatureCache CacheVision(OpenVlaModel model, VlaCheckpoint checkpoint, VlaDataset data, IReadOnlyList<int> episodes, DatasetStatistics stats,
        StreamOptions streamOptions, int cameras, int passes)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        VisionFeatureCache cache;
        using (var progress = new ConsoleProgress($"finetune: caching vision features ({passes} pass(es) over the training frames)"))
            cache = VisionFeatureCache.FromPasses(model, ImagePreprocessor.ForCheckpoint(checkpoint), data, episodes, stats, streamOptions, cameras, passes,
                (done, total) => progress.Report((double)done / total));
        Console.Error.WriteLine($"finetune: vision cache {cache.Rows} rows, {cache.Bytes / 1e9:0.00} GB float16 (max |feature| {cache.MaxAbs:0.#}), " +
                                $"{clock.Elapsed.TotalSeconds:0} s, {cache.Rows / Math.Max(clock.Elapsed.TotalSeconds, 1e-9):0} frames/s");
        return cache;
    }

    static Command Merge()
    {
        var baseDir = new Option<string>("--base") { Description = "base Hugging Face OpenVLA checkpoint directory", Required = true };
        var adapter = new Option<string>("--adapter") { Description = "PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors)", Required = true };
        var outDir = new Option<string>("--out") { Description = "directory to write the merged checkpoint to", Required = true };
        var dtype = new Option<string?>("--dtype") { Description = "stored precision: bf16 or f32 (default: the base's torch_dtype)" };
        var cmd = new Command("merge", "Fold a LoRA adapter into its base model and write a complete Hugging Face checkpoint.")
            { baseDir, adapter, outDir, dtype };
        cmd.SetAction(r =>
        {
            var checkpoint = VlaCheckpoint.Open(DefaultModel.Resolve(r.GetValue(baseDir)!, "--base"));
            var stored = PolicyOptions.ParseDType(r.GetValue(dtype) ?? checkpoint.Config.TorchDType);
            // Merge in float32 and round once to the stored precision (re-merging in bf16 is a known source of drift).
            using var model = new OpenVlaModel(checkpoint.Config, ModelPrecision.Cpu(torch.ScalarType.Float32));
            WeightLoader.Load(model, checkpoint);
            var adapterDir = r.GetValue(adapter)!;
            var paths = PeftAdapter.Load(adapterDir, model);
            var statsPath = Path.Combine(adapterDir, "dataset_statistics.json");
            var stats = File.Exists(statsPath) ? JsonNode.Parse(File.ReadAllText(statsPath))!.AsObject() : null;
            CheckpointWriter.Write(r.GetValue(outDir)!, checkpoint, model, stored, stats);
            Console.Error.WriteLine($"merge: {paths.Count} adapted layers folded into the base");
            Console.WriteLine(Path.GetFullPath(r.GetValue(outDir)!));
            return CliExit.Ok;
        });
        return cmd;
    }

    /// <summary>Prints a memory plan (human-readable or JSON).</summary>
    internal static void PrintPlan(MemoryPlan plan, string title, bool json)
    {
        if (json) { Console.WriteLine(plan.ToJson().ToJsonString()); return; }
        Console.WriteLine(title);
        foreach (var item in plan.Resident) Console.WriteLine($"  {item.Name,-26} {MemoryPlanner.Gb(item.Bytes),11}  {item.Detail}");
        Console.WriteLine($"  {"activations / sample",-26} {MemoryPlanner.Gb(plan.ActivationsPerSample),11}  sequence {plan.SequenceLength} tokens, no checkpointing");
        Console.WriteLine($"  {"  with checkpointing",-26} {MemoryPlanner.Gb(plan.ActivationsPerSampleCheckpointed + 2 * plan.RecomputeWorkspace),11}  block inputs + one block recomputed");
        Console.WriteLine($"  {"activations, batch " + plan.Batch,-26} {MemoryPlanner.Gb(plan.BatchActivationBytes),11}  {(plan.Checkpointing ? "checkpointing on" : "checkpointing off")}");
        Console.WriteLine($"  {"peak (excl. runtime)",-26} {MemoryPlanner.Gb(plan.PeakBytes),11}");
    }

    static Command Benchmark()
    {
        var training = new TrainingOptions();
        var preset = new Option<string>("--preset") { Description = $"model sizes: {string.Join(" | ", CheckpointPreset.Names)}", DefaultValueFactory = _ => "tiny" };
        var steps = new Option<int>("--steps") { Description = "timed optimizer steps (after one warm-up step)", DefaultValueFactory = _ => 5 };
        var json = new Option<bool>("--json") { Description = "print one JSON object" };
        var cmd = new Command("finetune-benchmark",
            "Train a random-weight preset on synthetic frames for a few steps: samples/s and peak memory, measured and planned.") { preset, steps, json };
        training.AddTo(cmd);
        cmd.SetAction(r =>
        {
            var name = r.GetValue(preset)!;
            CheckpointPreset.Get(name);
            if (r.GetValue(steps) < 1) throw new UsageException("--steps must be at least 1");
            var options = training.Read(r) with { SaveSteps = 0, EvalSteps = 0 };
            var dtype = training.WeightType(r);
            ProcessMemory.LimitHeapFragmentation();
            long rssStart = ProcessMemory.CurrentRss();
            var dir = Path.Combine(Path.GetTempPath(), $"openvla-finetune-benchmark-{name}-{Environment.ProcessId}");
            try
            {
                CheckpointMaker.Write(dir, name, 0, dtype);
                var checkpoint = VlaCheckpoint.Open(dir);
                var quant = training.Quantization(r);
                var plan = MemoryPlanner.Plan(checkpoint.Config, options, dtype == torch.ScalarType.Float32 ? 4 : 2, quantization: quant);
                using var model = new OpenVlaModel(checkpoint.Config, new ModelPrecision(dtype, training.TorchDevice(r)));
                WeightLoader.Load(model, checkpoint, quant);
                var tokenizer = VlaTokenizer.Load(checkpoint.TokenizerPath);
                using var trainer = TrainingOptions.NewTrainer(model, checkpoint, tokenizer, options, Path.Combine(dir, "run"), CheckpointMaker.ExampleStats());
                var source = new InMemoryExampleSource(SyntheticExamples(64, checkpoint.Config.ImageSize), options.Seed);
                long rssModel = ProcessMemory.CurrentRss();
                ProcessMemory.ResetPeak();
                trainer.TrainStep(source);                               // warm-up: first-touch allocations, thread pools
                var sw = Stopwatch.StartNew();
                StepMetrics last = null!;
                for (int i = 0; i < r.GetValue(steps); i++) last = trainer.TrainStep(source);
                double seconds = sw.Elapsed.TotalSeconds;
                long peak = ProcessMemory.PeakRss();
                double samplesPerSecond = r.GetValue(steps) * options.EffectiveBatch / seconds;
                var result = new JsonObject
                {
                    ["preset"] = name, ["dtype"] = MemoryPlanner.Precision(dtype == torch.ScalarType.Float32 ? 4 : 2), ["base"] = quant.Mode == QuantMode.None ? "float" : quant.Name,
                    ["mode"] = options.Full ? "full" : $"lora r{options.Lora.Rank}", ["batch"] = options.BatchSize,
                    ["grad_accumulation"] = options.GradAccumulation, ["grad_checkpointing"] = options.GradientCheckpointing,
                    ["threads"] = torch.get_num_threads(), ["steps"] = r.GetValue(steps), ["seconds"] = Math.Round(seconds, 3),
                    ["samples_per_s"] = Math.Round(samplesPerSecond, 3), ["last_loss"] = last.Loss,
                    ["trainable_parameters"] = trainer.TrainableParameters,
                    ["rss_start_bytes"] = rssStart, ["rss_model_bytes"] = rssModel, ["peak_rss_bytes"] = peak,
                    ["measured_step_bytes"] = peak - rssModel,
                    ["planned_step_bytes"] = PlannedStepBytes(plan, options),
                    ["planned_peak_bytes"] = plan.PeakBytes,
                    ["measured_peak_minus_runtime_bytes"] = peak - rssStart,
                };
                if (r.GetValue(json)) Console.WriteLine(result.ToJsonString());
                else
                {
                    Console.WriteLine($"{name} {result["mode"]} {result["dtype"]}{(quant.Mode == QuantMode.None ? "" : " int8 base")} batch {options.BatchSize}{(options.GradientCheckpointing ? " +checkpointing" : "")}, {torch.get_num_threads()} threads: " +
                                      $"{samplesPerSecond:0.00} samples/s ({seconds / r.GetValue(steps) * 1000:0} ms/step)");
                    Console.WriteLine($"  memory during a step: measured {MemoryPlanner.Gb(peak - rssModel)}, planned {MemoryPlanner.Gb(PlannedStepBytes(plan, options))} (gradients + activations)");
                    Console.WriteLine($"  peak: measured {MemoryPlanner.Gb(peak - rssStart)} above the runtime, planned {MemoryPlanner.Gb(plan.PeakBytes)}");
                }
                return CliExit.Ok;
            }
            finally
            {
                if (Directory.Exists(dir)) Directory.Delete(dir, true);
            }
        });
        return cmd;
    }

    /// <summary>What a step adds on top of the model and optimizer state: gradients and the micro-batch's activations.</summary>
    internal static long PlannedStepBytes(MemoryPlan plan, TrainerOptions options) =>
        plan.Resident.Where(i => i.Name.Contains("gradients")).Sum(i => i.Bytes) + plan.BatchActivationBytes;

    /// <summary>Flat-colour frames with varied instructions and actions, for benchmarks.</summary>
    internal static List<TrainingExample> SyntheticExamples(int count, int size)
    {
        var rng = new Random(0);
        string[] instructions = ["pick up the red cube", "push the blue block to the left", "open the top drawer", "put the green cup on the plate"];
        var list = new List<TrainingExample>();
        for (int i = 0; i < count; i++)
        {
            var px = new byte[size * size * 3];
            rng.NextBytes(px);
            var action = Enumerable.Range(0, 7).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
            list.Add(new TrainingExample(new RgbImage(size, size, px), instructions[i % instructions.Length], action, "sim_tabletop"));
        }
        return list;
    }

    /// <summary>
    /// The checkpoint a run continues from: with --resume the latest complete one (saves that were interrupted are named
    /// and ignored), without it none may exist yet. <paramref name="unit"/> names what a checkpoint is ("checkpoint", "completed iteration").
    /// </summary>
    internal static string? ResumePoint(string runDir, bool resume, string unit)
    {
        string? latest = Trainer.LatestCheckpoint(runDir);
        if (resume && latest is null) throw new UsageException($"--resume: no {unit} in {runDir}");
        if (!resume && latest is not null) throw new UsageException($"{runDir} already holds {Path.GetFileName(latest)}; pass --resume to continue it or choose another --out");
        if (resume)
            foreach (var broken in Trainer.IncompleteCheckpoints(runDir))
                Console.Error.WriteLine($"openvla: warning: ignoring {Path.GetFileName(broken)}, a save that was interrupted; resuming from {Path.GetFileName(latest)}");
        return latest;
    }
}


