using OpenVLA.Simulation.Tabletop;
using Parquet.Serialization;

namespace OpenVLA.Simulation.Datasets;

/// <summary>One demonstration to record: which task, from which seed, into which file. <see cref="Driver"/> names a
/// learned policy (as eval's --policy) that drives instead of the expert: DAgger recording.</summary>
public sealed record DemoJob(int EpisodeIndex, string TaskId, int Seed, double Noise, int ImageSize, bool Wrist, string OutDir, string[] SuiteTasks,
    bool ExpertLabels = false, string? Driver = null);

/// <summary>What a recorded episode contributes to the dataset metadata and statistics. <see cref="Success"/> is false
/// only for driven episodes that ran out of steps (expert demonstrations keep successes only).</summary>
public sealed record DemoEpisode(
    int EpisodeIndex, string TaskId, string Instruction, int TaskIndex, int Seed, int Attempts, int Length,
    float[][] Actions, float[][] States, float[][] EnvironmentStates, FeatureStats ImageStats, FeatureStats? WristStats, bool Success = true);

/// <summary>
/// A learned policy that drives the robot while the expert labels (DAgger). Given the third-person frame, the wrist frame
/// when the dataset records one, the instruction and the robot state, it returns the 7-D action to execute.
/// </summary>
public interface IDemoDriver : IDisposable
{
    /// <summary>Called before the first step of every episode.</summary>
    void BeginEpisode(EpisodeSpec episode);
    float[] Act(byte[] frame, byte[]? wristFrame, int imageSize, string instruction, float[] state);
}

/// <summary>
/// Records scripted-expert demonstrations: runs the expert (clean or noisy) until the task's success predicate holds,
/// keeping only successful episodes (a failed attempt is retried with another noise seed, then another layout), and writes
/// the episode parquet file. Runs in-process or inside a worker process.
/// </summary>
public static class DemoRecorder
{
    /// <summary>Attempts per episode: two on the job's layout (only the noise changes), then fresh layouts. A noisy expert
    /// (e.g. --noise 0.01 on push) fails a layout often enough that a few attempts would abort a long run: one episode in
    /// ~1,000 exhausted 6 of them.</summary>
    public const int MaxAttempts = 20;

    /// <summary>Settling steps before a driven episode's first action: the evaluator's protocol, so the driven states are
    /// the ones evaluation visits.</summary>
    public const int DrivenSettleSteps = 10;

    /// <summary>Builds the driver a job names (the CLI registers the learned-policy backends).</summary>
    public static Func<string, IDemoDriver>? DriverFactory { get; set; }

    public static DemoEpisode Record(DemoJob job, TabletopEnv env, IDemoDriver? driver = null)
    {
        var task = TabletopTasks.Get(job.TaskId);
        var catalogue = TabletopTasks.InstructionCatalogue(job.SuiteTasks.Select(TabletopTasks.Get));
        if (job.Driver is not null)
            return RecordDriven(job, env, driver ?? throw new InvalidOperationException($"job names driver {job.Driver} but none was given"), task, catalogue);
        for (int attempt = 0; attempt < MaxAttempts; attempt++)
        {
            // Attempts 0-1 keep the layout (only the noise changes); later ones draw a new layout.
            int layoutSeed = attempt < 2 ? job.Seed : TabletopTasks.EpisodeSeed(job.Seed, job.TaskId, attempt);
            var episode = task.Sample(layoutSeed);
            env.Reset(episode.Layout);
            var start = TabletopScene.CubeColours.ToDictionary(c => c, env.CubePosition);
            var expert = new ScriptedExpert(episode, ExpertNoise.FromSigma(job.Noise), noiseSeed: job.Seed * 31 + attempt);
            var recording = new Recording(job.Wrist);
            bool success = false;
            for (int step = 0; step < task.MaxSteps && !success; step++)
            {
                recording.Observe(env);
                var action = expert.Act(env);
                recording.Actions.Add(job.ExpertLabels ? expert.ExpertAction : action);
                env.Step(action);
                success = task.IsSuccess(env, episode.Args, start);
            }
            if (success) return recording.Finish(job, catalogue, episode.Instruction, layoutSeed, attempt + 1, success: true);
        }
        throw new InvalidOperationException($"the scripted expert failed task {job.TaskId} (seed {job.Seed}) {MaxAttempts} times" +
            (job.Noise > 0 ? $" at --noise {job.Noise}; lower the noise" : ""));
    }

    /// <summary>
    /// DAgger: the driver acts, the clean expert labels every state the driver reaches (its phase follows that state, as
    /// in eval --diagnose; the push phase is derived from each state afresh, see <see cref="ScriptedExpert"/>), and the episode is kept whether or not it succeeds, since its failures are the states the
    /// demonstrations never showed. One attempt, the job's own layout, the evaluator's settling steps.
    /// </summary>
    private static DemoEpisode RecordDriven(DemoJob job, TabletopEnv env, IDemoDriver driver, TabletopTask task, IReadOnlyList<string> catalogue)
    {
        var episode = task.Sample(job.Seed);
        env.Reset(episode.Layout, DrivenSettleSteps);
        var start = TabletopScene.CubeColours.ToDictionary(c => c, env.CubePosition);
        var expert = new ScriptedExpert(episode, pushPhaseFromState: true);
        driver.BeginEpisode(episode);
        var recording = new Recording(job.Wrist);
        bool success = false;
        for (int step = 0; step < task.MaxSteps && !success; step++)
        {
            var (frame, wristFrame, state) = recording.Observe(env);
            recording.Actions.Add(expert.Act(env));
            env.Step(driver.Act(frame, wristFrame, env.ImageSize, episode.Instruction, state));
            success = task.IsSuccess(env, episode.Args, start);
        }
        return recording.Finish(job, catalogue, episode.Instruction, job.Seed, attempts: 1, success);
    }

    /// <summary>One episode's columns as they are recorded, and the step that writes them and summarises them.</summary>
    private sealed class Recording(bool wrist)
    {
        private readonly List<byte[]> _frames = [], _wrist = [];
        private readonly List<float[]> _states = [], _environment = [];
        public List<float[]> Actions { get; } = [];

        /// <summary>Renders and records the current frame(s) and states (before the step's action).</summary>
        public (byte[] Frame, byte[]? WristFrame, float[] State) Observe(TabletopEnv env)
        {
            var frame = env.Render();
            byte[]? wristFrame = wrist ? env.Render(wrist: true) : null;
            var state = env.State();
            _frames.Add(frame);
            if (wristFrame is not null) _wrist.Add(wristFrame);
            _states.Add(state);
            _environment.Add(env.EnvironmentState());
            return (frame, wristFrame, state);
        }

        /// <summary>Writes the episode's parquet file and returns what it adds to the dataset's metadata and statistics.</summary>
        public DemoEpisode Finish(DemoJob job, IReadOnlyList<string> catalogue, string instruction, int seed, int attempts, bool success)
        {
            int taskIndex = catalogue.ToList().IndexOf(instruction);
            var imageStats = FeatureStats.Create(3);
            _frames.ForEach(f => imageStats.AddImage(f));
            FeatureStats? wristStats = null;
            if (wrist) { wristStats = FeatureStats.Create(3); _wrist.ForEach(f => wristStats.AddImage(f)); }
            WriteEpisodeFile(job, taskIndex, _frames, wrist ? _wrist : null, _states, _environment, Actions, globalIndexStart: 0);
            return new DemoEpisode(job.EpisodeIndex, job.TaskId, instruction, taskIndex, seed, attempts, Actions.Count,
                Actions.ToArray(), _states.ToArray(), _environment.ToArray(), imageStats, wristStats, success);
        }
    }

    private static void WriteEpisodeFile(DemoJob job, int taskIndex, List<byte[]> frames, List<byte[]>? wrist, List<float[]> states,
        List<float[]> environment, List<float[]> actions, long globalIndexStart)
    {
        string path = LeRobotLayout.EpisodeFile(job.OutDir, job.EpisodeIndex);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        int size = job.ImageSize;
        var rows = Enumerable.Range(0, frames.Count).Select(t => new LeRobotFrame
        {
            Image = new ImageCell { Bytes = Png.EncodeRgb(frames[t], size, size), Path = $"frame_{t:000000}.png" },
            WristImage = wrist is null ? null : new ImageCell { Bytes = Png.EncodeRgb(wrist[t], size, size), Path = $"wrist_{t:000000}.png" },
            State = [.. states[t]],
            EnvironmentState = [.. environment[t]],
            Action = [.. actions[t]],
            Timestamp = t / (float)TabletopEnv.ControlHz,
            FrameIndex = t,
            EpisodeIndex = job.EpisodeIndex,
            Index = globalIndexStart + t,
            TaskIndex = taskIndex,
        }).ToList();
        LeRobotFiles.WriteRows(path, rows, wrist is not null);
    }
}
