using OpenVLA.Simulation.Tabletop;
using Parquet.Serialization;

namespace OpenVLA.Simulation.Datasets;

/// <summary>One demonstration to record: which task, from which seed, into which file.</summary>
public sealed record DemoJob(int EpisodeIndex, string TaskId, int Seed, double Noise, int ImageSize, bool Wrist, string OutDir, string[] SuiteTasks,
    bool ExpertLabels = false);

/// <summary>What a recorded episode contributes to the dataset metadata and statistics.</summary>
public sealed record DemoEpisode(
    int EpisodeIndex, string TaskId, string Instruction, int TaskIndex, int Seed, int Attempts, int Length,
    float[][] Actions, float[][] States, float[][] EnvironmentStates, FeatureStats ImageStats, FeatureStats? WristStats);

/// <summary>
/// Records scripted-expert demonstrations: runs the expert (clean or noisy) until the task's success predicate holds,
/// keeping only successful episodes (a failed attempt is retried with another noise seed, then another layout), and writes
/// the episode parquet file. Runs in-process or inside a worker process.
/// </summary>
public static class DemoRecorder
{
    public const int MaxAttempts = 6;

    public static DemoEpisode Record(DemoJob job, TabletopEnv env)
    {
        var task = TabletopTasks.Get(job.TaskId);
        var catalogue = TabletopTasks.InstructionCatalogue(job.SuiteTasks.Select(TabletopTasks.Get));
        for (int attempt = 0; attempt < MaxAttempts; attempt++)
        {
            // Attempts 0-1 keep the layout (only the noise changes); later ones draw a new layout.
            int layoutSeed = attempt < 2 ? job.Seed : TabletopTasks.EpisodeSeed(job.Seed, job.TaskId, attempt);
            var episode = task.Sample(layoutSeed);
            env.Reset(episode.Layout);
            var start = TabletopScene.CubeColours.ToDictionary(c => c, env.CubePosition);
            var expert = new ScriptedExpert(episode, ExpertNoise.FromSigma(job.Noise), noiseSeed: job.Seed * 31 + attempt);
            var frames = new List<byte[]>();
            var wrist = new List<byte[]>();
            var states = new List<float[]>();
            var environment = new List<float[]>();
            var actions = new List<float[]>();
            bool success = false;
            for (int step = 0; step < task.MaxSteps && !success; step++)
            {
                frames.Add(env.Render());
                if (job.Wrist) wrist.Add(env.Render(wrist: true));
                states.Add(env.State());
                environment.Add(env.EnvironmentState());
                var action = expert.Act(env);
                actions.Add(job.ExpertLabels ? expert.ExpertAction : action);
                env.Step(action);
                success = task.IsSuccess(env, episode.Args, start);
            }
            if (!success) continue;
            int taskIndex = Array.IndexOf(catalogue.ToArray(), episode.Instruction);
            var imageStats = FeatureStats.Create(3);
            frames.ForEach(f => imageStats.AddImage(f));
            FeatureStats? wristStats = null;
            if (job.Wrist) { wristStats = FeatureStats.Create(3); wrist.ForEach(f => wristStats.AddImage(f)); }
            WriteEpisodeFile(job, taskIndex, frames, job.Wrist ? wrist : null, states, environment, actions, globalIndexStart: 0);
            return new DemoEpisode(job.EpisodeIndex, job.TaskId, episode.Instruction, taskIndex, layoutSeed, attempt + 1, actions.Count,
                actions.ToArray(), states.ToArray(), environment.ToArray(), imageStats, wristStats);
        }
        throw new InvalidOperationException($"the scripted expert failed task {job.TaskId} (seed {job.Seed}) {MaxAttempts} times");
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
