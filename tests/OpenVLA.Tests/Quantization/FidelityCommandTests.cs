using System.Text.Json.Nodes;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;

namespace OpenVLA.Tests.Quantization;

/// <summary>`openvla fidelity`: quantized variants against bf16 on the same observations, decoded greedily.</summary>
public sealed class FidelityCommandTests
{
    [Fact]
    public void Compares_the_variants_with_bf16_and_can_leave_the_vision_towers_float()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["ckpt"], "tiny", seed: 3, torch.ScalarType.Float32);
        // A checkpoint that samples; fidelity decodes greedily regardless, so bf16 against itself agrees exactly.
        File.WriteAllText(Path.Combine(tmp["ckpt"], "generation_config.json"), """{"do_sample": true, "temperature": 1.5}""");
        Directory.CreateDirectory(tmp["frames"]);
        for (int i = 0; i < 3; i++)
            OpenCvSharp.Cv2.ImWrite(Path.Combine(tmp["frames"], $"f{i}.png"),
                new OpenCvSharp.Mat(40, 40, OpenCvSharp.MatType.CV_8UC3, new OpenCvSharp.Scalar(30 + 60 * i, 120, 200 - 50 * i)));

        var full = CliRunner.Run("fidelity", "--checkpoint", tmp["ckpt"], "--images", tmp["frames"], "--instruction", "pick up the cup", "--unnorm-key", "bridge_orig", "--json");
        Assert.True(full.ExitCode == 0, full.Stderr);
        var report = JsonNode.Parse(full.Stdout)!.AsObject();
        Assert.Equal(["f32", "bf16", "int8", "int4-g128", "int4-g128-minmax"], report.Select(kv => kv.Key));
        Assert.Equal(1.0, report["bf16"]!["token_agreement"]!.GetValue<double>());
        Assert.Equal(3, report["int8"]!["observations"]!.GetValue<int>());

        var lm = CliRunner.Run("fidelity", "--checkpoint", tmp["ckpt"], "--images", tmp["frames"], "--instruction", "pick up the cup",
            "--unnorm-key", "bridge_orig", "--keep-vision-float", "--group-size", "32", "--json");
        Assert.True(lm.ExitCode == 0, lm.Stderr);
        Assert.Equal(["f32", "bf16", "int8-lm", "int4-g32-lm", "int4-g32-minmax-lm"], JsonNode.Parse(lm.Stdout)!.AsObject().Select(kv => kv.Key));
    }
}
