using OpenVLA.Simulation.Workers;

namespace OpenVLA.Tests;

/// <summary>The worker pool's error handling, with a shell script as the worker (one JSON line in, one out).</summary>
public sealed class WorkerPoolTests
{
    // Answers {"ok":true,"result":N} for job N, except that the first job it ever sees (across all its restarts: the marker
    // file outlives the process) fails with ERROR.
    static string[] Worker(string marker, string error) =>
        ["bash", "-c", $$"""while read -r job; do if [ ! -e '{{marker}}' ]; then touch '{{marker}}'; echo '{"ok":false,"error":"{{error}}"}'; else echo "{\"ok\":true,\"result\":$job}"; fi; done"""];

    [Fact]
    public void A_libtorch_error_replaces_the_worker_and_retries_the_job()
    {
        using var dir = new TestPaths.TempDir();
        var pool = new WorkerPool(Worker(Path.Combine(dir.Path, "failed"), "Expected false to be true. Exception raised from toFloat at Scalar.h:140"), workers: 1);
        var results = new Dictionary<int, int>();

        pool.Run<int, int>([10, 20, 30], (i, r) => results[i] = r);

        Assert.Equal(new Dictionary<int, int> { [0] = 10, [1] = 20, [2] = 30 }, results);
        var crash = Assert.Single(pool.Crashes);
        Assert.StartsWith("job error: Expected false", crash.StderrTail);
        Assert.Null(crash.ExitCode);
    }

    [Fact]
    public void Any_other_job_error_fails_the_run_at_once()
    {
        using var dir = new TestPaths.TempDir();
        var pool = new WorkerPool(Worker(Path.Combine(dir.Path, "failed"), "checkpoint directory not found"), workers: 1);

        var e = Assert.Throws<WorkerJobException>(() => pool.Run<int, int>([10, 20], (_, _) => { }));

        Assert.Equal("checkpoint directory not found", e.Message);
        Assert.Empty(pool.Crashes);
    }
}
