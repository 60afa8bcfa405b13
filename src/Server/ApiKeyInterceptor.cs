using System.Security.Cryptography;
using System.Text;
using Grpc.Core;
using Grpc.Core.Interceptors;

namespace OpenVLA.Server;

/// <summary>
/// Keys accepted in "authorization: Bearer KEY". Read once from --api-key-file: one key per line (so each robot can get
/// its own and lose it alone), blank lines and '#' comments ignored. Compared as SHA-256 digests in constant time.
/// </summary>
public sealed class ApiKeys
{
    readonly byte[][] digests;

    ApiKeys(byte[][] digests) => this.digests = digests;

    public static ApiKeys FromFile(string path)
    {
        var keys = File.ReadAllLines(path).Select(l => l.Trim()).Where(l => l.Length > 0 && !l.StartsWith('#')).ToArray();
        if (keys.Length == 0) throw new InvalidDataException($"--api-key-file {path} holds no key (one key per line)");
        if (keys.Any(k => k.Length < 16)) throw new InvalidDataException($"--api-key-file {path}: every key must be at least 16 characters");
        return new ApiKeys(keys.Select(k => SHA256.HashData(Encoding.UTF8.GetBytes(k))).ToArray());
    }

    public bool Accepts(string? authorizationHeader)
    {
        const string scheme = "Bearer ";
        if (authorizationHeader is null || !authorizationHeader.StartsWith(scheme, StringComparison.OrdinalIgnoreCase)) return false;
        var digest = SHA256.HashData(Encoding.UTF8.GetBytes(authorizationHeader[scheme.Length..].Trim()));
        bool ok = false;
        foreach (var d in digests) ok |= CryptographicOperations.FixedTimeEquals(d, digest);
        return ok;
    }
}

/// <summary>Refuses every call (all services: policy, health, reflection) that lacks an accepted API key.</summary>
internal sealed class ApiKeyInterceptor(ApiKeys keys, ServerMetrics metrics) : Interceptor
{
    void Check(ServerCallContext context)
    {
        if (keys.Accepts(context.RequestHeaders.GetValue("authorization"))) return;
        metrics.Request(context.Method[(context.Method.LastIndexOf('/') + 1)..], StatusCode.Unauthenticated);
        throw new RpcException(new Status(StatusCode.Unauthenticated, "missing or wrong API key (send \"authorization: Bearer KEY\")"));
    }

    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context,
        UnaryServerMethod<TRequest, TResponse> continuation)
    {
        Check(context);
        return continuation(request, context);
    }

    public override Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream,
        ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation)
    {
        Check(context);
        return continuation(requestStream, context);
    }

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream,
        ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        Check(context);
        return continuation(request, responseStream, context);
    }

    public override Task DuplexStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream,
        IServerStreamWriter<TResponse> responseStream, ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation)
    {
        Check(context);
        return continuation(requestStream, responseStream, context);
    }
}
