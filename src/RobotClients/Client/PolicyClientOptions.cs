using System.Security.Cryptography.X509Certificates;

namespace OpenVLA.RobotClients;

/// <summary>How to reach a policy server. Only <see cref="Address"/> is required.</summary>
public sealed record PolicyClientOptions
{
    /// <summary>"http://127.0.0.1:50051" (plain HTTP/2) or "https://host:50051" (TLS).</summary>
    public required Uri Address { get; init; }

    /// <summary>Sent as "authorization: Bearer KEY" on every call when the server was started with --api-key-file.</summary>
    public string? ApiKey { get; init; }

    /// <summary>Trust this certificate (a CA or the server's self-signed certificate) instead of the system store.</summary>
    public X509Certificate2? TrustedServerCertificate { get; init; }

    /// <summary>Presented to a server that requires mutual TLS (--tls-client-ca). Must hold its private key.</summary>
    public X509Certificate2? ClientCertificate { get; init; }

    /// <summary>Deadline of a unary call when the caller gives none. A robot should never wait forever for an action.</summary>
    public TimeSpan DefaultDeadline { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Reconnect policy: attempts and exponential backoff after UNAVAILABLE (server down or restarting).</summary>
    public int MaxAttempts { get; init; } = 5;
    public TimeSpan InitialBackoff { get; init; } = TimeSpan.FromMilliseconds(100);
    public TimeSpan MaxBackoff { get; init; } = TimeSpan.FromSeconds(2);

    /// <summary>Largest message the client sends or accepts, in bytes (the server has its own limit).</summary>
    public int MaxMessageBytes { get; init; } = 16 << 20;

    public static PolicyClientOptions For(string address) => new() { Address = new Uri(address) };
}
