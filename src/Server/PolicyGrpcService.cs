using System.Diagnostics;
using System.Threading.Channels;
using Grpc.Core;
using Microsoft.Extensions.Logging;
using OpenVLA.Contract.V1;

namespace OpenVLA.Server;

/// <summary>The loaded model as the service sees it; null until loading and warm-up finished.</summary>
internal sealed class ServingState
{
    volatile Loaded? loaded;
    public Loaded? Current => loaded;
    public void Set(Loaded? value) => loaded = value;
    public CancellationTokenSource Stopping { get; } = new();

    internal sealed record Loaded(ContractMapping Mapping, BatchScheduler Scheduler);
}

/// <summary>
/// openvla.v1.PolicyService: translates messages to scheduler work and back. Every failure leaves as a status code with
/// one line (<see cref="Fail"/>); exception text from inside the server never does.
/// </summary>
[BindServiceMethod(typeof(WireMessages), nameof(WireMessages.Bind))]
internal sealed class PolicyGrpcService(ServingState state, ServerMetrics metrics, ILogger<PolicyGrpcService> logger)
    : PolicyService.PolicyServiceBase
{
    public override Task<PolicyInfo> GetPolicyInfo(GetPolicyInfoRequest request, ServerCallContext context)
    {
        var loaded = Require("GetPolicyInfo");
        if (WireError(loaded, request) is { } wire) throw Fail("GetPolicyInfo", wire.Code, wire.Message);
        metrics.Request("GetPolicyInfo", StatusCode.OK);
        return Task.FromResult(loaded.Mapping.Describe());
    }

    public override async Task<PredictResponse> Predict(PredictRequest request, ServerCallContext context)
    {
        const string method = "Predict";
        long start = Stopwatch.GetTimestamp();
        var loaded = Require(method);
        if (WireError(loaded, request) is { } wire) throw Fail(method, wire.Code, wire.Message);
        var (observation, decodeMs) = Map(loaded, request.Observation, method);
        var item = new WorkItem(observation, Deadline(context), context.CancellationToken);
        if (!loaded.Scheduler.TryEnqueue(item)) throw Refused(method, loaded);
        WorkResult result;
        try { result = await item.Result.WaitAsync(context.CancellationToken); }
        catch (OperationCanceledException) { throw CallerGone(method, context); }
        if (result.Status != WorkStatus.Done) throw Fail(method, ToStatus(result.Status), result.Error ?? result.Status.ToString());
        var serverMs = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        metrics.Stage("image_decode", decodeMs);
        metrics.Stage("server_total", serverMs);
        metrics.Request(method, StatusCode.OK);
        return new PredictResponse
        {
            Action = ContractMapping.ToAction(result.Prediction!),
            Seq = request.Observation.Seq,
            CaptureTimeUnixUs = request.Observation.CaptureTimeUnixUs,
            ModelVersion = loaded.Mapping.ModelVersion,
            Timings = ContractMapping.ToTimings(result.Prediction, result.QueueMs, decodeMs, serverMs, result.BatchSize),
        };
    }

    public override async Task StreamActions(IAsyncStreamReader<StreamActionsRequest> requestStream,
        IServerStreamWriter<StreamActionsResponse> responseStream, ServerCallContext context)
    {
        const string method = "StreamActions";
        var loaded = Require(method);
        var session = new StreamSession();
        long opened = Stopwatch.GetTimestamp();
        logger.LogInformation("stream opened by {Peer}", context.Peer);
        var outgoing = Channel.CreateUnbounded<StreamActionsResponse>(new UnboundedChannelOptions { SingleReader = true });
        var writer = Task.Run(async () =>
        {
            await foreach (var reply in outgoing.Reader.ReadAllAsync(context.CancellationToken))
                await responseStream.WriteAsync(reply, context.CancellationToken);
        });
        using var reading = CancellationTokenSource.CreateLinkedTokenSource(context.CancellationToken, state.Stopping.Token);
        var outstanding = new List<Task>();
        try
        {
            while (await requestStream.MoveNext(reading.Token))
            {
                outstanding.RemoveAll(t => t.IsCompleted);
                var frame = requestStream.Current.Observation ?? new Observation();
                lock (session)
                {
                    session.Frames++;
                    if (session.RobotId.Length == 0) session.RobotId = frame.RobotId;
                }
                long start = Stopwatch.GetTimestamp();
                if (WireError(loaded, requestStream.Current) is { } wire)
                {
                    metrics.Request(method, wire.Code);
                    lock (session) outgoing.Writer.TryWrite(session.Error(frame, wire.Code, wire.Message));
                    continue;
                }
                try
                {
                    var (observation, decodeMs) = Map(loaded, requestStream.Current.Observation, method);
                    var item = new WorkItem(observation, Deadline(context), context.CancellationToken);
                    lock (session)
                    {
                        if (session.Waiting is { } older && loaded.Scheduler.TryReplace(older, item))
                        {
                            session.SkippedSinceReply++;
                            session.SkippedTotal++;
                            metrics.StaleDropped();
                        }
                        else if (!loaded.Scheduler.TryEnqueue(item))
                        {
                            var refused = Refused(method, loaded);
                            outgoing.Writer.TryWrite(session.Error(frame, refused.StatusCode, refused.Status.Detail));
                            continue;
                        }
                        session.Waiting = item;
                    }
                    outstanding.Add(AnswerAsync(loaded, session, item, frame, start, decodeMs, outgoing.Writer));
                }
                catch (RpcException e) when (e.StatusCode == StatusCode.InvalidArgument)
                {
                    lock (session) outgoing.Writer.TryWrite(session.Error(frame, StatusCode.InvalidArgument, e.Status.Detail));
                }
            }
        }
        catch (OperationCanceledException) when (state.Stopping.IsCancellationRequested && !context.CancellationToken.IsCancellationRequested)
        {
            // graceful shutdown: stop reading, answer what was already received, then end the stream as UNAVAILABLE
        }
        catch (Exception e) when (e is IOException or OperationCanceledException or InvalidOperationException)
        {
            throw CallerGone(method, context); // the client went away mid-stream
        }
        await Task.WhenAll(outstanding);
        lock (session)
            logger.LogInformation("stream of robot {RobotId} from {Peer} ended after {Seconds:F1} s: {Frames} frames, {Answered} answered, {Skipped} skipped as stale, {Errors} refused",
                session.RobotId, context.Peer, Stopwatch.GetElapsedTime(opened).TotalSeconds, session.Frames, session.Answered, session.SkippedTotal, session.Errors);
        outgoing.Writer.TryComplete();
        try { await writer; }
        catch (Exception e) when (e is IOException or OperationCanceledException or InvalidOperationException) { throw CallerGone(method, context); }
        if (state.Stopping.IsCancellationRequested && !context.CancellationToken.IsCancellationRequested)
            throw new RpcException(new Status(StatusCode.Unavailable, "the server is shutting down; reconnect"));
    }

    async Task AnswerAsync(ServingState.Loaded loaded, StreamSession session, WorkItem item, Observation frame, long start,
        double decodeMs, ChannelWriter<StreamActionsResponse> outgoing)
    {
        var result = await item.Result;
        if (result.Status == WorkStatus.Superseded) return; // counted as skipped in the next reply
        lock (session)
        {
            if (ReferenceEquals(session.Waiting, item)) session.Waiting = null;
            if (result.Status != WorkStatus.Done)
            {
                var code = ToStatus(result.Status);
                metrics.Request("StreamActions", code);
                outgoing.TryWrite(session.Error(frame, code, result.Error ?? code.ToString()));
                return;
            }
            var serverMs = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            metrics.Stage("image_decode", decodeMs);
            metrics.Stage("server_total", serverMs);
            metrics.Request("StreamActions", StatusCode.OK);
            var reply = session.Reply(frame);
            session.Answered++;
            reply.Action = ContractMapping.ToAction(result.Prediction!);
            reply.ModelVersion = loaded.Mapping.ModelVersion;
            reply.Timings = ContractMapping.ToTimings(result.Prediction, result.QueueMs, decodeMs, serverMs, result.BatchSize);
            outgoing.TryWrite(reply);
        }
    }

    /// <summary>Per-stream state: the frame still waiting in the scheduler, and skip counters for the next reply.</summary>
    sealed class StreamSession
    {
        public WorkItem? Waiting;
        public uint SkippedSinceReply;
        public long Frames, Answered, Errors;
        public string RobotId = "";
        public ulong SkippedTotal;

        public StreamActionsResponse Reply(Observation frame)
        {
            var reply = new StreamActionsResponse
            {
                Seq = frame.Seq, CaptureTimeUnixUs = frame.CaptureTimeUnixUs, Skipped = SkippedSinceReply, SkippedTotal = SkippedTotal,
            };
            SkippedSinceReply = 0;
            return reply;
        }

        public StreamActionsResponse Error(Observation frame, StatusCode code, string message)
        {
            Errors++;
            var reply = Reply(frame);
            reply.Error = new FrameError { Code = (int)code, Message = message };
            return reply;
        }
    }

    ServingState.Loaded Require(string method) =>
        state.Current ?? throw Fail(method, StatusCode.Unavailable,
            state.Stopping.IsCancellationRequested ? "the server is shutting down" : "the model is still loading; watch grpc.health.v1 for SERVING");

    (Policy.VlaObservation, double) Map(ServingState.Loaded loaded, Observation? observation, string method)
    {
        try { return loaded.Mapping.ToPolicyInput(observation); }
        catch (Policy.PolicyInputException e) { throw Fail(method, StatusCode.InvalidArgument, e.Message.ReplaceLineEndings(" ")); }
    }

    /// <summary>A request that did not parse, or is larger than the server's limit (<see cref="WireMessages"/>).</summary>
    static (StatusCode Code, string Message)? WireError(ServingState.Loaded loaded, Google.Protobuf.IMessage request)
    {
        var wire = WireMessages.Of(request);
        if (wire.Problem is { } problem) return (StatusCode.InvalidArgument, problem);
        if (wire.Bytes > loaded.Mapping.MaxMessageBytes)
            return (StatusCode.ResourceExhausted, $"the message is {wire.Bytes} bytes; the server accepts at most {loaded.Mapping.MaxMessageBytes} (--max-message-bytes)");
        return null;
    }

    static DateTime? Deadline(ServerCallContext context) => context.Deadline == DateTime.MaxValue ? null : context.Deadline.ToUniversalTime();

    /// <summary>Why the scheduler refused an observation: it is draining for shutdown, or its queue is full.</summary>
    RpcException Refused(string method, ServingState.Loaded loaded) => state.Stopping.IsCancellationRequested
        ? Fail(method, StatusCode.Unavailable, "the server is shutting down; reconnect")
        : Fail(method, StatusCode.ResourceExhausted, $"the server's queue is full ({loaded.Scheduler.Depth} observations waiting); retry later");

    RpcException CallerGone(string method, ServerCallContext context)
    {
        var expired = context.Deadline != DateTime.MaxValue && context.Deadline <= DateTime.UtcNow;
        return Fail(method, expired ? StatusCode.DeadlineExceeded : StatusCode.Cancelled,
            expired ? "deadline passed before the action was ready" : "the call was cancelled");
    }

    RpcException Fail(string method, StatusCode code, string message)
    {
        metrics.Request(method, code);
        if (code is StatusCode.Internal) logger.LogWarning("{Method} failed: {Status} {Message}", method, code, message);
        else logger.LogDebug("{Method} answered {Status}: {Message}", method, code, message);
        return new RpcException(new Status(code, message));
    }

    static StatusCode ToStatus(WorkStatus status) => status switch
    {
        WorkStatus.Done => StatusCode.OK,
        WorkStatus.DeadlineExceeded => StatusCode.DeadlineExceeded,
        WorkStatus.Cancelled => StatusCode.Cancelled,
        WorkStatus.InvalidInput => StatusCode.InvalidArgument,
        WorkStatus.ShuttingDown => StatusCode.Unavailable,
        _ => StatusCode.Internal,
    };
}
