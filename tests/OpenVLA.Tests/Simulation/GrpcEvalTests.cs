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

    /// <summary>An OFT-shaped double: two cameras, an 8-D proprio, chunks of 4 whose step k moves k+1 mm along x.</summary>
    sealed class ChunkPolicy : IActionPolicy
    {
        public int Calls;
        public string? Problem;
        public PolicyDescription Description { get; } = new("test/chunks", "test-double", 7, 56, 2, "resize-naive", "float32", "none",
            new Dictionary<string, ActionStats> { ["sim_tabletop"] = new([-1, -1, -1, -1, -1, -1, 0], [1, 1, 1, 1, 1, 1, 1], [true, true, true, true, true, true, false]) })
        { ChunkLength = 4, ProprioDim = 8, CameraNames = ["primary", "wrist"], ActionHead = "parallel-l1" };

        public IReadOnlyList<ActionPrediction> PredictBatch(IReadOnlyList<VlaObservation> observations, CancellationToken cancellationToken = default)
        {
            Interlocked.Add(ref Calls, observations.Count);
            foreach (var o in observations)
                if (o.Images.Count != 2 || o.Proprio is not { Count: 8 }) Problem = $"{o.Images.Count} images, proprio {o.Proprio?.Count}";
            float[][] chunk = [.. Enumerable.Range(0, 4).Select(k => new float[] { 0.001f * (k + 1), 0, 0, 0, 0, 0, 1 })];
            return observations.Select(_ => new ActionPrediction(chunk, chunk, [], [], "sim_tabletop", new StageTimings(0, 0, 0, 0, 0))).ToList();
        }
    }

    [Fact]
    public async Task ChunksAreExecutedOpenLoopWithTheWristCameraAndProprioFromTheSimulation()
    {
        var policy = new ChunkPolicy();
        await using var server = await TestServer.StartAsync(policy);
        Interlocked.Exchange(ref policy.Calls, 0);
        using var outDir = new TestPaths.TempDir();
        var root = Eval($"{server.GrpcAddress.Host}:{server.GrpcAddress.Port}", outDir.Path, "--execute-steps", "3");
        Assert.Null(policy.Problem);
        var episodes = root.GetProperty("episodes").EnumerateArray().ToList();
        Assert.Equal(2, episodes.Count);
        int expectedCalls = episodes.Sum(e => (e.GetProperty("steps").GetInt32() + 2) / 3);   // a new chunk every 3 steps
        Assert.Equal(expectedCalls, episodes.Sum(e => e.GetProperty("policy_calls").GetInt32()));
        Assert.Equal(expectedCalls, policy.Calls);
        Assert.Contains("executed actions per call", File.ReadAllText(Path.Combine(outDir.Path, "summary.md")));

        // --execute-steps longer than the chunk is the user's error, reported once.
        var r = CliRunner.Run(["eval", "--policy", $"grpc://{server.GrpcAddress.Host}:{server.GrpcAddress.Port}", "--tasks", "move_side",
            "--trials-per-task", "1", "--image-size", "56", "--out", outDir.Path, "--execute-steps", "5"]);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("--execute-steps 5 is longer than the policy's chunk of 4", r.Stderr);
        // The same error raised in a worker process is still the user's: the worker passes the verdict on.
        var inWorkers = CliRunner.Run(["eval", "--policy", $"grpc://{server.GrpcAddress.Host}:{server.GrpcAddress.Port}", "--tasks", "move_side",
            "--trials-per-task", "2", "--image-size", "56", "--out", outDir.Path, "--execute-steps", "5", "--workers", "2"]);
        Assert.Equal(2, inWorkers.ExitCode);
        Assert.Contains("--execute-steps 5 is longer than the policy's chunk of 4", inWorkers.Stderr);
    }

    [Fact]
    public void AnOftCheckpointIsEvaluatedInProcessWithChunks()
    {
        using var ckpt = new TestPaths.TempDir();
        CheckpointMaker.Write(ckpt.Path, "oft-tiny", seed: 3, torch.ScalarType.BFloat16);
        using var outDir = new TestPaths.TempDir();
        var r = CliRunner.Run(["eval", "--policy", "checkpoint:" + ckpt.Path, "--tasks", "pick_up", "--trials-per-task", "1",
            "--unnorm-key", "sim_tabletop", "--out", outDir.Path, "--json"]);
        Assert.True(r.ExitCode == 0, r.Stderr);
        var episode = JsonDocument.Parse(r.Stdout).RootElement.GetProperty("episodes")[0];
        int steps = episode.GetProperty("steps").GetInt32();
        Assert.Equal((steps + 7) / 8, episode.GetProperty("policy_calls").GetInt32());   // the whole chunk of 8 by default
    }
}
