using System.Text.Json;

namespace OpenVLA.Tests.Policy;

/// <summary>`predict` on OpenVLA-OFT checkpoints: the chunk contract, and one line with exit code 2 for every bad input.</summary>
public class OftPredictCommandTests
{
    static readonly string Ckpt = TestPaths.Fixture("oft-golden", "checkpoint");
    static readonly string Wrist = TestPaths.Fixture("oft-golden", "image1.png");
    static readonly string Full = TestPaths.Fixture("oft-golden", "image0.png");

    static string[] Args(params string[] extra) =>
        ["predict", "--checkpoint", Ckpt, "--image", Full, "--image", Wrist, "--instruction", "Pick up the red cube", "--unnorm-key", "sim_alpha", .. extra];

    [Fact]
    public void JsonCarriesTheWholeChunkAndMatchesTheReference()
    {
        var c = OftGoldenTests.Cases()[0];
        var r = CliRunner.Run(Args("--proprio", string.Join(",", c.Proprio.Select(v => v.ToString("R", System.Globalization.CultureInfo.InvariantCulture))), "--json"));
        Assert.True(r.ExitCode == 0, r.Stderr);
        using var doc = JsonDocument.Parse(r.Stdout);
        var o = doc.RootElement;
        Assert.Equal(["actions", "normalized_actions", "action", "prompt_token_ids", "unnorm_key", "timings_ms"], o.EnumerateObject().Select(p => p.Name));
        var actions = o.GetProperty("actions").EnumerateArray().Select(a => a.EnumerateArray().Select(v => v.GetDouble()).ToArray()).ToArray();
        Assert.Equal(4, actions.Length);
        var expected = c.Expected["checkpoint"].Actions;
        for (int k = 0; k < 4; k++)
            for (int d = 0; d < 7; d++) Assert.Equal(expected[k][d], actions[k][d], 1e-4);
        Assert.Equal(actions[0], o.GetProperty("action").EnumerateArray().Select(v => v.GetDouble()));
    }

    [Theory]
    [InlineData(new[] { "--proprio", "1,2,3" }, "the model takes a proprio of 5 values, got 3")]
    [InlineData(new[] { "--proprio", "1,2,nan,4,5" }, "--proprio: 'nan' (item 3) is not a finite number")]
    [InlineData(new[] { "--proprio", "1,,3,4,5" }, "--proprio: '' (item 2) is not a finite number")]
    [InlineData(new string[0], "the model takes the robot's proprioceptive state (5 values); none was given")]
    [InlineData(new[] { "--proprio", "1,2,3,4,5", "--num-images", "3" }, "the model takes 3 images per observation (primary, left_wrist, right_wrist), got 2")]
    [InlineData(new[] { "--proprio", "1,2,3,4,5", "--action-chunk", "0" }, "--action-chunk must be positive")]
    public void BadInputExitsWithCode2AndOneLine(string[] extra, string expected)
    {
        var r = CliRunner.Run(Args(extra));
        CliRunner.AssertUserError(r, expected);
    }

    [Fact]
    public void AHostileComponentFileIsRefusedWithOneLine()
    {
        using var tmp = new TestPaths.TempDir();
        foreach (var f in Directory.GetFiles(Ckpt)) File.Copy(f, tmp[Path.GetFileName(f)]);
        File.Copy(TestPaths.Fixture("torch-pt", "hostile_global.pt"), tmp["action_head--100_checkpoint.pt"], overwrite: true);
        var r = CliRunner.Run(["predict", "--checkpoint", tmp.Path, "--image", Full, "--image", Wrist, "--proprio", "1,2,3,4,5", "--instruction", "go", "--unnorm-key", "sim_alpha"]);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("action_head--100_checkpoint.pt: refusing the pickle global 'posix.system'", r.Stderr);
        Assert.Single(r.Stderr.Trim().Split('\n'));
    }

    [Fact]
    public void AnOftDirectoryIsNeverRunAsPlainOpenVla()
    {
        using var tmp = new TestPaths.TempDir();
        foreach (var f in Directory.GetFiles(Ckpt).Where(f => !f.EndsWith(".pt"))) File.Copy(f, tmp[Path.GetFileName(f)]);
        // config.json still declares the "oft" block, but the head file is gone.
        var r = CliRunner.Run(["predict", "--checkpoint", tmp.Path, "--image", Full, "--instruction", "go", "--unnorm-key", "sim_alpha"]);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("config.json has an \"oft\" block but there is no action_head--<step>_checkpoint.pt", r.Stderr);
        // Two head files: the reference refuses too.
        foreach (var f in Directory.GetFiles(Ckpt).Where(f => f.EndsWith(".pt"))) File.Copy(f, tmp[Path.GetFileName(f)]);
        File.Copy(tmp["action_head--100_checkpoint.pt"], tmp["action_head--200_checkpoint.pt"]);
        r = CliRunner.Run(["predict", "--checkpoint", tmp.Path, "--image", Full, "--image", Wrist, "--proprio", "1,2,3,4,5", "--instruction", "go", "--unnorm-key", "sim_alpha"]);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("2 action_head checkpoints", r.Stderr);
    }

    [Fact]
    public void OftFlagsOnAPlainCheckpointAreAnError()
    {
        var r = CliRunner.Run(["predict", "--checkpoint", TestPaths.Fixture("openvla-golden", "checkpoint"), "--image", Full, "--instruction", "go",
            "--unnorm-key", "sim_alpha", "--action-chunk", "8"]);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("--action-chunk and --num-images apply to OpenVLA-OFT checkpoints", r.Stderr);
        Assert.Single(r.Stderr.Trim().Split('\n'));
    }
}
