using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Grpc.Core;
using Grpc.Health.V1;
using Grpc.Net.Client;
using OpenVLA.RobotClients;
using OpenVLA.Server;

namespace OpenVLA.Tests.Server;

/// <summary>API keys on every call, TLS with a certificate made here, and mutual TLS.</summary>
public sealed class SecurityTests : IDisposable
{
    const string Key = "robot-7f3c9a1e4b2d8c60";
    readonly string dir = Directory.CreateTempSubdirectory("openvla-security-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    string KeyFile()
    {
        var path = Path.Combine(dir, "keys.txt");
        File.WriteAllText(path, $"# one key per robot\n{Key}\nanother-robot-key-000000\n");
        return path;
    }

    [Fact]
    public async Task Without_a_key_file_no_key_is_needed()
    {
        await using var server = await TestServer.StartAsync(new DeterministicPolicy());
        using var client = TestServer.Client(server);

        Assert.Equal(7, (await client.PredictAsync(TestServer.Raw(TestServer.Frame(1)))).Action.Values.Count);
    }

    [Fact]
    public async Task With_a_key_file_every_call_needs_a_listed_key()
    {
        await using var server = await TestServer.StartAsync(new DeterministicPolicy(), o => o with { ApiKeyFile = KeyFile() });
        using var anonymous = TestServer.Client(server);
        using var wrong = TestServer.Client(server, o => o with { ApiKey = "robot-00000000000000000" });
        using var right = TestServer.Client(server, o => o with { ApiKey = Key });
        using var channel = GrpcChannel.ForAddress(server.GrpcAddress);

        var noKey = await Assert.ThrowsAsync<RpcException>(() => anonymous.PredictAsync(TestServer.Raw(TestServer.Frame(1))));
        var badKey = await Assert.ThrowsAsync<RpcException>(() => wrong.GetPolicyInfoAsync());
        var health = await Assert.ThrowsAsync<RpcException>(async () => await new Health.HealthClient(channel).CheckAsync(new HealthCheckRequest()));
        using var stream = anonymous.Raw.StreamActions();
        var streamError = await Assert.ThrowsAsync<RpcException>(() => stream.ResponseStream.MoveNext());

        Assert.Equal(StatusCode.Unauthenticated, noKey.StatusCode);
        Assert.Equal(StatusCode.Unauthenticated, badKey.StatusCode);
        Assert.Equal(StatusCode.Unauthenticated, health.StatusCode);
        Assert.Equal(StatusCode.Unauthenticated, streamError.StatusCode);
        Assert.Equal(7, (await right.PredictAsync(TestServer.Raw(TestServer.Frame(1)))).Action.Values.Count);
        Assert.Equal("openvla.v1", (await right.GetPolicyInfoAsync()).ApiVersion);
    }

    [Fact]
    public async Task Tls_with_a_self_signed_certificate_serves_clients_that_trust_it()
    {
        using var serverCert = SelfSigned("localhost");
        var (certPath, keyPath) = WritePem(serverCert, "server");
        await using var server = await TestServer.StartAsync(new DeterministicPolicy(), o => o with { TlsCert = certPath, TlsKey = keyPath });
        using var trusting = TestServer.Client(server, o => o with { TrustedServerCertificate = X509CertificateLoader.LoadCertificate(serverCert.RawData) });
        using var untrusting = TestServer.Client(server);
        using var plain = new PolicyClient(new PolicyClientOptions { Address = new Uri($"http://127.0.0.1:{server.GrpcAddress.Port}"), MaxAttempts = 2 });

        Assert.Equal("https", server.GrpcAddress.Scheme);
        Assert.Equal(7, (await trusting.PredictAsync(TestServer.Raw(TestServer.Frame(1)))).Action.Values.Count);
        var refused = await Assert.ThrowsAsync<RpcException>(() => untrusting.GetPolicyInfoAsync());
        Assert.True(refused.StatusCode is StatusCode.Unavailable or StatusCode.Internal, refused.Status.ToString()); // TLS handshake refused
        Assert.NotEqual(StatusCode.OK, (await Assert.ThrowsAsync<RpcException>(() => plain.GetPolicyInfoAsync(TimeSpan.FromSeconds(3)))).StatusCode);
    }

    [Fact]
    public async Task Mutual_tls_accepts_only_clients_with_a_certificate_from_the_given_ca()
    {
        using var ca = SelfSigned("OpenVLA test robot CA", isCa: true);
        using var robotCert = IssuedBy(ca, "robot-1");
        using var strangerCert = SelfSigned("stranger");
        using var serverCert = SelfSigned("localhost");
        var (certPath, keyPath) = WritePem(serverCert, "server");
        var (caPath, _) = WritePem(ca, "ca");
        await using var server = await TestServer.StartAsync(new DeterministicPolicy(),
            o => o with { TlsCert = certPath, TlsKey = keyPath, TlsClientCa = caPath });
        var trust = X509CertificateLoader.LoadCertificate(serverCert.RawData);
        using var robot = TestServer.Client(server, o => o with { TrustedServerCertificate = trust, ClientCertificate = robotCert });
        using var stranger = TestServer.Client(server, o => o with { TrustedServerCertificate = trust, ClientCertificate = strangerCert });
        using var noCertificate = TestServer.Client(server, o => o with { TrustedServerCertificate = trust });

        Assert.Equal(7, (await robot.PredictAsync(TestServer.Raw(TestServer.Frame(1)))).Action.Values.Count);
        await Assert.ThrowsAsync<RpcException>(() => stranger.GetPolicyInfoAsync(TimeSpan.FromSeconds(3)));
        await Assert.ThrowsAsync<RpcException>(() => noCertificate.GetPolicyInfoAsync(TimeSpan.FromSeconds(3)));
    }

    static X509Certificate2 SelfSigned(string name, bool isCa = false)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = Request(name, key, isCa);
        return request.CreateSelfSigned(DateTimeOffset.UtcNow.AddMinutes(-5), DateTimeOffset.UtcNow.AddHours(1));
    }

    static X509Certificate2 IssuedBy(X509Certificate2 ca, string name)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = Request(name, key, isCa: false);
        using var issued = request.Create(ca, DateTimeOffset.UtcNow.AddMinutes(-5), ca.NotAfter.AddMinutes(-1), RandomNumberGenerator.GetBytes(8)); // within the CA's validity
        return issued.CopyWithPrivateKey(key);
    }

    static CertificateRequest Request(string name, ECDsa key, bool isCa)
    {
        var request = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(isCa, false, 0, true));
        if (isCa) request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.DigitalSignature, true));
        else
        {
            var san = new SubjectAlternativeNameBuilder();
            san.AddDnsName(name);
            request.CertificateExtensions.Add(san.Build());
            request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension(
                [new Oid("1.3.6.1.5.5.7.3.1"), new Oid("1.3.6.1.5.5.7.3.2")], false)); // server and client auth
        }
        return request;
    }

    (string Cert, string Key) WritePem(X509Certificate2 certificate, string name)
    {
        var certPath = Path.Combine(dir, $"{name}.crt");
        var keyPath = Path.Combine(dir, $"{name}.key");
        File.WriteAllText(certPath, certificate.ExportCertificatePem());
        File.WriteAllText(keyPath, certificate.GetECDsaPrivateKey()!.ExportPkcs8PrivateKeyPem());
        return (certPath, keyPath);
    }
}
