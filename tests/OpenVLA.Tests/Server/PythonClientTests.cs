using System.Diagnostics;

namespace OpenVLA.Tests.Server;

/// <summary>
/// The Python client (src/RobotClients/python) against a real server, run with Debian's /usr/bin/python3 and its
/// python3-grpcio/python3-protobuf (installed by ./openvla from APT_PACKAGES), so `./openvla test` covers it.
/// </summary>
public sealed class PythonClientTests
{
    const string Python = "/usr/bin/python3";
    static readonly string PythonDir = Path.Combine(RepoRoot(), "src", "RobotClients", "python");

    [Fact]
    public async Task The_python_client_tests_pass_against_a_real_server()
    {
        const string key = "python-robot-key-0123456789";
        var keyFile = Path.GetTempFileName();
        await File.WriteAllTextAsync(keyFile, key + "\n");
        try
        {
            await using var server = await TestServer.StartAsync(new DeterministicPolicy(), o => o with { ApiKeyFile = keyFile });
            var (code, output) = await RunAsync(Python, ["-m", "unittest", "-v", "test_client"], new()
            {
                ["PYTHONPATH"] = PythonDir,
                ["OPENVLA_SERVER"] = $"127.0.0.1:{server.GrpcAddress.Port}",
                ["OPENVLA_API_KEY"] = key,
            });

            Assert.True(code == 0, $"python tests failed (exit {code}):\n{output}");
            Assert.Contains("Ran 6 tests", output);
        }
        finally { File.Delete(keyFile); }
    }

    [Fact]
    public async Task The_committed_python_stubs_match_the_proto()
    {
        var fresh = Directory.CreateTempSubdirectory("openvla-stubs-").FullName;
        try
        {
            var (code, output) = await RunAsync("bash", [Path.Combine(PythonDir, "generate_stubs.sh"), fresh], new());
            Assert.True(code == 0, output);
            foreach (var name in new[] { "policy_pb2.py", "policy_pb2_grpc.py" })
                Assert.True(
                    File.ReadAllText(Path.Combine(fresh, "openvla", "v1", name)) == File.ReadAllText(Path.Combine(PythonDir, "openvla", "v1", name)),
                    $"{name} is stale: run src/RobotClients/python/generate_stubs.sh and commit the result");
        }
        finally { Directory.Delete(fresh, recursive: true); }
    }

    static async Task<(int Code, string Output)> RunAsync(string file, string[] args, Dictionary<string, string> environment)
    {
        var start = new ProcessStartInfo(file) { WorkingDirectory = PythonDir, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) start.ArgumentList.Add(a);
        foreach (var (k, v) in environment) start.Environment[k] = v;
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        try { await process.WaitForExitAsync(timeout.Token); }
        catch (OperationCanceledException) { process.Kill(entireProcessTree: true); throw new TimeoutException($"{file} ran past 120 s"); }
        return (process.ExitCode, await stdout + await stderr);
    }

    static string RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "proto", "openvla", "v1", "policy.proto"))) return dir.FullName;
        throw new DirectoryNotFoundException("repository root (with proto/openvla/v1/policy.proto) not found above the test assembly");
    }
}
