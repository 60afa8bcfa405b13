using System.Diagnostics;
using System.Net;
using System.Security.Cryptography.X509Certificates;
using Grpc.Health.V1;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.AspNetCore.Server.Kestrel.Https;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OpenVLA.Policy;

namespace OpenVLA.Server;

/// <summary>
/// A running policy server: Kestrel with an HTTP/2-only gRPC endpoint (openvla.v1.PolicyService, grpc.health.v1,
/// reflection) and a separate plain-HTTP /metrics endpoint. It listens at once and reports NOT_SERVING while the policy
/// loads and warms up on a background thread, then SERVING. Stopping refuses new calls, answers the ones in flight,
/// ends streams with UNAVAILABLE and then stops the scheduler.
/// </summary>
public sealed class PolicyServer : IAsyncDisposable
{
    public const string ServiceName = "openvla.v1.PolicyService";

    readonly WebApplication app;
    readonly ServingState state;
    readonly ServingHealth health;
    readonly ServerMetrics metrics;
    readonly ILogger logger;
    readonly TaskCompletionSource ready = new(TaskCreationOptions.RunContinuationsAsynchronously);
    readonly ServeOptions options;
    IActionPolicy? policy;
    bool disposePolicy = true;
    int stopped;

    PolicyServer(WebApplication app, ServingState state, ServingHealth health, ServerMetrics metrics, ServeOptions options)
    {
        this.app = app;
        this.state = state;
        this.health = health;
        this.metrics = metrics;
        this.options = options;
        logger = app.Services.GetRequiredService<ILoggerFactory>().CreateLogger("OpenVLA.Server");
    }

    /// <summary>Where robots connect, e.g. http://127.0.0.1:50051 (https:// with TLS).</summary>
    public Uri GrpcAddress { get; private set; } = null!;

    /// <summary>The Prometheus endpoint, e.g. http://127.0.0.1:50052/metrics; null when metrics are off.</summary>
    public Uri? MetricsAddress { get; private set; }

    /// <summary>Completes when the model is loaded and warmed up; faults (with the loader's exception) when loading fails.</summary>
    public Task Ready => ready.Task;

    public ServerMetrics Metrics => metrics;

    /// <summary>Starts listening, then loads the policy with <paramref name="loadPolicy"/> in the background.</summary>
    /// <param name="disposePolicy">Whether stopping disposes the policy (false when the caller reuses it, as the load benchmark does).</param>
    public static async Task<PolicyServer> StartAsync(ServeOptions options, Func<ServeOptions, CancellationToken, IActionPolicy> loadPolicy,
        Action<ILoggingBuilder>? configureLogging = null, CancellationToken cancellationToken = default, bool disposePolicy = true)
    {
        if (options.Problem() is { } problem) throw new ArgumentException(problem, nameof(options));
        var apiKeys = options.ApiKeyFile is null ? null : ApiKeys.FromFile(options.ApiKeyFile);
        var certificate = options.TlsCert is null ? null : LoadServerCertificate(options.TlsCert, options.TlsKey!);
        X509Certificate2Collection? clientCa = null;
        if (options.TlsClientCa is not null)
        {
            clientCa = [];
            clientCa.ImportFromPemFile(options.TlsClientCa); // one CA or a bundle
            if (clientCa.Count == 0) throw new ArgumentException($"--tls-client-ca {options.TlsClientCa} holds no PEM certificate");
        }
        var grpcIp = ParseHost(options.Host, "--host");
        var metricsIp = ParseHost(options.MetricsHost, "--metrics-host");

        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [] });
        builder.Logging.ClearProviders();
        if (configureLogging is not null) configureLogging(builder.Logging);
        else if (options.JsonLogs) builder.Logging.AddJsonConsole(o => o.IncludeScopes = false);
        else builder.Logging.AddSimpleConsole(o => { o.SingleLine = true; o.TimestampFormat = "HH:mm:ss.fff "; });
        builder.Services.Configure<Microsoft.Extensions.Logging.Console.ConsoleLoggerOptions>(c => c.LogToStandardErrorThreshold = LogLevel.Trace); // stdout is for results
        builder.Logging.AddFilter("Microsoft", LogLevel.Warning).AddFilter("Grpc", LogLevel.Warning);
        builder.Services.Configure<HostOptions>(h => h.ShutdownTimeout = options.ShutdownTimeout);

        ListenOptions? grpcEndpoint = null, metricsEndpoint = null;
        builder.WebHost.ConfigureKestrel(kestrel =>
        {
            kestrel.AddServerHeader = false;
            // Find robots that vanished without closing (power loss, Wi-Fi drop) so their streams end and free their slot.
            kestrel.Limits.Http2.KeepAlivePingDelay = TimeSpan.FromSeconds(20);
            kestrel.Limits.Http2.KeepAlivePingTimeout = TimeSpan.FromSeconds(20);
            kestrel.Listen(grpcIp, options.Port, listen =>
            {
                grpcEndpoint = listen;
                listen.Protocols = HttpProtocols.Http2; // gRPC needs HTTP/2; without TLS only prior-knowledge h2c works
                if (certificate is not null) listen.UseHttps(https => ConfigureTls(https, certificate, clientCa));
            });
            if (options.MetricsPort is { } metricsPort)
                kestrel.Listen(metricsIp, metricsPort, listen => { metricsEndpoint = listen; listen.Protocols = HttpProtocols.Http1; });
        });

        var metrics = new ServerMetrics(options.MaxBatch);
        var state = new ServingState();
        var health = new ServingHealth("", ServiceName);
        builder.Services.AddSingleton(metrics).AddSingleton(state).AddSingleton(health);
        if (apiKeys is not null) builder.Services.AddSingleton(apiKeys);
        builder.Services.AddGrpc(grpc =>
        {
            grpc.EnableDetailedErrors = false; // never send exception text to a client
            grpc.MaxReceiveMessageSize = WireMessages.TransportLimit(options.MaxMessageBytes);   // the service refuses what exceeds options.MaxMessageBytes
            grpc.MaxSendMessageSize = null;
            if (apiKeys is not null) grpc.Interceptors.Add<ApiKeyInterceptor>();
        });
        builder.Services.AddGrpcReflection();

        var app = builder.Build();
        int metricsPortBound = -1;
        app.Use(async (context, next) =>
        {
            if (context.Connection.LocalPort != Volatile.Read(ref metricsPortBound) || metricsEndpoint is null) { await next(context); return; }
            if (context.Request.Path != "/metrics" || !HttpMethods.IsGet(context.Request.Method)) { context.Response.StatusCode = 404; return; }
            context.Response.ContentType = "text/plain; version=0.0.4; charset=utf-8";
            await metrics.Registry.CollectAndExportAsTextAsync(context.Response.Body, context.RequestAborted);
        });
        app.MapGrpcService<PolicyGrpcService>();
        app.MapGrpcService<ServingHealth>();
        app.MapGrpcReflectionService();

        var server = new PolicyServer(app, state, health, metrics, options) { disposePolicy = disposePolicy };
        app.Lifetime.ApplicationStopping.Register(server.BeginStopping);
        await app.StartAsync(cancellationToken);

        var grpcPort = ((IPEndPoint)grpcEndpoint!.EndPoint).Port;
        server.GrpcAddress = new Uri($"{(certificate is null ? "http" : "https")}://{HostForUri(grpcIp, certificate)}:{grpcPort}");
        if (metricsEndpoint is not null)
        {
            var port = ((IPEndPoint)metricsEndpoint.EndPoint).Port;
            Volatile.Write(ref metricsPortBound, port);
            server.MetricsAddress = new Uri($"http://{HostForUri(metricsIp, null)}:{port}/metrics");
        }
        server.logger.LogInformation("listening on {GrpcAddress} (tls: {Tls}, mutual tls: {MutualTls}, api keys: {Auth}); metrics on {MetricsAddress}",
            server.GrpcAddress, certificate is not null, clientCa is not null, apiKeys is not null, server.MetricsAddress?.ToString() ?? "off");
        if (!IPAddress.IsLoopback(grpcIp) && (apiKeys is null || certificate is null))
            server.logger.LogWarning("listening beyond this machine on {Host} without {Missing}: anyone who can reach the port can {What}",
                options.Host, apiKeys is null && certificate is null ? "API keys or TLS" : apiKeys is null ? "API keys" : "TLS",
                apiKeys is null ? "use the robot policy" : "read the frames and actions on the wire");
        _ = Task.Run(() => server.LoadAndWarmUp(loadPolicy));
        return server;
    }

    void LoadAndWarmUp(Func<ServeOptions, CancellationToken, IActionPolicy> loadPolicy)
    {
        try
        {
            logger.LogInformation("loading the policy from {Checkpoint} (quantize {Quantize}, device {Device})", options.Checkpoint, options.Quantize, options.Device);
            var clock = Stopwatch.StartNew();
            policy = loadPolicy(options, state.Stopping.Token);
            var loadSeconds = clock.Elapsed.TotalSeconds;
            metrics.ModelLoad("load", loadSeconds);
            var mapping = new ContractMapping(policy.Description, options);

            clock.Restart();
            var sample = WarmUpObservation(policy.Description);
            policy.PredictBatch([sample], state.Stopping.Token);
            if (options.MaxBatch > 1) policy.PredictBatch([sample, sample], state.Stopping.Token); // the batched path too
            var warmSeconds = clock.Elapsed.TotalSeconds;
            metrics.ModelLoad("warmup", warmSeconds);

            var scheduler = new BatchScheduler(policy, options.MaxBatch, TimeSpan.FromMilliseconds(options.MaxQueueDelayMs), options.MaxQueue,
                metrics, logger);
            if (state.Stopping.IsCancellationRequested) { scheduler.Dispose(); throw new OperationCanceledException(); }
            state.Set(new ServingState.Loaded(mapping, scheduler));
            health.SetAll(HealthCheckResponse.Types.ServingStatus.Serving);
            metrics.Ready(true);
            logger.LogInformation("serving {ModelId} (version {ModelVersion}, {Architecture}, weights {Quantization}): loaded in {LoadSeconds:F2} s, warmed up in {WarmupSeconds:F2} s; max batch {MaxBatch}, max queue delay {MaxQueueDelayMs} ms",
                policy.Description.ModelId, mapping.ModelVersion, policy.Description.Architecture, policy.Description.Quantization == "none" ? "not quantized" : policy.Description.Quantization, loadSeconds, warmSeconds, options.MaxBatch, options.MaxQueueDelayMs);
            if (policy is VlaPolicy vla) logger.LogInformation("action decoding: {Decoding}", vla.Decoding);
            ready.TrySetResult();
        }
        catch (Exception e)
        {
            if (UserErrors.Is(e))
                logger.LogError("could not load the policy: {Reason}", e.Message.ReplaceLineEndings(" ")); // the user's input: one line
            else if (e is not OperationCanceledException)
                logger.LogError(e, "could not load the policy: {Reason}", e.Message.ReplaceLineEndings(" ")); // unexpected: keep the trace in the log
            ready.TrySetException(e);
        }
    }

    /// <summary>A mid-grey frame of the model's size with the first dataset's statistics: exercises every stage once.</summary>
    static VlaObservation WarmUpObservation(PolicyDescription description)
    {
        int side = Math.Max(1, description.ImageSize);
        var pixels = new byte[side * side * 3];
        Array.Fill(pixels, (byte)128);
        var images = Enumerable.Range(0, Math.Max(1, description.ImagesPerObservation)).Select(_ => new RgbImage(side, side, pixels)).ToArray();
        return new VlaObservation(images, "warm up", description.UnnormStats.Keys.Order(StringComparer.Ordinal).FirstOrDefault(),
            description.ProprioDim > 0 ? new float[description.ProprioDim] : null);
    }

    void BeginStopping()
    {
        if (state.Stopping.IsCancellationRequested) return;
        logger.LogInformation("stopping: refusing new calls, answering the ones in flight");
        health.SetAll(HealthCheckResponse.Types.ServingStatus.NotServing, isFinal: true);
        metrics.Ready(false);
        state.Stopping.Cancel();
    }

    /// <summary>Graceful stop: NOT_SERVING, drain in-flight calls (up to the shutdown timeout), stop the scheduler.</summary>
    public async Task StopAsync()
    {
        if (Interlocked.Exchange(ref stopped, 1) == 1) return;
        BeginStopping();
        await app.StopAsync();
        if (state.Current is { } loaded)
        {
            state.Set(null);
            loaded.Scheduler.Dispose();
        }
        if (disposePolicy) (policy as IDisposable)?.Dispose();
        logger.LogInformation("stopped");
    }

    /// <summary>Runs until the process is told to stop (Ctrl+C, SIGTERM) or <see cref="StopAsync"/> is called.</summary>
    public async Task WaitForShutdownAsync(CancellationToken cancellationToken = default)
    {
        var stopping = new TaskCompletionSource();
        using (app.Lifetime.ApplicationStopping.Register(() => stopping.TrySetResult()))
        using (cancellationToken.Register(() => stopping.TrySetResult()))
            await stopping.Task;
        await StopAsync();
    }

    public async ValueTask DisposeAsync()
    {
        await StopAsync();
        await app.DisposeAsync();
    }

    static void ConfigureTls(HttpsConnectionAdapterOptions https, X509Certificate2 certificate, X509Certificate2Collection? clientCa)
    {
        https.ServerCertificate = certificate;
        https.SslProtocols = System.Security.Authentication.SslProtocols.Tls12 | System.Security.Authentication.SslProtocols.Tls13;
        if (clientCa is null) return;
        https.ClientCertificateMode = ClientCertificateMode.RequireCertificate;
        https.ClientCertificateValidation = (client, _, _) =>
        {
            using var chain = new X509Chain();
            chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
            chain.ChainPolicy.CustomTrustStore.AddRange(clientCa);
            chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
            return chain.Build(client);
        };
    }

    static X509Certificate2 LoadServerCertificate(string certPath, string keyPath)
    {
        using var pem = X509Certificate2.CreateFromPemFile(certPath, keyPath);
        // Re-import so the private key is usable by SslStream on every platform (PEM keys are ephemeral).
        return X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
    }

    static IPAddress ParseHost(string host, string flag)
    {
        if (host == "localhost") return IPAddress.Loopback;
        if (IPAddress.TryParse(host, out var ip)) return ip;
        throw new ArgumentException($"{flag} must be an IP address such as 127.0.0.1 or 0.0.0.0, got '{host}'");
    }

    static string HostForUri(IPAddress ip, X509Certificate2? certificate)
    {
        var shown = ip.Equals(IPAddress.Any) ? IPAddress.Loopback : ip.Equals(IPAddress.IPv6Any) ? IPAddress.IPv6Loopback : ip;
        if (certificate is not null && IPAddress.IsLoopback(shown)) return "localhost"; // certificates name hosts, and tests issue them for localhost
        return shown.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 ? $"[{shown}]" : shown.ToString();
    }
}
