using System.Threading.Channels;
using Grpc.Core;
using Grpc.Health.V1;
using ServingStatus = Grpc.Health.V1.HealthCheckResponse.Types.ServingStatus;

namespace OpenVLA.Server;

/// <summary>
/// The standard grpc.health.v1 service for "" (the whole server) and "openvla.v1.PolicyService": NOT_SERVING until the
/// model is loaded and warmed up, SERVING then, NOT_SERVING again when stopping. Unlike Grpc.HealthCheck's
/// HealthServiceImpl, Watch streams end once they have sent the final NOT_SERVING, so an open Watch (a load balancer's)
/// does not hold up a graceful shutdown until its timeout.
/// </summary>
internal sealed class ServingHealth : Health.HealthBase
{
    readonly object gate = new();
    readonly Dictionary<string, ServingStatus> statuses = new();
    readonly List<Channel<ServingStatus>> watchers = new();
    bool final;

    public ServingHealth(params string[] services)
    {
        foreach (var service in services) statuses[service] = ServingStatus.NotServing;
    }

    /// <summary>Sets every service's status; <paramref name="isFinal"/> also ends the Watch streams after telling them.</summary>
    public void SetAll(ServingStatus status, bool isFinal = false)
    {
        lock (gate)
        {
            if (final) return; // stopping is final: a load that finishes late must not report SERVING
            foreach (var service in statuses.Keys.ToArray()) statuses[service] = status;
            final = isFinal;
            foreach (var watcher in watchers)
            {
                watcher.Writer.TryWrite(status);
                if (final) watcher.Writer.TryComplete();
            }
        }
    }

    public override Task<HealthCheckResponse> Check(HealthCheckRequest request, ServerCallContext context)
    {
        lock (gate)
        {
            if (!statuses.TryGetValue(request.Service, out var status))
                throw new RpcException(new Status(StatusCode.NotFound, $"unknown service '{request.Service}'"));
            return Task.FromResult(new HealthCheckResponse { Status = status });
        }
    }

    public override async Task Watch(HealthCheckRequest request, IServerStreamWriter<HealthCheckResponse> responseStream, ServerCallContext context)
    {
        var updates = Channel.CreateBounded<ServingStatus>(new BoundedChannelOptions(4) { FullMode = BoundedChannelFullMode.DropOldest });
        ServingStatus current;
        bool known;
        lock (gate)
        {
            known = statuses.TryGetValue(request.Service, out current);
            if (!final) watchers.Add(updates);
            else updates.Writer.TryComplete();
        }
        try
        {
            var last = known ? current : ServingStatus.ServiceUnknown;
            await responseStream.WriteAsync(new HealthCheckResponse { Status = last }, context.CancellationToken);
            if (!known) { await Task.Delay(Timeout.Infinite, context.CancellationToken); return; } // as the spec says: wait
            await foreach (var status in updates.Reader.ReadAllAsync(context.CancellationToken))
                if (status != last) await responseStream.WriteAsync(new HealthCheckResponse { Status = last = status }, context.CancellationToken);
        }
        catch (OperationCanceledException) when (context.CancellationToken.IsCancellationRequested) { }
        finally { lock (gate) watchers.Remove(updates); }
    }
}
