using System.Diagnostics;
using OpenVLA.Policy;
using OpenVLA.Simulation;
using OpenVLA.Simulation.Tabletop;
using OpenVLA.Simulation.Workers;

namespace OpenVLA.RobotClients.Evaluation;

/// <summary>Options of <c>openvla eval</c>.</summary>
public sealed record EvalOptions(
    IReadOnlyList<TabletopTask> Tasks, string Policy, int TrialsPerTask, int Seed = 7, int Workers = 1, int ImageSize = 224,
    int SettleSteps = 10, string? VideoDir = null, int VideosPerTask = 1, bool Diagnose = false, string? PolicySettings = null,
    int? ExecuteSteps = null);

/// <summary>One rollout to run. The seed fixes the initial state, so every policy sees the same episode for (task, trial).</summary>
public sealed record EvalJob(string TaskId, int Trial, int Seed, string Policy, int ImageSize, int SettleSteps, string? VideoPath, bool Diagnose = false,
    int? ExecuteSteps = null);

/// <summary>The outcome of one rollout; <see cref="Shadow"/> only with <c>--diagnose</c> and a learned policy.
/// <see cref="PolicyCalls"/> counts the model's forward passes (fewer than the steps when chunks are executed).</summary>
public sealed record EvalEpisode(string TaskId, int Trial, int Seed, string Instruction, bool Success, int Steps, double[] LatenciesMs, string? Video,
    ShadowTrace? Shadow = null, int PolicyCalls = 0);

/// <summary>
/// Closed-loop evaluation on the tabletop suite, following OpenVLA's LIBERO protocol (openvla-model.md §6): fixed initial
/// states per (task, trial), a few no-op settling steps first, success = the task predicate within the step budget.
/// </summary>
public static class Evaluator
{
    public static EvalReport Run(EvalOptions o, IReadOnlyList<string>? workerCommand, ProgressBar? progress = null)
    {
        var spec = RolloutPolicies.Parse(o.Policy);
        RolloutPolicies.EnsureAvailable(spec);
        if (o.VideoDir is not null) Directory.CreateDirectory(o.VideoDir);
        var jobs = o.Tasks.SelectMany(t => Enumerable.Range(0, o.TrialsPerTask).Select(trial => new EvalJob(
                t.Id, trial, TabletopTasks.EpisodeSeed(o.Seed, t.Id, trial), spec.Text, o.ImageSize, o.SettleSteps,
                o.VideoDir is not null && trial < o.VideosPerTask ? Path.GetFullPath(Path.Combine(o.VideoDir, $"{t.Id}_trial{trial:000}.mp4")) : null,
                o.Diagnose, o.ExecuteSteps)))
            .ToList();
        var results = new EvalEpisode[jobs.Count];
        var crashes = new List<WorkerCrash>();
        var clock = Stopwatch.StartNew();
        if (workerCommand is null || o.Workers <= 1)
        {
            using var policy = RolloutPolicies.Create(spec, o.ExecuteSteps);
            using var env = new TabletopEnv(o.ImageSize);
            for (int i = 0; i < jobs.Count; i++)
            {
                results[i] = RunEpisode(jobs[i], env, policy);
                progress?.Advance(Note(results[i]));
            }
        }
        else
        {
            var pool = new WorkerPool(workerCommand, o.Workers);
            pool.Run<EvalJob, EvalEpisode>(jobs, (i, r) => { results[i] = r; progress?.Advance(Note(r)); });
            crashes.AddRange(pool.Crashes);
        }
        return EvalReport.From(o, spec.Text, results, crashes, clock.Elapsed.TotalSeconds);
    }

    private static string Note(EvalEpisode r) => $"{r.TaskId} #{r.Trial} {(r.Success ? "success" : "failure")}";

    /// <summary>Runs one rollout: reset to the job's initial state, settle, then policy steps until success or the budget.</summary>
    public static EvalEpisode RunEpisode(EvalJob job, TabletopEnv env, IRolloutPolicy policy)
    {
        var task = TabletopTasks.Get(job.TaskId);
        var episode = task.Sample(job.Seed);
        env.Reset(episode.Layout, job.SettleSteps);
        var start = TabletopScene.CubeColours.ToDictionary(c => c, env.CubePosition);
        policy.BeginEpisode(episode);
        var privileged = policy is ScriptedRolloutPolicy ? new PrivilegedState(env, episode) : null;
        var shadow = job.Diagnose && privileged is null ? new ExpertShadow(episode) : null;
        var latencies = new List<double>();
        var frames = job.VideoPath is null ? null : new List<byte[]>();
        bool success = false;
        int steps = 0;
        while (steps < task.MaxSteps && !success)
        {
            var pixels = env.Render();
            frames?.Add(pixels);
            var wrist = policy.WantsWristImage ? RgbImage.Create(env.ImageSize, env.ImageSize, env.Render(wrist: true)) : null;
            var observation = new RolloutObservation(RgbImage.Create(env.ImageSize, env.ImageSize, pixels), episode.Instruction, env.State(), privileged, wrist);
            long t0 = Stopwatch.GetTimestamp();
            var action = policy.Act(observation);
            latencies.Add(Stopwatch.GetElapsedTime(t0).TotalMilliseconds);
            shadow?.Observe(env, action);
            env.Step(action);
            steps++;
            success = task.IsSuccess(env, episode.Args, start);
        }
        string? video = null;
        if (frames is not null)
        {
            frames.Add(env.Render());
            video = RolloutVideo.Write(job.VideoPath!, frames, env.ImageSize, TabletopEnv.ControlHz);
            RolloutVideo.WriteFilmstrip(Path.ChangeExtension(job.VideoPath!, ".png"), frames, env.ImageSize);
        }
        return new EvalEpisode(job.TaskId, job.Trial, job.Seed, episode.Instruction, success, steps, latencies.ToArray(), video, shadow?.Trace(), policy.PolicyCalls);
    }

    /// <summary>The worker side: one environment and one policy per worker process, reused across its jobs.</summary>
    public static int ServeWorker()
    {
        TabletopEnv? env = null;
        IRolloutPolicy? policy = null;
        string? policyText = null;
        int? executeSteps = null;
        return WorkerLoop.Serve<EvalJob, EvalEpisode>(job =>
        {
            if (env is null || env.ImageSize != job.ImageSize) { env?.Dispose(); env = new TabletopEnv(job.ImageSize); }
            if (policy is null || policyText != job.Policy || executeSteps != job.ExecuteSteps)
            {
                policy?.Dispose();
                policy = RolloutPolicies.Create(RolloutPolicies.Parse(job.Policy), job.ExecuteSteps);
                (policyText, executeSteps) = (job.Policy, job.ExecuteSteps);
            }
            if (Environment.GetEnvironmentVariable("OPENVLA_SIM_TEST_CRASH") is { } crash && crash == $"{job.TaskId}/{job.Trial}"
                && !File.Exists(CrashMarker(job)))
            {
                // Fault injection for the crash-recovery test: die once, mid-job, through MuJoCo's own fatal-error path.
                File.WriteAllText(CrashMarker(job), "crashed once");
                OpenVLA.Simulation.MuJoCo.MjRuntime.RaiseFatalErrorForTest("test crash requested by OPENVLA_SIM_TEST_CRASH");
            }
            return RunEpisode(job, env, policy);
        }, OpenVLA.Policy.UserErrors.Is);
    }

    private static string CrashMarker(EvalJob job) =>
        Path.Combine(Path.GetTempPath(), $"openvla-sim-crash-{Environment.GetEnvironmentVariable("OPENVLA_SIM_TEST_CRASH_ID")}-{job.TaskId}-{job.Trial}");
}
