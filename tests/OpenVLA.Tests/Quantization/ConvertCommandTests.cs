using System.Text.Json.Nodes;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;

namespace OpenVLA.Tests.Quantization;

/// <summary>`openvla convert`: the same checkpoint at another stored precision, statistics in both places.</summary>
public sealed class ConvertCommandTests
{
    [Fact]
    public void Writes_bf16_weights_rounded_once_from_f32_and_puts_the_statistics_into_norm_stats()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["f32"], "tiny", seed: 3, torch.ScalarType.Float32);
        var stats = new JsonObject { ["my_robot"] = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp["f32"], "dataset_statistics.json")))!["bridge_orig"]!.DeepClone() };
        File.WriteAllText(Path.Combine(tmp["f32"], "dataset_statistics.json"), stats.ToJsonString());

        var run = CliRunner.Run("convert", "--checkpoint", tmp["f32"], "--out", tmp["bf16"], "--dtype", "bf16");

        Assert.True(run.ExitCode == 0, run.Stderr);
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp["bf16"], "config.json")))!;
        Assert.Equal("bfloat16", config["torch_dtype"]!.GetValue<string>());
        Assert.True(JsonNode.DeepEquals(stats, config["norm_stats"]), "config.json norm_stats = dataset_statistics.json");
        using var source = SafetensorsFile.Open(Path.Combine(tmp["f32"], "model.safetensors"));
        using var converted = SafetensorsFile.Open(Path.Combine(tmp["bf16"], "model.safetensors"));
        Assert.Equal(source.Tensors.Keys.Order(), converted.Tensors.Keys.Order());
        const string name = "language_model.model.layers.0.self_attn.q_proj.weight";
        Assert.Equal("BF16", converted.Tensors[name].DType);
        using var expected = source.Load(name).to_type(torch.ScalarType.BFloat16);
        using var actual = converted.Load(name);
        Assert.True(actual.equal(expected).all().item<bool>(), "bf16 = f32 rounded once");
    }

    [Fact]
    public void Refuses_bad_input_with_one_line_and_exit_code_2()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["f32"], "tiny", seed: 3, torch.ScalarType.Float32);

        var dtype = CliRunner.Run("convert", "--checkpoint", tmp["f32"], "--out", tmp["x"], "--dtype", "fp8");
        var self = CliRunner.Run("convert", "--checkpoint", tmp["f32"], "--out", tmp["f32"], "--dtype", "bf16");

        Assert.Equal(2, dtype.ExitCode);
        Assert.Contains("unknown dtype 'fp8'", dtype.Stderr);
        Assert.Equal(2, self.ExitCode);
        Assert.Contains("is the base checkpoint itself", self.Stderr);
        Assert.Single(self.Stderr.Trim().Split('\n'));
        Assert.True(File.Exists(Path.Combine(tmp["f32"], "model.safetensors")), "the source is left as it was");
    }
}
