using System.Text.Json;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Tests.Server;
using TorchSharp;

namespace OpenVLA.Tests.Simulation;

/// <summary>The evaluator as a robot: eval --policy grpc://… streams rendered frames to a running server.</summary>
public class GrpcEvalTests
{
    /// <summary>Holds the arm still and the gripper open: no task can succeed, so the expected rate is exactly 0.</summary>
    sealed class StillPolicy : IActionPolicy
    {
        public int Calls;
        public PolicyDescription Description { get; } = new("test/still", "test-double", 7, 224, 1, "resize-naive", "float32", "none",
            new Dictionary<string, ActionStats> { ["sim_tabletop"] = new([-1, -1, -1, -1, -1, -1, 0], [1, 1, 1, 1, 1, 1, 1], [true, true, true, true, true, true, false]) });

        public IReadOnlyList<ActionPrediction> PredictBatch(IReadOnlyList<VlaObservation> observations, CancellationToken cancellationToken = default)
        {
            Interlocked.Add(ref Calls, observations.Count);
            return observations.Select(_ => ActionPrediction.Single([0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1], new int[7], [], "sim_tabletop",
                new StageTimings(0, 0, 0, 0, 0))).ToList();
        }
    }

    static JsonElement Eval(string address, string outDir, params string[] extra)
    {
        var r = CliRunner.Run(["eval", "--suite", "tabletop", "--policy", "grpc://" + address, "--tasks", "move_side",
            "--trials-per-task", "2", "--image-size", "56", "--out", outDir, "--json", .. extra]);
        Assert.True(r.ExitCode == 0, r.Stderr);
        return JsonDocument.Parse(r.Stdout).RootElement.Clone();
    }

    [Fact]
    public async Task StillPolicyServedOverGrpcScoresZeroOnEveryEpisode()
    {
        var policy = new StillPolicy();
        await using var server = await TestServer.StartAsync(policy);
        Interlocked.Exchange(ref policy.Calls, 0); // not the server's warm-up passes
        using var outDir = new TestPaths.TempDir();
        var root = Eval($"{server.GrpcAddress.Host}:{server.GrpcAddress.Port}", outDir.Path, "--unnorm-key", "sim_tabletop");
        Assert.Equal(0, root.GetProperty("overall").GetProperty("successes").GetInt32());
        Assert.Equal(2, root.GetProperty("overall").GetProperty("trials").GetInt32());
        // Every control step after the settling steps was one observation answered by the server.
        long steps = root.GetProperty("policy_latency").GetProperty("steps").GetInt64();
        Assert.True(steps > 0);
        Assert.Equal(steps, policy.Calls);
    }

    [Fact]
    public async Task RandomWeightModelIsEvaluatedEndToEndThroughTheServer()
    {
        using var ckpt = new TestPaths.TempDir();
        CheckpointMaker.Write(ckpt.Path, "tiny", seed: 3, torch.ScalarType.BFloat16);
        using var policy = VlaPolicy.Load(ckpt.Path);
        await using var server = await TestServer.StartAsync(policy);
        using var outDir = new TestPaths.TempDir();
        var root = Eval($"{server.GrpcAddress.Host}:{server.GrpcAddress.Port}", outDir.Path, "--unnorm-key", "sim_tabletop");
        Assert.Equal(2, root.GetProperty("overall").GetProperty("trials").GetInt32());
        Assert.True(root.GetProperty("policy_latency").GetProperty("steps").GetInt64() > 0);
    }
}
