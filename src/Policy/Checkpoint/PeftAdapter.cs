using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.Policy.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>LoRA hyper-parameters (PEFT LoraConfig names: r, lora_alpha, lora_dropout, target_modules).</summary>
public sealed record LoraSettings(int Rank, double Alpha, double Dropout, IReadOnlyList<string> TargetModules)
{
    /// <summary>finetune.py: lora_alpha = min(r, 16) (openvla-model.md §5.2).</summary>
    public static double DefaultAlpha(int rank) => Math.Min(rank, 16);

    /// <summary>The reference configuration: r 32, alpha 16, dropout 0, all-linear.</summary>
    public static LoraSettings Reference { get; } = new(32, 16, 0.0, [PeftAdapter.AllLinear]);
}

/// <summary>
/// PEFT LoRA adapters on an <see cref="OpenVlaModel"/>: which linear layers get one (PEFT target_modules matching), and
/// the adapter directory a PEFT user can load (`adapter_config.json`, `adapter_model.safetensors` with keys
/// `base_model.model.&lt;module path&gt;.lora_A.weight` / `.lora_B.weight`, float32). Module paths are the Hugging Face
/// ones, so `PeftModel.from_pretrained(openvla, dir)` finds every adapter. The published model also holds linears our
/// inference never builds (the towers' last block, SigLIP's attention pool); PEFT gives those fresh adapters with B = 0,
/// i.e. no change, exactly as our absent ones.
/// </summary>
public static class PeftAdapter
{
    public const string ConfigFileName = "adapter_config.json";
    public const string WeightsFileName = "adapter_model.safetensors";
    public const string KeyPrefix = "base_model.model.";
    /// <summary>PEFT's shorthand for every linear layer except the output head.</summary>
    public const string AllLinear = "all-linear";

    /// <summary>Every LoRA-capable linear layer of the model by Hugging Face module path, lm_head excluded, and so are
    /// OpenVLA-OFT's action head and proprio projector: openvla-oft trains them in full, outside the PEFT model.</summary>
    public static IReadOnlyList<(string Path, Linear Layer)> Linears(nn.Module model) =>
        model.named_modules()
            .Where(m => m.module is Linear && m.name != "language_model.lm_head" && !IsAdapterPart(m.name)
                && !m.name.StartsWith("action_head.", StringComparison.Ordinal) && !m.name.StartsWith("proprio_projector.", StringComparison.Ordinal))
            .Select(m => (m.name, (Linear)m.module))
            .ToList();

    static bool IsAdapterPart(string path) => path.EndsWith(".lora_A") || path.EndsWith(".lora_B");

    /// <summary>
    /// target_modules as PEFT saves them: "all-linear" becomes the set of last path components of every linear layer
    /// except the head; explicit names are kept. Unknown names are an error naming the valid ones.
    /// </summary>
    public static IReadOnlyList<string> ResolveTargets(nn.Module model, IReadOnlyList<string> targetModules)
    {
        var linears = Linears(model);
        var leafNames = linears.Select(l => l.Path[(l.Path.LastIndexOf('.') + 1)..]).Distinct().Order(StringComparer.Ordinal).ToList();
        if (targetModules.Count == 1 && targetModules[0] == AllLinear) return leafNames;
        if (targetModules.Count == 0) throw new PolicyInputException("target_modules is empty");
        foreach (var t in targetModules)
            if (!linears.Any(l => Matches(l.Path, t)))
                throw new PolicyInputException($"target module '{t}' matches no linear layer (valid names: {AllLinear}, {string.Join(", ", leafNames)}, or a module path)");
        return targetModules.Distinct().ToList();
    }

    /// <summary>PEFT's rule for a list of names: the module path equals the name or ends with "." + name.</summary>
    public static bool Matches(string path, string target) => path == target || path.EndsWith("." + target);

    /// <summary>Adds an adapter to every targeted linear layer, in module order, drawing A from <paramref name="generator"/>.
    /// Returns the module paths that got one.</summary>
    public static IReadOnlyList<string> Attach(OpenVlaModel model, LoraSettings settings, Generator? generator = null)
    {
        if (settings.Rank < 1) throw new PolicyInputException($"LoRA rank must be at least 1, got {settings.Rank}");
        if (settings.Dropout is < 0 or >= 1) throw new PolicyInputException($"LoRA dropout must be in [0, 1), got {settings.Dropout}");
        var targets = ResolveTargets(model, settings.TargetModules);
        var attached = new List<string>();
        foreach (var (path, layer) in Linears(model))
        {
            if (!targets.Any(t => Matches(path, t))) continue;
            layer.AttachLora(settings.Rank, settings.Alpha, settings.Dropout, generator);
            attached.Add(path);
        }
        return attached;
    }

    /// <summary>Folds every adapter into its base weight (W += (alpha/r)·B·A in float32) and removes it.</summary>
    public static int MergeAll(nn.Module model)
    {
        int merged = 0;
        foreach (var (_, layer) in Linears(model))
            if (layer.HasLora) { layer.MergeLora(); merged++; }
        return merged;
    }

    /// <summary>The adapter tensors under their PEFT keys (float32, as trained).</summary>
    public static List<KeyValuePair<string, Tensor>> AdapterTensors(nn.Module model)
    {
        var result = new List<KeyValuePair<string, Tensor>>();
        foreach (var (path, layer) in Linears(model))
        {
            if (!layer.HasLora) continue;
            result.Add(new(KeyPrefix + path + ".lora_A.weight", layer.lora_A!.weight));
            result.Add(new(KeyPrefix + path + ".lora_B.weight", layer.lora_B!.weight));
        }
        return result;
    }

    /// <summary>Writes the adapter directory (created if needed; existing adapter files are replaced).</summary>
    public static void Save(string dir, nn.Module model, LoraSettings settings, string baseModelNameOrPath)
    {
        var tensors = AdapterTensors(model);
        if (tensors.Count == 0) throw new InvalidOperationException("the model has no LoRA adapters to save");
        Directory.CreateDirectory(dir);
        SafetensorsWriter.Write(Path.Combine(dir, WeightsFileName), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        File.WriteAllText(Path.Combine(dir, ConfigFileName), ConfigJson(settings, ResolveTargets(model, settings.TargetModules), baseModelNameOrPath)
            .ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>adapter_config.json with the fields PEFT's LoraConfig serialises (defaults where we have no feature).</summary>
    public static JsonObject ConfigJson(LoraSettings s, IReadOnlyList<string> resolvedTargets, string baseModelNameOrPath) => new()
    {
        ["alpha_pattern"] = new JsonObject(),
        ["auto_mapping"] = null,
        ["base_model_name_or_path"] = baseModelNameOrPath,
        ["bias"] = "none",
        ["fan_in_fan_out"] = false,
        ["inference_mode"] = true,
        ["init_lora_weights"] = "gaussian",
        ["layer_replication"] = null,
        ["layers_pattern"] = null,
        ["layers_to_transform"] = null,
        ["loftq_config"] = new JsonObject(),
        ["lora_alpha"] = s.Alpha == Math.Floor(s.Alpha) ? JsonValue.Create((long)s.Alpha) : JsonValue.Create(s.Alpha),
        ["lora_dropout"] = s.Dropout,
        ["megatron_config"] = null,
        ["megatron_core"] = "megatron.core",
        ["modules_to_save"] = null,
        ["peft_type"] = "LORA",
        ["r"] = s.Rank,
        ["rank_pattern"] = new JsonObject(),
        ["revision"] = null,
        ["target_modules"] = new JsonArray(resolvedTargets.Select(t => (JsonNode)t).ToArray()),
        // finetune.py builds its LoraConfig without a task type.
        ["task_type"] = null,
        ["use_dora"] = false,
        ["use_rslora"] = false,
    };

    /// <summary>Reads adapter_config.json, rejecting LoRA variants this runtime does not implement.</summary>
    public static LoraSettings ReadConfig(string dir)
    {
        var path = Path.Combine(dir, ConfigFileName);
        if (!File.Exists(path)) throw new CheckpointException($"{dir}: {ConfigFileName} is missing (not a PEFT adapter directory)");
        JsonObject o;
        try { o = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new CheckpointException($"{path}: not a JSON object"); }
        catch (JsonException e) { throw new CheckpointException($"{path}: invalid JSON ({e.Message.Split('.')[0]})"); }
        string peftType = o["peft_type"]?.GetValue<string>() ?? "";
        if (peftType != "LORA") throw new CheckpointException($"{path}: peft_type '{peftType}' is not supported (expected LORA)");
        if (o["use_rslora"]?.GetValue<bool>() == true) throw new CheckpointException($"{path}: use_rslora adapters are not supported");
        if (o["use_dora"]?.GetValue<bool>() == true) throw new CheckpointException($"{path}: use_dora adapters are not supported");
        if (o["rank_pattern"] is JsonObject rp && rp.Count > 0 || o["alpha_pattern"] is JsonObject ap && ap.Count > 0)
            throw new CheckpointException($"{path}: per-module rank_pattern / alpha_pattern are not supported");
        string bias = o["bias"]?.GetValue<string>() ?? "none";
        if (bias != "none") throw new CheckpointException($"{path}: bias '{bias}' is not supported (expected none)");
        int r = o["r"]?.GetValue<int>() ?? throw new CheckpointException($"{path}: 'r' is missing");
        double alpha = o["lora_alpha"]?.GetValue<double>() ?? 8; // PEFT's default lora_alpha
        double dropout = o["lora_dropout"]?.GetValue<double>() ?? 0;
        IReadOnlyList<string> targets = o["target_modules"] switch
        {
            JsonArray a => a.Select(n => n!.GetValue<string>()).ToList(),
            JsonValue v when v.GetValueKind() == JsonValueKind.String && v.GetValue<string>() == AllLinear => [AllLinear],
            JsonValue v when v.GetValueKind() == JsonValueKind.String => throw new CheckpointException($"{path}: regular-expression target_modules ('{v.GetValue<string>()}') are not supported"),
            _ => throw new CheckpointException($"{path}: 'target_modules' is missing"),
        };
        return new LoraSettings(r, alpha, dropout, targets);
    }

    /// <summary>
    /// Attaches the adapter of <paramref name="dir"/> to <paramref name="model"/> (a loaded base) and copies its weights.
    /// Every adapter tensor must land on a layer of the model with the right shape; layers the model targets but the file
    /// lacks would keep random A and zero B (no effect) and are reported. Returns the adapted module paths.
    /// </summary>
    public static IReadOnlyList<string> Load(string dir, OpenVlaModel model)
    {
        var settings = ReadConfig(dir);
        var weightsPath = Path.Combine(dir, WeightsFileName);
        if (!File.Exists(weightsPath)) throw new CheckpointException($"{dir}: {WeightsFileName} is missing");
        using var file = SafetensorsFile.Open(weightsPath);
        var paths = Attach(model, settings, new Generator(0)); // A is overwritten below
        var layers = Linears(model).ToDictionary(l => l.Path, l => l.Layer);
        var loaded = new HashSet<string>();
        using var noGrad = torch.no_grad();
        foreach (var info in file.Tensors.Values)
        {
            string key = info.Name;
            string? part = key.EndsWith(".lora_A.weight") ? "A" : key.EndsWith(".lora_B.weight") ? "B" : null;
            if (!key.StartsWith(KeyPrefix) || part is null) throw new CheckpointException($"{weightsPath}: '{key}' is not a PEFT LoRA key ({KeyPrefix}<module>.lora_A.weight / .lora_B.weight)");
            string path = key[KeyPrefix.Length..^".lora_A.weight".Length];
            if (!layers.TryGetValue(path, out var layer) || !layer.HasLora)
            {
                // The published architecture's layers we never build (last ViT block, attn_pool) carry no information for inference.
                if (IsUnbuiltReferenceLayer(path)) continue;
                throw new CheckpointException($"{weightsPath}: adapter for '{path}', which is not a targeted linear layer of this model");
            }
            var target = part == "A" ? layer.lora_A!.weight : layer.lora_B!.weight;
            if (!info.Shape.SequenceEqual(target.shape))
                throw new CheckpointException($"{weightsPath}: '{key}' has shape [{string.Join(", ", info.Shape)}], the model expects [{string.Join(", ", target.shape)}] (rank {settings.Rank})");
            using var t = file.Load(key);
            target.copy_(t);
            loaded.Add(path + part);
        }
        var missing = paths.Where(p => !loaded.Contains(p + "A") || !loaded.Contains(p + "B")).ToList();
        if (missing.Count > 0)
            throw new CheckpointException($"{weightsPath}: no adapter weights for {missing.Count} targeted layer(s), first '{missing[0]}'");
        return paths;
    }

    static bool IsUnbuiltReferenceLayer(string path) =>
        path.StartsWith("vision_backbone.") && (path.Contains(".attn_pool.") || path.Contains(".blocks."));
}
