using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.Policy.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>The OpenVLA-OFT part of a preset: LIBERO's constants by default (chunks of 8, an 8-D proprio, two cameras).</summary>
public sealed record OftPreset(int ActionChunk = 8, int ProprioDim = 8, int NumImages = 2);

/// <summary>Sizes of a generated checkpoint. `openvla-7b` is the published architecture; the `oft` presets add an
/// OpenVLA-OFT L1 head and proprio projector with the openvla-oft sizes (hidden = the language model's width).</summary>
public sealed record CheckpointPreset(
    string Name, int ImageSize, VitConfig? Dino, VitConfig? SigLip, LlamaConfig Text, int TokenizerVocab, OftPreset? Oft = null)
{
    public bool Published => Dino is null;

    public static IReadOnlyList<string> Names => ["tiny", "small", "mini", "openvla-7b", "oft-tiny", "oft-mini", "openvla-7b-oft"];

    public static CheckpointPreset Get(string name) => name switch
    {
        "oft-tiny" => Get("tiny") with { Name = name, Oft = new() },
        "oft-mini" => Get("mini") with { Name = name, Oft = new() },
        "openvla-7b-oft" => Get("openvla-7b") with { Name = name, Oft = new() },
        // Unit-test size: runs in milliseconds; every linear width is a multiple of 32 so int4 groups of 32 fit.
        "tiny" => new("tiny", 56,
            new VitConfig(32, 3, 2, 64, 14, 56, 4, true, true, false),
            new VitConfig(64, 3, 2, 128, 14, 56, 0, false, false, true),
            Llama(hidden: 64, layers: 2, heads: 4, intermediate: 128, tokenizerVocab: 1024), 1024),
        // The embedded default policy (scripts/train-default-model): trained from scratch on the simulation suite, so
        // 112 px, narrow towers and 28 px patches (4×4 per tower: 16 image tokens, which cut the instruction-only plateau
        // of from-scratch training and the step time; docs/benchmarks.md); one action well under 100 ms on 2 cores.
        "small" => new("small", 112,
            new VitConfig(128, 4, 4, 512, 28, 112, 4, true, true, false),
            new VitConfig(128, 4, 4, 512, 28, 112, 0, false, false, true),
            Llama(hidden: 256, layers: 4, heads: 4, intermediate: 768, tokenizerVocab: 1024), 1024),
        // The real geometry (224 px, 256 patches per tower, 7 action tokens) at a width a CPU runs in tens of ms.
        "mini" => new("mini", 224,
            new VitConfig(192, 6, 3, 768, 14, 224, 4, true, true, false),
            new VitConfig(192, 6, 3, 768, 14, 224, 0, false, false, true),
            Llama(hidden: 384, layers: 6, heads: 6, intermediate: 1024, tokenizerVocab: 1024), 1024),
        // openvla-7b: published tower ids, Llama-2-7B, text_config with only the four serialised keys.
        "openvla-7b" => new("openvla-7b", 224, null, null,
            new LlamaConfig(32064, 4096, 11008, 32, 32, 32, 1e-6, 10000, 2048, 32000), 32000),
        _ => throw new PolicyInputException($"unknown preset '{name}' (valid: {string.Join(", ", Names)})"),
    };

    /// <summary>
    /// This preset with both towers cut into <paramref name="patchSize"/>-pixel patches instead: a finer (or coarser) grid of
    /// image tokens, (image size / patch)² per tower, with everything else unchanged. Only the presets with our own tower
    /// sizes have a patch size to choose; openvla-7b's towers are the published ones.
    /// </summary>
    public CheckpointPreset WithPatchSize(int patchSize)
    {
        if (Published) throw new PolicyInputException($"preset '{Name}' has the published towers; their patch size is fixed (14)");
        if (patchSize < 1 || ImageSize % patchSize != 0)
            throw new PolicyInputException($"patch size {patchSize} does not divide the {Name} preset's {ImageSize} px image");
        return this with { Dino = Dino! with { PatchSize = patchSize }, SigLip = SigLip! with { PatchSize = patchSize } };
    }

    static LlamaConfig Llama(int hidden, int layers, int heads, int intermediate, int tokenizerVocab) =>
        new(VocabSize: (tokenizerVocab + 1 + 63) / 64 * 64, hidden, intermediate, layers, heads, heads, 1e-6, 10000, 2048, PadTokenId: tokenizerVocab);
}

/// <summary>
/// Writes a checkpoint directory in exactly the Hugging Face OpenVLA layout with random weights: config.json (with
/// norm_stats for two datasets), safetensors (sharded with an index when larger than the shard limit), the full key set
/// including the tensors inference ignores, dataset_statistics.json, our own SentencePiece tokenizer.model,
/// preprocessor_config.json and generation_config.json. Weights are generated one tensor at a time, so even the 7B
/// preset needs memory for only its largest tensor.
/// </summary>
public static class CheckpointMaker
{
    public static VlaConfig Write(string dir, string presetName, int seed, ScalarType dtype, long maxShardBytes = 5_000_000_000,
        IProgress<double>? progress = null) =>
        Write(dir, CheckpointPreset.Get(presetName), seed, dtype, maxShardBytes, progress);

    public static VlaConfig Write(string dir, CheckpointPreset preset, int seed, ScalarType dtype, long maxShardBytes = 5_000_000_000,
        IProgress<double>? progress = null)
    {
        var config = WriteMetadata(dir, preset, dtype);
        WriteWeights(dir, config, seed, dtype, maxShardBytes, progress);
        if (preset.Oft is not null) WriteOftComponents(dir, config, preset.Oft, seed, dtype);
        return config;
    }

    /// <summary>Everything but the weights: config, statistics, tokenizer, preprocessor and generation configs.</summary>
    public static VlaConfig WriteMetadata(string dir, string presetName, ScalarType dtype) =>
        WriteMetadata(dir, CheckpointPreset.Get(presetName), dtype);

    public static VlaConfig WriteMetadata(string dir, CheckpointPreset preset, ScalarType dtype)
    {
        Directory.CreateDirectory(dir);
        var configJson = ConfigJson(preset, dtype);
        File.WriteAllText(Path.Combine(dir, "config.json"), configJson.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        var config = VlaConfig.Parse(configJson, "config.json");

        File.WriteAllText(Path.Combine(dir, "dataset_statistics.json"), ExampleStats(preset.Oft?.ProprioDim ?? 0).ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        File.WriteAllText(Path.Combine(dir, "generation_config.json"),
            new JsonObject { ["bos_token_id"] = 1, ["eos_token_id"] = 2, ["pad_token_id"] = config.Text.PadTokenId, ["transformers_version"] = "4.40.1" }.ToJsonString());
        Preprocessing.PreprocessorConfig.CreateDefault(preset.ImageSize).Save(Path.Combine(dir, Preprocessing.PreprocessorConfig.FileName));
        SentencePieceModelWriter.Write(Path.Combine(dir, "tokenizer.model"), preset.TokenizerVocab);
        return config;
    }

    static void WriteWeights(string dir, VlaConfig config, int seed, ScalarType dtype, long maxShardBytes, IProgress<double>? progress)
    {
        var specs = CheckpointLayout.Enumerate(config).ToList();
        long elt = dtype == ScalarType.Float32 ? 4 : 2;
        // Split into shards in layout order, each at most maxShardBytes (a tensor larger than the limit gets its own shard).
        var shards = new List<List<TensorSpec>> { new() };
        long current = 0;
        foreach (var s in specs)
        {
            long bytes = s.ElementCount * elt;
            if (shards[^1].Count > 0 && current + bytes > maxShardBytes) { shards.Add([]); current = 0; }
            shards[^1].Add(s);
            current += bytes;
        }
        foreach (var stale in Directory.EnumerateFiles(dir, "model*.safetensors*")) File.Delete(stale);
        var gen = new Generator((ulong)seed);
        long total = specs.Sum(s => s.ElementCount), done = 0;
        var weightMap = new JsonObject();
        var metadata = new Dictionary<string, string> { ["format"] = "pt" };
        for (int i = 0; i < shards.Count; i++)
        {
            string file = shards.Count == 1 ? "model.safetensors" : $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
            var shard = shards[i];
            SafetensorsWriter.Write(Path.Combine(dir, file),
                shard.Select(s => new SafetensorsWriter.Entry(s.Name, dtype, s.Shape)).ToList(),
                k =>
                {
                    var t = RandomTensor(shard[k], dtype, gen);
                    done += shard[k].ElementCount;
                    progress?.Report((double)done / total);
                    return t;
                }, metadata);
            foreach (var s in shard) weightMap[s.Name] = file;
        }
        if (shards.Count > 1)
        {
            var index = new JsonObject
            {
                ["metadata"] = new JsonObject { ["total_size"] = total * elt },
                ["weight_map"] = weightMap,
            };
            File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        }
    }

    /// <summary>openvla-oft's component files with random weights, in its names: action_head--0_checkpoint.pt and
    /// proprio_projector--0_checkpoint.pt (the keys and shapes of our modules, which are openvla-oft's).</summary>
    static void WriteOftComponents(string dir, VlaConfig config, OftPreset oft, int seed, ScalarType dtype)
    {
        foreach (var stale in Directory.EnumerateFiles(dir, "*--*_checkpoint.pt")) File.Delete(stale);
        var gen = new Generator((ulong)seed + 7919);
        var cpu = Model.ModelPrecision.Cpu(ScalarType.Float32);
        int llm = config.Text.HiddenSize;
        string stored = dtype == ScalarType.Float32 ? "Float" : "BFloat16";
        void Save(nn.Module module, string file)
        {
            var tensors = new List<(string, long[], float[])>();
            foreach (var (name, p) in module.named_parameters())
            {
                var (mean, std) = RandomInit.MeanStd(name, p.shape);
                using var t = mean + std * randn(p.shape, generator: gen);
                tensors.Add((name, p.shape, t.data<float>().ToArray()));
            }
            TorchStateDict.Save(Path.Combine(dir, file), tensors, stored);
        }
        using (var head = new Model.L1RegressionActionHead(llm, 7, cpu)) Save(head, "action_head--0_checkpoint.pt");
        if (oft.ProprioDim > 0)
            using (var projector = new Model.ProprioProjector(oft.ProprioDim, llm, cpu)) Save(projector, "proprio_projector--0_checkpoint.pt");
    }

    static Tensor RandomTensor(TensorSpec s, ScalarType dtype, Generator gen)
    {
        var (mean, std) = RandomInit.MeanStd(s.Name, s.Shape);
        using var scope = NewDisposeScope();
        return (mean + std * randn(s.Shape, generator: gen)).to(dtype).MoveToOuterDisposeScope();
    }

    /// <summary>The config.json of a preset (OpenVLAConfig fields, our size extension for non-published presets).</summary>
    public static JsonObject ConfigJson(CheckpointPreset p, ScalarType dtype)
    {
        string dt = dtype == ScalarType.Float32 ? "float32" : "bfloat16";
        var text = new JsonObject
        {
            ["model_type"] = "llama", ["pad_token_id"] = p.Text.PadTokenId, ["torch_dtype"] = dt, ["vocab_size"] = p.Text.VocabSize,
        };
        var root = new JsonObject
        {
            ["architectures"] = new JsonArray("OpenVLAForActionPrediction"),
            ["auto_map"] = new JsonObject
            {
                ["AutoConfig"] = "configuration_prismatic.OpenVLAConfig",
                ["AutoModelForVision2Seq"] = "modeling_prismatic.OpenVLAForActionPrediction",
            },
            ["model_type"] = "openvla",
            ["vision_backbone_id"] = "dinosiglip-vit-so-224px",
            ["llm_backbone_id"] = "llama2-7b-pure",
            ["hf_llm_id"] = "meta-llama/Llama-2-7b-hf",
            ["arch_specifier"] = "no-align+fused-gelu-mlp",
            ["use_fused_vision_backbone"] = true,
            ["image_resize_strategy"] = "resize-naive",
            ["image_sizes"] = new JsonArray(p.ImageSize, p.ImageSize),
            ["timm_model_ids"] = new JsonArray("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"),
            ["timm_override_act_layers"] = new JsonArray(null, null),
            ["llm_max_length"] = 2048,
            ["pad_token_id"] = p.Text.PadTokenId,
            ["pad_to_multiple_of"] = 64,
            ["output_projector_states"] = false,
            ["n_action_bins"] = 256,
            ["norm_stats"] = ExampleStats(p.Oft?.ProprioDim ?? 0),
            ["text_config"] = text,
            ["torch_dtype"] = dt,
            ["transformers_version"] = "4.40.1",
        };
        if (p.Oft is { } oft)
            root["oft"] = new JsonObject
            {
                ["action_chunk"] = oft.ActionChunk, ["action_dim"] = 7, ["proprio_dim"] = oft.ProprioDim, ["num_images"] = oft.NumImages,
                ["use_film"] = false, ["normalization"] = "bounds_q99",
            };
        if (!p.Published)
        {
            // Our documented extension for non-published sizes: Llama keys inside text_config, tower sizes in
            // vision_backbone_configs (one object per timm id, in order).
            text["hidden_size"] = p.Text.HiddenSize;
            text["intermediate_size"] = p.Text.IntermediateSize;
            text["num_hidden_layers"] = p.Text.NumHiddenLayers;
            text["num_attention_heads"] = p.Text.NumAttentionHeads;
            text["num_key_value_heads"] = p.Text.NumKeyValueHeads;
            text["rms_norm_eps"] = p.Text.RmsNormEps;
            text["rope_theta"] = p.Text.RopeTheta;
            text["max_position_embeddings"] = p.Text.MaxPositionEmbeddings;
            root["vision_backbone_configs"] = new JsonArray(TowerJson(p.Dino!), TowerJson(p.SigLip!));
        }
        return root;
    }

    static JsonObject TowerJson(VitConfig v) => new()
    {
        ["embed_dim"] = v.EmbedDim, ["depth"] = v.Depth, ["num_heads"] = v.NumHeads, ["mlp_hidden_dim"] = v.MlpHiddenDim,
        ["num_register_tokens"] = v.NumRegisterTokens, ["class_token"] = v.ClassToken, ["layer_scale"] = v.LayerScale,
        ["patch_size"] = v.PatchSize, ["image_size"] = v.ImageSize, ["attn_pool"] = v.AttnPool,
    };

    /// <summary>Statistics for two datasets: `bridge_orig` with the published openvla-7b q01/q99 (openvla-model.md §3.4)
    /// and `sim_tabletop`, a symmetric ±2 cm / ±0.1 rad range; both leave the gripper un-normalized. With
    /// <paramref name="proprioDim"/> &gt; 0 each also has proprio statistics of that length (positions within ±0.5,
    /// the last two — the fingers — within 0..0.04, as the tabletop robot's state).</summary>
    public static JsonObject ExampleStats(int proprioDim = 0)
    {
        bool[] mask = [true, true, true, true, true, true, false];
        var bridge = new ActionStats(
            [-0.02873, -0.04170, -0.02609, -0.08092, -0.09289, -0.20718, 0.0],
            [0.02831, 0.04086, 0.04016, 0.08192, 0.07793, 0.20383, 1.0], mask,
            Mean: [0.0002, 0.0001, -0.0001, 0.0001, -0.0002, 0.0002, 0.58], Std: [0.0097, 0.0137, 0.0126, 0.0283, 0.0307, 0.0769, 0.49],
            Min: [-0.04, -0.06, -0.04, -0.11, -0.13, -0.29, 0.0], Max: [0.04, 0.06, 0.05, 0.11, 0.11, 0.29, 1.0]);
        var sim = new ActionStats(
            [-0.02, -0.02, -0.02, -0.1, -0.1, -0.1, 0.0], [0.02, 0.02, 0.02, 0.1, 0.1, 0.1, 1.0], mask,
            Mean: [0, 0, 0, 0, 0, 0, 0.5], Std: [0.01, 0.01, 0.01, 0.05, 0.05, 0.05, 0.5],
            Min: [-0.025, -0.025, -0.025, -0.12, -0.12, -0.12, 0.0], Max: [0.025, 0.025, 0.025, 0.12, 0.12, 0.12, 1.0]);
        ActionStats? proprio = null;
        if (proprioDim > 0)
        {
            var low = Enumerable.Range(0, proprioDim).Select(i => i >= proprioDim - 2 && proprioDim >= 8 ? 0.0 : -0.5).ToArray();
            var high = Enumerable.Range(0, proprioDim).Select(i => i >= proprioDim - 2 && proprioDim >= 8 ? 0.04 : 0.5).ToArray();
            proprio = new ActionStats(low, high, Enumerable.Repeat(true, proprioDim).ToArray(),
                Mean: low.Zip(high, (a, b) => (a + b) / 2).ToArray(), Std: low.Zip(high, (a, b) => (b - a) / 4).ToArray(), Min: low, Max: high);
        }
        return new JsonObject
        {
            ["bridge_orig"] = NormStats.ToJson(bridge, 2135463, 60064, proprio),
            ["sim_tabletop"] = NormStats.ToJson(sim, 10000, 100, proprio),
        };
    }
}
