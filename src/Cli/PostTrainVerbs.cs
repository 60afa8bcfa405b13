using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using OpenVLA.FineTune.Data;
using OpenVLA.FineTune.PostTraining;
using OpenVLA.FineTune.Training;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Tokenization;
using OpenVLA.RobotClients.Evaluation;
using OpenVLA.Simulation;
using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.Cli;

/// <summary>post-train: the policy improves itself in simulation from success alone (RIPT-VLA's loop, <see cref="PostTrainer"/>).</summary>
internal static class PostTrainVerbs
{
    public static IEnumerable<Command> Create() => [PostTrain()];

    static Command PostTrain()
    {
        var training = new FineTuneVerbs.TrainingOptions();
        var baseDir = new Option<string?>("--base") { Description = $"checkpoint to start from (default: the embedded {DefaultModel.Name})" };
        var outDir = new Option<string>("--out") { Description = "run directory: step-N/ (one per iteration, model/ loadable), post_training.jsonl and .png, metrics.jsonl", Required = true };
        var resume = new Option<bool>("--resume") { Description = "continue the run in --out from its last completed iteration" };
        var iterations = new Option<int>("--iterations") { Description = "iterations in all", DefaultValueFactory = _ => 10 };
        var contexts = new Option<int>("--contexts") { Description = "informative contexts (task + initial state with mixed outcomes) per update", DefaultValueFactory = _ => 8 };
        var samples = new Option<int>("--rollouts-per-context") { Description = "K: rollouts per context", DefaultValueFactory = _ => 8 };
        var maxContexts = new Option<int?>("--max-contexts") { Description = "contexts rolled out per iteration at most while filling the batch (default 3 x --contexts)" };
        var advantage = new Option<string>("--advantage") { Description = "loop (RIPT's leave-one-out), grpo (group-normalized) or positive (behaviour-clone the successes only)", DefaultValueFactory = _ => "loop" };
        var clip = new Option<double>("--clip") { Description = "PPO clip epsilon", DefaultValueFactory = _ => 0.2 };
        var epochs = new Option<int>("--epochs") { Description = "passes over each iteration's samples", DefaultValueFactory = _ => 1 };
        var maxSamples = new Option<int>("--max-samples") { Description = "steps of the kept rollouts trained on per iteration at most, a seeded uniform subset (0: all)", DefaultValueFactory = _ => 1024 };
        var bcDataset = new Option<string?>("--bc-dataset") { Description = "demonstrations (LeRobot or RLDS) for a behaviour-cloning term beside the rollouts" };
        var bcWeight = new Option<double>("--bc-weight") { Description = "weight of the BC loss (needs --bc-dataset)", DefaultValueFactory = _ => 0.0 };
        var tasks = new Option<string>("--tasks") { Description = $"'all' or a comma-separated list of: {string.Join(", ", TabletopTasks.Ids)}", DefaultValueFactory = _ => "all" };
        var workers = new Option<int>("--workers") { Description = "rollout worker processes (1 = in this process)", DefaultValueFactory = _ => 2 };
        var decode = new Option<string?>("--decode") { Description = $"the sampling rollouts use and the objective assumes, {ActionDecoding.Syntax} (default: the checkpoint's generation_config.json)" };
        var evalEvery = new Option<int>("--eval-every") { Description = "evaluate on held-out initial states every N iterations and after the last (0: never)", DefaultValueFactory = _ => 0 };
        var evalTrials = new Option<int>("--eval-trials") { Description = "held-out trials per task", DefaultValueFactory = _ => 10 };
        var evalSeed = new Option<int>("--eval-seed") { Description = "suite seed of the held-out states (keep it apart from the seeds you report: 7 and 8 in the model card)", DefaultValueFactory = _ => 9 };
        var keepRollouts = new Option<bool>("--keep-rollouts") { Description = "keep every iteration's rollout files (frames, tokens, log-probabilities)" };
        var json = new Option<bool>("--json") { Description = "print the last iteration's report as JSON" };
        var cmd = new Command("post-train", "Improve a policy in simulation from its own successes and failures (PPO on its sampled action tokens, RIPT-VLA's LOOP), no demonstrations needed.")
        {
            baseDir, outDir, resume, iterations, contexts, samples, maxContexts, advantage, clip, epochs, maxSamples, bcDataset, bcWeight, tasks, workers, decode,
            evalEvery, evalTrials, evalSeed, keepRollouts, json,
        };
        training.AddTo(cmd);
        // Post-training's defaults: full training of the small model at a small, constant learning rate, one checkpoint per iteration kept.
        training.Full.DefaultValueFactory = _ => true;
        training.LearningRate.DefaultValueFactory = _ => 1e-5;
        training.BatchSize.DefaultValueFactory = _ => 32;
        training.MaxSteps.DefaultValueFactory = _ => 1_000_000;
        cmd.SetAction(r =>
        {
            var trainerOptions = training.Read(r) with { SaveSteps = 0, EvalSteps = 0, KeepCheckpoints = int.MaxValue };
            if (!trainerOptions.Full) trainerOptions = trainerOptions with { Merge = true };
            AdvantageKind kind;
            try { kind = Advantages.Parse(r.GetValue(advantage)!); }
            catch (ArgumentException e) { throw new UsageException($"--advantage: {e.Message}"); }
            int perIteration = r.GetValue(contexts);
            var options = new PostTrainOptions
            {
                Iterations = r.GetValue(iterations), ContextsPerIteration = perIteration, SamplesPerContext = r.GetValue(samples),
                MaxContextsDrawn = r.GetValue(maxContexts) ?? 3 * perIteration, Advantage = kind, ClipEpsilon = r.GetValue(clip),
                Epochs = r.GetValue(epochs), MaxSamples = r.GetValue(maxSamples), BcWeight = r.GetValue(bcWeight), EvalEvery = r.GetValue(evalEvery), KeepRollouts = r.GetValue(keepRollouts),
            };
            try { options.Validate(); }
            catch (ArgumentException e) { throw new UsageException(e.Message); }
            if (r.GetValue(clip) is not (> 0 and < 1)) throw new UsageException($"--clip must be in (0, 1), got {r.GetValue(clip)}");
            int w = r.GetValue(workers), trials = r.GetValue(evalTrials);
            if (w is < 1 or > 64) throw new UsageException($"--workers must be 1..64, got {w}");
            if (trials < 1) throw new UsageException($"--eval-trials must be at least 1, got {trials}");
            if (options.BcWeight > 0 != r.GetValue(bcDataset) is not null) throw new UsageException("--bc-dataset and --bc-weight (above 0) go together");
            IReadOnlyList<TabletopTask> selected;
            try { selected = TabletopTasks.Parse(r.GetValue(tasks)!); }
            catch (ArgumentException e) { throw new UsageException($"--tasks: {e.Message}"); }

            string basePath = Path.GetFullPath(DefaultModel.Resolve(r.GetValue(baseDir), "--base"));
            string runDir = Path.GetFullPath(r.GetValue(outDir)!);
            string? latest = FineTuneVerbs.ResumePoint(runDir, r.GetValue(resume), "completed iteration");

            var checkpoint = VlaCheckpoint.Open(basePath);
            ActionDecoding sampling = r.GetValue(decode) is { } d ? ActionDecoding.Parse(d)
                : ActionDecoding.FromGenerationConfig(Path.Combine(basePath, "generation_config.json"));
            if (sampling.Mode != DecodingMode.Sample)
                throw new UsageException($"post-training learns from sampled tokens; {basePath} decodes {sampling}: give --decode sample:T[,top_k=K]");
            if (OftSpec.IsOft(basePath, checkpoint.Config))
                throw new UsageException("post-training an OpenVLA-OFT checkpoint is not supported yet: its L1 head samples nothing (docs/post-training.md)");
            var tokenizer = VlaTokenizer.Load(checkpoint.TokenizerPath);
            var statsPath = Path.Combine(basePath, "dataset_statistics.json");
            // The statistics the model un-normalizes with travel with every iteration's checkpoint unchanged.
            var statistics = File.Exists(statsPath) ? JsonNode.Parse(File.ReadAllText(statsPath))!.AsObject()
                : JsonNode.Parse(File.ReadAllText(Path.Combine(basePath, "config.json")))!["norm_stats"]?.DeepClone().AsObject()
                  ?? throw new UsageException($"{basePath} has no action statistics (dataset_statistics.json or norm_stats in config.json)");
            var dtype = training.WeightType(r);

            using var model = new OpenVlaModel(checkpoint.Config, new ModelPrecision(dtype, training.TorchDevice(r)));
            WeightLoader.Load(model, checkpoint, training.Quantization(r));
            using var reference = new OpenVlaModel(checkpoint.Config, new ModelPrecision(dtype, training.TorchDevice(r)));
            WeightLoader.Load(reference, checkpoint, training.Quantization(r));
            reference.eval();
            foreach (var p in reference.parameters()) p.requires_grad = false;

            using var demonstrations = r.GetValue(bcDataset) is { } bc ? VlaDataset.Open([bc], null, null) : null;
            IExampleSource? bcSource = null;
            if (demonstrations is not null)
            {
                var bcStats = demonstrations.ComputeStatistics();
                var streamOptions = new StreamOptions { Seed = trainerOptions.Seed, ShuffleBufferSize = 2048, ImageSize = checkpoint.Config.ImageSize };
                var episodes = demonstrations.SplitEpisodes(0, trainerOptions.Seed).Train;
                bcSource = new StreamExampleSource(cursor => new TrainingStream(demonstrations, episodes, bcStats, streamOptions, cursor));
            }
            using var trainer = FineTuneVerbs.TrainingOptions.NewTrainer(model, checkpoint, tokenizer, trainerOptions, runDir, statistics);
            PolicyGradientObjective objective;
            try { objective = new PolicyGradientObjective(trainer.Objective, sampling, options.ClipEpsilon); }
            catch (ArgumentException e) { throw new UsageException(e.Message); }
            var environment = new SimulatedRollouts(selected, sampling.ToString(), checkpoint.Config.ImageSize, w, trials, r.GetValue(evalSeed));
            var post = new PostTrainer(trainer, objective, options, environment, basePath, reference, bcSource);
            if (latest is not null)
            {
                post.Resume(latest);
                Console.Error.WriteLine($"post-train: resumed from {latest} at iteration {post.Iteration}");
            }
            Console.Error.WriteLine($"post-train: {basePath}, {(trainerOptions.Full ? "full" : $"LoRA r={trainerOptions.Lora.Rank}")}, lr {trainerOptions.Optimizer.LearningRate:0.##e+0}, " +
                                    $"{options.ContextsPerIteration} contexts x {options.SamplesPerContext} rollouts per iteration, advantage {kind.ToString().ToLowerInvariant()}, " +
                                    $"sampling {sampling}{(options.BcWeight > 0 ? $", BC weight {options.BcWeight}" : "")}; tasks {string.Join(",", selected.Select(t => t.Id))}");
            IterationReport? last = null;
            while (post.Iteration < options.Iterations)
            {
                last = post.RunIteration(line => Console.Error.WriteLine($"post-train: {line}"));
                Console.Error.WriteLine($"post-train: iteration {last.Iteration + 1}/{options.Iterations} | {last.RolloutsPerMinute:0.0} rollouts/min | " +
                                        $"batch success {100 * last.BatchSuccess:0.0}% | kept {last.ContextsKept}/{last.ContextsDrawn} contexts | " +
                                        $"{last.Samples} samples, {last.OptimizerSteps} steps | loss {last.Loss:0.0000} | clip {last.ClipFraction:0.000} | " +
                                        $"KL(old||new) {last.ApproxKl:0.0000} | KL(start) {last.KlToStart:0.0000}" +
                                        (last.HeldOut is null ? "" : $" | held-out {100 * last.HeldOutMean:0.0}% ({string.Join(", ", last.HeldOut.Select(kv => $"{kv.Key} {100 * kv.Value:0}%"))})"));
            }
            string final = Path.Combine(Trainer.LatestCheckpoint(runDir)!, Trainer.ModelDirName);
            Console.WriteLine(r.GetValue(json) ? new JsonObject { ["checkpoint"] = final, ["last"] = last?.ToJson() }.ToJsonString() : final);
            return CliExit.Ok;
        });
        return cmd;
    }

    /// <summary>The tabletop suite as post-training's environment: contexts round-robin over the tasks at episode seeds
    /// that are none of the evaluation seeds (suites 7, 8 and the held-out one); rollouts and held-out evaluation in
    /// <see cref="SampledRollouts"/> workers, the decoding passed explicitly to each job.</summary>
    sealed class SimulatedRollouts(IReadOnlyList<TabletopTask> tasks, string decoding, int imageSize, int workers, int evalTrials, int evalSeed) : IRolloutEnvironment
    {
        /// <summary>The suite seed of post-training's contexts (evaluations use 7, 8 and the held-out seed).</summary>
        const int ContextSuite = 1_000_003;
        const int SettleSteps = 10;
        readonly HashSet<int> _reserved = ReservedSeeds(evalSeed);

        static HashSet<int> ReservedSeeds(int evalSeed)
        {
            var set = new HashSet<int>();
            foreach (int suite in new[] { 7, 8, evalSeed })
                foreach (var id in TabletopTasks.Ids)
                    for (int trial = 0; trial < 1000; trial++) set.Add(TabletopTasks.EpisodeSeed(suite, id, trial));
            return set;
        }

        public (string TaskId, int EpisodeSeed) Context(long index)
        {
            var task = tasks[(int)(index % tasks.Count)];
            for (long attempt = 0; ; attempt++)
            {
                int seed = TabletopTasks.EpisodeSeed(ContextSuite, task.Id, checked((int)(index + attempt * 10_000_000)));
                if (!_reserved.Contains(seed)) return (task.Id, seed);
            }
        }

        public IReadOnlyList<RolloutOutcome> Rollout(string checkpoint, IReadOnlyList<RolloutRequest> requests, string directory)
        {
            var jobs = requests.Select(q => new SampledRolloutJob(checkpoint, decoding, q.TaskId, q.EpisodeSeed, q.SampleSeed, q.Context, q.Sample, imageSize, SettleSteps,
                Path.Combine(directory, $"context{q.Context:D6}_{q.Sample:D2}.episode"))).ToList();
            var results = SampledRollouts.Run(jobs, workers > 1 ? SimulationVerbs.WorkerCommand("rollout") : null, workers,
                new ProgressBar("rollouts", jobs.Count, "episodes"));
            return requests.Select((q, i) => new RolloutOutcome(q, results[i].Success, results[i].Steps, results[i].Path!)).ToList();
        }

        public IReadOnlyDictionary<string, double> Evaluate(string checkpoint)
        {
            var jobs = tasks.SelectMany(t => Enumerable.Range(0, evalTrials).Select(trial => new SampledRolloutJob(checkpoint, decoding, t.Id,
                TabletopTasks.EpisodeSeed(evalSeed, t.Id, trial), trial, -1, trial, imageSize, SettleSteps, null))).ToList();
            var results = SampledRollouts.Run(jobs, workers > 1 ? SimulationVerbs.WorkerCommand("rollout") : null, workers,
                new ProgressBar("held-out", jobs.Count, "episodes"));
            return jobs.Select((j, i) => (j.TaskId, results[i].Success)).GroupBy(x => x.TaskId)
                .ToDictionary(g => g.Key, g => g.Average(x => x.Success ? 1.0 : 0.0));
        }
    }
}
