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
    }
}
