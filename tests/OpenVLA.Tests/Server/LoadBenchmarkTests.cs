using OpenVLA.Cli.Bench;

namespace OpenVLA.Tests.Server;

/// <summary>The load benchmark's machinery on a short run with a test policy (the real numbers come from `openvla bench-server`).</summary>
/// <remarks>
/// It runs alone: its robots pace themselves on the clock, and with other tests blocking the process's thread pool their
/// frames and the server's reads ran late enough that one robot's frames were replaced as stale (15 of 32 answered, once in
/// 8 runs of the server tests together).
/// </remarks>
[Collection(WallClockCollection.Name)]
public sealed class LoadBenchmarkTests
{
    [Fact]
    public async Task A_short_run_measures_every_configuration_and_the_batched_and_unbatched_rows()
    {
        var policy = new SlowPolicy(TimeSpan.FromMilliseconds(40)); // 25 actions/s serially, 8 robots offer 80 frames/s
        var options = new LoadBenchmarkOptions
        {
            Robots = [1, 8], Duration = TimeSpan.FromSeconds(3), Warmup = TimeSpan.FromSeconds(1), Fps = 10, Repeats = 1,
            GainRobots = 8, InProcessIterations = 5,
        };

        var report = await LoadBenchmark.RunAsync(policy, options, _ => { });

        Assert.Equal([1, 8], report.Rows.Select(r => r.Robots));
        Assert.InRange(report.InProcess.P50, 39, 500);
        Assert.True(report.Unary.P50 >= report.InProcess.P50 * 0.9, $"{report.Unary.P50} vs {report.InProcess.P50}");
        var one = report.Rows[0];
        // 3 s at 10 Hz: at most 36 (the first frames of the window may be counted with it); at least half, because a robot
        // whose cores are busy with other tests (the default model's closed-loop test) sends late. 22 seen once that way.
        Assert.InRange(one.Sent, 15, 36);
        Assert.InRange(one.Sent - one.Answered - one.SkippedStale, -2, 2); // every frame answered or counted (one may be in flight, or skipped in warm-up)
        Assert.True(one.Answered >= one.Sent / 2, $"{one.Answered} of {one.Sent} answered");
        Assert.Equal(0, one.Errors);
        var eight = report.Rows[1];
        Assert.Equal(1, report.WithoutBatching.MaxBatch);
        Assert.True(report.WithoutBatching.SkippedStale > 0, "without batching the model cannot keep up: frames must be skipped");
        Assert.True(eight.MeanBatch > 1.5, $"mean batch {eight.MeanBatch}");
        Assert.Equal(1.0, report.WithoutBatching.MeanBatch, 6); // max batch 1: one frame per forward pass
        // The gain is the ratio of the two rows' medians. Its size is a wall-clock rate (about 3x here on an idle machine,
        // 1.08 once on a loaded CI machine), so it is measured by `openvla bench-server`, not asserted here.
        Assert.Equal(eight.ActionsPerSecond.Median / report.WithoutBatching.ActionsPerSecond.Median, report.BatchingGain, 9);
        Assert.Equal(0, eight.Errors + report.WithoutBatching.Errors);
    }
}

/// <summary>Tests whose assertions depend on wall-clock pacing: they run after the parallel ones, one at a time.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class WallClockCollection
{
    public const string Name = "Wall clock";
}
