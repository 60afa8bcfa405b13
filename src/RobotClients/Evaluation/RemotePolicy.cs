using Google.Protobuf;
using Grpc.Core;
using OpenVLA.Contract.V1;
using OpenVLA.Policy;

namespace OpenVLA.RobotClients;

/// <summary>
/// An <see cref="IActionPolicy"/> answered by a policy server, so code written against the policy interface (the
/// simulation evaluator's <c>--policy grpc://HOST:PORT</c>) runs against a remote model. Frames travel as raw RGB8
/// (lossless: the server sees exactly the pixels given here). A batch becomes concurrent unary calls, which the server's
/// scheduler puts into one forward pass; every observation is answered (no latest-frame dropping, which suits lock-step
/// evaluation). Bad input comes back as <see cref="PolicyInputException"/> with the server's one-line reason.
/// </summary>
public sealed class RemotePolicy : IActionPolicy, IDisposable
{
    readonly PolicyClient client;
    readonly bool ownsClient;

    public RemotePolicy(PolicyClient client, bool ownsClient = false)
    {
        this.client = client;
        this.ownsClient = ownsClient;
        PolicyInfo info;
        try { info = Call(() => client.GetPolicyInfoAsync().GetAwaiter().GetResult()); }
        catch when (ownsClient) { client.Dispose(); throw; }
        Description = new PolicyDescription(info.ModelId, info.Architecture, (int)info.ActionDim, (int)info.ImageSize,
            (int)info.ImagesPerObservation, info.ResizeStrategy, info.Precision, info.Quantization,
            info.UnnormKeys.ToDictionary(k => k.Name, k => new ActionStats([.. k.Q01], [.. k.Q99], [.. k.Mask])))
        {
            ChunkLength = (int)Math.Max(1, info.ChunkLength),
            ProprioDim = (int)info.ProprioDim,
            CameraNames = info.CameraNames.Count > 0 ? [.. info.CameraNames] : ["primary"],
            ActionHead = info.ActionHead.Length > 0 ? info.ActionHead : "autoregressive-tokens",
        };
        ModelVersion = info.ModelVersion;
    }

    public PolicyDescription Description { get; }

    /// <summary>The server's model version (changes when the served model does).</summary>
    public string ModelVersion { get; }

    public IReadOnlyList<ActionPrediction> PredictBatch(IReadOnlyList<VlaObservation> observations, CancellationToken cancellationToken = default)
    {
        var calls = observations.Select(o => client.PredictAsync(ToMessage(o), cancellationToken: cancellationToken)).ToArray();
        var replies = Call(() => Task.WhenAll(calls).GetAwaiter().GetResult());
        return replies.Select(r => new ActionPrediction(
            Observations.Chunk(r.Action),
            r.Action.Chunk.Count > 0 ? [.. r.Action.Chunk.Select(s => s.Normalized.ToArray())] : [[.. r.Action.Normalized]],
            [.. r.Action.TokenIds], [], r.Action.UnnormKey,
            new Policy.StageTimings(r.Timings.PreprocessMs, r.Timings.VisionMs, r.Timings.PrefillMs, r.Timings.DecodeTokensMs, r.Timings.ServerTotalMs))).ToArray();
    }

    Observation ToMessage(VlaObservation observation)
    {
        var message = new Observation { Instruction = observation.Instruction, UnnormKey = observation.UnnormKey ?? "" };
        for (int i = 0; i < observation.Images.Count; i++)
        {
            var image = observation.Images[i];
            message.Images.Add(new Image
            {
                Camera = i < Description.CameraNames.Count ? Description.CameraNames[i] : "",
                Encoding = ImageEncoding.RawRgb8, Width = (uint)image.Width, Height = (uint)image.Height, Data = ByteString.CopyFrom(image.Pixels),
            });
        }
        if (observation.Proprio is { } proprio) message.Proprio.AddRange(proprio);
        return message;
    }

    T Call<T>(Func<T> call)
    {
        try { return call(); }
        catch (RpcException e) when (e.StatusCode == StatusCode.InvalidArgument) { throw new PolicyInputException(e.Status.Detail); }
        catch (RpcException e) { throw new PolicyServerException($"policy server {client.Options.Address}: {e.StatusCode}: {e.Status.Detail}", e.StatusCode); }
    }

    public void Dispose()
    {
        if (ownsClient) client.Dispose();
    }
}

/// <summary>A call to the policy server failed for a reason other than the input (unreachable, auth, overload); one line.</summary>
public sealed class PolicyServerException(string message, StatusCode status) : Exception(message)
{
    public StatusCode Status { get; } = status;
}
