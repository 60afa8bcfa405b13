using System.Text.Json;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;

namespace OpenVLA.Tests.Policy;

public class PredictCommandTests : IClassFixture<PredictCommandTests.TinyCheckpoint>
{
    public sealed class TinyCheckpoint : IDisposable
    {
        public TestPaths.TempDir Dir { get; } = new();
        public TinyCheckpoint() => CheckpointMaker.Write(Dir.Path, "tiny", seed: 2, torch.ScalarType.BFloat16);
        public void Dispose() => Dir.Dispose();
    }

    readonly string _ckpt;
    static readonly string Image = TestPaths.Fixture("openvla-golden", "image0.png");

    public PredictCommandTests(TinyCheckpoint tiny) => _ckpt = tiny.Dir.Path;

    [Fact]
    public void JsonOutputFollowsTheContract()
    {
        var r = CliRunner.Run("predict", "--checkpoint", _ckpt, "--image", Image, "--instruction", "Pick up the red cube",
            "--unnorm-key", "sim_tabletop", "--json");
        Assert.True(r.ExitCode == 0, r.Stderr);
        using var doc = JsonDocument.Parse(r.Stdout);
        var o = doc.RootElement;
        Assert.Equal(["actions", "normalized_actions", "action", "normalized_action", "action_token_ids", "prompt_token_ids", "unnorm_key", "timings_ms"],
            o.EnumerateObject().Select(p => p.Name));
        // Plain OpenVLA is a chunk of one: the chunk's only row is the action.
        Assert.Equal(1, o.GetProperty("actions").GetArrayLength());
        Assert.Equal(o.GetProperty("action").EnumerateArray().Select(v => v.GetDouble()), o.GetProperty("actions")[0].EnumerateArray().Select(v => v.GetDouble()));
        Assert.Equal(o.GetProperty("normalized_action").EnumerateArray().Select(v => v.GetDouble()), o.GetProperty("normalized_actions")[0].EnumerateArray().Select(v => v.GetDouble()));
        Assert.Equal(7, o.GetProperty("action").GetArrayLength());
        Assert.Equal(7, o.GetProperty("normalized_action").GetArrayLength());
        Assert.Equal(7, o.GetProperty("action_token_ids").GetArrayLength());
        Assert.Equal(1, o.GetProperty("prompt_token_ids")[0].GetInt32());
        Assert.Equal("sim_tabletop", o.GetProperty("unnorm_key").GetString());
        Assert.Equal(["preprocess", "vision", "prefill", "decode", "total"], o.GetProperty("timings_ms").EnumerateObject().Select(p => p.Name));
        // The gripper (mask false) is the normalized value itself.
        Assert.Equal(o.GetProperty("normalized_action")[6].GetDouble(), o.GetProperty("action")[6].GetDouble(), 6);
    }

    [Theory]
    [InlineData("--unnorm-key", "nope", "unknown unnorm_key 'nope'; valid keys: bridge_orig, sim_tabletop")]
    [InlineData("--dtype", "f8", "unknown dtype 'f8' (valid: f32, bf16)")]
    [InlineData(null, null, "choose one with unnorm_key: bridge_orig, sim_tabletop")]
    public void InputErrorsExitWithCode2AndOneLine(string? option, string? value, string expected)
    {
        var args = new List<string> { "predict", "--checkpoint", _ckpt, "--image", Image, "--instruction", "go" };
        if (option != null) { args.Add(option); args.Add(value!); }
        var r = CliRunner.Run([.. args]);
        CliRunner.AssertUserError(r, expected);
    }

    [Fact]
    public void UnreadableImageAndMissingCheckpointExitWithCode2()
    {
        using var tmp = new TestPaths.TempDir();
        File.WriteAllText(tmp["frame.png"], "not an image");
        var r = CliRunner.Run("predict", "--checkpoint", _ckpt, "--image", tmp["frame.png"], "--instruction", "go", "--unnorm-key", "sim_tabletop");
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("frame.png", r.Stderr);

        r = CliRunner.Run("predict", "--checkpoint", tmp["nothing-here"], "--image", Image, "--instruction", "go");
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("does not exist", r.Stderr);
    }
}
