using System.Text.Json;
using System.Text.Json.Nodes;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>
/// A Hugging Face OpenVLA checkpoint directory (openvla-model.md §2.1): config.json, model.safetensors or sharded
/// model-0000N-of-0000M.safetensors with model.safetensors.index.json, tokenizer.model, preprocessor_config.json and,
/// for fine-tunes, dataset_statistics.json, which replaces config.json's norm_stats as the reference loaders do.
/// </summary>
public sealed class VlaCheckpoint
{
    public string Directory { get; }
    public VlaConfig Config { get; }
    public IReadOnlyDictionary<string, ActionStats> NormStats { get; }
    /// <summary>Proprioceptive-state statistics per dataset, where the statistics have them (OpenVLA-OFT uses them).</summary>
    public IReadOnlyDictionary<string, ActionStats> ProprioStats { get; }
    public IReadOnlyList<string> WeightFiles { get; }
    public string TokenizerPath => Path.Combine(Directory, "tokenizer.model");
    public string PreprocessorConfigPath => Path.Combine(Directory, "preprocessor_config.json");

    VlaCheckpoint(string dir, VlaConfig config, IReadOnlyDictionary<string, ActionStats> stats, IReadOnlyDictionary<string, ActionStats> proprio, IReadOnlyList<string> weights)
    {
        Directory = dir; Config = config; NormStats = stats; ProprioStats = proprio; WeightFiles = weights;
    }

    /// <param name="requireWeights">false to read only the metadata (config, statistics, tokenizer) of a directory
    /// without safetensors, e.g. to build a model with random weights for a benchmark.</param>
    public static VlaCheckpoint Open(string dir, bool requireWeights = true)
    {
        if (!System.IO.Directory.Exists(dir)) throw new CheckpointException($"checkpoint directory '{dir}' does not exist");
        var configPath = Path.Combine(dir, "config.json");
        if (!File.Exists(configPath)) throw new CheckpointException($"{dir}: config.json is missing (not a Hugging Face checkpoint directory)");
        var config = VlaConfig.Load(configPath);

        var statsPath = Path.Combine(dir, "dataset_statistics.json");
        var (stats, proprio) = LoadStatistics(File.Exists(statsPath) ? statsPath : null, config, configPath);
        if (!File.Exists(Path.Combine(dir, "tokenizer.model"))) throw new CheckpointException($"{dir}: tokenizer.model is missing");
        return new VlaCheckpoint(dir, config, stats, proprio, requireWeights ? FindWeightFiles(dir) : []);
    }

    static (Dictionary<string, ActionStats>, Dictionary<string, ActionStats>) LoadStatistics(string? statsPath, VlaConfig config, string configPath)
    {
        if (statsPath is not null)
        {
            var root = OpenVLA.Policy.Checkpoint.NormStats.LoadRoot(statsPath);
            return (OpenVLA.Policy.Checkpoint.NormStats.Parse(root, statsPath), OpenVLA.Policy.Checkpoint.NormStats.ParseProprio(root, statsPath));
        }
        if (config.Raw["norm_stats"] is JsonObject ns)
            return (OpenVLA.Policy.Checkpoint.NormStats.Parse(ns, configPath + " norm_stats"), OpenVLA.Policy.Checkpoint.NormStats.ParseProprio(ns, configPath + " norm_stats"));
        return ([], []);
    }

    /// <summary>The same checkpoint with the statistics of another dataset_statistics.json (a LoRA adapter's replaces the
    /// base's, as it does next to a merged fine-tune).</summary>
    public VlaCheckpoint WithStatistics(string statsPath)
    {
        var (stats, proprio) = LoadStatistics(statsPath, Config, statsPath);
        return new(Directory, Config, stats, proprio, WeightFiles);
    }

    static List<string> FindWeightFiles(string dir)
    {
        var single = Path.Combine(dir, "model.safetensors");
        if (File.Exists(single)) return [single];
        var index = Path.Combine(dir, "model.safetensors.index.json");
        if (!File.Exists(index))
            throw new CheckpointException($"{dir}: no weights (neither model.safetensors nor model.safetensors.index.json)");
        JsonObject map;
        try { map = (JsonNode.Parse(File.ReadAllText(index)) as JsonObject)?["weight_map"] as JsonObject ?? throw new CheckpointException($"{index}: no 'weight_map'"); }
        catch (JsonException e) { throw new CheckpointException($"{index}: invalid JSON ({e.Message.Split('.')[0]})"); }
        var files = map.Select(kv => kv.Value?.GetValue<string>() ?? "").Distinct().OrderBy(f => f, StringComparer.Ordinal).ToList();
        var result = new List<string>();
        foreach (var f in files)
        {
            if (f.Contains('/') || f.Contains('\\') || f.Length == 0) throw new CheckpointException($"{index}: invalid shard name '{f}'");
            var p = Path.Combine(dir, f);
            if (!File.Exists(p)) throw new CheckpointException($"{dir}: shard {f} named in model.safetensors.index.json is missing");
            result.Add(p);
        }
        return result;
    }

    /// <summary>Resolves the statistics to un-normalize with, following the reference rules: no key and one dataset →
    /// that one; no key and several → error listing them; unknown key → error listing them.</summary>
    public string ResolveUnnormKey(string? key)
    {
        var keys = string.Join(", ", NormStats.Keys.OrderBy(k => k, StringComparer.Ordinal));
        if (string.IsNullOrEmpty(key))
        {
            if (NormStats.Count == 1) return NormStats.Keys.First();
            if (NormStats.Count == 0) throw new PolicyInputException("the checkpoint has no action statistics (norm_stats or dataset_statistics.json)");
            throw new PolicyInputException($"the checkpoint has statistics for several datasets; choose one with unnorm_key: {keys}");
        }
        if (!NormStats.ContainsKey(key)) throw new PolicyInputException($"unknown unnorm_key '{key}'; valid keys: {keys}");
        return key;
    }
}
