using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.FineTune.Training;

/// <summary>Metrics of one optimizer step (averaged over its micro-batches) or of one held-out evaluation.</summary>
public sealed record StepMetrics(long Step, string Split, double Loss, double ActionAccuracy, double L1, double LearningRate,
    double GradNorm, double SamplesPerSecond, double ElapsedSeconds)
{
    /// <summary>
    /// Held-out only: the loss of the same examples with every frame swapped for another example's (the frames rotated
    /// by one over the scored set). <see cref="VisionGain"/> = this − <see cref="Loss"/>: about 0 while the policy ignores the camera
    /// and predicts from the instruction alone, which a from-scratch policy does for its first thousand steps or so.
    /// </summary>
    public double ShuffledImageLoss { get; init; } = double.NaN;
    public double VisionGain => ShuffledImageLoss - Loss;
    /// <summary>With an auxiliary head: its mean squared error on standardized targets (1 = no better than the mean).</summary>
    public double AuxLoss { get; init; } = double.NaN;

    public JsonObject ToJson()
    {
        var o = new JsonObject
        {
            ["step"] = Step, ["split"] = Split, ["loss"] = Finite(Loss), ["action_accuracy"] = Finite(ActionAccuracy), ["l1_loss"] = Finite(L1),
            ["lr"] = LearningRate, ["grad_norm"] = Finite(GradNorm), ["samples_per_s"] = Math.Round(SamplesPerSecond, 3),
            ["elapsed_s"] = Math.Round(ElapsedSeconds, 3),
        };
        if (double.IsFinite(ShuffledImageLoss)) o["shuffled_image_loss"] = ShuffledImageLoss;
        if (double.IsFinite(AuxLoss)) o["aux_loss"] = AuxLoss;
        return o;
    }

    static JsonNode? Finite(double v) => double.IsFinite(v) ? JsonValue.Create(v) : null;
}

/// <summary>
/// Fine-tunes (LoRA) or trains (full) an OpenVLA model on examples with the reference objective. Deterministic on CPU for
/// a seed: the adapters' init and dropout masks draw from the run's own generator, reseeded from (seed, step,
/// micro-batch) before every micro-batch, and the example order is the source's. Everything needed to continue a run exactly is
/// written at each save: adapter (or model) weights, AdamW moments, step, and the source's cursor.
/// </summary>
public sealed class Trainer : IDisposable
{
    readonly OpenVlaModel _model;
    readonly VlaCheckpoint _base;
    readonly ActionObjective _objective;
    readonly AdamW _optimizer;
    readonly LearningRateSchedule _schedule;
    readonly JsonObject _statistics;
    readonly Stopwatch _clock = new();
    // Draws the adapters' init, then their dropout masks; reseeded per micro-batch (see TrainStep).
    readonly Generator _generator;
    // Numbers in tensor operations are Scalars held for the run: a temporary one can be finalized mid-call (KeptScalars).
    readonly Scalar _perMicroBatch, _auxWeight;
    double _elapsedBefore;
    readonly AuxHead? _aux;
    readonly OftObjective? _oft;

    public TrainerOptions Options { get; }
    public string OutputDirectory { get; }
    public long Step => _optimizer.Step;
    public long TrainableParameters => _optimizer.ParameterCount;
    public IReadOnlyList<string> AdaptedModules { get; }
    public MetricsLog Metrics { get; }
    public OpenVlaModel Model => _model;
    public ActionObjective Objective => _objective;

    /// <param name="model">The base model, loaded (its precision is the training precision of frozen weights).</param>
    /// <param name="datasetStatistics">dataset_statistics.json of the training data, written next to every checkpoint.</param>
    /// <param name="auxStatistics">Mean and std of the aux targets; required when <see cref="TrainerOptions.AuxWeight"/> &gt; 0.</param>
    public Trainer(OpenVlaModel model, VlaCheckpoint baseCheckpoint, VlaTokenizer tokenizer, TrainerOptions options,
        string outputDirectory, JsonObject datasetStatistics, OpenVLA.FineTune.Data.ArrayStatistics? auxStatistics = null)
    {
        options.Validate();
        _model = model;
        _base = baseCheckpoint;
        Options = options;
        OutputDirectory = outputDirectory;
        _statistics = datasetStatistics;
        _objective = ActionObjective.ForCheckpoint(baseCheckpoint, tokenizer);
        if (model.Oft is { } spec)
        {
            if (options.AuxWeight > 0) throw new ArgumentException("the auxiliary head belongs to the token objective; an OFT model trains with the L1 loss alone");
            _oft = OftObjective.ForCheckpoint(baseCheckpoint, tokenizer, spec);
        }

        var quantized = model.named_modules().Where(m => m.module is Linear { Quantized: not null }).Select(m => ((Linear)m.module).Quantized!).ToList();
        if (quantized.Count > 0)
        {
            // A quantized (QLoRA-style) base trains adapters only, and its weights cannot be written back as floats.
            if (options.Full) throw new ArgumentException("full training needs a float model, not a quantized one");
            if (options.Merge) throw new ArgumentException("a quantized base cannot be merged in place; merge the adapter into the float base with `openvla merge`");
            if (quantized.Any(q => q.Mode == OpenVLA.Policy.Quantization.QuantMode.Int4))
                throw new ArgumentException("training on an int4 base is not supported (its backward would rebuild every weight through the kernel); use int8");
        }
        _generator = new Generator(options.Seed, model.Precision.Device);   // masks are drawn on the model's device
        _perMicroBatch = (1.0 / options.GradAccumulation).ToScalar();
        _auxWeight = options.AuxWeight.ToScalar();
        if (options.Full)
        {
            foreach (var p in model.parameters()) p.requires_grad = true;
            AdaptedModules = [];
        }
        else
        {
            foreach (var p in model.parameters()) p.requires_grad = false;
            AdaptedModules = PeftAdapter.Attach(model, options.Lora, _generator);
            // openvla-oft trains the action head and the proprio projector in full beside the LoRA model.
            foreach (var component in new nn.Module?[] { model.action_head, model.proprio_projector })
                if (component is not null) foreach (var p in component.parameters()) p.requires_grad = true;
        }
        if (options.FreezeVision)
            foreach (var (name, p) in model.vision_backbone.named_parameters())
                if (!name.Contains(".scale.") && !name.Contains(".shift.")) p.requires_grad = false;   // FiLM layers would still train
        model.train();
        GradientCheckpointing.SetVision(model, options.GradientCheckpointing && !options.FreezeVision, _generator);
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => (p.name, p.parameter)).ToList();
        if (options.AuxWeight > 0)
        {
            if (auxStatistics is null) throw new ArgumentException("an aux weight needs aux targets: name them with the dataset config's aux_keys");
            _aux = new AuxHead(model.Config.NumPatches * model.Config.Text.HiddenSize, auxStatistics, options.Seed, model.Precision.Device);
            trainable.AddRange(_aux.Parameters);
        }
        _optimizer = new AdamW(trainable, options.Optimizer);
        _schedule = new LearningRateSchedule(options.Schedule, options.Optimizer.LearningRate, options.WarmupSteps, options.MaxSteps);
        Directory.CreateDirectory(outputDirectory);
        Metrics = new MetricsLog(Path.Combine(outputDirectory, MetricsLog.FileName));
    }

    /// <summary>One optimizer step: <see cref="TrainerOptions.GradAccumulation"/> micro-batches of
    /// <see cref="TrainerOptions.BatchSize"/> examples, gradient clipping, AdamW with the scheduled learning rate.</summary>
    public StepMetrics TrainStep(IExampleSource source)
    {
        _clock.Start();
        long step = _optimizer.Step;
        double lossSum = 0, l1Sum = 0, auxSum = 0;
        long actionTokens = 0, correct = 0;
        for (int micro = 0; micro < Options.GradAccumulation; micro++)
        {
            var examples = Enumerable.Range(0, Options.BatchSize).Select(_ => source.Next()).ToList();
            using var scope = NewDisposeScope();
            _generator.manual_seed((long)(InMemoryExampleSource.Mix(Options.Seed, (ulong)step, (ulong)micro) >> 1));
            if (_oft is not null)
            {
                using var oftBatch = _oft.Build(examples, _model.Precision.Device, _model.Precision.DType);
                var (oftLoss, value) = _oft.Forward(_model, oftBatch, LayerRunner());
                Backward(oftLoss);
                lossSum += value;   // the L1 loss is also the L1 metric (no tokens to count)
                continue;
            }
            using var batch = _objective.Build(examples, _model.Precision.Device, _model.Precision.DType);
            Tensor? patches = null;
            var result = Forward(batch, _aux is null ? null : t => patches = t);
            var loss = result.Loss;
            if (_aux is not null)
            {
                var aux = _aux.Loss(patches!, examples);
                auxSum += aux.item<float>();
                loss = loss.add(aux.mul(_auxWeight), KeptScalars.One);
            }
            Backward(loss);
            lossSum += result.LossValue;
            actionTokens += result.ActionTokens;
            correct += result.ActionCorrect;
            l1Sum += result.L1 * result.ActionTokens;
        }
        var (gradNorm, lr, elapsed) = ClipAndUpdate(step);
        double meanLoss = lossSum / Options.GradAccumulation;
        return new StepMetrics(_optimizer.Step, "train", meanLoss,
            actionTokens == 0 ? double.NaN : (double)correct / actionTokens, _oft is not null ? meanLoss : actionTokens == 0 ? double.NaN : l1Sum / actionTokens,
            lr, gradNorm, _optimizer.Step * (double)Options.EffectiveBatch / Math.Max(elapsed, 1e-9), elapsed)
        {
            AuxLoss = _aux is null ? double.NaN : auxSum / Options.GradAccumulation,
        };
    }

    /// <summary>
    /// One optimizer step whose loss the caller defines (post-training's clipped objective): <paramref name="microBatch"/>
    /// runs micro-batch m of <see cref="TrainerOptions.GradAccumulation"/> — forward, and backward of its loss divided by the
    /// accumulation — with the run's generator reseeded for (step, m) as in <see cref="TrainStep(IExampleSource)"/>, and
    /// returns its loss value; then the same clipping, schedule and AdamW update.
    /// </summary>
    public StepMetrics TrainStep(Func<int, double> microBatch)
    {
        _clock.Start();
        long step = _optimizer.Step;
        double lossSum = 0;
        for (int micro = 0; micro < Options.GradAccumulation; micro++)
        {
            using var scope = NewDisposeScope();
            _generator.manual_seed((long)(InMemoryExampleSource.Mix(Options.Seed, (ulong)step, (ulong)micro) >> 1));
            lossSum += microBatch(micro);
        }
        var (gradNorm, lr, elapsed) = ClipAndUpdate(step);
        return new StepMetrics(_optimizer.Step, "train", lossSum / Options.GradAccumulation, double.NaN, double.NaN, lr, gradNorm,
            _optimizer.Step * (double)Options.EffectiveBatch / Math.Max(elapsed, 1e-9), elapsed);
    }

    /// <summary>Global-norm clipping, the scheduled learning rate, AdamW, zeroed gradients; stops the step's clock.</summary>
    (double GradNorm, double LearningRate, double ElapsedSeconds) ClipAndUpdate(long step)
    {
        double gradNorm = GradNorm();
        if (Options.MaxGradNorm > 0 && gradNorm > Options.MaxGradNorm)
        {
            using var noGrad = torch.no_grad();
            double scale = Options.MaxGradNorm / (gradNorm + 1e-6);
            foreach (var p in _optimizer.Parameters) p.grad?.mul_(scale);
        }
        double lr = _schedule.At(step);
        _optimizer.Update(lr);
        _optimizer.ZeroGrad();
        _clock.Stop();
        return (gradNorm, lr, _elapsedBefore + _clock.Elapsed.TotalSeconds);
    }

    /// <summary>What runs the decoder layers in a training forward: gradient checkpointing when the options ask for it.</summary>
    public Func<LlamaDecoderLayer, Tensor, Func<Tensor, Tensor>, Tensor>? DecoderLayerRunner => LayerRunner();

    Func<LlamaDecoderLayer, Tensor, Func<Tensor, Tensor>, Tensor>? LayerRunner() =>
        Options.GradientCheckpointing ? GradientCheckpointing.DecoderLayers(_generator) : null;

    ObjectiveResult Forward(TrainingBatch batch, Action<Tensor>? onPatches = null)
    {
        var (hidden, labels) = ActionObjective.Forward(_model, batch, LayerRunner(), onPatches);
        return _objective.Score(hidden, labels, _model.language_model.Logits);
    }

    /// <summary>‖g‖₂ over every trainable parameter's gradient, in float64 (torch clip_grad_norm_'s total norm).</summary>
    double GradNorm()
    {
        using var noGrad = torch.no_grad();
        double sumSq = 0;
        foreach (var p in _optimizer.Parameters)
        {
            if (p.grad is not { } g) continue;
            using var n = g.to(ScalarType.Float32).pow(2).sum();
            sumSq += n.to(ScalarType.Float64).item<double>();
        }
        return Math.Sqrt(sumSq);
    }

    /// <summary>Loss and metrics on held-out examples (no dropout, no gradients), weighted by token counts.</summary>
    public StepMetrics Evaluate(IReadOnlyList<TrainingExample> heldOut)
    {
        var sw = Stopwatch.StartNew();
        int n = Options.EvalExamples > 0 ? Math.Min(Options.EvalExamples, heldOut.Count) : heldOut.Count;
        double lossSum = 0, l1Sum = 0, shuffledSum = 0, auxSum = 0;
        long targets = 0, actions = 0, correct = 0, shuffledTargets = 0;
        // Same instructions and targets, the next example's frame (over the whole set, so every scored example is also
        // scored without its own frame): what the policy knows without looking. Nothing to swap with a single example.
        var swapped = n < 2 ? null : heldOut.Take(n).Select((e, k) => e with { Image = heldOut[(k + 1) % n].Image, ExtraImages = heldOut[(k + 1) % n].ExtraImages }).ToList();
        if (_oft is not null) return EvaluateOft(heldOut.Take(n).ToList(), swapped, sw);
        _model.eval();
        try
        {
            using var noGrad = torch.no_grad();
            for (int i = 0; i < n; i += Options.BatchSize)
            {
                using var scope = NewDisposeScope();
                int count = Math.Min(Options.BatchSize, n - i);
                var examples = heldOut.Skip(i).Take(count).ToList();
                using var batch = _objective.Build(examples, _model.Precision.Device, _model.Precision.DType);
                Tensor? patches = null;
                var r = Forward(batch, _aux is null ? null : t => patches = t);
                if (_aux is not null) auxSum += _aux.Loss(patches!, examples).item<float>() * count;
                lossSum += r.LossValue * r.TargetTokens;
                targets += r.TargetTokens;
                actions += r.ActionTokens;
                correct += r.ActionCorrect;
                l1Sum += r.L1 * r.ActionTokens;
                if (swapped is null) continue;
                using var swappedBatch = _objective.Build(swapped.GetRange(i, count), _model.Precision.Device, _model.Precision.DType);
                var s = Forward(swappedBatch);
                shuffledSum += s.LossValue * s.TargetTokens;
                shuffledTargets += s.TargetTokens;
            }
        }
        finally { _model.train(); }
        return new StepMetrics(Step, "eval", targets == 0 ? double.NaN : lossSum / targets, actions == 0 ? double.NaN : (double)correct / actions,
            actions == 0 ? double.NaN : l1Sum / actions, _schedule.At(Math.Max(0, Step - 1)), double.NaN, n / Math.Max(sw.Elapsed.TotalSeconds, 1e-9),
            _elapsedBefore + _clock.Elapsed.TotalSeconds)
        {
            ShuffledImageLoss = shuffledTargets == 0 ? double.NaN : shuffledSum / shuffledTargets,
            AuxLoss = _aux is null || n == 0 ? double.NaN : auxSum / n,
        };
    }

    /// <summary>OFT: the mean L1 of the held-out chunks, and with every frame swapped for another example's.</summary>
    StepMetrics EvaluateOft(List<TrainingExample> examples, List<TrainingExample>? swapped, Stopwatch sw)
    {
        double sum = 0, shuffledSum = 0;
        _model.eval();
        try
        {
            using var noGrad = torch.no_grad();
            for (int i = 0; i < examples.Count; i += Options.BatchSize)
            {
                using var scope = NewDisposeScope();
                int count = Math.Min(Options.BatchSize, examples.Count - i);
                using var batch = _oft!.Build(examples.GetRange(i, count), _model.Precision.Device, _model.Precision.DType);
                sum += _oft.Forward(_model, batch).Value * count;
                if (swapped is null) continue;
                using var swappedBatch = _oft.Build(swapped.GetRange(i, count), _model.Precision.Device, _model.Precision.DType);
                shuffledSum += _oft.Forward(_model, swappedBatch).Value * count;
            }
        }
        finally { _model.train(); }
        int n = examples.Count;
        double l1 = n == 0 ? double.NaN : sum / n;
        return new StepMetrics(Step, "eval", l1, double.NaN, l1, _schedule.At(Math.Max(0, Step - 1)), double.NaN, n / Math.Max(sw.Elapsed.TotalSeconds, 1e-9),
            _elapsedBefore + _clock.Elapsed.TotalSeconds)
        {
            ShuffledImageLoss = swapped is null || n == 0 ? double.NaN : shuffledSum / n,
        };
    }

    // ---- checkpoints ------------------------------------------------------------------------------------------------

    public const string StateDirName = "training_state", AdapterDirName = "adapter", ModelDirName = "model";
    const string StateFile = "state.json", OptimizerFile = "optimizer.safetensors", AuxHeadFile = "aux_head.safetensors";

    public static string CheckpointName(long step) => $"step-{step:D7}";

    /// <summary>
    /// Writes a checkpoint for the current step into `&lt;out&gt;/step-NNNNNNN/`, atomically: everything goes to a
    /// temporary sibling first, which is renamed when complete, so an interrupted save never leaves a half checkpoint that
    /// <see cref="LatestCheckpoint"/> would pick. Older checkpoints beyond <see cref="TrainerOptions.KeepCheckpoints"/> are removed.
    /// </summary>
    public string Save(IExampleSource source, string baseModelNameOrPath)
    {
        string final = Path.Combine(OutputDirectory, CheckpointName(Step));
        string tmp = final + ".tmp";
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);
        string stats = _statistics.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
        File.WriteAllText(Path.Combine(tmp, "dataset_statistics.json"), stats);
        if (!Options.Full)
        {
            var adapterDir = Path.Combine(tmp, AdapterDirName);
            PeftAdapter.Save(adapterDir, _model, Options.Lora, baseModelNameOrPath);
            File.WriteAllText(Path.Combine(adapterDir, "dataset_statistics.json"), stats);
        }
        if (Options.Full || Options.Merge)
            CheckpointWriter.Write(Path.Combine(tmp, ModelDirName), _base, _model, _model.Precision.DType, _statistics);
        // OFT: the head and the proprio projector in openvla-oft's file names, beside the adapter (what a resume reads).
        if (_model.Oft is not null) OftWeights.Save(tmp, _model, Step.ToString(System.Globalization.CultureInfo.InvariantCulture));

        var stateDir = Path.Combine(tmp, StateDirName);
        Directory.CreateDirectory(stateDir);
        _optimizer.Save(Path.Combine(stateDir, OptimizerFile));
        _aux?.Save(Path.Combine(stateDir, AuxHeadFile));
        var state = new JsonObject
        {
            ["step"] = Step,
            ["elapsed_s"] = _elapsedBefore + _clock.Elapsed.TotalSeconds,
            ["cursor"] = source.Cursor.DeepClone(),
            // The run's generator is reseeded from (seed, step, micro-batch) before every micro-batch, so the step is its state.
            ["rng"] = new JsonObject { ["seed"] = Options.Seed.ToString(), ["reseeded_per_micro_batch"] = true },
            ["options"] = OptionsJson(Options),
            ["oft"] = _model.Oft?.ToJson(),
            ["base_model"] = baseModelNameOrPath,
        };
        File.WriteAllText(Path.Combine(stateDir, StateFile), state.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));

        if (Directory.Exists(final)) Directory.Delete(final, true);
        Directory.Move(tmp, final);
        var old = Checkpoints(OutputDirectory).SkipLast(Options.KeepCheckpoints).ToList();
        foreach (var dir in old) Directory.Delete(dir, true);
        return final;
    }

    /// <summary>Complete checkpoints under an output directory, oldest first (temporary ones are ignored).</summary>
    public static IReadOnlyList<string> Checkpoints(string outputDirectory) =>
        !Directory.Exists(outputDirectory) ? [] :
        Directory.EnumerateDirectories(outputDirectory, "step-*")
            .Where(d => !d.EndsWith(".tmp") && File.Exists(Path.Combine(d, StateDirName, StateFile)))
            .Order(StringComparer.Ordinal).ToList();

    public static string? LatestCheckpoint(string outputDirectory) => Checkpoints(outputDirectory).LastOrDefault();

    /// <summary>Step directories a resume ignores: saves that were interrupted (a `.tmp` sibling, or no training state).</summary>
    public static IReadOnlyList<string> IncompleteCheckpoints(string outputDirectory) =>
        !Directory.Exists(outputDirectory) ? [] :
        Directory.EnumerateDirectories(outputDirectory, "step-*")
            .Where(d => d.EndsWith(".tmp") || !File.Exists(Path.Combine(d, StateDirName, StateFile)))
            .Order(StringComparer.Ordinal).ToList();

    /// <summary>
    /// Continues from a checkpoint written by <see cref="Save"/>: trainable weights, AdamW state, step, elapsed time and the
    /// source's cursor. The options that shape the computation must match the saved ones; metrics logged after the
    /// checkpoint (by a run that died before its next save) are dropped so the log stays one consistent history.
    /// </summary>
    public void Resume(string checkpointDir, IExampleSource source)
    {
        var statePath = Path.Combine(checkpointDir, StateDirName, StateFile);
        if (!File.Exists(statePath)) throw new CheckpointException($"{checkpointDir}: no {StateDirName}/{StateFile} (not a training checkpoint)");
        var state = JsonNode.Parse(File.ReadAllText(statePath))!.AsObject();
        var saved = state["options"]!.AsObject();
        var now = OptionsJson(Options);
        foreach (var (key, value) in now)
        {
            // Free to change between runs: when and what to save or evaluate, whether to checkpoint activations (the
            // gradients are bit-identical), and the step budget unless a cosine schedule depends on it.
            if (key is "save_steps" or "eval_steps" or "eval_examples" or "keep_checkpoints" or "merge" or "gradient_checkpointing"
                || key == "max_steps" && Options.Schedule == "constant") continue;
            var was = saved[key] ?? (AddedOptions.TryGetValue(key, out var old) ? old.DeepClone() : null);
            if (!JsonNode.DeepEquals(was, value))
                throw new PolicyInputException($"cannot resume from {checkpointDir}: option {key} was {was?.ToJsonString() ?? "unset"}, now {value?.ToJsonString() ?? "unset"}");
        }
        var savedOft = state["oft"];
        var nowOft = _model.Oft?.ToJson();
        if (!JsonNode.DeepEquals(savedOft, nowOft))
            throw new PolicyInputException($"cannot resume from {checkpointDir}: OFT settings were {savedOft?.ToJsonString() ?? "none"}, now {nowOft?.ToJsonString() ?? "none"}");
        using (torch.no_grad())
        {
            if (Options.Full)
            {
                WeightLoader.Load(_model, VlaCheckpoint.Open(Path.Combine(checkpointDir, ModelDirName)), loadedElsewhere: _model.Oft is null ? null : OpenVlaModel.IsOftComponent);
            }
            else
            {
                var adapterPath = Path.Combine(checkpointDir, AdapterDirName, PeftAdapter.WeightsFileName);
                using var file = SafetensorsFile.Open(adapterPath);
                var byKey = PeftAdapter.AdapterTensors(_model);
                if (byKey.Count != file.Tensors.Count) throw new CheckpointException($"{adapterPath}: {file.Tensors.Count} adapter tensors, the model has {byKey.Count}");
                foreach (var (key, target) in byKey)
                {
                    if (!file.Tensors.ContainsKey(key)) throw new CheckpointException($"{adapterPath}: '{key}' is missing");
                    using var t = file.Load(key);
                    target.copy_(t);
                }
            }
        }
        if (_model.Oft is { } spec)
        {
            var components = OftWeights.Read(checkpointDir, _model.Config, [], new OftOverrides(spec.ActionChunk, spec.NumImages))
                ?? throw new CheckpointException($"{checkpointDir}: the OFT action head file is missing");
            components.Fill(_model, []);
        }
        _aux?.Load(Path.Combine(checkpointDir, StateDirName, AuxHeadFile));
        _optimizer.Load(Path.Combine(checkpointDir, StateDirName, OptimizerFile));
        long step = state["step"]!.GetValue<long>();
        if (step != _optimizer.Step) throw new CheckpointException($"{checkpointDir}: state.json says step {step}, the optimizer state {_optimizer.Step}");
        _elapsedBefore = state["elapsed_s"]?.GetValue<double>() ?? 0;
        source.Restore(state["cursor"]!);
        Metrics.TruncateAfter(step);
    }

    /// <summary>Options added after runs were saved without them, with the value those runs trained with.</summary>
    static readonly Dictionary<string, JsonNode> AddedOptions = new() { ["aux_weight"] = 0.0, ["freeze_vision"] = false };

    static JsonObject OptionsJson(TrainerOptions o) => new()
    {
        ["full"] = o.Full,
        ["lora_rank"] = o.Full ? null : o.Lora.Rank,
        ["lora_alpha"] = o.Full ? null : o.Lora.Alpha,
        ["lora_dropout"] = o.Full ? null : o.Lora.Dropout,
        ["target_modules"] = o.Full ? null : new JsonArray(o.Lora.TargetModules.Select(t => (JsonNode)t).ToArray()),
        ["learning_rate"] = o.Optimizer.LearningRate,
        ["betas"] = new JsonArray(o.Optimizer.Beta1, o.Optimizer.Beta2),
        ["eps"] = o.Optimizer.Eps,
        ["weight_decay"] = o.Optimizer.WeightDecay,
        ["schedule"] = o.Schedule,
        ["warmup_steps"] = o.WarmupSteps,
        ["max_steps"] = o.MaxSteps,
        ["batch_size"] = o.BatchSize,
        ["grad_accumulation"] = o.GradAccumulation,
        ["max_grad_norm"] = o.MaxGradNorm,
        ["gradient_checkpointing"] = o.GradientCheckpointing,
        ["seed"] = o.Seed.ToString(),
        ["save_steps"] = o.SaveSteps,
        ["eval_steps"] = o.EvalSteps,
        ["eval_examples"] = o.EvalExamples,
        ["merge"] = o.Merge,
        ["keep_checkpoints"] = o.KeepCheckpoints,
        ["aux_weight"] = o.AuxWeight,
        ["freeze_vision"] = o.FreezeVision,
    };

    /// <summary>Backpropagates one micro-batch's loss, scaled by 1 / gradient accumulation.</summary>
    public void Backward(Tensor loss) => loss.mul(_perMicroBatch).backward();

    public void Dispose()
    {
        _perMicroBatch.Dispose();
        _auxWeight.Dispose();
        _optimizer.Dispose();
        _aux?.Dispose();
        GradientCheckpointing.SetVision(_model, false, null);
    }
}
