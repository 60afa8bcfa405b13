using OpenVLA.Simulation.Workers;

namespace OpenVLA.Tests.Simulation;

public sealed class WorkerPoolTests
{
    [Fact]
    public void A_worker_that_never_answers_is_killed_retried_and_finally_reported()
    {
        // `cat > /dev/null` reads the job and never replies: a hung worker.
        var pool = new WorkerPool(["sh", "-c", "cat > /dev/null"], workers: 1, jobTimeout: TimeSpan.FromMilliseconds(300));
        var e = Assert.Throws<WorkerJobException>(() => pool.Run<int, int>([42], (_, _) => { }));
        Assert.Contains("crashed its worker 3 times", e.Message);
        Assert.Equal(WorkerPool.MaxAttempts, pool.Crashes.Count);
        Assert.All(pool.Crashes, c => Assert.Contains("without an answer", c.StderrTail));
    }

    [Fact]
    public void Replies_come_back_for_every_job_and_a_worker_error_stops_the_run()
    {
        // A shell worker that answers {"ok":true,"result":<the job>} for every line: results keep their job's index.
        var echo = new WorkerPool(["sh", "-c", "while read -r line; do echo \"{\\\"ok\\\":true,\\\"result\\\":$line}\"; done"], workers: 2);
        var results = new int[5];
        echo.Run<int, int>([10, 11, 12, 13, 14], (i, r) => results[i] = r);
        Assert.Equal([10, 11, 12, 13, 14], results);
        Assert.Empty(echo.Crashes);

        var failing = new WorkerPool(["sh", "-c", "read -r line; echo '{\"ok\":false,\"error\":\"server unreachable\"}'"], workers: 1);
        var e = Assert.Throws<WorkerJobException>(() => failing.Run<int, int>([1], (_, _) => { }));
        Assert.Equal("server unreachable", e.Message);
        Assert.False(e.UserError);
        Assert.Empty(failing.Crashes); // not a libtorch error: no retry

        // The worker's verdict that the user caused it travels with the error (and is never retried).
        var refused = new WorkerPool(["sh", "-c", "read -r line; echo '{\"ok\":false,\"error\":\"no such checkpoint\",\"user_error\":true}'"], workers: 1);
        var u = Assert.Throws<WorkerJobException>(() => refused.Run<int, int>([1], (_, _) => { }));
        Assert.True(u.UserError);
        Assert.Empty(refused.Crashes);
        Assert.True(OpenVLA.Cli.CliExit.IsUserError(u));   // exit code 2, as in process
        Assert.False(OpenVLA.Cli.CliExit.IsUserError(e));
    }

    [Fact]
    public void A_libtorch_error_replaces_the_worker_and_retries_the_job()
    {
        // The first job this worker ever sees (across its restarts: the marker file outlives the process) fails with a
        // c10-style message; every other job is echoed back.
        using var dir = new TestPaths.TempDir();
        string marker = dir["failed"];
        var pool = new WorkerPool(["bash", "-c", $$"""while read -r job; do if [ ! -e '{{marker}}' ]; then touch '{{marker}}'; echo '{"ok":false,"error":"Expected false to be true. Exception raised from toFloat at Scalar.h:140"}'; else echo "{\"ok\":true,\"result\":$job}"; fi; done"""], workers: 1);
        var results = new Dictionary<int, int>();

        pool.Run<int, int>([10, 20, 30], (i, r) => results[i] = r);

        Assert.Equal(new Dictionary<int, int> { [0] = 10, [1] = 20, [2] = 30 }, results);
        var crash = Assert.Single(pool.Crashes);
        Assert.StartsWith("job error: Expected false", crash.StderrTail);
        Assert.Null(crash.ExitCode);
    }
}
