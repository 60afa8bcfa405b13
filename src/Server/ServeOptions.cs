namespace OpenVLA.Server;

/// <summary>Everything `openvla serve` can be told; the defaults are the safe ones (loopback only, bounded everything).</summary>
public sealed record ServeOptions
{
    /// <summary>The checkpoint directory the policy factory loads, and how (see the policy core for the accepted values).</summary>
    public string Checkpoint { get; init; } = "";
    public string Quantize { get; init; } = "none";
    public string Device { get; init; } = "cpu";
    /// <summary>"f32" or "bf16"; null lets the policy core choose (f32, or bf16 when quantized).</summary>
    public string? DType { get; init; }
    public bool CenterCrop { get; init; }
    public int? Threads { get; init; }

    /// <summary>Address and port of the gRPC endpoint (HTTP/2 only). 127.0.0.1 unless the operator says otherwise; port 0 picks a free one.</summary>
    public string Host { get; init; } = "127.0.0.1";
    public int Port { get; init; } = 50051;

    /// <summary>Plain-HTTP Prometheus endpoint (/metrics) on its own port; null turns it off, 0 picks a free port.</summary>
    public string MetricsHost { get; init; } = "127.0.0.1";
    public int? MetricsPort { get; init; } = DefaultMetricsPort(50051);

    /// <summary>The metrics port when none is given: the next one after the gRPC port (ephemeral when that is).</summary>
    public static int DefaultMetricsPort(int port) => port == 0 ? 0 : port < 65535 ? port + 1 : port - 1;

    /// <summary>
    /// Dynamic batching: at most MaxBatch observations per forward pass, waiting at most MaxQueueDelay after the oldest
    /// arrived for more. The default 0 adds no latency to a lone robot; robots that arrive while the model is busy still
    /// share the next pass. A few ms helps fill batches on hardware where a batch costs little more than one (GPU).
    /// </summary>
    public int MaxBatch { get; init; } = 8;
    public double MaxQueueDelayMs { get; init; } = 0;
    /// <summary>Observations waiting at once across all robots; one more is refused with RESOURCE_EXHAUSTED.</summary>
    public int MaxQueue { get; init; } = 64;

    /// <summary>Input limits, checked before anything is allocated for the input.</summary>
    public int MaxMessageBytes { get; init; } = 8 << 20;
    public int MaxImageSide { get; init; } = 2048;
    /// <summary>Largest width x height of a frame, checked on the container's header before decoding (12 MB of RGB at the default).</summary>
    public long MaxImagePixels { get; init; } = 2048L * 2048;
    public int MaxInstructionBytes { get; init; } = 1024;
    public int MaxProprio { get; init; } = 64;

    /// <summary>A file of API keys, one per line ('#' starts a comment); when set every call needs "authorization: Bearer KEY".</summary>
    public string? ApiKeyFile { get; init; }

    /// <summary>PEM certificate and key for TLS; with TlsClientCa, clients must present a certificate issued by that CA.</summary>
    public string? TlsCert { get; init; }
    public string? TlsKey { get; init; }
    public string? TlsClientCa { get; init; }

    /// <summary>How long a stop waits for requests already received to be answered.</summary>
    public TimeSpan ShutdownTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Structured JSON log lines instead of plain text.</summary>
    public bool JsonLogs { get; init; }

    /// <summary>The first line of what is wrong with these options, or null when they can be served.</summary>
    public string? Problem()
    {
        if (Port is < 0 or > 65535) return $"--port must be 0..65535, got {Port}";
        if (MetricsPort is < 0 or > 65535) return $"--metrics-port must be 0..65535, got {MetricsPort}";
        if (MetricsPort is > 0 && MetricsPort == Port && MetricsHost == Host) return "--metrics-port must differ from --port";
        if (MaxBatch is < 1 or > 1024) return $"--max-batch must be 1..1024, got {MaxBatch}";
        if (MaxQueueDelayMs is < 0 or > 10_000 || double.IsNaN(MaxQueueDelayMs)) return $"--max-queue-delay-ms must be 0..10000, got {MaxQueueDelayMs}";
        if (MaxQueue < 1) return $"--max-queue must be at least 1, got {MaxQueue}";
        if (MaxMessageBytes is < 1024) return $"--max-message-bytes must be at least 1024, got {MaxMessageBytes}";
        if (MaxImageSide is < 1 or > 16384) return $"--max-image-side must be 1..16384, got {MaxImageSide}";
        if (MaxImagePixels is < 1 or > 1L << 28) return $"--max-image-pixels must be 1..{1L << 28}, got {MaxImagePixels}";
        if ((TlsCert is null) != (TlsKey is null)) return "--tls-cert and --tls-key go together";
        if (TlsClientCa is not null && TlsCert is null) return "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key";
        foreach (var (flag, path) in new[] { ("--api-key-file", ApiKeyFile), ("--tls-cert", TlsCert), ("--tls-key", TlsKey), ("--tls-client-ca", TlsClientCa) })
            if (path is not null && !File.Exists(path)) return $"{flag}: file not found: {path}";
        return null;
    }
}
