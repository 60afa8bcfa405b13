using System.Diagnostics;
using Grpc.Core;
using OpenVLA.Contract.V1;
using OpenVLA.Policy;
using OpenVLA.RobotClients;
using OpenVLA.Tests.Policy;

namespace OpenVLA.Tests.Server;

/// <summary>
/// An OpenVLA-OFT policy (the FiLM checkpoint of tests/fixtures/oft-golden: two cameras, proprio, chunks of 4) behind the
/// real server: C# and Python robots get the chunk the independent implementation computes, alone, batched and over a
/// stream; the contract describes the chunk, the cameras and the proprio.
/// </summary>
public sealed class OftServerTests : IAsyncLifetime
{
    OpenVLA.Server.PolicyServer server = null!;
    static readonly string Fixture = TestPaths.Fixture("oft-golden");

    public async Task InitializeAsync() =>
        server = await TestServer.StartAsync(VlaPolicy.Load(Path.Combine(Fixture, "checkpoint-film")), o => o with { MaxBatch = 4, MaxQueueDelayMs = 20 });

    public async Task DisposeAsync() => await server.DisposeAsync();

    static Observation Request(OftGoldenTests.Case c) => Observations.FromEncoded(
        c.Images.Select((name, i) => (File.ReadAllBytes(Path.Combine(Fixture, name)), ImageEncoding.Png, i == 0 ? "primary" : "wrist")).ToList(),
        c.Instruction, c.UnnormKey, c.Proprio);

    static void AssertChunk(OftGoldenTests.Case c, Contract.V1.Action action)
    {
        var expected = c.Expected["checkpoint-film"].Actions;
        Assert.Equal(4, action.Chunk.Count);
        for (int k = 0; k < 4; k++)
            for (int d = 0; d < 7; d++) Assert.Equal(expected[k][d], action.Chunk[k].Values[d], 1e-4);
        Assert.Equal(action.Chunk[0].Values, action.Values);   // what a client written before chunks reads
        Assert.Empty(action.TokenIds);
    }

    [Fact]
    public async Task Robots_get_the_reference_chunk_alone_batched_and_streamed()
    {
        var cases = OftGoldenTests.Cases();
        using var client = TestServer.Client(server);
        var info = await client.GetPolicyInfoAsync();
        Assert.Equal(4u, info.ChunkLength);
        Assert.Equal(7u, info.ActionDim);
        Assert.Equal(5u, info.ProprioDim);
        Assert.Equal(2u, info.ImagesPerObservation);
        Assert.Equal(["primary", "wrist"], info.CameraNames);
        Assert.Equal("parallel-l1", info.ActionHead);

        foreach (var c in cases) AssertChunk(c, (await client.PredictAsync(Request(c))).Action);
        var together = await Task.WhenAll(cases.Select(async c =>
        {
            using var robot = TestServer.Client(server);
            return (Case: c, Reply: await robot.PredictAsync(Request(c)));
        }));
        foreach (var (c, reply) in together) AssertChunk(c, reply.Action);

        using var call = client.Raw.StreamActions(deadline: DateTime.UtcNow.AddSeconds(30));
        ulong seq = 0;
        foreach (var c in cases)
        {
            var observation = Request(c);
            observation.Seq = ++seq;
            await call.RequestStream.WriteAsync(new StreamActionsRequest { Observation = observation });
            Assert.True(await call.ResponseStream.MoveNext());
            AssertChunk(c, call.ResponseStream.Current.Action);
        }
        await call.RequestStream.CompleteAsync();
    }

    [Fact]
    public async Task A_missing_or_short_proprio_and_a_missing_camera_are_invalid_argument()
    {
        var c = OftGoldenTests.Cases()[0];
        using var client = TestServer.Client(server);
        async Task<RpcException> Refused(Observation o) => await Assert.ThrowsAsync<RpcException>(() => client.PredictAsync(o));

        var noProprio = Request(c);
        noProprio.Proprio.Clear();
        var e = await Refused(noProprio);
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Equal("proprio is missing: the model takes 5 values", e.Status.Detail);

        var shortProprio = Request(c);
        shortProprio.Proprio.RemoveAt(0);
        Assert.Equal("proprio has 4 values, the model takes 5", (await Refused(shortProprio)).Status.Detail);

        var oneCamera = Request(c);
        oneCamera.Images.RemoveAt(1);
        Assert.Equal("expected 2 images per observation (primary, wrist), got 1", (await Refused(oneCamera)).Status.Detail);

        AssertChunk(c, (await client.PredictAsync(Request(c))).Action);   // and the server still answers
    }

    [Fact]
    public void RemotePolicy_returns_the_chunk_and_describes_it()
    {
        var cases = OftGoldenTests.Cases();
        using var remote = new RemotePolicy(TestServer.Client(server), ownsClient: true);
        Assert.Equal(4, remote.Description.ChunkLength);
        Assert.Equal(5, remote.Description.ProprioDim);
        var observations = cases.Select(c => new VlaObservation(
            c.Images.Select(i => GoldenModelTests.ReadPng(Path.Combine(Fixture, i))).ToArray(), c.Instruction, c.UnnormKey, c.Proprio)).ToList();
        var predictions = remote.PredictBatch(observations);
        for (int i = 0; i < cases.Count; i++)
        {
            var expected = cases[i].Expected["checkpoint-film"].Actions;
            Assert.Equal(4, predictions[i].ChunkLength);
            for (int k = 0; k < 4; k++)
                for (int d = 0; d < 7; d++) Assert.Equal(expected[k][d], predictions[i].Actions[k][d], 1e-4);
        }
    }

    [Fact]
    public async Task The_python_client_executes_the_servers_chunks()
    {
        var python = new ProcessStartInfo("/usr/bin/python3")
        {
            WorkingDirectory = Path.Combine(TestPaths.RepoRoot, "src", "RobotClients", "python"), RedirectStandardOutput = true, RedirectStandardError = true,
        };
        foreach (var a in new[] { "-m", "unittest", "-v", "test_chunks" }) python.ArgumentList.Add(a);
        python.Environment["PYTHONPATH"] = python.WorkingDirectory;
        python.Environment["OPENVLA_SERVER"] = $"127.0.0.1:{server.GrpcAddress.Port}";
        python.Environment["OPENVLA_OFT_FIXTURE"] = Fixture;
        using var process = Process.Start(python)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        await process.WaitForExitAsync(timeout.Token);
        var output = await stdout + await stderr;
        Assert.True(process.ExitCode == 0, $"python chunk tests failed (exit {process.ExitCode}):\n{output}");
        Assert.Contains("Ran 4 tests", output);
    }
}
