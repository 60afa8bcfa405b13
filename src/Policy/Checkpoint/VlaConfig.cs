using System.Text.Json;
using System.Text.Json.Nodes;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>Sizes of one timm ViT tower as the reference creates it (see openvla-model.md §1.2).</summary>
public sealed record VitConfig(
    int EmbedDim, int Depth, int NumHeads, int MlpHiddenDim, int PatchSize, int ImageSize,
    int NumRegisterTokens, bool ClassToken, bool LayerScale, bool AttnPool)
{
    public int GridSize => ImageSize / PatchSize;
    public int NumPatches => GridSize * GridSize;
    public int NumPrefixTokens => (ClassToken ? 1 : 0) + NumRegisterTokens;
    /// <summary>The reference takes the output of the second-to-last block (timm get_intermediate_layers n = {depth − 2}).</summary>
    public int FeatureBlockIndex => Depth - 2;
}

/// <summary>Llama sizes (HF LlamaConfig keys).</summary>
public sealed record LlamaConfig(
    int VocabSize, int HiddenSize, int IntermediateSize, int NumHiddenLayers, int NumAttentionHeads, int NumKeyValueHeads,
    double RmsNormEps, double RopeTheta, int MaxPositionEmbeddings, int PadTokenId)
{
    public int HeadDim => HiddenSize / NumAttentionHeads;
}

/// <summary>
/// The OpenVLAConfig of a Hugging Face checkpoint's config.json (openvla-model.md §2.2), resolved to concrete sizes.
/// Published timm ids map to the published tower sizes; other sizes come from our documented extension
/// `vision_backbone_configs` (one object per tower in `timm_model_ids` order). A `text_config` holding only the four keys
/// the published checkpoint serialises falls back to LlamaConfig defaults — including rms_norm_eps 1e-6, which is what HF
/// inference actually runs (openvla-model.md §1.4), not the 1e-5 Llama-2 was trained with.
/// </summary>
public sealed record VlaConfig(
    IReadOnlyList<string> TimmModelIds,
    IReadOnlyList<VitConfig> VisionTowers,
    LlamaConfig Text,
    int ImageSize,
    string ImageResizeStrategy,
    bool UseFusedVisionBackbone,
    string ArchSpecifier,
    int PadToMultipleOf,
    int NActionBins,
    string TorchDType,
    JsonObject Raw)
{
    /// <summary>The weight-only quantization a pre-quantized checkpoint was saved with (`quantization_config`), else null.</summary>
    public Quantization.QuantizationOptions? StoredQuantization =>
        Raw["quantization_config"] is JsonObject q && q["quant_method"]?.GetValue<string>() == QuantMethod
            ? new Quantization.QuantizationOptions(
                q["bits"]?.GetValue<int>() == 4 ? Quantization.QuantMode.Int4 : Quantization.QuantMode.Int8,
                q["bits"]?.GetValue<int>() == 4 ? q["group_size"]?.GetValue<int>() ?? 128 : 0,
                q["modules"] is JsonArray m && m.Any(x => x?.GetValue<string>() == "vision_backbone"))
            : null;

    /// <summary>`quant_method` of our pre-quantized checkpoints (format in docs/quantization.md).</summary>
    public const string QuantMethod = "openvla-net-weight-only";

    /// <summary>Size of the tokenizer vocabulary the action bins count down from (32000 for openvla-7b).</summary>
    public int TokenizerVocabSize => Text.VocabSize - PadToMultipleOf;
    public int VisionDim => VisionTowers.Sum(t => t.EmbedDim);
    public int NumPatches => VisionTowers[0].NumPatches;

    public static VlaConfig Load(string path)
    {
        if (!File.Exists(path)) throw new CheckpointException($"{path}: file not found");
        JsonObject root;
        try { root = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new CheckpointException($"{path}: not a JSON object"); }
        catch (JsonException e) { throw new CheckpointException($"{path}: invalid JSON ({e.Message.Split('.')[0]})"); }
        return Parse(root, path);
    }

    public static VlaConfig Parse(JsonObject root, string source)
    {
        var ids = root["timm_model_ids"] is JsonArray a ? a.Select(n => n?.GetValue<string>() ?? "").ToList() : [];
        if (ids.Count == 0) throw new CheckpointException($"{source}: 'timm_model_ids' is missing");
        var imageSizes = root["image_sizes"] is JsonArray s ? s.Select(n => n!.GetValue<int>()).ToList() : [224, 224];
        if (imageSizes.Count == 0 || imageSizes.Any(v => v != imageSizes[0]))
            throw new CheckpointException($"{source}: 'image_sizes' must hold one square size, got [{string.Join(",", imageSizes)}]");
        int imageSize = imageSizes[0];
        bool fused = root["use_fused_vision_backbone"]?.GetValue<bool>() ?? ids.Count > 1;
        string arch = root["arch_specifier"]?.GetValue<string>() ?? "no-align+fused-gelu-mlp";
        if (!fused || ids.Count != 2 || !arch.EndsWith("fused-gelu-mlp"))
            throw new CheckpointException($"{source}: only the fused DinoSigLIP backbone with 'fused-gelu-mlp' projector (openvla-7b) is supported, got arch_specifier '{arch}' with {ids.Count} tower(s)");

        var towers = new List<VitConfig>();
        var custom = root["vision_backbone_configs"] as JsonArray;
        if (custom != null && custom.Count != ids.Count)
            throw new CheckpointException($"{source}: 'vision_backbone_configs' has {custom.Count} entries for {ids.Count} timm_model_ids");
        for (int i = 0; i < ids.Count; i++)
        {
            var tower = custom != null ? ParseTower(custom[i] as JsonObject, ids[i], source) : PublishedTower(ids[i], imageSize, source);
            if (tower.ImageSize != imageSize)
                throw new CheckpointException($"{source}: tower {i} image_size {tower.ImageSize} differs from image_sizes {imageSize}");
            if (imageSize % tower.PatchSize != 0)
                throw new CheckpointException($"{source}: image size {imageSize} is not a multiple of patch size {tower.PatchSize}");
            towers.Add(tower);
        }
        if (towers.Select(t => t.NumPatches).Distinct().Count() != 1)
            throw new CheckpointException($"{source}: the fused towers must produce the same number of patches");

        var text = root["text_config"] as JsonObject ?? new JsonObject();
        int padTokenId = Int(text, "pad_token_id", root["pad_token_id"]?.GetValue<int>() ?? 32000);
        var llama = new LlamaConfig(
            VocabSize: Int(text, "vocab_size", 32064),
            HiddenSize: Int(text, "hidden_size", 4096),
            IntermediateSize: Int(text, "intermediate_size", 11008),
            NumHiddenLayers: Int(text, "num_hidden_layers", 32),
            NumAttentionHeads: Int(text, "num_attention_heads", 32),
            NumKeyValueHeads: Int(text, "num_key_value_heads", Int(text, "num_attention_heads", 32)),
            RmsNormEps: text["rms_norm_eps"]?.GetValue<double>() ?? 1e-6,
            RopeTheta: text["rope_theta"]?.GetValue<double>() ?? 10000.0,
            MaxPositionEmbeddings: Int(text, "max_position_embeddings", 2048),
            PadTokenId: padTokenId);
        if (llama.HiddenSize % llama.NumAttentionHeads != 0 || llama.NumAttentionHeads % llama.NumKeyValueHeads != 0)
            throw new CheckpointException($"{source}: text_config hidden_size {llama.HiddenSize} / heads {llama.NumAttentionHeads} / kv heads {llama.NumKeyValueHeads} are inconsistent");
        if (text["rope_scaling"] is JsonObject)
            throw new CheckpointException($"{source}: text_config.rope_scaling is not supported");

        if (root["quantization_config"] is JsonObject qc && qc["quant_method"]?.GetValue<string>() != QuantMethod)
            throw new CheckpointException($"{source}: quantization_config quant_method '{qc["quant_method"]}' is not supported (only {QuantMethod}; load a bf16/f32 checkpoint with --quantize instead)");
        int padMultiple = root["pad_to_multiple_of"]?.GetValue<int>() ?? 64;
        return new VlaConfig(ids, towers, llama, imageSize,
            root["image_resize_strategy"]?.GetValue<string>() ?? "resize-naive", fused, arch, padMultiple,
            root["n_action_bins"]?.GetValue<int>() ?? 256, root["torch_dtype"]?.GetValue<string>() ?? "bfloat16", root);
    }

    static int Int(JsonObject o, string key, int fallback) => o[key]?.GetValue<int>() ?? fallback;

    static VitConfig ParseTower(JsonObject? o, string id, string source)
    {
        if (o == null) throw new CheckpointException($"{source}: vision_backbone_configs entry for '{id}' is not an object");
        int Req(string k) => o[k]?.GetValue<int>() ?? throw new CheckpointException($"{source}: vision_backbone_configs entry for '{id}' lacks '{k}'");
        return new VitConfig(Req("embed_dim"), Req("depth"), Req("num_heads"), Req("mlp_hidden_dim"), Req("patch_size"), Req("image_size"),
            o["num_register_tokens"]?.GetValue<int>() ?? 0, o["class_token"]?.GetValue<bool>() ?? false,
            o["layer_scale"]?.GetValue<bool>() ?? false, o["attn_pool"]?.GetValue<bool>() ?? id.Contains("siglip"));
    }

    /// <summary>The timm definitions of the towers the published checkpoints use (openvla-model.md §1.2).</summary>
    public static VitConfig PublishedTower(string id, int imageSize, string source = "config.json") => id switch
    {
        "vit_large_patch14_reg4_dinov2.lvd142m" => new VitConfig(1024, 24, 16, 4096, 14, imageSize, 4, true, true, false),
        "vit_so400m_patch14_siglip_224" => new VitConfig(1152, 27, 16, 4304, 14, imageSize, 0, false, false, true),
        _ => throw new CheckpointException($"{source}: unknown timm model id '{id}' (known: vit_large_patch14_reg4_dinov2.lvd142m, vit_so400m_patch14_siglip_224; give other sizes in 'vision_backbone_configs')"),
    };
}
