using System.Text;
using System.Text.Json;
using OpenVLA.Policy;

namespace OpenVLA.FineTune.Data;

/// <summary>Per-dim statistics of one array (actions or proprio), as stored in dataset_statistics.json.</summary>
/// <param name="Mask">Action only: which dims BOUNDS_Q99 normalizes (the gripper usually not).</param>
public sealed record ArrayStatistics(float[] Mean, float[] Std, float[] Max, float[] Min, float[] Q01, float[] Q99, bool[]? Mask = null)
{
    public int Dim => Mean.Length;

    /// <summary>These statistics' values normalized as the training pipeline does
    /// (<see cref="OpenVLA.Policy.ActionNormalizer.NormalizeForTraining"/>).</summary>
    public float[] Normalize(float[] values) => OpenVLA.Policy.ActionNormalizer.NormalizeForTraining(values, Q01, Q99, Min, Max, Mask);

    /// <summary>
    /// The reference's numbers over rows [N][D]: mean, population std (numpy ddof=0), min, max and <c>np.quantile(x, 0.01/0.99,
    /// axis=0)</c> with numpy's default linear interpolation (h = (N−1)·q, x[⌊h⌋] + (h−⌊h⌋)·(x[⌊h⌋+1] − x[⌊h⌋])). Sums are in
    /// double and rounded to float once, so they can differ from numpy's float32 pairwise sums in the last bit.
    /// </summary>
    public static ArrayStatistics Compute(IReadOnlyList<float[]> rows, int dim, bool[]? mask = null)
    {
        if (rows.Count == 0) throw new DatasetException("cannot compute statistics of an empty dataset");
        int n = rows.Count;
        var mean = new float[dim]; var std = new float[dim]; var max = new float[dim]; var min = new float[dim];
        var q01 = new float[dim]; var q99 = new float[dim];
        var column = new double[n];
        for (int d = 0; d < dim; d++)
        {
            double sum = 0;
            for (int i = 0; i < n; i++)
            {
                if (rows[i].Length != dim) throw new DatasetException($"statistics: row {i} has {rows[i].Length} dims, expected {dim}");
                column[i] = rows[i][d];
                sum += column[i];
            }
            double m = sum / n, sq = 0;
            for (int i = 0; i < n; i++) sq += (column[i] - m) * (column[i] - m);
            Array.Sort(column);
            mean[d] = (float)m;
            std[d] = (float)Math.Sqrt(sq / n);
            min[d] = (float)column[0];
            max[d] = (float)column[n - 1];
            q01[d] = (float)Quantile(column, 0.01);
            q99[d] = (float)Quantile(column, 0.99);
        }
        return new ArrayStatistics(mean, std, max, min, q01, q99, mask);
    }

    /// <summary>numpy's default ("linear") quantile of sorted values.</summary>
    public static double Quantile(double[] sorted, double q)
    {
        double h = (sorted.Length - 1) * q;
        int lo = (int)Math.Floor(h);
        if (lo >= sorted.Length - 1) return sorted[^1];
        return sorted[lo] + (h - lo) * (sorted[lo + 1] - sorted[lo]);
    }

    /// <summary>What the reference stores when a dataset has no proprio: the statistics of zeros shaped like the action.</summary>
    public static ArrayStatistics Zeros(int dim) => new(new float[dim], new float[dim], new float[dim], new float[dim], new float[dim], new float[dim]);
}

/// <summary>
/// One dataset's entry of <c>dataset_statistics.json</c> (reference: prismatic/vla/datasets/rlds/utils/data_utils.py
/// get_dataset_statistics / save_dataset_statistics):
/// <c>{ "NAME": { "action": {mean,std,max,min,q01,q99,mask}, "proprio": {mean,std,max,min,q01,q99}, "num_transitions", "num_trajectories" } }</c>.
/// The same entry becomes <c>norm_stats[NAME]</c> of a fine-tuned checkpoint.
/// </summary>
public sealed record DatasetStatistics(string DatasetName, ArrayStatistics Action, ArrayStatistics Proprio, long NumTransitions, long NumTrajectories)
{
    public const string FileName = "dataset_statistics.json";

    /// <summary>
    /// The aux targets' statistics (the dataset config's aux_keys), which the auxiliary head standardizes with; null without
    /// aux_keys. Not part of dataset_statistics.json: a training device, not something the policy needs.
    /// </summary>
    public ArrayStatistics? Aux { get; init; }

    /// <summary>The un-normalization statistics the policy core uses at inference.</summary>
    public ActionStats ToActionStats()
    {
        static double[] D(float[] v) => Array.ConvertAll(v, x => (double)x);
        return new(D(Action.Q01), D(Action.Q99), Action.Mask ?? Enumerable.Repeat(true, Action.Dim).ToArray(), D(Action.Mean), D(Action.Std), D(Action.Min), D(Action.Max));
    }

    public static string ToJson(IEnumerable<DatasetStatistics> datasets)
    {
        using var buffer = new MemoryStream();
        using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = true }))
        {
            w.WriteStartObject();
            foreach (var s in datasets)
            {
                w.WriteStartObject(s.DatasetName);
                WriteArray(w, "action", s.Action, withMask: true);
                WriteArray(w, "proprio", s.Proprio, withMask: false);
                w.WriteNumber("num_transitions", s.NumTransitions);
                w.WriteNumber("num_trajectories", s.NumTrajectories);
                w.WriteEndObject();
            }
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(buffer.ToArray());
    }

    /// <summary>Writes dataset_statistics.json into <paramref name="directory"/> atomically (temp file, then rename).</summary>
    public string SaveTo(string directory)
    {
        Directory.CreateDirectory(directory);
        string path = Path.Combine(directory, FileName), temp = path + ".tmp";
        File.WriteAllText(temp, ToJson([this]));
        File.Move(temp, path, overwrite: true);
        return path;
    }

    public static IReadOnlyDictionary<string, DatasetStatistics> Load(string path)
    {
        if (!File.Exists(path)) throw new DatasetException($"statistics file not found: {path}");
        try { return Parse(File.ReadAllText(path), path); }
        catch (Exception e) when (e is JsonException or InvalidOperationException or KeyNotFoundException or FormatException)
        {
            throw new DatasetException($"{path} is not a valid dataset_statistics.json: {e.Message}", e);
        }
    }

    public static IReadOnlyDictionary<string, DatasetStatistics> Parse(string json, string source = "dataset_statistics.json")
    {
        using var doc = JsonDocument.Parse(json);
        var result = new Dictionary<string, DatasetStatistics>(StringComparer.Ordinal);
        foreach (var entry in doc.RootElement.EnumerateObject())
        {
            var e = entry.Value;
            var action = ReadArray(e.GetProperty("action"));
            var proprio = e.TryGetProperty("proprio", out var p) ? ReadArray(p) : ArrayStatistics.Zeros(action.Dim);
            result[entry.Name] = new DatasetStatistics(entry.Name, action, proprio,
                e.TryGetProperty("num_transitions", out var nt) ? nt.GetInt64() : 0,
                e.TryGetProperty("num_trajectories", out var nj) ? nj.GetInt64() : 0);
        }
        if (result.Count == 0) throw new DatasetException($"{source} holds no datasets");
        return result;
    }

    private static void WriteArray(Utf8JsonWriter w, string name, ArrayStatistics s, bool withMask)
    {
        w.WriteStartObject(name);
        foreach (var (key, values) in new[] { ("mean", s.Mean), ("std", s.Std), ("max", s.Max), ("min", s.Min), ("q01", s.Q01), ("q99", s.Q99) })
        {
            w.WriteStartArray(key);
            foreach (float v in values) w.WriteNumberValue(v);
            w.WriteEndArray();
        }
        if (withMask)
        {
            w.WriteStartArray("mask");
            foreach (bool b in s.Mask ?? Enumerable.Repeat(true, s.Dim).ToArray()) w.WriteBooleanValue(b);
            w.WriteEndArray();
        }
        w.WriteEndObject();
    }

    private static ArrayStatistics ReadArray(JsonElement e)
    {
        float[] F(string k) => e.GetProperty(k).EnumerateArray().Select(x => x.GetSingle()).ToArray();
        bool[]? mask = e.TryGetProperty("mask", out var m) ? m.EnumerateArray().Select(x => x.GetBoolean()).ToArray() : null;
        return new ArrayStatistics(F("mean"), F("std"), F("max"), F("min"), F("q01"), F("q99"), mask);
    }
}
