using System.Collections.Concurrent;
using OpenVLA.Policy;

namespace OpenVLA.Tests.Server;

/// <summary>
/// Test doubles for <see cref="IActionPolicy"/>: the server is tested against the interface, so these stand in for the
/// real model. The action is a pure function of the observation, so a test can tell which robot got which answer.
/// </summary>
internal class DeterministicPolicy : IActionPolicy
{
    public static readonly ActionStats Bridge = new([-1, -1, -1, -1, -1, -1, 0], [1, 1, 1, 1, 1, 1, 1], [true, true, true, true, true, true, false]);
    public static readonly ActionStats Fractal = new([-2, -2, -2, -2, -2, -2, 0], [2, 2, 2, 2, 2, 2, 1], [true, true, true, true, true, true, false]);

    public ConcurrentQueue<int> BatchSizes { get; } = new();
    public ConcurrentQueue<string> Instructions { get; } = new();

    public virtual PolicyDescription Description { get; } = new("test/deterministic", "test-double", 7, 224, 1, "resize-naive", "float32", "none",
        new Dictionary<string, ActionStats> { ["bridge_orig"] = Bridge, ["fractal20220817_data"] = Fractal });

    /// <summary>What the double answers: value i is the mean red level in [0,1] times (i+1), plus 0.001 per instruction character.</summary>
    public static float[] ExpectedAction(RgbImage image, string instruction)
    {
        double red = 0;
        for (int p = 0; p < image.Pixels.Length; p += 3) red += image.Pixels[p];
        red /= image.Width * image.Height * 255.0;
        return Enumerable.Range(0, 7).Select(i => (float)(red * (i + 1) + 0.001 * instruction.Length)).ToArray();
    }

    public virtual IReadOnlyList<ActionPrediction> PredictBatch(IReadOnlyList<VlaObservation> observations, CancellationToken cancellationToken = default)
    {
        BatchSizes.Enqueue(observations.Count);
        foreach (var o in observations) Instructions.Enqueue(o.Instruction);
        return observations.Select(o => ActionPrediction.Single(
            ExpectedAction(o.Images[0], o.Instruction), new float[7], [31800, 31801, 31802, 31803, 31804, 31805, 31806], [1, 2, 3],
            o.UnnormKey ?? "", new StageTimings(0.1, 0.2, 0.3, 0.4, 1.0))).ToArray();
    }
}

/// <summary>Takes <see cref="Delay"/> per forward pass, like a real model on a slow machine.</summary>
internal sealed class SlowPolicy(TimeSpan delay) : DeterministicPolicy
{
    readonly ConcurrentDictionary<string, TaskCompletionSource> computing = new();

    public TimeSpan Delay { get; } = delay;

    /// <summary>
    /// Completes when a forward pass over <paramref name="instruction"/> has begun: tests wait on this rather than on a
    /// fixed delay, which a cold, busy machine can outlast before the request even connects.
    /// </summary>
    public Task Computing(string instruction) =>
        Signal(instruction).Task.WaitAsync(TimeSpan.FromSeconds(30));

    TaskCompletionSource Signal(string instruction) =>
        computing.GetOrAdd(instruction, _ => new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously));

    public override IReadOnlyList<ActionPrediction> PredictBatch(IReadOnlyList<VlaObservation> observations, CancellationToken cancellationToken = default)
    {
        foreach (var o in observations) Signal(o.Instruction).TrySetResult();
        Thread.Sleep(Delay);
        return base.PredictBatch(observations, cancellationToken);
    }
}

/// <summary>Fails on instruction "explode" with an exception whose text must never reach a client.</summary>
internal sealed class ThrowingPolicy : DeterministicPolicy
{
    public const string SecretText = "secret stack detail /home/model/weights.bin";

    public override IReadOnlyList<ActionPrediction> PredictBatch(IReadOnlyList<VlaObservation> observations, CancellationToken cancellationToken = default)
    {
        if (observations.Any(o => o.Instruction == "explode")) throw new InvalidOperationException(SecretText);
        if (observations.Any(o => o.Instruction == "bad input")) throw new PolicyInputException("the policy refused this observation");
        return base.PredictBatch(observations, cancellationToken);
    }
}
