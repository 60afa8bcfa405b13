using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.Policy.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>
/// Saves a model (fine-tuned, LoRA-merged or trained in full) as a complete Hugging Face OpenVLA checkpoint directory
/// that <see cref="VlaPolicy.Load"/> and the reference code read unchanged: the base's config, tokenizer and processor
/// files copied, every tensor of the layout written (the model's own, with any LoRA adapter folded in on the fly, and the
/// tensors inference never reads copied from the base), sharded like save_pretrained, plus dataset_statistics.json.
/// </summary>
public static class CheckpointWriter
{
    /// <param name="outDir">Created if needed; must not be the base directory.</param>
    /// <param name="dtype">Stored precision (bf16 as the published checkpoints, or f32).</param>
    /// <param name="datasetStatistics">The training data's statistics (dataset_statistics.json), or null to keep the base's.</param>
    public static void Write(string outDir, VlaCheckpoint baseCheckpoint, OpenVlaModel model, ScalarType dtype,
        JsonObject? datasetStatistics, long maxShardBytes = 5_000_000_000)
    {
        if (Path.GetFullPath(outDir).TrimEnd('/') == Path.GetFullPath(baseCheckpoint.Directory).TrimEnd('/'))
            throw new PolicyInputException($"the output directory {outDir} is the base checkpoint itself");
        Directory.CreateDirectory(outDir);
        foreach (var stale in Directory.EnumerateFiles(outDir, "model*.safetensors*")) File.Delete(stale);
        CopyNonWeightFiles(baseCheckpoint.Directory, outDir, dtype, model.Oft);
        if (model.Oft is not null) OftWeights.Save(outDir, model, "latest");
        var statsPath = Path.Combine(outDir, "dataset_statistics.json");
        if (datasetStatistics is not null) File.WriteAllText(statsPath, datasetStatistics.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        else if (File.Exists(Path.Combine(baseCheckpoint.Directory, "dataset_statistics.json"))) File.Copy(Path.Combine(baseCheckpoint.Directory, "dataset_statistics.json"), statsPath, true);

        var parameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        var linears = PeftAdapter.Linears(model).ToDictionary(l => l.Path, l => l.Layer);
        var baseFiles = new Dictionary<string, SafetensorsFile>();
        try
        {
            foreach (var f in baseCheckpoint.WeightFiles)
            {
                var st = SafetensorsFile.Open(f);
                foreach (var name in st.Tensors.Keys) baseFiles[name] = st;
            }
            var specs = CheckpointLayout.Enumerate(baseCheckpoint.Config)
                .Where(s => parameters.ContainsKey(s.Name) || baseFiles.ContainsKey(s.Name)).ToList();
            Tensor Produce(TensorSpec s)
            {
                using var scope = NewDisposeScope();
                Tensor t;
                if (parameters.TryGetValue(s.Name, out var p))
                {
                    string module = s.Name[..s.Name.LastIndexOf('.')];
                    t = s.Name.EndsWith(".weight") && linears.TryGetValue(module, out var lin) && lin.HasLora ? lin.MergedWeight() : p.detach();
                }
                else t = baseFiles[s.Name].Load(s.Name);
                return t.to(dtype, CPU).contiguous().clone().MoveToOuterDisposeScope();
            }
            WriteSharded(outDir, specs, dtype, Produce, maxShardBytes);
        }
        finally
        {
            foreach (var st in baseFiles.Values.Distinct()) st.Dispose();
        }
    }

    /// <summary>Config, tokenizer, processor and remote-code files: everything at the top level except weights and statistics.
    /// config.json's torch_dtype follows the stored precision.</summary>
    /// <param name="oft">the model's OFT constants: its component files are written from the model (not copied) and
    /// config.json gets the "oft" block</param>
    static void CopyNonWeightFiles(string from, string to, ScalarType dtype, OftSpec? oft)
    {
        foreach (var file in Directory.EnumerateFiles(from))
        {
            var name = Path.GetFileName(file);
            if (name.StartsWith("model") && name.Contains(".safetensors") || name == "dataset_statistics.json") continue;
            // The head and projector are written from the model; a FiLM vision_backbone file is kept as it is.
            if (oft is not null && (name.StartsWith("action_head--", StringComparison.Ordinal) || name.StartsWith("proprio_projector--", StringComparison.Ordinal))) continue;
            if (name == "config.json")
            {
                var config = JsonNode.Parse(File.ReadAllText(file))!.AsObject();
                string dt = dtype == ScalarType.Float32 ? "float32" : "bfloat16";
                config["torch_dtype"] = dt;
                if (config["text_config"] is JsonObject text) text["torch_dtype"] = dt;
                if (oft is not null) config["oft"] = oft.ToJson();
                File.WriteAllText(Path.Combine(to, name), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            }
            else File.Copy(file, Path.Combine(to, name), overwrite: true);
        }
    }

    /// <summary>Shards in layout order, each at most <paramref name="maxShardBytes"/> (save_pretrained's rule), with
    /// model.safetensors.index.json when there is more than one.</summary>
    static void WriteSharded(string dir, IReadOnlyList<TensorSpec> specs, ScalarType dtype, Func<TensorSpec, Tensor> produce, long maxShardBytes)
    {
        long elt = dtype == ScalarType.Float32 ? 4 : 2;
        var shards = new List<List<TensorSpec>> { new() };
        long current = 0, total = 0;
        foreach (var s in specs)
        {
            long bytes = s.ElementCount * elt;
            if (shards[^1].Count > 0 && current + bytes > maxShardBytes) { shards.Add([]); current = 0; }
            shards[^1].Add(s);
            current += bytes;
            total += bytes;
        }
        var weightMap = new JsonObject();
        for (int i = 0; i < shards.Count; i++)
        {
            string file = shards.Count == 1 ? "model.safetensors" : $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
            var shard = shards[i];
            SafetensorsWriter.Write(Path.Combine(dir, file), shard.Select(s => new SafetensorsWriter.Entry(s.Name, dtype, s.Shape)).ToList(),
                k => produce(shard[k]), new Dictionary<string, string> { ["format"] = "pt" });
            foreach (var s in shard) weightMap[s.Name] = file;
        }
        if (shards.Count > 1)
            File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), new JsonObject
            {
                ["metadata"] = new JsonObject { ["total_size"] = total },
                ["weight_map"] = weightMap,
            }.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }
}
