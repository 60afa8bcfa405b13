using System.Diagnostics;
using System.Text.Json.Nodes;
using OpenVLA.FineTune.Training;
using OpenVLA.Policy;
using OpenVLA.Policy.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.FineTune.PostTraining;

/// <summary>The recipe of a post-training run (RIPT-VLA's loop: arXiv 2505.17016).</summary>
public sealed record PostTrainOptions
{
    /// <summary>Iterations in all (a resumed run continues up to this).</summary>
    public int Iterations { get; init; } = 10;
    /// <summary>Informative contexts (task + initial state with mixed outcomes) per update: the batch.</summary>
    public int ContextsPerIteration { get; init; } = 8;
    /// <summary>K: rollouts per context.</summary>
    public int SamplesPerContext { get; init; } = 8;
    /// <summary>Contexts rolled out per iteration at most while filling the batch (dynamic sampling's budget).</summary>
    public int MaxContextsDrawn { get; init; } = 24;
    public AdvantageKind Advantage { get; init; } = AdvantageKind.Loop;
    /// <summary>PPO's ε.</summary>
    public double ClipEpsilon { get; init; } = 0.2;
    /// <summary>Passes over an iteration's samples.</summary>
    public int Epochs { get; init; } = 1;
    /// <summary>Steps of the kept rollouts trained on per iteration at most (0: all): a uniform, seeded subset, so an update's
    /// cost stays bounded however long the episodes run (PPO's minibatches are subsets too).</summary>
    public int MaxSamples { get; init; }
    /// <summary>Weight of the behaviour-cloning loss on the original demonstrations (0: off); its examples accumulate
    /// beside the rollouts in every micro-batch, they are never replaced by them.</summary>
    public double BcWeight { get; init; }
    /// <summary>Evaluate on held-out initial states every this many iterations (and after the last); 0: never.</summary>
    public int EvalEvery { get; init; }
    /// <summary>Keep every iteration's rollout files (frames, tokens, log-probabilities) instead of deleting them after the update.</summary>
    public bool KeepRollouts { get; init; }

    public void Validate()
    {
        if (Iterations < 1) throw new ArgumentException($"iterations must be at least 1, got {Iterations}");
        if (ContextsPerIteration < 1) throw new ArgumentException($"contexts per iteration must be at least 1, got {ContextsPerIteration}");
        if (SamplesPerContext < 2) throw new ArgumentException($"rollouts per context must be at least 2 (advantages compare them), got {SamplesPerContext}");
        if (MaxContextsDrawn < ContextsPerIteration) throw new ArgumentException($"max contexts drawn ({MaxContextsDrawn}) must be at least the contexts per iteration ({ContextsPerIteration})");
        if (Epochs < 1) throw new ArgumentException($"epochs must be at least 1, got {Epochs}");
        if (!double.IsFinite(BcWeight) || BcWeight < 0) throw new ArgumentException($"the BC weight must be a finite non-negative number, got {BcWeight}");
        if (MaxSamples < 0) throw new ArgumentException($"max samples must be non-negative, got {MaxSamples}");
        if (EvalEvery < 0) throw new ArgumentException($"eval-every must be non-negative, got {EvalEvery}");
    }
}

/// <summary>One rollout to run: the context (task, initial state) and the sampler's seed.</summary>
public sealed record RolloutRequest(string TaskId, int EpisodeSeed, long SampleSeed, int Context, int Sample);

/// <summary>A finished rollout: its outcome and the <see cref="SampledEpisode"/> file it wrote.</summary>
public sealed record RolloutOutcome(RolloutRequest Request, bool Success, int Steps, string Path);

/// <summary>Where rollouts happen: the simulator, seen from the trainer (the CLI wires the tabletop suite's workers).</summary>
public interface IRolloutEnvironment
{
    /// <summary>Context number <paramref name="index"/> (0, 1, …): a task and an episode seed, none of them an evaluation seed.</summary>
    (string TaskId, int EpisodeSeed) Context(long index);
    /// <summary>Runs the requests with the policy at <paramref name="checkpoint"/>, writing episode files under <paramref name="directory"/>.</summary>
    IReadOnlyList<RolloutOutcome> Rollout(string checkpoint, IReadOnlyList<RolloutRequest> requests, string directory);
    /// <summary>Success rate per task on held-out initial states.</summary>
    IReadOnlyDictionary<string, double> Evaluate(string checkpoint);
}

/// <summary>What one iteration did, as logged to post_training.jsonl.</summary>
public sealed record IterationReport(int Iteration, long Step, int Rollouts, double RolloutsPerMinute, double BatchSuccess,
    IReadOnlyDictionary<string, double> SuccessByTask, int ContextsDrawn, int ContextsKept, int Samples, int OptimizerSteps,
    double Loss, double ClipFraction, double ApproxKl, double KlToStart, double RolloutSeconds, double UpdateSeconds,
    IReadOnlyDictionary<string, double>? HeldOut)
{
    public double HeldOutMean => HeldOut is null || HeldOut.Count == 0 ? double.NaN : HeldOut.Values.Average();

    public JsonObject ToJson()
    {
        static JsonNode? Finite(double v) => double.IsFinite(v) ? JsonValue.Create(Math.Round(v, 6)) : null;
        static JsonObject Rates(IReadOnlyDictionary<string, double> d) => new(d.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(Math.Round(kv.Value, 4)))));
        return new JsonObject
        {
            ["iteration"] = Iteration, ["step"] = Step, ["rollouts"] = Rollouts, ["rollouts_per_min"] = Finite(RolloutsPerMinute),
            ["batch_success"] = Finite(BatchSuccess), ["batch_success_by_task"] = Rates(SuccessByTask),
            ["contexts_drawn"] = ContextsDrawn, ["contexts_kept"] = ContextsKept, ["samples"] = Samples, ["optimizer_steps"] = OptimizerSteps,
            ["loss"] = Finite(Loss), ["clip_fraction"] = Finite(ClipFraction), ["approx_kl"] = Finite(ApproxKl), ["kl_to_start"] = Finite(KlToStart),
            ["rollout_s"] = Finite(RolloutSeconds), ["update_s"] = Finite(UpdateSeconds),
            ["held_out"] = HeldOut is null ? null : Rates(HeldOut), ["held_out_mean"] = Finite(HeldOutMean),
        };
    }
}

/// <summary>
/// Interactive post-training: roll the policy out, score each episode by the task's success check, and push the policy
/// towards its own successes and away from its own failures — no demonstrations, no expert labels.
/// Each iteration: contexts (task + initial state) from <see cref="IRolloutEnvironment.Context"/> in order, K rollouts
/// each with the policy's own sampling and a per-rollout sampler seed; contexts whose K outcomes are all equal are dropped
/// and more are drawn until <see cref="PostTrainOptions.ContextsPerIteration"/> are kept (dynamic sampling); advantages
/// within each context (<see cref="Advantages"/>); then PPO's clipped objective (<see cref="PolicyGradientObjective"/>)
/// over every step of the kept rollouts in shuffled micro-batches, each an optimizer step of the <see cref="Trainer"/>,
/// optionally with a BC loss on demonstrations beside them. The iteration ends with a checkpoint that the next
/// iteration's rollouts load and that a resumed run continues from exactly: weights, AdamW, the context cursor (every
/// rollout is a function of the weights, its context and its seed, so nothing else is random).
/// </summary>
public sealed class PostTrainer
{
    public const string LogFileName = "post_training.jsonl", PlotFileName = "post_training.png";

    readonly Trainer _trainer;
    readonly PolicyGradientObjective _objective;
    readonly PostTrainOptions _options;
    readonly IRolloutEnvironment _environment;
    readonly string _start;
    readonly OpenVlaModel? _reference;
    readonly PostTrainCursor _cursor;
    readonly int _klSamples;

    /// <param name="startCheckpoint">The checkpoint the run starts from (iteration 0's rollouts load it).</param>
    /// <param name="reference">The start model, frozen, for the KL-to-start metric (null: not measured).</param>
    /// <param name="demonstrations">The BC term's examples (required when <see cref="PostTrainOptions.BcWeight"/> &gt; 0).</param>
    public PostTrainer(Trainer trainer, PolicyGradientObjective objective, PostTrainOptions options, IRolloutEnvironment environment,
        string startCheckpoint, OpenVlaModel? reference = null, IExampleSource? demonstrations = null, int klSamples = 256)
    {
        options.Validate();
        if (options.BcWeight > 0 && demonstrations is null) throw new ArgumentException("a BC weight needs demonstrations (--bc-dataset)");
        if (!trainer.Options.Full && !trainer.Options.Merge)
            throw new ArgumentException("post-training with LoRA needs the merged model at every save (the next iteration's rollouts load it)");
        _trainer = trainer;
        _objective = objective;
        _options = options;
        _environment = environment;
        _start = startCheckpoint;
        _reference = reference;
        _klSamples = klSamples;
        _cursor = new PostTrainCursor(demonstrations);
    }

    public int Iteration => _cursor.Iteration;
    /// <summary>What the trainer saves and restores: the iteration, the next context and the demonstrations' cursor.</summary>
    public IExampleSource Cursor => _cursor;
    public string LogPath => Path.Combine(_trainer.OutputDirectory, LogFileName);

    /// <summary>The checkpoint the next iteration's rollouts load: the start, or the latest saved iteration's model.</summary>
    public string CurrentPolicy => _cursor.Iteration == 0 ? _start
        : Path.Combine(Trainer.LatestCheckpoint(_trainer.OutputDirectory) ?? throw new InvalidOperationException("no saved iteration"), Trainer.ModelDirName);

    /// <summary>Continues from the latest saved iteration: the trainer's state, the cursor, the log cut after it.</summary>
    public void Resume(string checkpointDir)
    {
        _trainer.Resume(checkpointDir, _cursor);
        if (File.Exists(LogPath))
        {
            var kept = File.ReadLines(LogPath).Where(l => l.Length > 0 && JsonNode.Parse(l)!["iteration"]!.GetValue<int>() < _cursor.Iteration).ToList();
            File.WriteAllLines(LogPath, kept);
        }
    }

    /// <summary>Runs one iteration: rollouts, update, save, held-out evaluation when due; appends it to the log.</summary>
    public IterationReport RunIteration(Action<string>? note = null)
    {
        int iteration = _cursor.Iteration;
        string policy = CurrentPolicy;
        string rolloutDir = Path.Combine(_trainer.OutputDirectory, $"rollouts-{iteration:D4}");
        if (Directory.Exists(rolloutDir)) Directory.Delete(rolloutDir, true);   // a run that died mid-iteration
        Directory.CreateDirectory(rolloutDir);
        int k = _options.SamplesPerContext;

        // ---- rollouts, with dynamic sampling ----
        var clock = Stopwatch.StartNew();
        var kept = new List<(IReadOnlyList<RolloutOutcome> Episodes, double[] Advantages)>();
        var all = new List<RolloutOutcome>();
        int drawn = 0;
        while (kept.Count < _options.ContextsPerIteration && drawn < _options.MaxContextsDrawn)
        {
            // Half as many again as still needed (some come back uninformative), so the workers stay busy; every
            // informative context is kept, so a batch may end a little larger than asked.
            int needed = _options.ContextsPerIteration - kept.Count;
            int wave = Math.Min(needed + (needed + 1) / 2, _options.MaxContextsDrawn - drawn);
            var requests = new List<RolloutRequest>();
            for (int c = 0; c < wave; c++)
            {
                int context = checked((int)_cursor.NextContext + c);
                var (task, episodeSeed) = _environment.Context(context);
                for (int s = 0; s < k; s++)
                    requests.Add(new RolloutRequest(task, episodeSeed, SampleSeed(context, s), context, s));
            }
            var outcomes = _environment.Rollout(policy, requests, rolloutDir);
            _cursor.NextContext += wave;
            drawn += wave;
            all.AddRange(outcomes);
            foreach (var group in outcomes.GroupBy(o => o.Request.Context).OrderBy(g => g.Key))
            {
                var episodes = group.OrderBy(o => o.Request.Sample).ToList();
                var rewards = episodes.Select(o => o.Success ? 1.0 : 0.0).ToList();
                if (Advantages.Informative(rewards, _options.Advantage)) kept.Add((episodes, Advantages.Compute(rewards, _options.Advantage)));
                else foreach (var o in episodes) File.Delete(o.Path);
            }
        }
        double rolloutSeconds = clock.Elapsed.TotalSeconds;
        var byTask = all.GroupBy(o => o.Request.TaskId).OrderBy(g => g.Key).ToDictionary(g => g.Key, g => g.Average(o => o.Success ? 1.0 : 0.0));
        note?.Invoke($"iteration {iteration + 1}: {all.Count} rollouts in {rolloutSeconds:0} s, {all.Count(o => o.Success)} successes, " +
                     $"{kept.Count} of {drawn} contexts informative");

        // ---- update ----
        clock.Restart();
        var samples = new List<PolicySample>();
        foreach (var (episodes, advantages) in kept)
            for (int i = 0; i < episodes.Count; i++)
            {
                if (advantages[i] == 0) continue;   // no gradient: skip its forward
                var episode = SampledEpisode.Read(episodes[i].Path);
                foreach (var step in episode.Steps)
                    samples.Add(new PolicySample(new TrainingExample(new RgbImage(episode.ImageSize, episode.ImageSize, step.Frame), episode.Instruction,
                        step.Tokens.Select(t => (float)_objective.Objective.ActionTokenizer.Decode(t)).ToArray(), "post-training")
                    { ActionTokenIds = step.Tokens }, step.LogProbs, advantages[i]));
            }
        int available = samples.Count;
        if (_options.MaxSamples > 0 && samples.Count > _options.MaxSamples)
            samples = Shuffle(samples.Count, (ulong)iteration, 0xCA9).Take(_options.MaxSamples).Order().Select(j => samples[j]).ToList();
        if (samples.Count < available) note?.Invoke($"training on {samples.Count} of the kept rollouts' {available} steps (--max-samples)");
        double klToStart = KlToStart(samples);
        double lossSum = 0, clipSum = 0, klSum = 0;
        int stepsTaken = 0;
        int batch = _trainer.Options.BatchSize, effective = _trainer.Options.EffectiveBatch;
        for (int epoch = 0; epoch < _options.Epochs && samples.Count > 0; epoch++)
        {
            var order = Shuffle(samples.Count, (ulong)iteration, (ulong)epoch);
            // Whole optimizer steps only; the remainder (< one step's samples) waits for the next epoch's shuffle.
            int steps = Math.Max(1, samples.Count / effective);
            for (int s = 0; s < steps; s++)
            {
                double clipped = 0, kl = 0;
                var m = _trainer.TrainStep(micro =>
                {
                    int from = (s * effective + micro * batch) % samples.Count;
                    var slice = Enumerable.Range(from, Math.Min(batch, samples.Count)).Select(j => samples[order[j % samples.Count]]).ToList();
                    var stats = _objective.Loss(_trainer.Model, slice, _trainer.DecoderLayerRunner);
                    var loss = stats.Loss;
                    if (_options.BcWeight > 0)
                    {
                        var demos = Enumerable.Range(0, batch).Select(_ => _cursor.Next()).ToList();
                        using var bcBatch = _trainer.Objective.Build(demos, _trainer.Model.Precision.Device, _trainer.Model.Precision.DType);
                        var (hidden, labels) = ActionObjective.Forward(_trainer.Model, bcBatch, _trainer.DecoderLayerRunner);
                        using var weight = _options.BcWeight.ToScalar();
                        loss = loss.add(_trainer.Objective.Score(hidden, labels, _trainer.Model.language_model.Logits).Loss.mul(weight), KeptScalars.One);
                    }
                    _trainer.Backward(loss);
                    clipped += stats.ClipFraction / _trainer.Options.GradAccumulation;
                    kl += stats.ApproxKl / _trainer.Options.GradAccumulation;
                    return stats.LossValue;
                });
                _trainer.Metrics.Append(m);
                lossSum += m.Loss;
                clipSum += clipped;
                klSum += kl;
                stepsTaken++;
            }
        }
        double updateSeconds = clock.Elapsed.TotalSeconds;
        _cursor.Iteration++;
        string saved = _trainer.Save(_cursor, _start);
        if (!_options.KeepRollouts) Directory.Delete(rolloutDir, true);

        IReadOnlyDictionary<string, double>? heldOut = null;
        if (_options.EvalEvery > 0 && (_cursor.Iteration % _options.EvalEvery == 0 || _cursor.Iteration == _options.Iterations))
            heldOut = _environment.Evaluate(Path.Combine(saved, Trainer.ModelDirName));
        var report = new IterationReport(iteration, _trainer.Step, all.Count, all.Count / Math.Max(rolloutSeconds / 60, 1e-9),
            all.Count == 0 ? double.NaN : all.Average(o => o.Success ? 1.0 : 0.0), byTask, drawn, kept.Count, samples.Count, stepsTaken,
            stepsTaken == 0 ? double.NaN : lossSum / stepsTaken, stepsTaken == 0 ? double.NaN : clipSum / stepsTaken,
            stepsTaken == 0 ? double.NaN : klSum / stepsTaken, klToStart, rolloutSeconds, updateSeconds, heldOut);
        File.AppendAllText(LogPath, report.ToJson().ToJsonString() + "\n");
        Plot(Path.Combine(_trainer.OutputDirectory, PlotFileName));
        return report;
    }

    /// <summary>The sampler's seed of rollout <paramref name="sample"/> of context <paramref name="context"/>.</summary>
    public long SampleSeed(int context, int sample) => (long)(InMemoryExampleSource.Mix(_trainer.Options.Seed ^ 0x5EED, (ulong)context, (ulong)sample) >> 1);

    int[] Shuffle(int count, ulong iteration, ulong epoch)
    {
        var order = Enumerable.Range(0, count).ToArray();
        for (int i = count - 1; i > 0; i--)
        {
            int j = (int)(InMemoryExampleSource.Mix(_trainer.Options.Seed, (iteration << 16) ^ (0xB00 + epoch), (ulong)i) % (ulong)(i + 1));
            (order[i], order[j]) = (order[j], order[i]);
        }
        return order;
    }

    /// <summary>KL(π_old ‖ π_start) estimated on up to klSamples of the iteration's steps (k3 over their drawn tokens).</summary>
    double KlToStart(IReadOnlyList<PolicySample> samples)
    {
        if (_reference is null || samples.Count == 0) return double.NaN;
        double sum = 0;
        long count = 0;
        int n = Math.Min(_klSamples, samples.Count), stride = Math.Max(1, samples.Count / n);
        var chosen = Enumerable.Range(0, n).Select(i => samples[i * stride % samples.Count]).ToList();
        using var noGrad = torch.no_grad();
        for (int i = 0; i < chosen.Count; i += _trainer.Options.BatchSize)
        {
            using var scope = NewDisposeScope();
            var part = chosen.Skip(i).Take(_trainer.Options.BatchSize).ToList();
            var start = _objective.LogProbs(_reference, part.Select(p => p.Example).ToList()).cpu().data<float>().ToArray();
            var old = part.SelectMany(p => p.OldLogProbs).ToArray();
            for (int j = 0; j < old.Length; j++)
            {
                if (!float.IsFinite(old[j]) || !float.IsFinite(start[j])) continue;
                double d = start[j] - old[j];
                sum += Math.Exp(d) - d - 1;
                count++;
            }
        }
        return count == 0 ? double.NaN : sum / count;
    }

    /// <summary>Success against the iteration: the rollouts' (per task and overall) and the held-out evaluations'.</summary>
    void Plot(string pngPath)
    {
        var entries = File.ReadLines(LogPath).Where(l => l.Length > 0).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();
        var plot = new ScottPlot.Plot();
        double[] xs = entries.Select(e => e["iteration"]!.GetValue<double>() + 1).ToArray();
        var batch = plot.Add.Scatter(xs, entries.Select(e => 100 * (e["batch_success"]?.GetValue<double>() ?? double.NaN)).ToArray());
        batch.LegendText = "rollouts (all tasks)";
        batch.LineWidth = 2;
        var tasks = entries.SelectMany(e => e["batch_success_by_task"]!.AsObject().Select(kv => kv.Key)).Distinct().Order().ToList();
        foreach (var task in tasks)
        {
            var line = plot.Add.Scatter(xs, entries.Select(e => 100 * (e["batch_success_by_task"]![task]?.GetValue<double>() ?? double.NaN)).ToArray());
            line.LegendText = $"rollouts: {task}";
            line.LinePattern = ScottPlot.LinePattern.Dashed;
            line.MarkerSize = 3;
        }
        var evals = entries.Where(e => e["held_out_mean"] is not null).ToList();
        if (evals.Count > 0)
        {
            var held = plot.Add.Scatter(evals.Select(e => e["iteration"]!.GetValue<double>() + 1).ToArray(),
                evals.Select(e => 100 * e["held_out_mean"]!.GetValue<double>()).ToArray());
            held.LegendText = "held-out evaluation";
            held.MarkerSize = 8;
            held.LineWidth = 2;
        }
        plot.Title("Post-training: success against iteration");
        plot.XLabel("iteration");
        plot.YLabel("success (%)");
        plot.Axes.SetLimitsY(0, 100);
        plot.ShowLegend();
        var tmp = pngPath + ".tmp.png";
        plot.SavePng(tmp, 900, 600);
        File.Move(tmp, pngPath, overwrite: true);
    }

    /// <summary>The trainer's view of the run's position: the iteration, the next context and the BC examples' cursor
    /// (<see cref="Next"/> draws demonstrations for the BC term).</summary>
    sealed class PostTrainCursor(IExampleSource? demonstrations) : IExampleSource
    {
        public int Iteration { get; set; }
        public long NextContext { get; set; }

        public TrainingExample Next() => (demonstrations ?? throw new InvalidOperationException("no demonstrations were given")).Next();

        public JsonNode Cursor => new JsonObject
        {
            ["iteration"] = Iteration, ["next_context"] = NextContext, ["demonstrations"] = demonstrations?.Cursor.DeepClone(),
        };

        public void Restore(JsonNode cursor)
        {
            Iteration = cursor["iteration"]?.GetValue<int>() ?? throw new InvalidOperationException("not a post-training checkpoint (no iteration in its cursor)");
            NextContext = cursor["next_context"]!.GetValue<long>();
            if (demonstrations is not null)
                demonstrations.Restore(cursor["demonstrations"] ?? throw new InvalidOperationException("the checkpoint was saved without demonstrations; resume without --bc-dataset"));
            else if (cursor["demonstrations"] is not null) throw new InvalidOperationException("the checkpoint was saved with demonstrations; resume with the same --bc-dataset");
        }
    }
}
