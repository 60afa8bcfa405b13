using System.Threading.Channels;
using Grpc.Core;
using OpenVLA.Contract.V1;

namespace OpenVLA.RobotClients;

/// <summary>
/// A robot session over StreamActions for a control loop: <see cref="Submit"/> never blocks the camera loop; only the
/// newest frame not yet sent is kept (older ones are counted in <see cref="DroppedBeforeSend"/>), and the server drops
/// frames that go stale in its queue. Replies arrive on <see cref="Replies"/> and the newest action is always in
/// <see cref="Latest"/>. When the stream breaks (server restart, network), it reconnects with exponential backoff;
/// after <see cref="PolicyClientOptions.MaxAttempts"/> failed connects in a row, or a status that retrying cannot fix
/// (UNAUTHENTICATED, PERMISSION_DENIED, UNIMPLEMENTED), <see cref="Replies"/> completes with that error.
/// </summary>
public sealed class LatestFrameStream : IAsyncDisposable
{
    readonly PolicyClient client;
    readonly Channel<Observation> pending;
    readonly Channel<StreamActionsResponse> replies =
        Channel.CreateBounded<StreamActionsResponse>(new BoundedChannelOptions(256) { FullMode = BoundedChannelFullMode.DropOldest });
    readonly CancellationTokenSource stop;
    readonly Task pump;
    StreamActionsResponse? latest;
    long droppedBeforeSend, reconnects;

    internal LatestFrameStream(PolicyClient client, CancellationToken cancellationToken)
    {
        this.client = client;
        pending = Channel.CreateBounded<Observation>(new BoundedChannelOptions(1) { FullMode = BoundedChannelFullMode.DropOldest },
            _ => Interlocked.Increment(ref droppedBeforeSend));
        stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        pump = Task.Run(PumpAsync);
    }

    /// <summary>Queues the frame for sending, replacing any frame not sent yet. Returns false once the stream has ended.</summary>
    public bool Submit(Observation observation) => pending.Writer.TryWrite(observation);

    /// <summary>Every reply, in order (actions and per-frame errors). Completes when the stream ends.</summary>
    public ChannelReader<StreamActionsResponse> Replies => replies.Reader;

    /// <summary>The newest reply received, or null before the first.</summary>
    public StreamActionsResponse? Latest => Volatile.Read(ref latest);

    public long DroppedBeforeSend => Interlocked.Read(ref droppedBeforeSend);
    public long Reconnects => Interlocked.Read(ref reconnects);

    async Task PumpAsync()
    {
        var backoff = client.Options.InitialBackoff;
        int failures = 0;
        Exception? fatal = null;
        while (!stop.IsCancellationRequested)
        {
            bool gotReply = false;
            using var attempt = CancellationTokenSource.CreateLinkedTokenSource(stop.Token);
            try
            {
                using var call = client.Raw.StreamActions(cancellationToken: attempt.Token);
                var reading = Task.Run(async () =>
                {
                    await foreach (var reply in call.ResponseStream.ReadAllAsync(attempt.Token))
                    {
                        gotReply = true;
                        Volatile.Write(ref latest, reply);
                        replies.Writer.TryWrite(reply);
                    }
                });
                var writing = Task.Run(async () =>
                {
                    await foreach (var observation in pending.Reader.ReadAllAsync(attempt.Token))
                        await call.RequestStream.WriteAsync(new StreamActionsRequest { Observation = observation }, attempt.Token);
                    await call.RequestStream.CompleteAsync();
                });
                var first = await Task.WhenAny(reading, writing);
                if (first == writing && writing.IsCompletedSuccessfully)
                {
                    await reading; // the robot is done: wait for the answers to frames already sent
                    break;
                }
                attempt.Cancel();
                await Task.WhenAll(reading.ContinueWith(_ => { }), writing.ContinueWith(_ => { }));
                await first; // rethrows why this attempt ended
                if (first == reading) throw new RpcException(new Status(StatusCode.Unavailable, "the server ended the stream"));
            }
            catch (OperationCanceledException) when (stop.IsCancellationRequested) { break; }
            catch (RpcException e) when (e.StatusCode is StatusCode.Unauthenticated or StatusCode.PermissionDenied or StatusCode.Unimplemented)
            {
                fatal = e;
                break;
            }
            catch (Exception e) when (e is RpcException or IOException or InvalidOperationException or OperationCanceledException)
            {
                if (gotReply) { failures = 0; backoff = client.Options.InitialBackoff; }
                if (++failures >= client.Options.MaxAttempts) { fatal = e; break; }
            }
            if (pending.Reader.Completion.IsCompleted) break; // the robot is done sending: nothing to reconnect for
            Interlocked.Increment(ref reconnects);
            try { await Task.Delay(backoff, stop.Token); } catch (OperationCanceledException) { break; }
            backoff = TimeSpan.FromTicks(Math.Min(backoff.Ticks * 2, client.Options.MaxBackoff.Ticks));
        }
        pending.Writer.TryComplete();
        replies.Writer.TryComplete(fatal);
    }

    /// <summary>Stops sending, waits briefly for the replies to frames already sent, and closes the stream.</summary>
    public async ValueTask DisposeAsync()
    {
        pending.Writer.TryComplete();
        if (await Task.WhenAny(pump, Task.Delay(client.Options.DefaultDeadline)) != pump) stop.Cancel();
        try { await pump; } catch (OperationCanceledException) { }
        stop.Dispose();
    }
}
