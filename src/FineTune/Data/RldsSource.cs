using System.Text;
using System.Text.Json;
using Google.Protobuf;
using OpenVLA.FineTune.Data.TfExample;

namespace OpenVLA.FineTune.Data;

/// <summary>
/// RLDS episodes in TFDS TFRecord shards (Open X-Embodiment layout): one <c>tf.train.Example</c> per episode whose features
/// are the flattened step tensors, e.g. <c>steps/observation/image</c> (one JPEG per step), <c>steps/action</c> (T·D floats),
/// <c>steps/language_instruction</c> (one string per step), <c>steps/is_first</c> / <c>is_last</c> / <c>is_terminal</c>.
/// Opening scans every record once to index episodes (shard, offset, length) and keep their actions, so statistics and a
/// resumed stream need no second pass; images are read again only when a sample needs them.
/// </summary>
internal sealed class RldsSource : IEpisodeSource
{
    private readonly DatasetConfig _config;
    private readonly List<string> _shards;
    private readonly bool[] _shardCompressed;
    private readonly List<Entry> _index = [];
    private readonly string[] _imageFeatures;
    private readonly string[] _actionFeatures;
    private readonly string _instructionFeature;
    private readonly string? _proprioFeature;
    private TfRecordReader? _open;
    private int _openShard = -1;

    private sealed record Entry(int Shard, long Record, long Offset, RawEpisode Stored);

    public string Format => DatasetFormats.Rlds;
    public string DefaultName { get; }
    public int EpisodeCount => _index.Count;
    public int EpisodeLength(int episode) => _index[episode].Stored.Actions.Length;
    public int GroupOf(int episode) => _index[episode].Shard;
    public bool RandomAccess => !_shardCompressed.Any(c => c);

    /// <summary>TFRecord shards of a TFDS directory: the "train" split's shards when there are any, otherwise every *.tfrecord* file.</summary>
    public static List<string> FindShards(string dir)
    {
        var all = Directory.EnumerateFiles(dir).Where(f => Path.GetFileName(f).Contains(".tfrecord", StringComparison.Ordinal)).Order(StringComparer.Ordinal).ToList();
        var train = all.Where(f => Path.GetFileName(f).Contains("-train.tfrecord", StringComparison.Ordinal)).ToList();
        return train.Count > 0 ? train : all;
    }

    public RldsSource(string dir, DatasetConfig config, Action<string>? progress = null)
    {
        _config = config;
        _shards = FindShards(dir);
        if (_shards.Count == 0) throw new DatasetException($"no *.tfrecord* shards in {dir}");
        _shardCompressed = _shards.Select(TfRecordFormat.IsGzip).ToArray();
        DefaultName = ReadTfdsName(dir);

        Example first;
        using (var reader = TfRecordReader.Open(_shards[0], _shardCompressed[0]))
        {
            if (!reader.TryRead(out var bytes)) throw new DatasetException($"TFRecord file {_shards[0]} holds no records");
            first = ParseExample(bytes, _shards[0], 0);
        }
        var keys = first.Features?.Feature ?? throw new DatasetException($"TFRecord file {_shards[0]}: record 0 has no features");
        string where = $"RLDS dataset {dir}";
        if (config.AuxKeys is not null) throw new DatasetException($"{where}: aux_keys are supported for LeRobot datasets only");
        _imageFeatures = config.ImageKeys!.Select(k => Resolve(keys, k)
            ?? throw new DatasetException($"{where} has no image key '{k}' (step features: {StepKeys(keys)})")).ToArray();
        _actionFeatures = config.ActionKeys!.Select(k => Resolve(keys, k)
            ?? throw new DatasetException($"{where} has no action key '{k}' (step features: {StepKeys(keys)})")).ToArray();
        _instructionFeature = Resolve(keys, config.Instruction!)
            ?? throw new DatasetException($"{where} has no language: no instruction feature '{config.Instruction}' (step features: {StepKeys(keys)})");
        _proprioFeature = config.ProprioKey is { } pk ? Resolve(keys, pk) : null;
        if (config.ProprioKey is { } pk2 && _proprioFeature is null && !config.ProprioOptional)
            throw new DatasetException($"{where} has no proprio key '{pk2}' (step features: {StepKeys(keys)})");

        for (int s = 0; s < _shards.Count; s++)
        {
            progress?.Invoke($"indexing shard {s + 1}/{_shards.Count} ({_index.Count} episodes so far): {Path.GetFileName(_shards[s])}");
            using var reader = TfRecordReader.Open(_shards[s], _shardCompressed[s]);
            while (true)
            {
                long record = reader.RecordIndex, offset = reader.Offset;
                if (!reader.TryRead(out var bytes)) break;
                var example = ParseExample(bytes, _shards[s], record);
                var stored = Decode(example, withFrames: false, _shards[s], record);
                if (_index.Count == 0) LeRobotSource.CheckActionDim(stored.Actions[0].Length, config, where);
                _index.Add(new Entry(s, record, offset, stored));
            }
        }
    }

    public RawEpisode Read(int episode, bool withFrames)
    {
        var entry = _index[episode];
        if (!withFrames) return entry.Stored;
        // Reads forward in the open shard when possible, which keeps GZIP shards read in order from being decompressed again.
        if (_open is null || _openShard != entry.Shard || (_open.Offset > entry.Offset && !_open.CanSeekBack))
        {
            _open?.Dispose();
            _open = TfRecordReader.Open(_shards[entry.Shard], _shardCompressed[entry.Shard]);
            _openShard = entry.Shard;
        }
        _open.SkipTo(entry.Offset, entry.Record);
        if (!_open.TryRead(out var bytes)) throw new DatasetException($"TFRecord file {_shards[entry.Shard]}: record {entry.Record} disappeared since the dataset was opened");
        return Decode(ParseExample(bytes, _shards[entry.Shard], entry.Record), withFrames: true, _shards[entry.Shard], entry.Record);
    }

    private RawEpisode Decode(Example example, bool withFrames, string file, long record)
    {
        var f = example.Features?.Feature ?? throw new DatasetException($"TFRecord file {file}: record {record} has no features");
        string where = $"TFRecord file {file}: record {record}";
        int steps = StepCount(f) ?? throw new DatasetException($"{where} has no steps/is_first, steps/is_last or steps/is_terminal to count its steps (not an RLDS episode?)");
        if (steps == 0) throw new DatasetException($"{where} is an episode with no steps");

        var parts = _actionFeatures.Select(k => Floats(f, k, steps, where)).ToArray();
        var actions = new float[steps][];
        for (int t = 0; t < steps; t++) actions[t] = parts.Length == 1 ? parts[0][t] : parts.SelectMany(p => p[t]).ToArray();
        float[][]? proprio = _proprioFeature is null ? null : Floats(f, _proprioFeature, steps, where);

        var texts = Bytes(f, _instructionFeature, where);
        if (texts.Count != steps && texts.Count != 1)
            throw new DatasetException($"{where}: '{_instructionFeature}' has {texts.Count} entries for {steps} steps");
        var instructions = new string[steps];
        for (int t = 0; t < steps; t++)
        {
            var b = texts.Count == 1 ? texts[0] : texts[t];
            // Consecutive steps usually repeat the instruction: share one string instead of one per step.
            instructions[t] = t > 0 && (texts.Count == 1 || b.Equals(texts[t - 1])) ? instructions[t - 1] : b.ToStringUtf8();
        }

        Frame?[][]? frames = null;
        if (withFrames)
        {
            frames = new Frame?[_imageFeatures.Length][];
            for (int c = 0; c < frames.Length; c++)
            {
                var images = Bytes(f, _imageFeatures[c], where);
                if (images.Count != steps) throw new DatasetException($"{where}: image '{_imageFeatures[c]}' has {images.Count} frames for {steps} steps");
                frames[c] = images.Select(b => (Frame?)Frame.FromEncoded(b.ToByteArray())).ToArray();
            }
        }
        return new RawEpisode(actions, proprio, instructions, frames);
    }

    private static int? StepCount(Google.Protobuf.Collections.MapField<string, Feature> f)
    {
        foreach (string k in new[] { "steps/is_first", "steps/is_last", "steps/is_terminal" })
            if (f.TryGetValue(k, out var v))
                return v.KindCase switch
                {
                    Feature.KindOneofCase.Int64List => v.Int64List.Value.Count,
                    Feature.KindOneofCase.FloatList => v.FloatList.Value.Count,
                    Feature.KindOneofCase.BytesList => v.BytesList.Value.Count,
                    _ => 0,
                };
        return null;
    }

    private static float[][] Floats(Google.Protobuf.Collections.MapField<string, Feature> f, string key, int steps, string where)
    {
        if (!f.TryGetValue(key, out var v)) throw new DatasetException($"{where} has no feature '{key}'");
        IReadOnlyList<float> values = v.KindCase switch
        {
            Feature.KindOneofCase.FloatList => v.FloatList.Value,
            Feature.KindOneofCase.Int64List => v.Int64List.Value.Select(x => (float)x).ToArray(),
            _ => throw new DatasetException($"{where}: feature '{key}' holds {v.KindCase}, expected numbers"),
        };
        if (values.Count % steps != 0)
            throw new DatasetException($"{where}: mismatched action dimension: '{key}' has {values.Count} values, not a multiple of its {steps} steps");
        int d = values.Count / steps;
        var result = new float[steps][];
        for (int t = 0; t < steps; t++)
        {
            result[t] = new float[d];
            for (int i = 0; i < d; i++) result[t][i] = values[t * d + i];
        }
        return result;
    }

    private static IReadOnlyList<ByteString> Bytes(Google.Protobuf.Collections.MapField<string, Feature> f, string key, string where)
    {
        if (!f.TryGetValue(key, out var v)) throw new DatasetException($"{where} has no feature '{key}'");
        return v.KindCase == Feature.KindOneofCase.BytesList ? v.BytesList.Value
            : throw new DatasetException($"{where}: feature '{key}' holds {v.KindCase}, expected bytes");
    }

    /// <summary>A config key as written (<c>steps/...</c>, <c>episode_metadata/...</c>), else <c>steps/KEY</c>, else <c>steps/observation/KEY</c>.</summary>
    private static string? Resolve(Google.Protobuf.Collections.MapField<string, Feature> keys, string key)
    {
        if (key.StartsWith("steps/", StringComparison.Ordinal) || key.StartsWith("episode_metadata/", StringComparison.Ordinal))
            return keys.ContainsKey(key) ? key : null;
        foreach (string candidate in new[] { "steps/" + key, "steps/observation/" + key })
            if (keys.ContainsKey(candidate)) return candidate;
        return null;
    }

    private static string StepKeys(Google.Protobuf.Collections.MapField<string, Feature> keys) =>
        string.Join(", ", keys.Keys.Where(k => k.StartsWith("steps/", StringComparison.Ordinal)).Select(k => k["steps/".Length..]).Order(StringComparer.Ordinal));

    private static Example ParseExample(byte[] bytes, string file, long record)
    {
        try { return Example.Parser.ParseFrom(bytes); }
        catch (InvalidProtocolBufferException e) { throw new DatasetException($"TFRecord file {file}: record {record} is not a tf.train.Example: {e.Message}", e); }
    }

    /// <summary>TFDS writes dataset_info.json with the builder name; a TFDS directory is NAME/VERSION, so fall back to NAME.</summary>
    private static string ReadTfdsName(string dir)
    {
        string info = Path.Combine(dir, "dataset_info.json");
        if (File.Exists(info))
        {
            try
            {
                using var doc = JsonDocument.Parse(File.ReadAllText(info));
                if (doc.RootElement.TryGetProperty("name", out var n) && n.GetString() is { Length: > 0 } name) return name;
            }
            catch (JsonException e) { throw new DatasetException($"{info} is not valid JSON: {e.Message}", e); }
        }
        var d = new DirectoryInfo(dir);
        return d.Name.All(c => char.IsDigit(c) || c == '.') && d.Parent is { } parent ? parent.Name : d.Name;
    }

    public void Dispose() => _open?.Dispose();
}

/// <summary>One episode to write as an RLDS record: per-step frames (encoded PNG/JPEG), actions, instructions, optional state.</summary>
/// <param name="Images">Image key (e.g. "image", stored as steps/observation/image) → one encoded frame per step.</param>
public sealed record RldsEpisode(
    IReadOnlyDictionary<string, IReadOnlyList<byte[]>> Images,
    IReadOnlyList<float[]> Actions,
    IReadOnlyList<string> Instructions,
    IReadOnlyList<float[]>? State = null);

/// <summary>Writes RLDS episodes as TFDS-style TFRecord shards (for converting data and for tests).</summary>
public static class RldsWriter
{
    public static Example ToExample(RldsEpisode episode)
    {
        int steps = episode.Actions.Count;
        if (episode.Instructions.Count != steps) throw new ArgumentException($"{episode.Instructions.Count} instructions for {steps} steps");
        var f = new Features();
        foreach (var (key, frames) in episode.Images)
        {
            if (frames.Count != steps) throw new ArgumentException($"image '{key}' has {frames.Count} frames for {steps} steps");
            var list = new BytesList();
            list.Value.AddRange(frames.Select(ByteString.CopyFrom));
            f.Feature["steps/observation/" + key] = new Feature { BytesList = list };
        }
        f.Feature["steps/action"] = FloatFeature(episode.Actions);
        if (episode.State is { } state) f.Feature["steps/observation/state"] = FloatFeature(state);
        var text = new BytesList();
        text.Value.AddRange(episode.Instructions.Select(s => ByteString.CopyFrom(s, Encoding.UTF8)));
        f.Feature["steps/language_instruction"] = new Feature { BytesList = text };
        f.Feature["steps/is_first"] = Flags(steps, t => t == 0);
        f.Feature["steps/is_last"] = Flags(steps, t => t == steps - 1);
        f.Feature["steps/is_terminal"] = Flags(steps, t => t == steps - 1);
        f.Feature["steps/reward"] = FloatFeature(Enumerable.Range(0, steps).Select(t => new[] { t == steps - 1 ? 1f : 0f }).ToList());
        return new Example { Features = f };
    }

    /// <summary>Writes <c>DIR/NAME-train.tfrecord-SSSSS-of-NNNNN</c> shards (episodes dealt round-robin) and a minimal dataset_info.json.</summary>
    public static IReadOnlyList<string> WriteDataset(string dir, string name, IReadOnlyList<RldsEpisode> episodes, int shards = 1, bool gzip = false)
    {
        Directory.CreateDirectory(dir);
        var paths = Enumerable.Range(0, shards).Select(s => Path.Combine(dir, $"{name}-train.tfrecord-{s:D5}-of-{shards:D5}")).ToList();
        var writers = paths.Select(p => TfRecordWriter.Create(p, gzip)).ToList();
        try
        {
            for (int e = 0; e < episodes.Count; e++) writers[e % shards].Write(ToExample(episodes[e]).ToByteArray());
        }
        finally { writers.ForEach(w => w.Dispose()); }
        File.WriteAllText(Path.Combine(dir, "dataset_info.json"), JsonSerializer.Serialize(new { name, fileFormat = "tfrecord", moduleName = "openvla.net" }));
        return paths;
    }

    private static Feature FloatFeature(IReadOnlyList<float[]> rows)
    {
        var list = new FloatList();
        foreach (var r in rows) list.Value.AddRange(r);
        return new Feature { FloatList = list };
    }

    private static Feature Flags(int steps, Func<int, bool> on)
    {
        var list = new Int64List();
        for (int t = 0; t < steps; t++) list.Value.Add(on(t) ? 1 : 0);
        return new Feature { Int64List = list };
    }
}
