using System.Text.Json.Nodes;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Quantization;

namespace OpenVLA.FineTune.Training;

/// <summary>One line of a memory budget.</summary>
public sealed record MemoryItem(string Name, long Bytes, string Detail);

/// <summary>A training memory budget: what is resident for the whole run, and what one sample adds during a step.</summary>
public sealed record MemoryPlan(IReadOnlyList<MemoryItem> Resident, long ActivationsPerSample, long ActivationsPerSampleCheckpointed,
    long RecomputeWorkspace, int Batch, bool Checkpointing, long SequenceLength, long TrainableParameters)
{
    public long ResidentBytes => Resident.Sum(i => i.Bytes);
    /// <summary>Activations of one micro-batch under the chosen checkpointing setting. Backward adds the gradients of one
    /// block's activations in flight; with checkpointing, that block's recomputed activations exist as well.</summary>
    public long BatchActivationBytes => Checkpointing
        ? Batch * (ActivationsPerSampleCheckpointed + 2 * RecomputeWorkspace)
        : Batch * (ActivationsPerSample + RecomputeWorkspace);
    public long PeakBytes => ResidentBytes + BatchActivationBytes;

    public JsonObject ToJson() => new()
    {
        ["resident"] = new JsonArray(Resident.Select(i => (JsonNode)new JsonObject { ["name"] = i.Name, ["bytes"] = i.Bytes, ["detail"] = i.Detail }).ToArray()),
        ["sequence_length"] = SequenceLength,
        ["trainable_parameters"] = TrainableParameters,
        ["activations_per_sample_bytes"] = ActivationsPerSample,
        ["activations_per_sample_checkpointed_bytes"] = ActivationsPerSampleCheckpointed,
        ["recompute_workspace_bytes"] = RecomputeWorkspace,
        ["batch"] = Batch,
        ["gradient_checkpointing"] = Checkpointing,
        ["batch_activation_bytes"] = BatchActivationBytes,
        ["peak_bytes"] = PeakBytes,
    };
}

/// <summary>
/// Training memory from formulas, without allocating the model (so it answers for the 7B model on any machine):
/// weights of the modules inference builds at the chosen precision; LoRA parameters, their gradients and AdamW moments in
/// float32 (full training: gradients in the weight precision, moments and a master copy in float32); and the tensors a
/// block keeps for backward, per sample. Activation terms count the saved tensors of each op of our forward:
/// ViT block 9·N·D + 2·N·M elements plus the attention probabilities H·N² (the masked CPU attention saves them);
/// decoder layer 10·L·d + 4·L·m + H·L²; projector P·(9·V + 3·h); each adapted linear adds its float32 input copy (none when
/// the model is float32) and the rank-r intermediate. Backward holds the gradients of one block's activations at a time.
/// With checkpointing a block keeps only its input, and one block's full activations exist again while it is recomputed.
/// Allocator caching and the runtime itself are not included (the finetune verbs cap glibc's heap fragmentation, see
/// ProcessMemory).
/// </summary>
public static class MemoryPlanner
{
    /// <param name="promptTokens">Prompt length in tokens (BOS … "▁"); the reference prompt with a short instruction is ~25–35.</param>
    /// <param name="quantization">A weight-only quantized base (int8: one byte per weight plus a bf16 scale per row).</param>
    /// <param name="oft">OpenVLA-OFT: every camera through the towers, the sequence [BOS, patches of every camera, proprio,
    /// prompt, chunk·A placeholders, stop] attended in full, the head and projector trained in full beside LoRA.</param>
    public static MemoryPlan Plan(VlaConfig config, TrainerOptions options, int weightBytesPerElement, int promptTokens = 32,
        QuantizationOptions? quantization = null, OftSpec? oft = null)
    {
        int s = weightBytesPerElement;
        var quant = quantization ?? QuantizationOptions.None;
        var specs = CheckpointLayout.Enumerate(config).Where(t => t.UsedByInference).ToList();
        long Count(string prefix) => specs.Where(t => t.Name.StartsWith(prefix)).Sum(t => t.ElementCount);
        long StoredBytes(TensorSpec t)
        {
            bool quantizedLinear = t.Shape.Length == 2 && t.Name.EndsWith(".weight") && !t.Name.Contains("embed_tokens")
                && quant.Covers(t.Name[..^".weight".Length] + ".");
            if (!quantizedLinear) return t.ElementCount * s;
            return quant.ModeFor(t.Shape[0], t.Shape[1]) == QuantMode.Int8
                ? t.ElementCount + 2 * t.Shape[0]
                : t.ElementCount / 2 + 4 * t.Shape[0] * (t.Shape[1] / quant.GroupSize);
        }
        long Bytes(string prefix) => specs.Where(t => t.Name.StartsWith(prefix)).Sum(StoredBytes);
        long vision = Count("vision_backbone."), projector = Count("projector."), llm = Count("language_model.");
        long all = vision + projector + llm;

        // Linear layers LoRA can target: every used *.weight of a 2-D linear, minus the head.
        var linears = specs.Where(t => t.Shape.Length == 2 && t.Name.EndsWith(".weight") && !t.Name.Contains("embed_tokens")
                && t.Name != "language_model.lm_head.weight")
            .Select(t => (Path: t.Name[..^".weight".Length], Out: t.Shape[0], In: t.Shape[1])).ToList();
        var leafNames = linears.Select(l => l.Path[(l.Path.LastIndexOf('.') + 1)..]).Distinct().ToList();
        var targets = options.Lora.TargetModules is [PeftAdapter.AllLinear] ? leafNames : options.Lora.TargetModules.ToList();
        var adapted = options.Full ? [] : linears.Where(l => targets.Any(t => PeftAdapter.Matches(l.Path, t))).ToList();
        int r = options.Lora.Rank;
        long loraParams = adapted.Sum(l => (long)r * (l.In + l.Out));

        var resident = new List<MemoryItem>
        {
            new($"weights ({(quant.Mode == QuantMode.None ? Precision(s) : quant.Name + " base")})", Bytes(""),
                $"vision {Gb(Bytes("vision_backbone."))}, projector {Gb(Bytes("projector."))}, language model {Gb(Bytes("language_model."))}; {all / 1e6:0.#} M params"),
        };
        // OFT head (MLP-ResNet: fc1 from A·H, two H×H blocks, fc2; LayerNorms) and proprio projector, always trained in full.
        long oftParams = 0;
        if (oft is not null)
        {
            long hd = config.Text.HiddenSize, a = oft.ActionDim;
            oftParams = (a * hd * hd + hd) + 2 * (hd * hd + hd) + (hd * a + a) + 2 * a * hd + 6 * hd
                + (oft.ProprioDim > 0 ? oft.ProprioDim * hd + hd + hd * hd + hd : 0);
            resident.Add(new($"OFT head + proprio projector ({Precision(s)})", oftParams * s, $"{oftParams / 1e6:0.##} M params"));
            if (!options.Full)
            {
                resident.Add(new("their gradients and AdamW moments", oftParams * (s + 8) + (s != 4 ? oftParams * 4 : 0), "trained in full beside the adapters"));
            }
        }
        long trainable;
        if (options.Full)
        {
            trainable = all + oftParams;
            resident.Add(new($"gradients ({Precision(s)})", trainable * s, "every parameter"));
            resident.Add(new("AdamW moments (f32)", trainable * 8, "exp_avg + exp_avg_sq"));
            if (s != 4) resident.Add(new("f32 master weights", trainable * 4, "the update runs on float32 copies of the bf16 weights"));
        }
        else
        {
            trainable = loraParams + oftParams;
            resident.Add(new("LoRA adapters (f32)", loraParams * 4, $"{adapted.Count} layers, rank {r}, {loraParams / 1e6:0.##} M params ({100.0 * loraParams / all:0.##}% of the model)"));
            resident.Add(new("LoRA gradients (f32)", loraParams * 4, ""));
            resident.Add(new("AdamW moments (f32)", loraParams * 8, "exp_avg + exp_avg_sq"));
        }

        // Activations per sample.
        var vit = config.VisionTowers;
        long p = config.NumPatches, h = config.Text.HiddenSize, m = config.Text.IntermediateSize, v = config.VisionDim;
        int cameras = oft?.NumImages ?? 1;
        long seq = oft is null ? p + promptTokens + 8 : cameras * p + (oft.ProprioDim > 0 ? 1 : 0) + promptTokens + (long)oft.ActionChunk * oft.ActionDim + 1;
        long LoraExtra(string prefix, long tokens) => adapted.Where(l => l.Path.StartsWith(prefix))
            .Sum(l => (s == 4 ? 0 : 4 * tokens * l.In) + 4 * tokens * r + (options.Lora.Dropout > 0 ? 4 * tokens * l.In : 0));
        long perSample = 0, checkpointed = 0, workspace = 0;
        string[] towers = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."];
        for (int t = 0; t < vit.Count; t++)
        {
            var c = vit[t];
            long n = c.NumPatches + c.NumPrefixTokens, d = c.EmbedDim, mh = c.MlpHiddenDim;
            int blocks = c.FeatureBlockIndex + 1;
            long block = cameras * s * (9 * n * d + 2 * n * mh + (long)c.NumHeads * n * n);
            for (int b = 0; b < blocks; b++)
            {
                long withLora = block + LoraExtra($"{towers[t]}blocks.{b}.", cameras * n);
                perSample += withLora;
                checkpointed += cameras * s * n * d;
                workspace = Math.Max(workspace, withLora);
            }
            perSample += cameras * s * 3 * n * d; // patch embedding, position add, prefix concat
            checkpointed += cameras * s * 3 * n * d;
        }
        long proj = cameras * s * p * (9 * v + 3 * h) + LoraExtra("projector.", cameras * p);
        perSample += proj;
        checkpointed += proj;
        long layer = s * (10 * seq * h + 4 * seq * m + (long)config.Text.NumAttentionHeads * seq * seq);
        for (int i = 0; i < config.Text.NumHiddenLayers; i++)
        {
            long withLora = layer + LoraExtra($"language_model.model.layers.{i}.", seq);
            perSample += withLora;
            checkpointed += s * seq * h;
            workspace = Math.Max(workspace, withLora);
        }
        long embed = s * 3 * seq * h;                      // token embeddings, the concatenated input, final norm
        long head = oft is null
            ? 8 * (4L * config.Text.VocabSize + s * h)        // 8 target positions through lm_head, f32 logits for the loss
            : (long)oft.ActionChunk * s * (3 * oft.ActionDim * h + 12 * h) + 8L * oft.ActionChunk * oft.ActionDim;   // MLP-ResNet per chunk step, f32 L1
        perSample += embed + head;
        checkpointed += embed + head;
        return new MemoryPlan(resident, perSample, checkpointed, workspace, options.BatchSize, options.GradientCheckpointing, seq, trainable);
    }

    public static string Precision(int bytes) => bytes == 4 ? "f32" : "bf16";

    public static string Gb(long bytes) => bytes >= 1L << 30 ? $"{bytes / (double)(1L << 30):0.00} GiB" : $"{bytes / (double)(1L << 20):0.0} MiB";
}
