namespace OpenVLA.RobotClients;

/// <summary>
/// Open-loop execution of action chunks (the idea of openpi's ActionChunkBroker): the policy is asked for a chunk only
/// when the first <see cref="ExecuteSteps"/> actions of the previous chunk have all been executed; in between, every
/// control step takes the next queued action. With a plain OpenVLA policy (chunks of one) it asks every step.
/// Call <see cref="Reset"/> at the start of every episode so no action of the last episode leaks into the next.
/// </summary>
public sealed class ActionChunkBroker
{
    readonly Queue<float[]> _pending = new();

    /// <param name="executeSteps">actions of each chunk to execute before asking again; null: the whole chunk</param>
    public ActionChunkBroker(int? executeSteps = null)
    {
        if (executeSteps is <= 0) throw new ArgumentOutOfRangeException(nameof(executeSteps), "execute steps must be positive");
        ExecuteSteps = executeSteps;
    }

    public int? ExecuteSteps { get; }

    /// <summary>Chunks requested since the last <see cref="Reset"/>.</summary>
    public int PolicyCalls { get; private set; }

    /// <summary>The action for this control step; <paramref name="predictChunk"/> runs only when the queue is empty.</summary>
    /// <exception cref="ChunkTooShortException">the policy returned fewer actions than <see cref="ExecuteSteps"/></exception>
    public float[] Next(Func<IReadOnlyList<float[]>> predictChunk)
    {
        if (_pending.Count == 0)
        {
            var chunk = predictChunk();
            if (chunk.Count == 0) throw new InvalidOperationException("the policy returned an empty chunk");
            if (ExecuteSteps is int k && k > chunk.Count) throw new ChunkTooShortException(k, chunk.Count);
            PolicyCalls++;
            foreach (var action in chunk.Take(ExecuteSteps ?? chunk.Count)) _pending.Enqueue(action);
        }
        return _pending.Dequeue();
    }

    public void Reset()
    {
        _pending.Clear();
        PolicyCalls = 0;
    }
}

/// <summary>An <see cref="ActionChunkBroker"/> was told to execute more actions of each chunk than the policy returns: the
/// caller's setting does not fit the policy. Callers that take the setting from a user translate it into their own error.</summary>
public sealed class ChunkTooShortException(int executeSteps, int chunkLength)
    : ArgumentException($"execute steps {executeSteps} is longer than the policy's chunk of {chunkLength}")
{
    public int ExecuteSteps { get; } = executeSteps;
    public int ChunkLength { get; } = chunkLength;
}
