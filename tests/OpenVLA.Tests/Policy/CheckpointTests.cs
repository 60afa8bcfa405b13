using System.Text.Json.Nodes;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;

namespace OpenVLA.Tests.Policy;

public class CheckpointTests
{
    [Fact]
    public void MakeCheckpointRoundTripsThroughTheLoaderWithNoMissingOrUnexpectedKeys()
    {
        using var tmp = new TestPaths.TempDir();
        var config = CheckpointMaker.Write(tmp.Path, "tiny", seed: 3, torch.ScalarType.BFloat16);
        var layout = CheckpointLayout.Enumerate(config).ToList();

        using var st = SafetensorsFile.Open(tmp["model.safetensors"]);
        Assert.Equal(layout.Select(s => s.Name).Order(), st.Tensors.Keys.Order());
        foreach (var s in layout) Assert.Equal(s.Shape, st.Tensors[s.Name].Shape);
        Assert.Equal("pt", st.Metadata["format"]);

        using var policy = VlaPolicy.Load(tmp.Path);
        Assert.Empty(policy.LoadReport.Unexpected);
        // What the loader skipped is exactly what inference never reads: last ViT blocks, final norms, SigLIP attn_pool.
        Assert.Equal(layout.Where(s => !s.UsedByInference).Select(s => s.Name).Order(), policy.LoadReport.Unused.Order());
        Assert.Contains("vision_backbone.featurizer.blocks.2.attn.qkv.weight", policy.LoadReport.Unused);
        Assert.Contains("vision_backbone.fused_featurizer.attn_pool.latent", policy.LoadReport.Unused);
        Assert.Equal(layout.Count(s => s.UsedByInference), policy.Model.named_parameters().Count());

        // The loaded parameters hold the stored values (bf16 → f32 is exact).
        var name = "language_model.model.layers.1.mlp.down_proj.weight";
        using var stored = st.Load(name);
        var loaded = policy.Model.named_parameters().Single(p => p.name == name).parameter;
        Assert.True(Tensors.Identical(stored.to(torch.ScalarType.Float32), loaded));
    }

    [Fact]
    public void ShardedCheckpointLoadsThroughTheIndexAndPredictsLikeTheSingleFile()
    {
        using var single = new TestPaths.TempDir();
        using var sharded = new TestPaths.TempDir();
        CheckpointMaker.Write(single.Path, "tiny", seed: 5, torch.ScalarType.BFloat16);
        CheckpointMaker.Write(sharded.Path, "tiny", seed: 5, torch.ScalarType.BFloat16, maxShardBytes: 200_000);
        var shards = Directory.GetFiles(sharded.Path, "model-*-of-*.safetensors");
        Assert.True(shards.Length >= 3, $"expected several shards, got {shards.Length}");
        Assert.True(File.Exists(sharded["model.safetensors.index.json"]));
        Assert.False(File.Exists(sharded["model.safetensors"]));

        using var a = VlaPolicy.Load(single.Path);
        using var b = VlaPolicy.Load(sharded.Path);
        var obs = new VlaObservation([Frames.Noise(56, seed: 1)], "stack the blue cube on the red cube", "sim_tabletop");
        Assert.Equal(a.Predict(obs).ActionTokenIds, b.Predict(obs).ActionTokenIds);
    }

    [Fact]
    public void MisShapedTensorFailsNamingTensorExpectedAndFoundShape()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp.Path, "tiny", seed: 1, torch.ScalarType.Float32);
        var path = tmp["model.safetensors"];
        var tensors = new Dictionary<string, torch.Tensor>();
        using (var st = SafetensorsFile.Open(path))
            foreach (var n in st.Tensors.Keys) tensors[n] = st.Load(n);
        tensors["projector.fc2.bias"] = torch.zeros(7);
        SafetensorsWriter.Write(path, tensors);
        var e = Assert.Throws<CheckpointException>(() => VlaPolicy.Load(tmp.Path));
        Assert.Contains("'projector.fc2.bias' has shape [7], expected [64]", e.Message);

        tensors.Remove("projector.fc2.bias");
        SafetensorsWriter.Write(path, tensors);
        e = Assert.Throws<CheckpointException>(() => VlaPolicy.Load(tmp.Path));
        Assert.Contains("1 tensor(s) missing, first 'projector.fc2.bias' (expected shape [64])", e.Message);
    }

    [Theory]
    [InlineData("config.json", "config.json is missing")]
    [InlineData("tokenizer.model", "tokenizer.model is missing")]
    [InlineData("model.safetensors", "no weights")]
    public void MissingCheckpointFilesAreNamed(string file, string message)
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp.Path, "tiny", seed: 1, torch.ScalarType.BFloat16);
        File.Delete(tmp[file]);
        var e = Assert.Throws<CheckpointException>(() => VlaPolicy.Load(tmp.Path));
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void DatasetStatisticsOverrideConfigNormStats()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp.Path, "tiny", seed: 1, torch.ScalarType.BFloat16);
        var stats = new JsonObject { ["my_robot"] = NormStats.ToJson(new ActionStats([-1, -1, -1, -1, -1, -1, 0], [1, 1, 1, 1, 1, 1, 1], [true, true, true, true, true, true, false]), 10, 2) };
        File.WriteAllText(tmp["dataset_statistics.json"], stats.ToJsonString());
        var ckpt = VlaCheckpoint.Open(tmp.Path);
        Assert.Equal(["my_robot"], ckpt.NormStats.Keys);
        Assert.Equal("my_robot", ckpt.ResolveUnnormKey(null)); // one dataset: no key needed

        File.Delete(tmp["dataset_statistics.json"]);
        ckpt = VlaCheckpoint.Open(tmp.Path);
        Assert.Equal(["bridge_orig", "sim_tabletop"], ckpt.NormStats.Keys.Order());
        var e = Assert.Throws<PolicyInputException>(() => ckpt.ResolveUnnormKey(null));
        Assert.Contains("bridge_orig, sim_tabletop", e.Message);
        e = Assert.Throws<PolicyInputException>(() => ckpt.ResolveUnnormKey("libero_spatial"));
        Assert.Equal("unknown unnorm_key 'libero_spatial'; valid keys: bridge_orig, sim_tabletop", e.Message);
    }

    [Fact]
    public void PublishedOpenVla7bKeySetAndShapesEnumerateWithoutAllocating()
    {
        using var tmp = new TestPaths.TempDir();
        // Only config.json of the 7B preset: its text_config holds just the four keys the published file serialises.
        var configJson = JsonNode.Parse(File.ReadAllText(WriteConfigOnly(tmp.Path)))!.AsObject();
        Assert.Equal(["model_type", "pad_token_id", "torch_dtype", "vocab_size"], configJson["text_config"]!.AsObject().Select(kv => kv.Key).Order());
        var config = VlaConfig.Load(tmp["config.json"]);
        Assert.Equal(1e-6, config.Text.RmsNormEps); // HF LlamaConfig default, what the reference runs (not Llama-2's 1e-5)
        Assert.Equal(32000, config.TokenizerVocabSize);

        var specs = CheckpointLayout.Enumerate(config).ToDictionary(s => s.Name, s => s.Shape);
        long[] Shape(string n) => specs[n];
        Assert.Equal([32064, 4096], Shape("language_model.model.embed_tokens.weight"));
        Assert.Equal([32064, 4096], Shape("language_model.lm_head.weight"));
        Assert.Equal([4096, 4096], Shape("language_model.model.layers.31.self_attn.k_proj.weight"));
        Assert.Equal([11008, 4096], Shape("language_model.model.layers.0.mlp.gate_proj.weight"));
        Assert.Equal([4096, 11008], Shape("language_model.model.layers.0.mlp.down_proj.weight"));
        Assert.Equal([8704, 2176], Shape("projector.fc1.weight"));
        Assert.Equal([4096, 8704], Shape("projector.fc2.weight"));
        Assert.Equal([4096, 4096], Shape("projector.fc3.weight"));
        Assert.Equal([1, 4, 1024], Shape("vision_backbone.featurizer.reg_token"));
        Assert.Equal([1, 256, 1024], Shape("vision_backbone.featurizer.pos_embed"));
        Assert.Equal([1024, 3, 14, 14], Shape("vision_backbone.featurizer.patch_embed.proj.weight"));
        Assert.Equal([3072, 1024], Shape("vision_backbone.featurizer.blocks.23.attn.qkv.weight"));
        Assert.Equal([1024], Shape("vision_backbone.featurizer.blocks.0.ls1.scale_factor"));
        Assert.Equal([1, 256, 1152], Shape("vision_backbone.fused_featurizer.pos_embed"));
        Assert.Equal([4304, 1152], Shape("vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight"));
        Assert.Equal([2304, 1152], Shape("vision_backbone.fused_featurizer.attn_pool.kv.weight"));
        Assert.False(specs.ContainsKey("vision_backbone.fused_featurizer.cls_token"));
        Assert.False(specs.ContainsKey("vision_backbone.fused_featurizer.blocks.0.ls1.scale_factor"));
        Assert.False(specs.ContainsKey("vision_backbone.featurizer.blocks.24.norm1.weight"));
        Assert.Equal(32, specs.Keys.Count(k => k.EndsWith("input_layernorm.weight")));

        // Parameter counts of openvla-model.md §1.1: LLM 6.739B, DINOv2 0.303B, SigLIP 0.428B, projector 0.071B.
        double Billions(string prefix) => CheckpointLayout.Enumerate(config).Where(s => s.Name.StartsWith(prefix)).Sum(s => s.ElementCount) / 1e9;
        Assert.Equal(6.739, Billions("language_model."), 3);
        Assert.Equal(0.303, Billions("vision_backbone.featurizer."), 3);
        Assert.Equal(0.428, Billions("vision_backbone.fused_featurizer."), 3);
        Assert.Equal(0.071, Billions("projector."), 3);
        Assert.Equal(7.541, CheckpointLayout.Enumerate(config).Sum(s => s.ElementCount) / 1e9, 3);
    }

    static string WriteConfigOnly(string dir)
    {
        // Only config.json: writing the 15 GB of weights is a benchmark's job, not a test's.
        var path = Path.Combine(dir, "config.json");
        File.WriteAllText(path, CheckpointMaker.ConfigJson(CheckpointPreset.Get("openvla-7b"), torch.ScalarType.BFloat16).ToJsonString());
        return path;
    }
}

/// <summary>Test frames.</summary>
public static class Frames
{
    public static RgbImage Noise(int size, int seed)
    {
        var px = new byte[size * size * 3];
        new Random(seed).NextBytes(px);
        return new RgbImage(size, size, px);
    }
}

public static class Tensors
{
    /// <summary>Same shape and bit-identical values (torch.equal in TorchSharp returns an element-wise tensor).</summary>
    public static bool Identical(TorchSharp.torch.Tensor a, TorchSharp.torch.Tensor b) =>
        a.shape.SequenceEqual(b.shape) && a.dtype == b.dtype && a.eq(b).all().item<bool>();
}
