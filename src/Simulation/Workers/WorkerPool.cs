using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text.Json;

namespace OpenVLA.Simulation.Workers;

/// <summary>A worker process died (or hit a libtorch error) while running a job; the job was retried on a fresh worker.</summary>
public sealed record WorkerCrash(int Worker, string Job, int? ExitCode, string StderrTail);

/// <summary>A worker reported that a job failed for a reason a retry will not fix (bad policy, unreachable server, ...);
/// <see cref="UserError"/> is the worker's verdict that the cause is the user's input (OpenVLA.Policy.UserErrors).</summary>
public sealed class WorkerJobException(string message, bool userError = false) : Exception(message)
{
    public bool UserError { get; } = userError;
}

/// <summary>
/// Runs jobs in separate worker processes (each with its own MuJoCo data and GL context) over a JSON-lines protocol:
/// the parent writes one job per line to a worker's stdin, the worker answers one line <c>{"ok":true,"result":...}</c> or
/// <c>{"ok":false,"error":"..."}</c> on stdout. A worker that dies mid-job is recorded as a crash, replaced, and its job
/// is retried (up to <see cref="MaxAttempts"/> times) — episodes are never silently lost. A job whose error comes from
/// libtorch is handled the same way; any other job error (bad policy, unreachable server) fails the run at once.
/// </summary>
public sealed class WorkerPool
{
    public const int MaxAttempts = 3;
    private readonly string _fileName;
    private readonly IReadOnlyList<string> _arguments;
    private readonly int _workers;
    private readonly TimeSpan _jobTimeout;

    /// <param name="command">The worker command line, e.g. <c>dotnet openvla.dll sim-worker --kind eval</c>.</param>
    /// <param name="jobTimeout">A worker silent for longer than this on one job is killed and counted as crashed.</param>
    public WorkerPool(IReadOnlyList<string> command, int workers, TimeSpan? jobTimeout = null)
    {
        _jobTimeout = jobTimeout ?? TimeSpan.FromMinutes(10);
        if (workers < 1) throw new ArgumentOutOfRangeException(nameof(workers));
        _fileName = command[0];
        _arguments = command.Skip(1).ToArray();
        _workers = workers;
    }

    public List<WorkerCrash> Crashes { get; } = [];

    /// <summary>Runs every job; <paramref name="onResult"/> is called (from pool threads, serialized) as results arrive.</summary>
    public void Run<TJob, TResult>(IReadOnlyList<TJob> jobs, Action<int, TResult> onResult, CancellationToken cancellation = default)
    {
        var queue = new ConcurrentQueue<(int Index, int Attempt)>(jobs.Select((_, i) => (i, 1)));
        var gate = new object();
        Exception? failure = null;
        int remaining = jobs.Count;
        var threads = Enumerable.Range(0, Math.Min(_workers, Math.Max(1, jobs.Count))).Select(w => new Thread(() =>
        {
            WorkerProcess? worker = null;
            try
            {
                while (Volatile.Read(ref remaining) > 0 && failure is null && !cancellation.IsCancellationRequested)
                {
                    if (!queue.TryDequeue(out var item)) { Thread.Sleep(20); continue; }
                    worker ??= new WorkerProcess(_fileName, _arguments);
                    string jobJson = JsonSerializer.Serialize(jobs[item.Index], WorkerJson.Options);
                    string? line = worker.Call(jobJson, _jobTimeout);
                    // The worker is replaced and the job retried, up to MaxAttempts: after a crash (line is null), or
                    // after a libtorch error (TorchSharp's implicitly created Scalars have been seen to fail this way
                    // about once in a few hundred episodes), since the worker's native state is then suspect.
                    void Retry(WorkerCrash crash, string what, string finalFailure)
                    {
                        worker!.Dispose();
                        worker = null;
                        lock (gate)
                        {
                            Crashes.Add(crash);
                            Console.Error.WriteLine($"openvla: {what} on job {item.Index}; " +
                                                    (item.Attempt < MaxAttempts ? "retrying it on a new worker" : "giving up on it"));
                            if (item.Attempt >= MaxAttempts)
                                failure ??= new WorkerJobException(finalFailure);
                        }
                        if (item.Attempt < MaxAttempts) queue.Enqueue((item.Index, item.Attempt + 1));
                    }
                    string jobSummary = Truncate(jobJson, 300);
                    if (line is null)
                    {
                        var crash = new WorkerCrash(w, jobSummary, worker.ExitCode(), worker.StderrTail());
                        Retry(crash, $"worker {w} crashed (exit code {crash.ExitCode?.ToString() ?? "?"})",
                              $"job {item.Index} crashed its worker {MaxAttempts} times; last stderr: {crash.StderrTail}");
                        continue;
                    }
                    using var reply = JsonDocument.Parse(line);
                    if (!reply.RootElement.GetProperty("ok").GetBoolean())
                    {
                        string error = reply.RootElement.GetProperty("error").GetString() ?? "worker error";
                        bool userError = reply.RootElement.TryGetProperty("user_error", out var u) && u.ValueKind == JsonValueKind.True;
                        if (userError || !IsNativeError(error))
                        {
                            lock (gate) failure ??= new WorkerJobException(error, userError);
                            break;
                        }
                        Retry(new WorkerCrash(w, jobSummary, null, "job error: " + error),
                              $"worker {w} hit a libtorch error ({Truncate(error, 160)})", $"job {item.Index} failed {MaxAttempts} times; last error: {error}");
                        continue;
                    }
                    var result = reply.RootElement.GetProperty("result").Deserialize<TResult>(WorkerJson.Options)!;
                    lock (gate) onResult(item.Index, result);
                    Interlocked.Decrement(ref remaining);
                }
            }
            catch (Exception e) { lock (gate) failure ??= e; }
            finally { worker?.Dispose(); }
        }) { IsBackground = true, Name = $"sim-worker-{w}" }).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        if (failure is not null) throw failure;
        cancellation.ThrowIfCancellationRequested();
    }

    /// <summary>An error raised inside libtorch (c10's messages carry "Exception raised from"), not by our own checks.</summary>
    public static bool IsNativeError(string error) => error.Contains("Exception raised from", StringComparison.Ordinal);

    private static string Truncate(string s, int max) => s.Length <= max ? s : s[..max] + "...";

    private sealed class WorkerProcess : IDisposable
    {
        private readonly Process _process;
        private readonly Queue<string> _stderr = new();

        public WorkerProcess(string fileName, IReadOnlyList<string> arguments)
        {
            var start = new ProcessStartInfo(fileName)
            {
                RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
            };
            foreach (var a in arguments) start.ArgumentList.Add(a);
            _process = Process.Start(start) ?? throw new InvalidOperationException($"could not start worker {fileName}");
            _process.ErrorDataReceived += (_, e) =>
            {
                if (e.Data is null) return;
                lock (_stderr) { _stderr.Enqueue(e.Data); if (_stderr.Count > 200) _stderr.Dequeue(); }
            };
            _process.BeginErrorReadLine();
        }

        /// <summary>Sends a job and waits for its reply line; null when the worker died or hung past the timeout (then it is killed).</summary>
        public string? Call(string job, TimeSpan timeout)
        {
            try
            {
                _process.StandardInput.WriteLine(job);
                _process.StandardInput.Flush();
                var reply = _process.StandardOutput.ReadLineAsync();
                if (reply.Wait(timeout)) return reply.Result;
                lock (_stderr) _stderr.Enqueue($"openvla: worker killed after {timeout.TotalSeconds:F0} s without an answer");
                try { _process.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
                return null;
            }
            catch (IOException) { return null; }
            catch (AggregateException e) when (e.InnerException is IOException) { return null; }
        }

        /// <summary>
        /// The exit code of a worker that died (null if it is still running after 2 s). Also lets the stderr reader
        /// drain: WaitForExit(timeout) returns before the last asynchronous stderr lines are delivered, so without the
        /// second wait a crash could be recorded with an empty <see cref="StderrTail"/> (seen on CI). That wait is
        /// bounded too, in case something else still holds the pipe open.
        /// </summary>
        public int? ExitCode()
        {
            if (!_process.WaitForExit(2000)) return null;
            Task.Run(() => _process.WaitForExit()).Wait(TimeSpan.FromSeconds(2));
            return _process.ExitCode;
        }

        /// <summary>What the worker said last; our own "openvla:" lines first, since a crash ends with a long stack trace.</summary>
        public string StderrTail()
        {
            lock (_stderr)
            {
                var lines = _stderr.Where(l => !string.IsNullOrWhiteSpace(l)).Select(l => l.Trim()).ToList();
                var ours = lines.Where(l => l.StartsWith("openvla:", StringComparison.Ordinal)).TakeLast(3).ToList();
                return string.Join(" | ", ours.Count > 0 ? ours : lines.TakeLast(4));
            }
        }

        public void Dispose()
        {
            try { _process.StandardInput.Close(); } catch { }
            if (!_process.WaitForExit(3000)) try { _process.Kill(); } catch { }
            _process.Dispose();
        }
    }
}

/// <summary>The worker side of the protocol: reads jobs from stdin, answers on the real stdout.</summary>
public static class WorkerLoop
{
    /// <param name="isUserError">Which job errors are the user's (reported as <c>"user_error": true</c>); null: none.</param>
    public static int Serve<TJob, TResult>(Func<TJob, TResult> handle, Func<Exception, bool>? isUserError = null)
    {
        var protocol = new StreamWriter(Console.OpenStandardOutput()) { AutoFlush = true };
        // Anything else a library prints must not corrupt the protocol: send it to stderr.
        Console.SetOut(Console.Error);
        string? line;
        while ((line = Console.In.ReadLine()) is not null)
        {
            if (line.Length == 0) continue;
            string reply;
            try
            {
                var job = JsonSerializer.Deserialize<TJob>(line, WorkerJson.Options)!;
                reply = JsonSerializer.Serialize(new { ok = true, result = handle(job) }, WorkerJson.Options);
            }
            catch (Exception e)
            {
                reply = JsonSerializer.Serialize(new { ok = false, error = e.Message.ReplaceLineEndings(" "), user_error = isUserError?.Invoke(e) ?? false }, WorkerJson.Options);
            }
            protocol.WriteLine(reply);
        }
        return 0;
    }
}

internal static class WorkerJson
{
    public static readonly JsonSerializerOptions Options = new() { IncludeFields = true, NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals };
}
