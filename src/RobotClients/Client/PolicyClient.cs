using System.Net.Security;
using System.Security.Cryptography.X509Certificates;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Grpc.Net.Client;
using Grpc.Net.Client.Configuration;
using OpenVLA.Contract.V1;

namespace OpenVLA.RobotClients;

/// <summary>
/// A typed connection to an OpenVLA policy server. Thread-safe; make one per server and share it.
/// Unary calls get the default deadline when none is given and are retried with exponential backoff while the server is
/// UNAVAILABLE (not started yet, restarting, connection lost), within their deadline.
/// </summary>
public sealed class PolicyClient : IDisposable
{
    readonly GrpcChannel channel;

    public PolicyClientOptions Options { get; }

    /// <summary>The generated stub, for callers who need the raw gRPC surface (headers, trailers, call options).</summary>
    public PolicyService.PolicyServiceClient Raw { get; }

    public PolicyClient(PolicyClientOptions options)
    {
        Options = options;
        var handler = new SocketsHttpHandler
        {
            EnableMultipleHttp2Connections = true,
            PooledConnectionIdleTimeout = Timeout.InfiniteTimeSpan,
            KeepAlivePingDelay = TimeSpan.FromSeconds(30),
            KeepAlivePingTimeout = TimeSpan.FromSeconds(10),
            ConnectTimeout = TimeSpan.FromSeconds(5),
        };
        if (options.Address.Scheme == Uri.UriSchemeHttps) handler.SslOptions = TlsOptions(options);
        var retry = new MethodConfig
        {
            Names = { MethodName.Default },
            RetryPolicy = new RetryPolicy
            {
                MaxAttempts = Math.Max(2, options.MaxAttempts),
                InitialBackoff = options.InitialBackoff,
                MaxBackoff = options.MaxBackoff,
                BackoffMultiplier = 2,
                RetryableStatusCodes = { StatusCode.Unavailable },
            },
        };
        channel = GrpcChannel.ForAddress(options.Address, new GrpcChannelOptions
        {
            HttpHandler = handler,
            DisposeHttpClient = true,
            ServiceConfig = new ServiceConfig { MethodConfigs = { retry } },
            MaxRetryAttempts = Math.Max(2, options.MaxAttempts),
            MaxReceiveMessageSize = options.MaxMessageBytes,
            MaxSendMessageSize = options.MaxMessageBytes,
        });
        CallInvoker invoker = channel.CreateCallInvoker();
        if (!string.IsNullOrEmpty(options.ApiKey))
        {
            var header = $"Bearer {options.ApiKey}";
            invoker = invoker.Intercept(metadata => { metadata.Add("authorization", header); return metadata; });
        }
        Raw = new PolicyService.PolicyServiceClient(invoker);
    }

    public PolicyClient(string address) : this(PolicyClientOptions.For(address)) { }

    public async Task<PolicyInfo> GetPolicyInfoAsync(TimeSpan? timeout = null, CancellationToken cancellationToken = default) =>
        await Raw.GetPolicyInfoAsync(new GetPolicyInfoRequest(), deadline: Deadline(timeout), cancellationToken: cancellationToken);

    /// <summary>One action for one observation. Throws <see cref="RpcException"/> with the server's status on failure.</summary>
    public async Task<PredictResponse> PredictAsync(Observation observation, TimeSpan? timeout = null, CancellationToken cancellationToken = default) =>
        await Raw.PredictAsync(new PredictRequest { Observation = observation }, deadline: Deadline(timeout), cancellationToken: cancellationToken);

    /// <summary>Opens a robot session that always sends the newest frame and reconnects when the stream breaks.</summary>
    public LatestFrameStream OpenStream(CancellationToken cancellationToken = default) => new(this, cancellationToken);

    internal DateTime Deadline(TimeSpan? timeout) => DateTime.UtcNow + (timeout ?? Options.DefaultDeadline);

    public void Dispose() => channel.Dispose();

    static SslClientAuthenticationOptions TlsOptions(PolicyClientOptions options)
    {
        var ssl = new SslClientAuthenticationOptions();
        if (options.ClientCertificate is { } clientCertificate)
            ssl.ClientCertificates = new X509CertificateCollection { clientCertificate };
        if (options.TrustedServerCertificate is { } trusted)
        {
            ssl.RemoteCertificateValidationCallback = (_, certificate, _, errors) =>
            {
                if (certificate is null) return false;
                // Name mismatches still fail; only the chain is judged against the given root instead of the system store.
                if ((errors & SslPolicyErrors.RemoteCertificateNameMismatch) != 0) return false;
                using var chain = new X509Chain();
                chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
                chain.ChainPolicy.CustomTrustStore.Add(trusted);
                chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
                return chain.Build(new X509Certificate2(certificate));
            };
        }
        return ssl;
    }
}
