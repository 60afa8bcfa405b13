using System.Text.Json.Nodes;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Quantization;
using OpenVLA.Tests.FineTune;
using OpenVLA.Tests.Policy;
using TorchSharp;

namespace OpenVLA.Tests.Quantization;

/// <summary>`openvla quantize --calibration` (GPTQ on dataset frames) and `fidelity --quantized`.</summary>
public sealed class CalibratedQuantizeCommandTests
{
    [Fact]
    public void Writes_a_gptq_checkpoint_that_loads_records_its_calibration_and_compares_in_fidelity()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["ckpt"], "tiny", seed: 3, torch.ScalarType.Float32);
        TestDatasets.WriteLeRobot(tmp["data"], [5, 4, 6]);

        var run = CliRunner.Run("quantize", "--checkpoint", tmp["ckpt"], "--out", tmp["gptq"], "--mode", "int4", "--group-size", "32",
            "--calibration", tmp["data"], "--calibration-samples", "6", "--unnorm-key", "bridge_orig");
        Assert.True(run.ExitCode == 0, run.Stderr);
        Assert.Contains("GPTQ on 6 frames", run.Stdout);
        var quant = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp["gptq"], "config.json")))!["quantization_config"]!;
        Assert.Equal(4, quant["bits"]!.GetValue<int>());
        Assert.Equal("gptq", quant["calibration"]!["method"]!.GetValue<string>());
        Assert.Equal(6, quant["calibration"]!["samples"]!.GetValue<int>());
        Assert.Equal("act-order, static groups", quant["calibration"]!["column_order"]!.GetValue<string>());

        // Same format as round-to-nearest: it loads as a pre-quantized int4 checkpoint; only the levels differ.
        var rtnRun = CliRunner.Run("quantize", "--checkpoint", tmp["ckpt"], "--out", tmp["rtn"], "--mode", "int4", "--group-size", "32");
        Assert.True(rtnRun.ExitCode == 0, rtnRun.Stderr);
        using (var gptq = SafetensorsFile.Open(Path.Combine(tmp["gptq"], "model.safetensors")))
        using (var rtn = SafetensorsFile.Open(Path.Combine(tmp["rtn"], "model.safetensors")))
        {
            Assert.Equal(rtn.Tensors.Keys.Order(), gptq.Tensors.Keys.Order());
            const string q = "language_model.model.layers.0.mlp.down_proj.weight";
            Assert.Equal(rtn.Tensors[q].DType, gptq.Tensors[q].DType);
            Assert.False(Tensors.Identical(rtn.Load(q), gptq.Load(q)));
        }
        using (var policy = VlaPolicy.Load(tmp["gptq"]))
        {
            Assert.Equal("int4-g32", policy.Checkpoint.Config.StoredQuantization!.Name);
            var action = policy.Predict(new VlaObservation([Frames.Noise(40, 1)], "pick up the cup", "bridge_orig")).Action;
            Assert.Equal(7, action.Length);
            Assert.All(action, a => Assert.True(float.IsFinite(a)));
        }

        var fidelity = CliRunner.Run("fidelity", "--checkpoint", tmp["ckpt"], "--images", tmp["data"], "--instruction", "pick up the cup",
            "--unnorm-key", "bridge_orig", "--quantized", tmp["gptq"], "--json");
        // The dataset directory holds no loose frames; fidelity says so.
        Assert.Equal(2, fidelity.ExitCode);
        Directory.CreateDirectory(tmp["frames"]);
        OpenCvSharp.Cv2.ImWrite(Path.Combine(tmp["frames"], "f.png"), new OpenCvSharp.Mat(40, 40, OpenCvSharp.MatType.CV_8UC3, new OpenCvSharp.Scalar(30, 120, 200)));
        fidelity = CliRunner.Run("fidelity", "--checkpoint", tmp["ckpt"], "--images", tmp["frames"], "--instruction", "pick up the cup",
            "--unnorm-key", "bridge_orig", "--quantized", tmp["gptq"], "--json");
        Assert.True(fidelity.ExitCode == 0, fidelity.Stderr);
        Assert.Contains("gptq", JsonNode.Parse(fidelity.Stdout)!.AsObject().Select(kv => kv.Key));
        var notQuantized = CliRunner.Run("fidelity", "--checkpoint", tmp["ckpt"], "--images", tmp["frames"], "--instruction", "pick up the cup",
            "--unnorm-key", "bridge_orig", "--quantized", tmp["ckpt"]);
        Assert.Equal(2, notQuantized.ExitCode);
        Assert.Contains("not a pre-quantized checkpoint", notQuantized.Stderr);
    }

    [Theory]
    [InlineData("--calibration-samples", "0", "--calibration-samples must be at least 1")]
    [InlineData("--column-order", "sideways", "--column-order must be act or natural")]
    [InlineData("--damp", "0", "damping must be in (0, 1]")]
    public void Bad_calibration_settings_exit_2_with_one_line(string option, string value, string message)
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["ckpt"], "tiny", seed: 3, torch.ScalarType.Float32);
        TestDatasets.WriteLeRobot(tmp["data"], [3]);
        var run = CliRunner.Run("quantize", "--checkpoint", tmp["ckpt"], "--out", tmp["out"], "--mode", "int4", "--group-size", "32",
            "--calibration", tmp["data"], "--unnorm-key", "bridge_orig", option, value);
        Assert.Equal(2, run.ExitCode);
        Assert.Contains(message, run.Stderr);
        Assert.Single(run.Stderr.Trim().Split('\n'));
    }

    [Fact]
    public void A_gptq_setting_without_calibration_data_exits_2_instead_of_being_ignored()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["ckpt"], "tiny", seed: 3, torch.ScalarType.Float32);
        var run = CliRunner.Run("quantize", "--checkpoint", tmp["ckpt"], "--out", tmp["out"], "--mode", "int4", "--damp", "0.05");
        Assert.Equal(2, run.ExitCode);
        Assert.Contains("--damp applies to GPTQ: add --calibration", run.Stderr);
        Assert.False(Directory.Exists(tmp["out"]));
    }

    [Fact]
    public void A_missing_calibration_dataset_exits_2()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["ckpt"], "tiny", seed: 3, torch.ScalarType.Float32);
        var run = CliRunner.Run("quantize", "--checkpoint", tmp["ckpt"], "--out", tmp["out"], "--mode", "int4", "--calibration", tmp["nowhere"]);
        Assert.Equal(2, run.ExitCode);
        Assert.Contains("not found", run.Stderr);
        Assert.False(Directory.Exists(tmp["out"]));
    }
}
