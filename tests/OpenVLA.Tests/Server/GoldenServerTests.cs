using Grpc.Core;
using OpenVLA.Contract.V1;
using OpenVLA.Policy;
using OpenVLA.RobotClients;
using OpenVLA.Tests.Policy;

namespace OpenVLA.Tests.Server;

/// <summary>
/// The real policy (VlaPolicy on the golden fixture checkpoint) behind the real server: a robot sending the fixture PNGs
/// over gRPC gets the reference tokens and actions, alone, batched with other robots, and over a stream.
/// </summary>
public sealed class GoldenServerTests : IAsyncLifetime
{
    OpenVLA.Server.PolicyServer server = null!;

    public async Task InitializeAsync() =>
        server = await TestServer.StartAsync(VlaPolicy.Load(TestPaths.Fixture("openvla-golden", "checkpoint")), o => o with { MaxBatch = 4, MaxQueueDelayMs = 20 });

    public async Task DisposeAsync() => await server.DisposeAsync();

    static Observation Request(GoldenModelTests.Case c) =>
        Observations.FromEncoded(File.ReadAllBytes(TestPaths.Fixture("openvla-golden", c.Image)), c.Instruction, ImageEncoding.Png, c.UnnormKey);

    static void AssertMatches(GoldenModelTests.Case c, Contract.V1.Action action)
    {
        Assert.Equal(c.ActionTokenIds, action.TokenIds);
        for (int i = 0; i < 7; i++) Assert.Equal(c.Action[i], action.Values[i], 1e-5);
        Assert.Equal(c.UnnormKey, action.UnnormKey);
    }

    [Fact]
    public async Task Each_robot_gets_the_reference_action_alone_and_when_batched_with_others()
    {
        var cases = GoldenModelTests.Cases();
        using var client = TestServer.Client(server);

        foreach (var c in cases) AssertMatches(c, (await client.PredictAsync(Request(c))).Action);
        var together = await Task.WhenAll(cases.Select(async c =>
        {
            using var robot = TestServer.Client(server);
            return (Case: c, Reply: await robot.PredictAsync(Request(c)));
        }));

        foreach (var (c, reply) in together) AssertMatches(c, reply.Action);
        Assert.Contains(together, t => t.Reply.Timings.BatchSize > 1); // the three robots shared a forward pass
        var info = await client.GetPolicyInfoAsync();
        Assert.Equal(["sim_alpha", "sim_beta"], info.UnnormKeys.Select(k => k.Name));
        Assert.Equal(56u, info.ImageSize);
    }

    [Fact]
    public void RemotePolicy_gives_the_reference_actions_and_the_statistics_through_the_server()
    {
        var cases = GoldenModelTests.Cases();
        using var remote = new RemotePolicy(TestServer.Client(server), ownsClient: true);
        var observations = cases.Select(c => new VlaObservation([GoldenModelTests.ReadPng(TestPaths.Fixture("openvla-golden", c.Image))], c.Instruction, c.UnnormKey)).ToList();
        using var local = VlaPolicy.Load(TestPaths.Fixture("openvla-golden", "checkpoint"));

        var predictions = remote.PredictBatch(observations);

        for (int i = 0; i < cases.Count; i++)
        {
            Assert.Equal(cases[i].ActionTokenIds, predictions[i].ActionTokenIds);
            for (int d = 0; d < 7; d++) Assert.Equal(cases[i].Action[d], predictions[i].Action[d], 1e-5);
        }
        Assert.Equal(local.Description.UnnormStats.Keys.Order(), remote.Description.UnnormStats.Keys.Order());
        foreach (var (key, stats) in local.Description.UnnormStats)
        {
            Assert.Equal(stats.Q01, remote.Description.UnnormStats[key].Q01);
            Assert.Equal(stats.Q99, remote.Description.UnnormStats[key].Q99);
            Assert.Equal(stats.Mask, remote.Description.UnnormStats[key].Mask);
        }
        var bad = new VlaObservation([observations[0].Images[0]], "pick", "no_such_key");
        Assert.Contains("unknown unnorm_key 'no_such_key'", Assert.Throws<PolicyInputException>(() => remote.PredictBatch([bad])).Message);
    }

    [Fact]
    public async Task A_stream_gets_the_reference_actions_and_a_bad_key_is_refused()
    {
        var cases = GoldenModelTests.Cases();
        using var client = TestServer.Client(server);
        using var call = client.Raw.StreamActions(deadline: DateTime.UtcNow.AddSeconds(30));
        ulong seq = 0;
        foreach (var c in cases)
        {
            var observation = Request(c);
            observation.Seq = ++seq;
            await call.RequestStream.WriteAsync(new StreamActionsRequest { Observation = observation });
            Assert.True(await call.ResponseStream.MoveNext());
            Assert.Equal(seq, call.ResponseStream.Current.Seq);
            AssertMatches(c, call.ResponseStream.Current.Action);
        }
        await call.RequestStream.CompleteAsync();

        var wrongKey = Request(cases[0]);
        wrongKey.UnnormKey = "bridge_orig";
        var error = await Assert.ThrowsAsync<RpcException>(() => client.PredictAsync(wrongKey));
        Assert.Equal(StatusCode.InvalidArgument, error.StatusCode);
        Assert.Equal("unknown unnorm_key 'bridge_orig' (known: sim_alpha, sim_beta)", error.Status.Detail);
    }
}
