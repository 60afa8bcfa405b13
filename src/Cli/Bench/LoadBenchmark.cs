using System.Collections.Concurrent;
using System.Diagnostics;
using Grpc.Core;
using OpenCvSharp;
using OpenVLA.Contract.V1;
using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;
using OpenVLA.RobotClients;
using OpenVLA.Server;

namespace OpenVLA.Cli.Bench;

public sealed record LoadBenchmarkOptions
{
    public int[] Robots { get; init; } = [1, 4, 8, 16];
    public TimeSpan Duration { get; init; } = TimeSpan.FromSeconds(60);
    public TimeSpan Warmup { get; init; } = TimeSpan.FromSeconds(5);
    public double Fps { get; init; } = 10;
    public int ImageSize { get; init; } = 224;
    public int Repeats { get; init; } = 3;
    /// <summary>Robots of the run without batching (max-batch 1) that the batching gain is measured against.</summary>
    public int GainRobots { get; init; } = 8;
    public int MaxBatch { get; init; } = 8;
    public double MaxQueueDelayMs { get; init; } = 0;
    public int InProcessIterations { get; init; } = 30;
}

/// <summary>One configuration, repeated: the median of each measure and its range across repeats.</summary>
public sealed record LoadBenchmarkRow(int Robots, int MaxBatch, Spread ActionsPerSecond, Spread P50Ms, Spread P99Ms,
    long Sent, long Answered, long SkippedStale, long Errors, double MeanBatch);

public sealed record Spread(double Median, double Min, double Max)
{
    public static Spread Of(IEnumerable<double> values)
    {
        var v = values.Order().ToArray();
        return new Spread(v.Length % 2 == 1 ? v[v.Length / 2] : (v[v.Length / 2 - 1] + v[v.Length / 2]) / 2, v[0], v[^1]);
    }

    public override string ToString() => Min == Max ? $"{Median:F1}" : $"{Median:F1} ({Min:F1}–{Max:F1})";
}

public sealed record LoadBenchmarkReport(
    string Model, LatencySummary InProcess, LatencySummary Unary, LatencySummary Overhead, LatencySummary ServerSideDecode,
    LatencySummary ServerSideQueue, IReadOnlyList<LoadBenchmarkRow> Rows, LoadBenchmarkRow WithoutBatching, double BatchingGain);

/// <summary>
/// The load benchmark of `openvla bench-server` (not a test): a real server on loopback in this process, N simulated
/// robots each streaming JPEG frames at a fixed rate over their own connection, and the same policy called in-process
/// for comparison. Every loop is bounded by the configured duration.
/// </summary>
public static class LoadBenchmark
{
    public static async Task<LoadBenchmarkReport> RunAsync(IActionPolicy policy, LoadBenchmarkOptions options, Action<string> progress,
        CancellationToken cancellationToken = default)
    {
        var frames = Enumerable.Range(0, 16).Select(i => SyntheticJpeg(options.ImageSize, i)).ToArray();
        var key = policy.Description.UnnormStats.Keys.Order(StringComparer.Ordinal).FirstOrDefault() ?? "";

        progress("in-process forward pass (batch of 1, decoded frame)");
        var decoded = DecodeJpeg(frames[0]);
        var observation = new VlaObservation([decoded], "pick up the block", key.Length == 0 ? null : key);
        // On a thread of its own, as the server's scheduler calls it: TorchSharp forward passes on the process's main
        // thread ran 10-30x slower here (measured 2026-11-26), which would flatter the server.
        var inProcess = new List<double>();
        var measuring = new Thread(() =>
        {
            for (int i = 0; i < 3; i++) policy.PredictBatch([observation], cancellationToken);
            for (int i = 0; i < options.InProcessIterations; i++)
            {
                long start = Stopwatch.GetTimestamp();
                policy.PredictBatch([observation], cancellationToken);
                inProcess.Add(Stopwatch.GetElapsedTime(start).TotalMilliseconds);
            }
        }) { Name = "openvla-bench-in-process" };
        measuring.Start();
        measuring.Join();
        progress($"in-process: {LatencySummary.Of(inProcess)}");

        LatencySummary unary, decode, overhead, queue;
        await using (var server = await StartAsync(policy, options.MaxBatch, options.MaxQueueDelayMs))
        {
            progress("unary round trips, one robot in lockstep (JPEG over loopback)");
            using var client = new PolicyClient(server.GrpcAddress.ToString());
            var request = Observations.FromEncoded(frames[0], "pick up the block", ImageEncoding.Jpeg, key);
            for (int i = 0; i < 3; i++) await client.PredictAsync(request, cancellationToken: cancellationToken);
            var roundTrips = new List<double>();
            var decodes = new List<double>();
            var overheads = new List<double>();
            var queued = new List<double>();
            for (int i = 0; i < options.InProcessIterations; i++)
            {
                long start = Stopwatch.GetTimestamp();
                var reply = await client.PredictAsync(request, cancellationToken: cancellationToken);
                var roundTrip = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                roundTrips.Add(roundTrip);
                // Everything but the forward pass, per call: serialization, transport, decode, queue, fan-out.
                overheads.Add(roundTrip - reply.Timings.ModelTotalMs);
                decodes.Add(reply.Timings.ImageDecodeMs);
                queued.Add(reply.Timings.QueueMs);
            }
            unary = LatencySummary.Of(roundTrips);
            decode = LatencySummary.Of(decodes);
            overhead = LatencySummary.Of(overheads);
            queue = LatencySummary.Of(queued);
            progress($"unary: {unary}; overhead (round trip - forward pass): {overhead}");
        }

        var rows = new List<LoadBenchmarkRow>();
        foreach (var robots in options.Robots)
            rows.Add(await RowAsync(policy, robots, options.MaxBatch, options, frames, key, progress, cancellationToken));
        var serial = await RowAsync(policy, options.GainRobots, 1, options, frames, key, progress, cancellationToken);
        var batched = rows.FirstOrDefault(r => r.Robots == options.GainRobots)
            ?? await RowAsync(policy, options.GainRobots, options.MaxBatch, options, frames, key, progress, cancellationToken);
        var gain = batched.ActionsPerSecond.Median / Math.Max(1e-9, serial.ActionsPerSecond.Median);
        return new LoadBenchmarkReport(policy.Description.ModelId, LatencySummary.Of(inProcess), unary, overhead, decode, queue, rows, serial, gain);
    }

    static async Task<LoadBenchmarkRow> RowAsync(IActionPolicy policy, int robots, int maxBatch, LoadBenchmarkOptions options, byte[][] frames,
        string key, Action<string> progress, CancellationToken cancellationToken)
    {
        var runs = new List<RunResult>();
        for (int repeat = 0; repeat < options.Repeats; repeat++)
        {
            progress($"{robots} robot(s) at {options.Fps} Hz, max batch {maxBatch}, run {repeat + 1}/{options.Repeats}: {options.Warmup.TotalSeconds:F0} s warm-up + {options.Duration.TotalSeconds:F0} s");
            await using var server = await StartAsync(policy, maxBatch, options.MaxQueueDelayMs);
            var run = await StreamAsync(server, robots, options, frames, key, cancellationToken);
            progress($"  {run.ActionsPerSecond:F1} actions/s, latency {run.Latency}, mean batch {run.MeanBatch:F2}, skipped {run.Skipped}, errors {run.Errors}");
            runs.Add(run);
        }
        return new LoadBenchmarkRow(robots, maxBatch,
            Spread.Of(runs.Select(r => r.ActionsPerSecond)), Spread.Of(runs.Select(r => r.Latency.P50)), Spread.Of(runs.Select(r => r.Latency.P99)),
            runs.Sum(r => r.Sent), runs.Sum(r => r.Answered), runs.Sum(r => r.Skipped), runs.Sum(r => r.Errors), runs.Average(r => r.MeanBatch));
    }

    sealed record RunResult(double ActionsPerSecond, LatencySummary Latency, long Sent, long Answered, long Skipped, long Errors, double MeanBatch);

    /// <summary>N robots stream for warm-up + duration; only replies to frames sent after the warm-up are counted.</summary>
    static async Task<RunResult> StreamAsync(PolicyServer server, int robots, LoadBenchmarkOptions options, byte[][] frames, string key,
        CancellationToken cancellationToken)
    {
        var period = TimeSpan.FromSeconds(1 / options.Fps);
        var clock = Stopwatch.StartNew();
        var measureFrom = options.Warmup;
        var stopAt = options.Warmup + options.Duration;
        var latencies = new ConcurrentBag<double>();
        long sent = 0, answered = 0, skipped = 0, errors = 0, batchSum = 0;

        async Task RobotAsync(int robot)
        {
            using var client = new PolicyClient(server.GrpcAddress.ToString());
            using var call = client.Raw.StreamActions(deadline: DateTime.UtcNow + stopAt + TimeSpan.FromSeconds(60), cancellationToken: cancellationToken);
            var sentAt = new ConcurrentDictionary<ulong, TimeSpan>();
            var reader = Task.Run(async () =>
            {
                await foreach (var reply in call.ResponseStream.ReadAllAsync(cancellationToken))
                {
                    if (!sentAt.TryRemove(reply.Seq, out var at) || at < measureFrom) continue;
                    if (reply.ResultCase == StreamActionsResponse.ResultOneofCase.Error) { Interlocked.Increment(ref errors); continue; }
                    latencies.Add((clock.Elapsed - at).TotalMilliseconds);
                    Interlocked.Increment(ref answered);
                    Interlocked.Add(ref skipped, reply.Skipped);
                    Interlocked.Add(ref batchSum, reply.Timings.BatchSize);
                }
            });
            // Robots start out of phase, as real ones would.
            var next = TimeSpan.FromTicks(period.Ticks * robot / Math.Max(1, robots));
            for (ulong seq = 1; ; seq++)
            {
                var wait = next - clock.Elapsed;
                if (wait > TimeSpan.Zero) await Task.Delay(wait, cancellationToken);
                var now = clock.Elapsed;
                if (now >= stopAt) break;
                // A camera that fell behind (its thread was late) drops the ticks it missed, as a real one would, instead
                // of sending them back to back: a burst would make the server replace the older frame and count it stale.
                if (now - next >= period) next += TimeSpan.FromTicks((now - next).Ticks / period.Ticks * period.Ticks);
                var observation = Observations.FromEncoded(frames[(robot * 7 + (int)seq) % frames.Length], $"robot {robot}: pick up the block", ImageEncoding.Jpeg, key);
                observation.Seq = seq;
                observation.RobotId = $"robot-{robot}";
                sentAt[seq] = now;
                if (now >= measureFrom) Interlocked.Increment(ref sent);
                await call.RequestStream.WriteAsync(new StreamActionsRequest { Observation = observation }, cancellationToken);
                next += period;
            }
            await call.RequestStream.CompleteAsync();
            try { await reader; }
            catch (RpcException) { Interlocked.Increment(ref errors); }
        }

        await Task.WhenAll(Enumerable.Range(0, robots).Select(RobotAsync));
        var latency = LatencySummary.Of(latencies);
        return new RunResult(answered / options.Duration.TotalSeconds, latency, sent, answered, skipped, errors,
            answered == 0 ? 0 : (double)batchSum / answered);
    }

    static Task<PolicyServer> StartAsync(IActionPolicy policy, int maxBatch, double maxQueueDelayMs) =>
        StartReadyAsync(new ServeOptions
        {
            Checkpoint = policy.Description.ModelId, Host = "127.0.0.1", Port = 0, MetricsPort = null,
            MaxBatch = maxBatch, MaxQueueDelayMs = maxQueueDelayMs, MaxQueue = 256,
        }, policy);

    static async Task<PolicyServer> StartReadyAsync(ServeOptions options, IActionPolicy policy)
    {
        var server = await PolicyServer.StartAsync(options, (_, _) => policy, logging => { }, disposePolicy: false);
        await server.Ready;
        return server;
    }

    /// <summary>A 224x224 scene (gradient background, a coloured block that moves with <paramref name="index"/>) as JPEG, quality 90.</summary>
    static byte[] SyntheticJpeg(int size, int index)
    {
        var bgr = new byte[size * size * 3];
        for (int y = 0; y < size; y++)
            for (int x0 = 0; x0 < size; x0++)
            {
                int p = (y * size + x0) * 3;
                bgr[p] = (byte)(60 + y * 100 / size);
                bgr[p + 1] = (byte)(90 + x0 * 60 / size);
                bgr[p + 2] = (byte)(140 - y * 60 / size);
            }
        using var image = new Mat(size, size, MatType.CV_8UC3);
        System.Runtime.InteropServices.Marshal.Copy(bgr, 0, image.Data, bgr.Length);
        var x = 20 + index * (size - 80) / 16;
        Cv2.Rectangle(image, new Rect(x, size / 2, 40, 40), new Scalar(30, 30, 220), -1);
        Cv2.ImEncode(".jpg", image, out var bytes, new ImageEncodingParam(ImwriteFlags.JpegQuality, 90));
        return bytes;
    }

    // The policy core's decoder, which the server's frame decoder also ends in for JPEG frames: the same pixels.
    static RgbImage DecodeJpeg(byte[] jpeg) => ImageDecoder.Decode(jpeg, new ImageLimits(4096));
}
