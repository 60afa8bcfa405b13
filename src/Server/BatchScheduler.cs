using System.Diagnostics;
using Microsoft.Extensions.Logging;
using OpenVLA.Policy;

namespace OpenVLA.Server;

/// <summary>How one queued observation ended.</summary>
internal enum WorkStatus { Done, DeadlineExceeded, Cancelled, Superseded, InvalidInput, ModelFailed, ShuttingDown }

internal sealed record WorkResult(WorkStatus Status, ActionPrediction? Prediction, string? Error, double QueueMs, int BatchSize);

/// <summary>One observation waiting for the model, from a unary call or a stream.</summary>
internal sealed class WorkItem(VlaObservation observation, DateTime? deadlineUtc, CancellationToken cancellation)
{
    readonly TaskCompletionSource<WorkResult> completion = new(TaskCreationOptions.RunContinuationsAsynchronously);
    public VlaObservation Observation { get; } = observation;
    public DateTime? DeadlineUtc { get; } = deadlineUtc;
    public CancellationToken Cancellation { get; } = cancellation;
    public long EnqueuedAt { get; set; }
    public Task<WorkResult> Result => completion.Task;
    public double QueuedMs(long now) => Stopwatch.GetElapsedTime(EnqueuedAt, now).TotalMilliseconds;
    public void Complete(WorkResult result) => completion.TrySetResult(result);
}

/// <summary>
/// The one scheduler all robots share. Observations wait in a bounded FIFO; a single worker thread takes up to
/// max-batch of them, waiting at most max-queue-delay after the oldest arrived for the batch to fill, drops the ones
/// whose deadline passed or whose caller left (they are never computed), runs ONE PredictBatch for the rest and
/// hands each caller its own result. Streams use <see cref="TryReplace"/> so a newer frame takes the place of its
/// stream's older frame that is still waiting (latest frame wins, and the newer frame keeps the older one's turn).
/// </summary>
internal sealed class BatchScheduler : IDisposable
{
    readonly IActionPolicy policy;
    readonly int maxBatch, maxQueue;
    readonly TimeSpan maxDelay;
    readonly ServerMetrics metrics;
    readonly ILogger logger;
    readonly LinkedList<WorkItem> queue = new();
    readonly Dictionary<WorkItem, LinkedListNode<WorkItem>> nodes = new(ReferenceEqualityComparer.Instance);
    readonly object gate = new();
    readonly Thread worker;
    readonly CancellationTokenSource abort = new();
    bool stopping;

    public BatchScheduler(IActionPolicy policy, int maxBatch, TimeSpan maxDelay, int maxQueue, ServerMetrics metrics, ILogger logger)
    {
        this.policy = policy;
        this.maxBatch = maxBatch;
        this.maxDelay = maxDelay;
        this.maxQueue = maxQueue;
        this.metrics = metrics;
        this.logger = logger;
        worker = new Thread(Run) { IsBackground = true, Name = "openvla-batch-scheduler" };
        worker.Start();
    }

    public int Depth { get { lock (gate) return queue.Count; } }

    /// <summary>Queues the item; false when the queue is full or the scheduler is stopping.</summary>
    public bool TryEnqueue(WorkItem item)
    {
        lock (gate)
        {
            if (stopping || queue.Count >= maxQueue) return false;
            item.EnqueuedAt = Stopwatch.GetTimestamp();
            nodes[item] = queue.AddLast(item);
            metrics.QueueDepth(queue.Count);
            Monitor.PulseAll(gate);
            return true;
        }
    }

    /// <summary>
    /// Puts <paramref name="newer"/> in the place of <paramref name="older"/> when the older one is still waiting, and
    /// completes the older one as superseded. False when the older one was already taken for computing.
    /// </summary>
    public bool TryReplace(WorkItem older, WorkItem newer)
    {
        lock (gate)
        {
            if (!nodes.Remove(older, out var node)) return false;
            newer.EnqueuedAt = Stopwatch.GetTimestamp();
            node.Value = newer;
            nodes[newer] = node;
        }
        older.Complete(new WorkResult(WorkStatus.Superseded, null, null, older.QueuedMs(Stopwatch.GetTimestamp()), 0));
        return true;
    }

    void Run()
    {
        while (true)
        {
            var batch = new List<WorkItem>(maxBatch);
            lock (gate)
            {
                while (queue.Count == 0 && !stopping) Monitor.Wait(gate);
                if (queue.Count == 0) return; // stopping and drained
                var fillBy = queue.First!.Value.EnqueuedAt + (long)(maxDelay.TotalSeconds * Stopwatch.Frequency);
                while (queue.Count < maxBatch && !stopping)
                {
                    var left = Stopwatch.GetElapsedTime(Stopwatch.GetTimestamp(), fillBy);
                    if (left <= TimeSpan.Zero) break;
                    Monitor.Wait(gate, left);
                }
                while (batch.Count < maxBatch && queue.First is { } node)
                {
                    queue.RemoveFirst();
                    nodes.Remove(node.Value);
                    batch.Add(node.Value);
                }
                metrics.QueueDepth(queue.Count);
            }
            Compute(batch);
        }
    }

    void Compute(List<WorkItem> taken)
    {
        var now = Stopwatch.GetTimestamp();
        var utcNow = DateTime.UtcNow;
        var runnable = new List<WorkItem>(taken.Count);
        foreach (var item in taken)
        {
            if (item.DeadlineUtc is { } deadline && deadline <= utcNow)
                item.Complete(new WorkResult(WorkStatus.DeadlineExceeded, null, "deadline passed while waiting for the model", item.QueuedMs(now), 0));
            else if (item.Cancellation.IsCancellationRequested)
                item.Complete(new WorkResult(WorkStatus.Cancelled, null, "the caller cancelled", item.QueuedMs(now), 0));
            else runnable.Add(item);
        }
        if (runnable.Count == 0) return;
        var queued = runnable.Select(i => i.QueuedMs(now)).ToArray();
        foreach (var q in queued) metrics.Stage("queue", q);
        try
        {
            var predictions = Predict(runnable);
            for (int i = 0; i < runnable.Count; i++)
                runnable[i].Complete(new WorkResult(WorkStatus.Done, predictions[i], null, queued[i], runnable.Count));
        }
        catch (PolicyInputException e) when (runnable.Count > 1)
        {
            // One observation of the batch is bad, but which one? Compute each alone so only that robot gets the error.
            logger.LogDebug("batch of {Count} refused ({Reason}); computing each observation alone", runnable.Count, e.Message);
            foreach (var item in runnable) Compute([item]);
        }
        catch (PolicyInputException e)
        {
            runnable[0].Complete(new WorkResult(WorkStatus.InvalidInput, null, e.Message.ReplaceLineEndings(" "), queued[0], 1));
        }
        catch (Exception e) when (abort.IsCancellationRequested && e is OperationCanceledException)
        {
            foreach (var (item, q) in runnable.Zip(queued)) item.Complete(new WorkResult(WorkStatus.ShuttingDown, null, "the server is shutting down", q, 0));
        }
        catch (Exception e)
        {
            logger.LogError(e, "the policy failed on a batch of {Count}", runnable.Count);
            foreach (var (item, q) in runnable.Zip(queued)) item.Complete(new WorkResult(WorkStatus.ModelFailed, null, "the model failed; see the server log", q, 0));
        }
    }

    IReadOnlyList<ActionPrediction> Predict(List<WorkItem> batch)
    {
        metrics.Batch(batch.Count);
        var predictions = policy.PredictBatch(batch.Select(i => i.Observation).ToArray(), abort.Token);
        if (predictions.Count != batch.Count)
            throw new InvalidOperationException($"the policy returned {predictions.Count} predictions for a batch of {batch.Count}");
        var t = predictions[0].Timings;
        metrics.Stage("preprocess", t.PreprocessMs);
        metrics.Stage("vision", t.VisionMs);
        metrics.Stage("prefill", t.PrefillMs);
        metrics.Stage("decode_tokens", t.DecodeMs);
        metrics.Stage("model_total", t.TotalMs);
        return predictions;
    }

    /// <summary>Refuses new work, computes what is already queued, and waits for the worker (at most <paramref name="timeout"/>).</summary>
    public bool Drain(TimeSpan timeout)
    {
        lock (gate) { stopping = true; Monitor.PulseAll(gate); }
        return worker.Join(timeout);
    }

    public void Dispose()
    {
        if (!Drain(TimeSpan.FromSeconds(5)))
        {
            abort.Cancel(); // a forward pass that takes too long is asked to stop; queued items end as shutting down
            lock (gate)
            {
                foreach (var item in queue) item.Complete(new WorkResult(WorkStatus.ShuttingDown, null, "the server is shutting down", 0, 0));
                queue.Clear();
                nodes.Clear();
            }
        }
    }
}
