namespace OpenVLA.Policy.Checkpoint;

/// <summary>One tensor of the Hugging Face OpenVLA layout. Unused ones (the last ViT block, the final norms, SigLIP's
/// attention-pool head) exist in real checkpoints but inference never reads them.</summary>
public sealed record TensorSpec(string Name, long[] Shape, bool UsedByInference)
{
    public long ElementCount => Shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>
/// Every tensor name and shape of an OpenVLAForActionPrediction checkpoint for a given config (openvla-model.md §2.3),
/// enumerated without allocating anything. The loader checks a checkpoint against it and the checkpoint maker writes it.
/// </summary>
public static class CheckpointLayout
{
    public static IEnumerable<TensorSpec> Enumerate(VlaConfig config)
    {
        string[] prefixes = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."];
        for (int t = 0; t < config.VisionTowers.Count; t++)
            foreach (var spec in Tower(prefixes[t], config.VisionTowers[t])) yield return spec;

        int vision = config.VisionDim, llm = config.Text.HiddenSize, hiddenProj = 4 * vision;
        yield return new("projector.fc1.weight", [hiddenProj, vision], true);
        yield return new("projector.fc1.bias", [hiddenProj], true);
        yield return new("projector.fc2.weight", [llm, hiddenProj], true);
        yield return new("projector.fc2.bias", [llm], true);
        yield return new("projector.fc3.weight", [llm, llm], true);
        yield return new("projector.fc3.bias", [llm], true);

        var c = config.Text;
        int kv = c.NumKeyValueHeads * c.HeadDim;
        yield return new("language_model.model.embed_tokens.weight", [c.VocabSize, c.HiddenSize], true);
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            string p = $"language_model.model.layers.{i}.";
            yield return new(p + "self_attn.q_proj.weight", [c.HiddenSize, c.HiddenSize], true);
            yield return new(p + "self_attn.k_proj.weight", [kv, c.HiddenSize], true);
            yield return new(p + "self_attn.v_proj.weight", [kv, c.HiddenSize], true);
            yield return new(p + "self_attn.o_proj.weight", [c.HiddenSize, c.HiddenSize], true);
            yield return new(p + "mlp.gate_proj.weight", [c.IntermediateSize, c.HiddenSize], true);
            yield return new(p + "mlp.up_proj.weight", [c.IntermediateSize, c.HiddenSize], true);
            yield return new(p + "mlp.down_proj.weight", [c.HiddenSize, c.IntermediateSize], true);
            yield return new(p + "input_layernorm.weight", [c.HiddenSize], true);
            yield return new(p + "post_attention_layernorm.weight", [c.HiddenSize], true);
        }
        yield return new("language_model.model.norm.weight", [c.HiddenSize], true);
        yield return new("language_model.lm_head.weight", [c.VocabSize, c.HiddenSize], true);
    }

    static IEnumerable<TensorSpec> Tower(string p, VitConfig v)
    {
        int d = v.EmbedDim;
        if (v.ClassToken) yield return new(p + "cls_token", [1, 1, d], true);
        if (v.NumRegisterTokens > 0) yield return new(p + "reg_token", [1, v.NumRegisterTokens, d], true);
        yield return new(p + "pos_embed", [1, v.NumPatches, d], true);
        yield return new(p + "patch_embed.proj.weight", [d, 3, v.PatchSize, v.PatchSize], true);
        yield return new(p + "patch_embed.proj.bias", [d], true);
        for (int i = 0; i < v.Depth; i++)
        {
            bool used = i <= v.FeatureBlockIndex;
            string b = $"{p}blocks.{i}.";
            yield return new(b + "norm1.weight", [d], used);
            yield return new(b + "norm1.bias", [d], used);
            yield return new(b + "attn.qkv.weight", [3 * d, d], used);
            yield return new(b + "attn.qkv.bias", [3 * d], used);
            yield return new(b + "attn.proj.weight", [d, d], used);
            yield return new(b + "attn.proj.bias", [d], used);
            if (v.LayerScale) yield return new(b + "ls1.scale_factor", [d], used);
            yield return new(b + "norm2.weight", [d], used);
            yield return new(b + "norm2.bias", [d], used);
            yield return new(b + "mlp.fc1.weight", [v.MlpHiddenDim, d], used);
            yield return new(b + "mlp.fc1.bias", [v.MlpHiddenDim], used);
            yield return new(b + "mlp.fc2.weight", [d, v.MlpHiddenDim], used);
            yield return new(b + "mlp.fc2.bias", [d], used);
            if (v.LayerScale) yield return new(b + "ls2.scale_factor", [d], used);
        }
        yield return new(p + "norm.weight", [d], false);
        yield return new(p + "norm.bias", [d], false);
        if (v.AttnPool)
        {
            yield return new(p + "attn_pool.latent", [1, 1, d], false);
            yield return new(p + "attn_pool.q.weight", [d, d], false);
            yield return new(p + "attn_pool.q.bias", [d], false);
            yield return new(p + "attn_pool.kv.weight", [2 * d, d], false);
            yield return new(p + "attn_pool.kv.bias", [2 * d], false);
            yield return new(p + "attn_pool.proj.weight", [d, d], false);
            yield return new(p + "attn_pool.proj.bias", [d], false);
            yield return new(p + "attn_pool.norm.weight", [d], false);
            yield return new(p + "attn_pool.norm.bias", [d], false);
            yield return new(p + "attn_pool.mlp.fc1.weight", [v.MlpHiddenDim, d], false);
            yield return new(p + "attn_pool.mlp.fc1.bias", [v.MlpHiddenDim], false);
            yield return new(p + "attn_pool.mlp.fc2.weight", [d, v.MlpHiddenDim], false);
            yield return new(p + "attn_pool.mlp.fc2.bias", [d], false);
        }
    }
}
