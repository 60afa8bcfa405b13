using System.Text.Json;
using System.Text.Json.Nodes;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>
/// Reads and writes dataset statistics in the OpenVLA structure (openvla-model.md §3.4):
/// { "&lt;dataset&gt;": { "action": {mean,std,max,min,q01,q99,mask}, "proprio": {...}, "num_transitions", "num_trajectories" } },
/// the same object config.json embeds as `norm_stats`.
/// </summary>
public static class NormStats
{
    public static Dictionary<string, ActionStats> Parse(JsonObject root, string source)
    {
        var result = new Dictionary<string, ActionStats>(StringComparer.Ordinal);
        foreach (var (key, node) in root)
        {
            if (node is not JsonObject entry || entry["action"] is not JsonObject action)
                throw new CheckpointException($"{source}: statistics for '{key}' have no 'action' object");
            double[] Vec(string name, bool required)
            {
                if (action[name] is JsonArray arr) return arr.Select(v => v!.GetValue<double>()).ToArray();
                if (required) throw new CheckpointException($"{source}: statistics for '{key}' lack action.{name}");
                return [];
            }
            var q01 = Vec("q01", true);
            var q99 = Vec("q99", true);
            if (q01.Length != q99.Length) throw new CheckpointException($"{source}: '{key}' has {q01.Length} q01 values but {q99.Length} q99 values");
            bool[] mask = action["mask"] is JsonArray m ? m.Select(v => v!.GetValue<bool>()).ToArray() : Enumerable.Repeat(true, q01.Length).ToArray();
            if (mask.Length != q01.Length) throw new CheckpointException($"{source}: '{key}' mask has {mask.Length} entries for {q01.Length} dims");
            double[]? Opt(string name) { var v = Vec(name, false); return v.Length == q01.Length ? v : null; }
            result[key] = new ActionStats(q01, q99, mask, Opt("mean"), Opt("std"), Opt("min"), Opt("max"));
        }
        return result;
    }

    /// <summary>The "proprio" statistics of each dataset that has them with q01/q99 (OpenVLA-OFT normalizes the robot
    /// state with them); datasets without a proprio entry are absent from the result.</summary>
    public static Dictionary<string, ActionStats> ParseProprio(JsonObject root, string source)
    {
        var result = new Dictionary<string, ActionStats>(StringComparer.Ordinal);
        foreach (var (key, node) in root)
        {
            if (node is not JsonObject entry || entry["proprio"] is not JsonObject proprio || proprio["q01"] is not JsonArray) continue;
            double[] Vec(string name) => proprio[name] is JsonArray arr ? arr.Select(v => v!.GetValue<double>()).ToArray() : [];
            var q01 = Vec("q01");
            var q99 = Vec("q99");
            if (q01.Length != q99.Length) throw new CheckpointException($"{source}: '{key}' has {q01.Length} proprio q01 values but {q99.Length} q99 values");
            bool[] mask = proprio["mask"] is JsonArray m ? m.Select(v => v!.GetValue<bool>()).ToArray() : Enumerable.Repeat(true, q01.Length).ToArray();
            if (mask.Length != q01.Length) throw new CheckpointException($"{source}: '{key}' proprio mask has {mask.Length} entries for {q01.Length} dims");
            double[]? Opt(string name) { var v = Vec(name); return v.Length == q01.Length ? v : null; }
            result[key] = new ActionStats(q01, q99, mask, Opt("mean"), Opt("std"), Opt("min"), Opt("max"));
        }
        return result;
    }

    public static Dictionary<string, ActionStats> Load(string path) => Parse(LoadRoot(path), path);

    /// <summary>The whole statistics object of a dataset_statistics.json.</summary>
    public static JsonObject LoadRoot(string path)
    {
        try
        {
            var root = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new CheckpointException($"{path}: not a JSON object");
            Parse(root, path);   // validates the action entries
            return root;
        }
        catch (JsonException e) { throw new CheckpointException($"{path}: invalid JSON ({e.Message.Split('.')[0]})"); }
        catch (InvalidOperationException e) { throw new CheckpointException($"{path}: unexpected value type ({e.Message})"); }
    }

    /// <summary>The JSON object of one dataset's statistics (proprio all zeros when the dataset has none).</summary>
    public static JsonObject ToJson(ActionStats a, long numTransitions, long numTrajectories, ActionStats? proprio = null)
    {
        JsonArray Arr(double[]? v, int n) => new((v ?? new double[n]).Select(x => (JsonNode)x).ToArray());
        int d = a.Q01.Length;
        var p = proprio ?? new ActionStats(new double[d], new double[d], new bool[d]);
        int pd = p.Q01.Length;
        return new JsonObject
        {
            ["action"] = new JsonObject
            {
                ["mean"] = Arr(a.Mean, d), ["std"] = Arr(a.Std, d), ["max"] = Arr(a.Max, d), ["min"] = Arr(a.Min, d),
                ["q01"] = Arr(a.Q01, d), ["q99"] = Arr(a.Q99, d), ["mask"] = new JsonArray(a.Mask.Select(x => (JsonNode)x).ToArray()),
            },
            ["proprio"] = new JsonObject
            {
                ["mean"] = Arr(p.Mean, pd), ["std"] = Arr(p.Std, pd), ["max"] = Arr(p.Max, pd), ["min"] = Arr(p.Min, pd),
                ["q01"] = Arr(p.Q01, pd), ["q99"] = Arr(p.Q99, pd),
            },
            ["num_transitions"] = numTransitions,
            ["num_trajectories"] = numTrajectories,
        };
    }
}
