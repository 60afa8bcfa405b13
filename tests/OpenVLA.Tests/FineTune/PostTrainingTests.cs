using System.Text.Json.Nodes;
using OpenVLA.FineTune.PostTraining;
using OpenVLA.FineTune.Training;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Tokenization;
using OpenVLA.Simulation.Tabletop;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.FineTune;

/// <summary>
/// Post-training (RIPT-VLA's loop): the log-probabilities the sampler records are the ones the objective recomputes,
/// advantages and dynamic sampling follow their definitions, the clipped objective clips, an iteration changes the
/// weights and a resumed run repeats the uninterrupted one bit for bit; and the CLI runs the loop in the simulator.
/// </summary>
[Collection("MuJoCo")]
public sealed class PostTrainingTests
{
    static readonly string ModelDir = Path.Combine(TestPaths.RepoRoot, "models", "openvla-small-tabletop");

    /// <summary>Frames the default model sees in the simulator: first frames of a few tasks' episodes.</summary>
    static List<(RgbImage Image, string Instruction)> Frames(int count)
    {
        var frames = new List<(RgbImage, string)>();
        using var env = new TabletopEnv(112);
        for (int i = 0; i < count; i++)
        {
            var id = TabletopTasks.Ids[i % TabletopTasks.Ids.Count];
            var episode = TabletopTasks.Get(id).Sample(TabletopTasks.EpisodeSeed(123, id, i));
            env.Reset(episode.Layout);
            frames.Add((new RgbImage(112, 112, env.Render()), episode.Instruction));
        }
        return frames;
    }

    static PolicyGradientObjective Objective(VlaPolicy policy, ActionDecoding decoding, double clip = 0.2) =>
        new(ActionObjective.ForCheckpoint(policy.Checkpoint, VlaTokenizer.Load(policy.Checkpoint.TokenizerPath)), decoding, clip);

    static TrainingExample Example(RgbImage image, string instruction, int[] tokens) =>
        new(image, instruction, new float[tokens.Length], "test") { ActionTokenIds = tokens };

    [Theory]
    [InlineData("sample:0.8,top_k=50,seed=1")]                 // the default model's own rule
    [InlineData("sample:1.3,top_k=0,seed=2")]                  // no truncation, a hot temperature
    [InlineData("sample:0.5,top_k=7,top_p=0.8,seed=3")]        // both truncations at once
    public void Recorded_log_probabilities_match_their_recomputation_for_unchanged_weights(string decoding)
    {
        using var policy = VlaPolicy.Load(ModelDir, new PolicyOptions { Decoding = decoding });
        var frames = Frames(6);
        var predictions = frames.Select(f => policy.Predict(new VlaObservation([f.Image], f.Instruction))).ToList();
        var objective = Objective(policy, policy.Decoding);
        float[] recomputed;
        using (torch.no_grad())
            recomputed = objective.LogProbs(policy.Model, frames.Select((f, i) => Example(f.Image, f.Instruction, predictions[i].ActionTokenIds)).ToList())
                .cpu().data<float>().ToArray();
        var recorded = predictions.SelectMany(p => p.TokenLogProbs!).ToArray();
        Assert.Equal(recorded.Length, recomputed.Length);
        Assert.All(recorded, v => Assert.True(float.IsFinite(v) && v <= 0));
        for (int i = 0; i < recorded.Length; i++) Assert.InRange(recomputed[i] - recorded[i], -1e-5f, 1e-5f);
        // And they are log-probabilities of the warped distribution, not of the raw logits: a temperature changes them.
        if (decoding.StartsWith("sample:0.5"))
        {
            using var raw = torch.no_grad();
            var plain = Objective(policy, ActionDecoding.Parse("sample:1,top_k=0"))
                .LogProbs(policy.Model, frames.Select((f, i) => Example(f.Image, f.Instruction, predictions[i].ActionTokenIds)).ToList()).cpu().data<float>().ToArray();
            Assert.True(recorded.Zip(plain).Max(p => Math.Abs(p.First - p.Second)) > 1e-2);
        }
    }

    [Fact]
    public void A_greedy_gripper_token_has_no_log_probability_and_reseeding_repeats_the_draws()
    {
        using var policy = VlaPolicy.Load(ModelDir, new PolicyOptions { Decoding = "sample:0.8,gripper=greedy" });
        var (image, instruction) = Frames(1)[0];
        policy.ReseedSampling(42);
        var a = policy.Predict(new VlaObservation([image], instruction));
        policy.Predict(new VlaObservation([image], instruction));
        policy.ReseedSampling(42);
        var b = policy.Predict(new VlaObservation([image], instruction));
        Assert.True(float.IsNaN(a.TokenLogProbs![^1]));
        Assert.All(a.TokenLogProbs[..^1], v => Assert.True(float.IsFinite(v)));
        Assert.Equal(a.ActionTokenIds, b.ActionTokenIds);
        Assert.Equal(a.TokenLogProbs[..^1], b.TokenLogProbs![..^1]);
        using var greedy = VlaPolicy.Load(ModelDir);
        Assert.NotNull(greedy.Predict(new VlaObservation([image], instruction)).TokenLogProbs);   // the card samples
        using var argmax = VlaPolicy.Load(ModelDir, new PolicyOptions { Decoding = "greedy" });
        Assert.Null(argmax.Predict(new VlaObservation([image], instruction)).TokenLogProbs);
    }

    [Fact]
    public void Advantages_follow_their_definitions()
    {
        double[] rewards = [1, 0, 0, 1];
        Assert.Equal([1 - 1 / 3.0, -2 / 3.0, -2 / 3.0, 1 - 1 / 3.0], Advantages.Compute(rewards, AdvantageKind.Loop), new Tol(1e-12));
        // mean 0.5, unbiased std sqrt(1/3)
        double g = 0.5 / (Math.Sqrt(1 / 3.0) + 1e-4);
        Assert.Equal([g, -g, -g, g], Advantages.Compute(rewards, AdvantageKind.Grpo), new Tol(1e-12));
        Assert.Equal([1.0, 0, 0, 1], Advantages.Compute(rewards, AdvantageKind.Positive));
        Assert.Equal([1.0, -1 / 3.0, -1 / 3.0, -1 / 3.0], Advantages.Compute([1, 0, 0, 0], AdvantageKind.Loop), new Tol(1e-12));
        Assert.Throws<ArgumentException>(() => Advantages.Compute([1], AdvantageKind.Loop));
        // Dynamic sampling: all-equal contexts teach nothing under LOOP and GRPO; positive-only needs one success.
        Assert.False(Advantages.Informative([1, 1, 1], AdvantageKind.Loop));
        Assert.False(Advantages.Informative([0, 0, 0], AdvantageKind.Grpo));
        Assert.True(Advantages.Informative([0, 1, 0], AdvantageKind.Loop));
        Assert.True(Advantages.Informative([1, 1, 1], AdvantageKind.Positive));
        Assert.False(Advantages.Informative([0, 0], AdvantageKind.Positive));
        Assert.All(new[] { AdvantageKind.Loop, AdvantageKind.Grpo }, k => Assert.Equal(0, Advantages.Compute([0, 1, 1, 0, 1], k).Sum(), 9));
    }

    sealed class Tol(double eps) : IEqualityComparer<double>
    {
        public bool Equals(double a, double b) => Math.Abs(a - b) <= eps;
        public int GetHashCode(double v) => 0;
    }

    [Fact]
    public void The_clipped_objective_is_minus_the_mean_advantage_at_ratio_one_and_clips_beyond_epsilon()
    {
        using var policy = VlaPolicy.Load(ModelDir, new PolicyOptions { Decoding = "sample:0.8,top_k=50,seed=5" });
        var frames = Frames(2);
        var p = frames.Select(f => policy.Predict(new VlaObservation([f.Image], f.Instruction))).ToList();
        var objective = Objective(policy, policy.Decoding, clip: 0.2);
        using var noGrad = torch.no_grad();
        var same = objective.Loss(policy.Model, [
            new PolicySample(Example(frames[0].Image, frames[0].Instruction, p[0].ActionTokenIds), p[0].TokenLogProbs!, 1.0),
            new PolicySample(Example(frames[1].Image, frames[1].Instruction, p[1].ActionTokenIds), p[1].TokenLogProbs!, -0.5)]);
        Assert.Equal(-(1.0 - 0.5) / 2, same.LossValue, 4);
        Assert.Equal(0, same.ClipFraction);
        Assert.InRange(same.ApproxKl, -1e-6, 1e-6);
        Assert.Equal(14, same.Tokens);
        // Recorded log-probabilities 0.5 lower: every ratio is e^0.5 ≈ 1.65, clipped to 1.2 for A > 0 (min picks the clip)
        // and kept for A < 0 (min picks the larger loss).
        var shifted = objective.Loss(policy.Model, [
            new PolicySample(Example(frames[0].Image, frames[0].Instruction, p[0].ActionTokenIds), p[0].TokenLogProbs!.Select(v => v - 0.5f).ToArray(), 1.0),
            new PolicySample(Example(frames[1].Image, frames[1].Instruction, p[1].ActionTokenIds), p[1].TokenLogProbs!.Select(v => v - 0.5f).ToArray(), -0.5)]);
        Assert.Equal(-(1.2 * 1.0 + Math.Exp(0.5) * -0.5) / 2, shifted.LossValue, 3);
        Assert.Equal(1, shifted.ClipFraction);
        Assert.Equal(Math.Exp(0.5) - 1 - 0.5, shifted.ApproxKl, 3);
    }

    /// <summary>An environment without a simulator: each rollout is a few steps of the policy at the checkpoint on fixed
    /// frames, with its own sampler seed; it succeeds when its first drawn token is even. Deterministic, like the real one.</summary>
    sealed class TokenParityEnvironment(List<(RgbImage Image, string Instruction)> frames, int steps) : IRolloutEnvironment
    {
        public int Rollouts { get; private set; }
        public (string TaskId, int EpisodeSeed) Context(long index) => ($"frame{index % frames.Count}", (int)index);

        public IReadOnlyList<RolloutOutcome> Rollout(string checkpoint, IReadOnlyList<RolloutRequest> requests, string directory)
        {
            using var policy = VlaPolicy.Load(checkpoint, new PolicyOptions { Decoding = "sample:1.0,top_k=0" });
            return requests.Select(q =>
            {
                Rollouts++;
                policy.ReseedSampling(q.SampleSeed);
                var (image, instruction) = frames[int.Parse(q.TaskId[5..])];
                var recorded = Enumerable.Range(0, steps).Select(_ => policy.Predict(new VlaObservation([image], instruction)))
                    .Select(p => new SampledStep(image.Pixels, p.ActionTokenIds, p.TokenLogProbs!)).ToList();
                bool success = recorded[0].Tokens[0] % 2 == 0;
                string path = Path.Combine(directory, $"{q.Context}_{q.Sample}.episode");
                new SampledEpisode(q.TaskId, instruction, q.EpisodeSeed, q.SampleSeed, q.Context, q.Sample, success, 112, recorded).Write(path);
                return new RolloutOutcome(q, success, steps, path);
            }).ToList();
        }

        public IReadOnlyDictionary<string, double> Evaluate(string checkpoint) => new Dictionary<string, double> { ["frame0"] = 0.5 };
    }

    static (Trainer Trainer, PostTrainer Post, OpenVlaModel Model, TokenParityEnvironment Env) NewRun(string dir, List<(RgbImage, string)> frames)
    {
        var checkpoint = VlaCheckpoint.Open(ModelDir);
        var tokenizer = VlaTokenizer.Load(checkpoint.TokenizerPath);
        var model = new OpenVlaModel(checkpoint.Config, ModelPrecision.Cpu(ScalarType.Float32));
        WeightLoader.Load(model, checkpoint);
        var options = new TrainerOptions { Full = true, FreezeVision = true, BatchSize = 4, GradAccumulation = 2, MaxSteps = 1000, SaveSteps = 0, EvalSteps = 0, KeepCheckpoints = 100,
            Optimizer = new AdamW.Settings(LearningRate: 1e-4) };
        var statistics = JsonNode.Parse(File.ReadAllText(Path.Combine(ModelDir, "config.json")))!["norm_stats"]!.DeepClone().AsObject();
        var trainer = new Trainer(model, checkpoint, tokenizer, options, dir, statistics);
        var env = new TokenParityEnvironment(frames, steps: 3);
        var objective = new PolicyGradientObjective(trainer.Objective, ActionDecoding.Parse("sample:1.0,top_k=0"), 0.2);
        var post = new PostTrainer(trainer, objective, new PostTrainOptions { Iterations = 2, ContextsPerIteration = 2, SamplesPerContext = 4, MaxContextsDrawn = 6, MaxSamples = 16, EvalEvery = 2 },
            env, ModelDir, reference: null);
        return (trainer, post, model, env);
    }

    static Dictionary<string, float[]> Weights(OpenVlaModel model) =>
        model.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().cpu().to(ScalarType.Float32).data<float>().ToArray());

    [Fact]
    public void An_iteration_keeps_only_informative_contexts_changes_the_weights_and_resumes_bit_identically()
    {
        var frames = Frames(3);
        using var straight = new TestPaths.TempDir();
        using var resumed = new TestPaths.TempDir();
        Dictionary<string, float[]> start;
        var probe = NewRun(straight["probe"], frames);
        using (probe.Trainer) start = Weights(probe.Model);

        var (t1, p1, m1, env1) = NewRun(straight.Path, frames);
        var first = p1.RunIteration();
        var second = p1.RunIteration();
        var end = Weights(m1);
        t1.Dispose();

        // Dynamic sampling: every kept context had mixed outcomes, the dropped ones' files are gone, all rollouts counted.
        Assert.Equal(first.ContextsDrawn * 4, first.Rollouts);
        Assert.InRange(first.ContextsKept, 2, first.ContextsDrawn);
        Assert.Equal(first.ContextsDrawn * 4 + second.ContextsDrawn * 4, env1.Rollouts);
        Assert.True(first.OptimizerSteps >= 1 && first.Samples <= 16);
        Assert.NotNull(second.HeldOut);
        Assert.False(Directory.Exists(Path.Combine(straight.Path, "rollouts-0000")));
        Assert.Contains(start, kv => !kv.Value.SequenceEqual(end[kv.Key]));
        Assert.All(start.Where(kv => kv.Key.StartsWith("vision_backbone.")), kv => Assert.Equal(kv.Value, end[kv.Key]));   // frozen
        Assert.True(File.Exists(Path.Combine(straight.Path, PostTrainer.PlotFileName)));
        Assert.Equal(2, File.ReadAllLines(Path.Combine(straight.Path, PostTrainer.LogFileName)).Length);

        // Interrupted after the first iteration, resumed in a new trainer: the same second iteration, bit for bit.
        var (t2, p2, _, _) = NewRun(resumed.Path, frames);
        p2.RunIteration();
        t2.Dispose();
        var (t3, p3, m3, _) = NewRun(resumed.Path, frames);
        p3.Resume(Trainer.LatestCheckpoint(resumed.Path)!);
        Assert.Equal(1, p3.Iteration);
        var again = p3.RunIteration();
        t3.Dispose();
        Assert.Equal(second.ToJson()["batch_success"]!.ToJsonString(), again.ToJson()["batch_success"]!.ToJsonString());
        Assert.Equal(second.Loss, again.Loss);
        var endResumed = Weights(m3);
        Assert.All(end, kv => Assert.Equal(kv.Value, endResumed[kv.Key]));
    }

    [Fact]
    public void The_cli_runs_an_iteration_in_the_simulator_and_writes_a_loadable_checkpoint()
    {
        using var dir = new TestPaths.TempDir();
        var r = CliRunner.Run("post-train", "--out", dir.Path, "--iterations", "1", "--contexts", "1", "--rollouts-per-context", "2", "--max-contexts", "2",
            "--tasks", "push_to_target", "--workers", "1", "--max-samples", "16", "--batch-size", "8", "--freeze-vision", "--lr", "1e-4", "--json");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var summary = JsonNode.Parse(r.Stdout.Trim().Split('\n')[^1])!;
        var last = summary["last"]!;
        Assert.Equal(last["contexts_drawn"]!.GetValue<int>() * 2, last["rollouts"]!.GetValue<int>());
        using var trained = VlaPolicy.Load(summary["checkpoint"]!.GetValue<string>());   // loads, and samples as the base did
        Assert.Equal(DecodingMode.Sample, trained.Decoding.Mode);
        using var original = VlaPolicy.Load(ModelDir);
        var before = original.Model.language_model.named_parameters().First(p => p.name.Contains("layers.0.self_attn.q_proj")).parameter.to(ScalarType.Float32).data<float>().ToArray();
        var after = trained.Model.language_model.named_parameters().First(p => p.name.Contains("layers.0.self_attn.q_proj")).parameter.to(ScalarType.Float32).data<float>().ToArray();
        // Weights move exactly when some context was informative (the outcomes are the simulator's to decide).
        Assert.Equal(last["contexts_kept"]!.GetValue<int>() > 0, !before.SequenceEqual(after));

        CliRunner.AssertUserError(CliRunner.Run("post-train", "--base", ModelDir, "--out", dir.Path, "--iterations", "1"), "already holds");
        CliRunner.AssertUserError(CliRunner.Run("post-train", "--base", ModelDir, "--out", dir["x"], "--decode", "greedy"), "sampled tokens");
        CliRunner.AssertUserError(CliRunner.Run("post-train", "--base", ModelDir, "--out", dir["y"], "--rollouts-per-context", "1"), "at least 2");
        CliRunner.AssertUserError(CliRunner.Run("post-train", "--base", ModelDir, "--out", dir["z"], "--advantage", "ppo"), "unknown advantage");
        CliRunner.AssertUserError(CliRunner.Run("post-train", "--base", ModelDir, "--out", dir["w"], "--bc-weight", "0.5"), "go together");
    }
}
