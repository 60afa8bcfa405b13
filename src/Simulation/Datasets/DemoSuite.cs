using OpenVLA.Simulation.Tabletop;
using OpenVLA.Simulation.Workers;

namespace OpenVLA.Simulation.Datasets;

/// <summary>Options of <c>openvla demos</c>.</summary>
public sealed record DemoOptions(
    IReadOnlyList<TabletopTask> Tasks, int EpisodesPerTask, string OutDir, double Noise = 0, int Seed = 0, int Workers = 1,
    int ImageSize = 224, bool Wrist = false, string DatasetName = "tabletop", bool ExpertLabels = false, string? Driver = null);

/// <summary>What <c>demos</c> produced.</summary>
public sealed record DemoSummary(int Episodes, long Frames, int ExpertAttempts, double Seconds, IReadOnlyList<WorkerCrash> Crashes,
    IReadOnlyDictionary<string, double> MeanLengthByTask, int Successes);

/// <summary>Generates a LeRobot v2.1 dataset of scripted demonstrations, in-process or across worker processes.</summary>
public static class DemoSuite
{
    /// <param name="workerCommand">How to start a worker process (the CLI's hidden worker verb); null runs in this process.</param>
    public static DemoSummary Generate(DemoOptions o, IReadOnlyList<string>? workerCommand, ProgressBar? progress = null)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        Directory.CreateDirectory(o.OutDir);
        var suiteTasks = o.Tasks.Select(t => t.Id).ToArray();
        var jobs = o.Tasks.SelectMany(t => Enumerable.Range(0, o.EpisodesPerTask).Select(i => (t.Id, i)))
            .Select((x, index) => new DemoJob(index, x.Id, TabletopTasks.EpisodeSeed(o.Seed, x.Id, x.i), o.Noise, o.ImageSize, o.Wrist,
                Path.GetFullPath(o.OutDir), suiteTasks, o.ExpertLabels || o.Driver is not null, o.Driver))
            .ToList();
        var episodes = new DemoEpisode[jobs.Count];
        var crashes = new List<WorkerCrash>();
        if (workerCommand is null || o.Workers <= 1)
        {
            using var env = new TabletopEnv(o.ImageSize);
            using var driver = o.Driver is null ? null : CreateDriver(o.Driver);
            foreach (var job in jobs)
            {
                episodes[job.EpisodeIndex] = DemoRecorder.Record(job, env, driver);
                progress?.Advance(job.TaskId);
            }
        }
        else
        {
            var pool = new WorkerPool(workerCommand, o.Workers);
            pool.Run<DemoJob, DemoEpisode>(jobs, (i, e) => { episodes[i] = e; progress?.Advance(e.TaskId); });
            crashes.AddRange(pool.Crashes);
        }
        var catalogue = TabletopTasks.InstructionCatalogue(o.Tasks);
        LeRobotFiles.Finish(o.OutDir, o.DatasetName, catalogue, episodes, o.ImageSize, o.Wrist);
        return new DemoSummary(episodes.Length, episodes.Sum(e => (long)e.Length), episodes.Sum(e => e.Attempts), clock.Elapsed.TotalSeconds,
            crashes, episodes.GroupBy(e => e.TaskId).ToDictionary(g => g.Key, g => g.Average(e => e.Length)), episodes.Count(e => e.Success));
    }

    private static IDemoDriver CreateDriver(string spec) =>
        (DemoRecorder.DriverFactory ?? throw new InvalidOperationException("no demo driver backend is registered"))(spec);

    /// <summary>The worker side: one environment per worker process, reused across jobs of the same image size.</summary>
    public static int ServeWorker()
    {
        TabletopEnv? env = null;
        IDemoDriver? driver = null;
        string? driverSpec = null;
        return WorkerLoop.Serve<DemoJob, DemoEpisode>(job =>
        {
            if (env is null || env.ImageSize != job.ImageSize) { env?.Dispose(); env = new TabletopEnv(job.ImageSize); }
            if (job.Driver is not null && (driver is null || driverSpec != job.Driver))
            {
                driver?.Dispose();
                driver = CreateDriver(job.Driver);
                driverSpec = job.Driver;
            }
            return DemoRecorder.Record(job, env, driver);
        });
    }
}
