using OpenCvSharp;
using OpenVLA.Policy;
using OpenVLA.RobotClients.Evaluation;
using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.Tests.Simulation;

[Collection("MuJoCo")]
public sealed class EvaluatorTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), $"openvla-eval-test-{Guid.NewGuid():N}");

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    /// <summary>A learned-policy stand-in that records what it was shown and always answers the same action.</summary>
    private sealed class ConstantPolicy(float[] action, int images = 1) : IActionPolicy
    {
        public List<VlaObservation> Seen { get; } = [];
        public PolicyDescription Description => new("constant", "test", 7, 32, images, "resize", "f32", "none", new Dictionary<string, ActionStats>());

        public IReadOnlyList<ActionPrediction> PredictBatch(IReadOnlyList<VlaObservation> observations, CancellationToken cancellationToken = default)
        {
            Seen.AddRange(observations);
            return observations.Select(_ => ActionPrediction.Single(action, action, [], [], "tabletop", new StageTimings(0, 0, 0, 0, 0))).ToList();
        }
    }

    [Fact]
    public void Wilson_interval_matches_the_textbook_values()
    {
        var r = Rate.Wilson(8, 10);
        Assert.Equal(0.8, r.Value, 12);
        Assert.Equal(0.4902, r.Low, 4);
        Assert.Equal(0.9433, r.High, 4);
        var none = Rate.Wilson(0, 50);
        Assert.Equal(0.0, none.Low);
        Assert.Equal(0.0714, none.High, 4);
    }

    [Fact]
    public void Scripted_policy_solves_fixed_episodes_and_a_rerun_sees_identical_episodes()
    {
        var options = new EvalOptions(TabletopTasks.Parse("pick_up,push_to_target"), "scripted", TrialsPerTask: 2, Seed: 7, ImageSize: 32,
            VideoDir: Path.Combine(_dir, "videos"));
        var first = Evaluator.Run(options, workerCommand: null);
        var second = Evaluator.Run(options with { VideoDir = null }, workerCommand: null);
        Assert.Equal(4, first.Overall.Trials);
        Assert.Equal(1.0, first.Overall.Value);
        Assert.Equal(first.Episodes.Select(e => (e.Seed, e.Instruction, e.Steps)), second.Episodes.Select(e => (e.Seed, e.Instruction, e.Steps)));
        Assert.Equal(first.Episodes.Sum(e => e.Steps), first.PolicyLatency.Steps);

        // One MP4 per task (the first trial), holding every control step plus the final frame.
        var recorded = first.Episodes.Where(e => e.Video is not null).ToList();
        Assert.All(recorded, e => Assert.True(File.Exists(Path.ChangeExtension(e.Video!, ".png")), "a filmstrip PNG sits next to each MP4"));
        Assert.Equal(["pick_up", "push_to_target"], recorded.Select(e => e.TaskId));
        foreach (var e in recorded)
        {
            Assert.EndsWith(".mp4", e.Video);
            using var video = new VideoCapture(e.Video!);
            Assert.True(video.IsOpened());
            Assert.Equal(e.Steps + 1, video.FrameCount);
        }

        var files = first.WriteFiles(Path.Combine(_dir, "out"));
        Assert.All(files, f => Assert.True(new FileInfo(f).Length > 100, f));
        Assert.Contains("| pick_up | 2/2 = 100.0% |", File.ReadAllText(Path.Combine(_dir, "out", "summary.md")));
        Assert.Equal([137, 80, 78, 71], File.ReadAllBytes(Path.Combine(_dir, "out", "success.png")).Take(4).Select(b => (int)b));
    }

    [Fact]
    public void A_learned_policy_sees_the_camera_frame_and_instruction_and_doing_nothing_fails()
    {
        var policy = new ConstantPolicy([0, 0, 0, 0, 0, 0, 1]);
        using var rollout = new ActionPolicyRolloutPolicy(policy, "constant");
        using var env = new TabletopEnv(32);
        var job = new EvalJob("stack", 0, TabletopTasks.EpisodeSeed(7, "stack", 0), "constant", 32, 10, null);
        var result = Evaluator.RunEpisode(job, env, rollout);
        Assert.False(result.Success);
        Assert.Equal(TabletopTasks.Get("stack").MaxSteps, result.Steps);
        Assert.Equal(result.Steps, policy.Seen.Count);
        Assert.All(policy.Seen, o => Assert.Equal(result.Instruction, o.Instruction));
        Assert.Equal((32, 32), (policy.Seen[0].Images[0].Width, policy.Seen[0].Images[0].Height));
        Assert.Single(policy.Seen[0].Images);
    }

    /// <summary>The scripted expert dressed as a learned policy: it reaches the simulator through the test, not the observation.</summary>
    private sealed class ReplayedExpert(TabletopEnv env) : IRolloutPolicy
    {
        private ScriptedExpert? _expert;
        public string Name => "replayed-expert";
        public bool WantsWristImage => false;
        public int PolicyCalls => 0;
        public void BeginEpisode(EpisodeSpec episode) => _expert = new ScriptedExpert(episode);
        public float[] Act(RolloutObservation observation)
        {
            Assert.Null(observation.Privileged);
            return _expert!.Act(env);
        }
        public void Dispose() { }
    }

    [Fact]
    public void Diagnose_shadows_a_policy_that_does_what_the_expert_does_with_zero_error()
    {
        using var env = new TabletopEnv(32);
        using var rollout = new ReplayedExpert(env);
        var job = new EvalJob("place_on_plate", 0, TabletopTasks.EpisodeSeed(7, "place_on_plate", 0), "replayed-expert", 32, 10, null, Diagnose: true);
        var result = Evaluator.RunEpisode(job, env, rollout);
        Assert.True(result.Success);
        var trace = result.Shadow!;
        Assert.Equal(result.Steps, trace.Phases.Length);
        var steps = Enumerable.Range(0, trace.Phases.Length).ToList();
        Assert.All(steps, i => Assert.Equal(0.0, trace.TranslationErrorCm(i)));
        Assert.Equal(trace.ExpertActions, trace.PolicyActions);
        Assert.All(steps, i => Assert.True(trace.GripperAgrees(i)));
        Assert.All(steps, i => Assert.False(trace.Stalled(i)));
        var replayed = EvalReport.From(new EvalOptions(TabletopTasks.Parse("place_on_plate"), "replayed-expert", 1, ImageSize: 32, Diagnose: true),
            "replayed-expert", [result], [], 1).Diagnosis!;
        Assert.Empty(replayed.FailureStages);
        Assert.All(replayed.Phases, p => Assert.Equal((0.0, 1.0, 0.0), (p.MeanTranslationErrorCm, p.GripperAgreement, p.Stalled)));
        // The shadow walks the same script: approach first, the grasp in the middle, the release at the end.
        Assert.Equal("Approach", trace.Phases[0]);
        Assert.True(Array.IndexOf(trace.Phases, "Close") < Array.IndexOf(trace.Phases, "Carry"));
        Assert.Contains("Open", trace.Phases);
        Assert.Null(Evaluator.RunEpisode(job with { Diagnose = false }, env, rollout).Shadow);
    }

    [Fact]
    public void Diagnose_reports_where_a_failed_episode_stopped_and_how_far_the_policy_was_from_the_expert()
    {
        var policy = new ConstantPolicy([0, 0, 0, 0, 0, 0, 0]); // stays put with the gripper closed
        using var rollout = new ActionPolicyRolloutPolicy(policy, "constant");
        using var env = new TabletopEnv(32);
        var job = new EvalJob("pick_up", 0, TabletopTasks.EpisodeSeed(7, "pick_up", 0), "constant", 32, 10, null, Diagnose: true);
        var episode = Evaluator.RunEpisode(job, env, rollout);
        var trace = episode.Shadow!;
        Assert.False(episode.Success);
        Assert.All(trace.Phases, p => Assert.Equal("Approach", p));
        Assert.Equal("Approach", trace.FurthestPhase);
        var steps = Enumerable.Range(0, trace.Phases.Length).ToList();
        Assert.All(steps, i => Assert.False(trace.GripperAgrees(i))); // the expert approaches with open fingers
        Assert.All(steps, i => Assert.True(trace.Stalled(i)));

        // The hand never moves, so the expert asks for the same step every time: its length is the whole error, at most
        // 2 cm per axis. Check it against the expert's own first command in the same initial state.
        var spec = TabletopTasks.Get("pick_up").Sample(job.Seed);
        env.Reset(spec.Layout, 10);
        var first = new ScriptedExpert(spec).Act(env);
        var offset = env.Tcp - env.CubePosition(spec.Args.Cube);
        Assert.All(trace.HandToCubeCm, v =>
        {
            Assert.Equal(100 * offset.X, v[0], 3);
            Assert.Equal(100 * offset.Y, v[1], 3);
            Assert.Equal(100 * offset.Z, v[2], 3);
        });
        Assert.All(trace.ExpertActions, a => Assert.Equal(first, a));
        Assert.All(trace.PolicyActions, a => Assert.Equal(new float[7], a));
        float expected = 100 * MathF.Sqrt(first[0] * first[0] + first[1] * first[1] + first[2] * first[2]);
        Assert.InRange(expected, 0.5f, 3.5f);
        Assert.All(steps, i => Assert.Equal(expected, trace.TranslationErrorCm(i), 3));

        var options = new EvalOptions(TabletopTasks.Parse("pick_up"), "constant", TrialsPerTask: 1, ImageSize: 32, Diagnose: true);
        var report = EvalReport.From(options, "constant", [episode], [], 1);
        Assert.Equal([new FailureStage("pick_up", "Approach", 1)], report.Diagnosis!.FailureStages);
        var phase = Assert.Single(report.Diagnosis.Phases);
        Assert.Equal(("pick_up", "Approach", episode.Steps, 0.0), (phase.Task, phase.Phase, phase.Steps, phase.GripperAgreement));
        Assert.Equal(expected, phase.MeanTranslationErrorCm, 3);
        Assert.Equal(1.0, phase.Stalled); // it never moves, and the expert asks for at least 5 mm every step
        var markdown = report.ToMarkdown();
        Assert.Contains("| pick_up | 1 | Approach 1 |", markdown);
        Assert.Contains($"| pick_up | Approach | {episode.Steps} | {expected:F2} | 0.0% | 100.0% |", markdown);
        Assert.Null(EvalReport.From(options with { Diagnose = false }, "constant", [episode with { Shadow = null }], [], 1).Diagnosis);
    }

    [Fact]
    public void A_two_camera_policy_also_gets_the_wrist_view()
    {
        var policy = new ConstantPolicy([0, 0, -0.01f, 0, 0, 0, 1], images: 2);
        using var rollout = new ActionPolicyRolloutPolicy(policy, "two-camera");
        using var env = new TabletopEnv(32);
        var result = Evaluator.RunEpisode(new EvalJob("pick_up", 0, 1, "two-camera", 32, 0, null), env, rollout);
        Assert.All(policy.Seen, o => Assert.Equal(2, o.Images.Count));
        Assert.NotEqual(policy.Seen[0].Images[0].Pixels, policy.Seen[0].Images[1].Pixels);
        // Moving down 1 cm per step, the wrist view changes while the fixed camera mostly does not.
        Assert.NotEqual(policy.Seen[0].Images[1].Pixels, policy.Seen[^1].Images[1].Pixels);
        Assert.False(result.Success);
    }

    [Fact]
    public void Policy_arguments_parse_and_missing_backends_are_reported()
    {
        Assert.IsType<RolloutPolicies.Scripted>(RolloutPolicies.Parse("scripted"));
        Assert.Equal(new RolloutPolicies.Grpc("localhost", 50051), RolloutPolicies.Parse("grpc://localhost:50051"));
        Assert.Throws<ArgumentException>(() => RolloutPolicies.Parse("grpc://localhost"));
        Assert.Throws<ArgumentException>(() => RolloutPolicies.Parse("http://x:1"));
        Directory.CreateDirectory(_dir);
        var checkpoint = RolloutPolicies.Parse($"checkpoint:{_dir}");
        var previous = RolloutPolicies.CheckpointFactory;
        try
        {
            RolloutPolicies.CheckpointFactory = null;
            Assert.Throws<PolicyUnavailableException>(() => RolloutPolicies.EnsureAvailable(checkpoint));
            RolloutPolicies.CheckpointFactory = dir => new ConstantPolicy([0.01f, 0, 0, 0, 0, 0, 1]);
            using var created = RolloutPolicies.Create(checkpoint);
            Assert.Equal($"checkpoint:{_dir}", created.Name);
        }
        finally { RolloutPolicies.CheckpointFactory = previous; }
        Assert.Throws<DirectoryNotFoundException>(() => RolloutPolicies.EnsureAvailable(RolloutPolicies.Parse($"checkpoint:{_dir}/missing")));
    }

    [Fact]
    public void A_crashed_worker_is_reported_and_its_episode_retried()
    {
        string cli = Path.Combine(AppContext.BaseDirectory, "openvla.dll");
        Assert.True(File.Exists(cli), "the CLI is copied next to the tests");
        string id = Guid.NewGuid().ToString("N");
        Environment.SetEnvironmentVariable("OPENVLA_SIM_TEST_CRASH", "pick_up/1");
        Environment.SetEnvironmentVariable("OPENVLA_SIM_TEST_CRASH_ID", id);
        try
        {
            var options = new EvalOptions(TabletopTasks.Parse("pick_up"), "scripted", TrialsPerTask: 3, Workers: 2, ImageSize: 32);
            var report = Evaluator.Run(options, ["dotnet", cli, "sim-worker", "--kind", "eval"]);
            var crash = Assert.Single(report.WorkerCrashes);
            Assert.NotEqual(0, crash.ExitCode);
            // MuJoCo's fatal error reached our handler, which reported it and ended the worker (no prompt, no carrying on).
            Assert.Contains("MuJoCo fatal error: test crash requested", crash.StderrTail);
            Assert.Equal([0, 1, 2], report.Episodes.Select(e => e.Trial));
            Assert.Equal(1.0, report.Overall.Value);
            Assert.Contains("worker crash", report.ToMarkdown());
        }
        finally
        {
            Environment.SetEnvironmentVariable("OPENVLA_SIM_TEST_CRASH", null);
            Environment.SetEnvironmentVariable("OPENVLA_SIM_TEST_CRASH_ID", null);
            foreach (var f in Directory.GetFiles(Path.GetTempPath(), $"openvla-sim-crash-{id}-*")) File.Delete(f);
        }
    }

    [Fact]
    public void Dagger_recording_keeps_a_failed_driven_episode_labelled_by_the_expert()
    {
        using var env = new TabletopEnv(32);
        var stayClosed = new ConstantPolicy([0, 0, 0, 0, 0, 0, 0]);
        using var driver = new RolloutDemoDriver(new ActionPolicyRolloutPolicy(stayClosed, "constant"));
        int seed = TabletopTasks.EpisodeSeed(5, "pick_up", 0);
        var job = new OpenVLA.Simulation.Datasets.DemoJob(0, "pick_up", seed, 0, 32, false, _dir, ["pick_up"], ExpertLabels: true, Driver: "constant");
        var episode = OpenVLA.Simulation.Datasets.DemoRecorder.Record(job, env, driver);

        // The arm never moves, so the episode runs out of steps, and it is kept anyway.
        Assert.False(episode.Success);
        Assert.Equal(TabletopTasks.Get("pick_up").MaxSteps, episode.Length);
        Assert.Equal(episode.Length, stayClosed.Seen.Count);
        Assert.All(stayClosed.Seen, o => Assert.Equal(episode.Instruction, o.Instruction));
        Assert.True(File.Exists(OpenVLA.Simulation.Datasets.LeRobotLayout.EpisodeFile(_dir, 0)));

        // Every label is what a clean expert says in that (unchanging) state: the first approach command after settling.
        var spec = TabletopTasks.Get("pick_up").Sample(seed);
        env.Reset(spec.Layout, OpenVLA.Simulation.Datasets.DemoRecorder.DrivenSettleSteps);
        var first = new ScriptedExpert(spec).Act(env);
        Assert.True(Math.Abs(first[0]) + Math.Abs(first[1]) + Math.Abs(first[2]) > 0.005, "the expert should be asking to move");
        Assert.All(episode.Actions, a => Assert.Equal(first, a));
    }

    [Fact]
    public void Dagger_recording_driven_by_the_expert_itself_records_what_it_executed_and_succeeds()
    {
        using var env = new TabletopEnv(32);
        using var driver = new RolloutDemoDriver(new ReplayedExpert(env));
        var job = new OpenVLA.Simulation.Datasets.DemoJob(0, "stack", TabletopTasks.EpisodeSeed(5, "stack", 0), 0, 32, false, _dir, ["stack"],
            ExpertLabels: true, Driver: "replayed-expert");
        var episode = OpenVLA.Simulation.Datasets.DemoRecorder.Record(job, env, driver);
        Assert.True(episode.Success);
        Assert.True(episode.Length < TabletopTasks.Get("stack").MaxSteps);
        // Replay the labels open loop from the same reset: a clean expert's labels are its commands, so the replay succeeds
        // in the same number of steps.
        var spec = TabletopTasks.Get("stack").Sample(job.Seed);
        env.Reset(spec.Layout, OpenVLA.Simulation.Datasets.DemoRecorder.DrivenSettleSteps);
        var start = OpenVLA.Simulation.Tabletop.TabletopScene.CubeColours.ToDictionary(c => c, env.CubePosition);
        foreach (var a in episode.Actions) env.Step(a);
        Assert.True(TabletopTasks.Get("stack").IsSuccess(env, spec.Args, start));
    }
}
