using OpenVLA.Policy.Preprocessing;
using System.Text.Json;
using System.Text.RegularExpressions;
using OpenCvSharp;

namespace OpenVLA.FineTune.Data;

/// <summary>
/// LeRobot v2.1 datasets (Hugging Face hub layout): <c>meta/info.json</c> (fps, features, data_path, video_path, chunks_size),
/// <c>meta/episodes.jsonl</c> (episode_index, length), <c>meta/tasks.jsonl</c> (task_index → task), one parquet file per
/// episode, and for "video" features one mp4 per episode and camera. "image" features are parquet structs {bytes, path}.
/// </summary>
internal sealed partial class LeRobotSource : IEpisodeSource
{
    private readonly string _root;
    private readonly DatasetConfig _config;
    private readonly double _fps;
    private readonly int _chunksSize;
    private readonly string _dataPath;
    private readonly string? _videoPath;
    private readonly Dictionary<string, Feature> _features;
    private readonly (int Index, int Length)[] _episodes;
    private readonly Dictionary<long, string> _tasks = [];
    private readonly bool _hasProprio;

    private sealed record Feature(string Dtype, int[] Shape);

    public string Format => DatasetFormats.LeRobot;
    public string DefaultName { get; }
    public int EpisodeCount => _episodes.Length;
    public bool RandomAccess => true;
    /// <summary>Some task in meta/tasks.jsonl is empty, so some episodes may have no language.</summary>
    public bool HasEmptyTask => _tasks.Values.Any(string.IsNullOrWhiteSpace);
    public int EpisodeLength(int episode) => _episodes[episode].Length;
    public int GroupOf(int episode) => episode;

    /// <summary>
    /// The name a dataset gives itself: the single key of its own dataset_statistics.json (what `openvla demos --name`
    /// writes), so a model trained on it un-normalizes under the dataset's name rather than its folder's.
    /// </summary>
    private static string? OwnStatisticsName(string root)
    {
        string path = Path.Combine(root, "dataset_statistics.json");
        if (!File.Exists(path)) return null;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            var keys = doc.RootElement.ValueKind == JsonValueKind.Object ? doc.RootElement.EnumerateObject().Select(p => p.Name).ToList() : [];
            return keys.Count == 1 && keys[0].Length > 0 ? keys[0] : null;
        }
        catch (JsonException) { return null; }
    }

    public LeRobotSource(string root, DatasetConfig config)
    {
        _root = root;
        _config = config;
        DefaultName = OwnStatisticsName(root) ?? new DirectoryInfo(root).Name;
        string infoPath = Path.Combine(root, "meta", "info.json");
        using var info = ParseJson(infoPath);
        var r = info.RootElement;
        string version = r.TryGetProperty("codebase_version", out var v) ? v.GetString() ?? "" : "";
        if (!version.StartsWith("v2.", StringComparison.Ordinal))
            throw new DatasetException($"unknown LeRobot layout in {root}: codebase_version is '{version}', this reader supports v2.0/v2.1");
        _fps = r.TryGetProperty("fps", out var fps) ? fps.GetDouble() : throw new DatasetException($"{infoPath} has no 'fps'");
        _chunksSize = r.TryGetProperty("chunks_size", out var cs) ? cs.GetInt32() : 1000;
        _dataPath = r.TryGetProperty("data_path", out var dp) ? dp.GetString()! : "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet";
        _videoPath = r.TryGetProperty("video_path", out var vp) && vp.ValueKind == JsonValueKind.String ? vp.GetString() : null;
        if (!r.TryGetProperty("features", out var feats) || feats.ValueKind != JsonValueKind.Object)
            throw new DatasetException($"{infoPath} has no 'features' object");
        _features = feats.EnumerateObject().ToDictionary(p => p.Name, p => new Feature(
            p.Value.TryGetProperty("dtype", out var dt) ? dt.GetString() ?? "" : "",
            p.Value.TryGetProperty("shape", out var sh) && sh.ValueKind == JsonValueKind.Array ? sh.EnumerateArray().Select(x => x.GetInt32()).ToArray() : []));

        _episodes = ReadJsonLines(Path.Combine(root, "meta", "episodes.jsonl"))
            .Select(e => (Index: Int(e, "episode_index", "episodes.jsonl"), Length: Int(e, "length", "episodes.jsonl")))
            .OrderBy(e => e.Index).ToArray();
        if (_episodes.Length == 0) throw new DatasetException($"{root}: meta/episodes.jsonl lists no episodes");

        // Checks that make a wrong config fail at open with one line, rather than deep inside training.
        foreach (string key in config.ImageKeys!)
        {
            if (!_features.TryGetValue(key, out var f) || f.Dtype is not ("image" or "video"))
                throw new DatasetException($"LeRobot dataset {root} has no image key '{key}' (image/video features: {Join(_features.Where(x => x.Value.Dtype is "image" or "video").Select(x => x.Key))})");
            if (f.Dtype == "video" && _videoPath is null) throw new DatasetException($"{infoPath}: '{key}' is a video feature but there is no 'video_path'");
        }
        int stored = 0;
        foreach (string key in config.ActionKeys!)
        {
            if (!_features.TryGetValue(key, out var f))
                throw new DatasetException($"LeRobot dataset {root} has no action key '{key}' (features: {Join(_features.Keys)})");
            stored += f.Shape.Aggregate(1, (a, b) => a * b);
        }
        CheckActionDim(stored, config, $"LeRobot dataset {root}");
        _hasProprio = config.ProprioKey is { } pk && _features.ContainsKey(pk);
        if (config.ProprioKey is { } pk2 && !_hasProprio && !config.ProprioOptional)
            throw new DatasetException($"LeRobot dataset {root} has no proprio key '{pk2}' (features: {Join(_features.Keys)})");
        foreach (string key in config.AuxKeys ?? [])
            if (!_features.ContainsKey(key))
                throw new DatasetException($"LeRobot dataset {root} has no aux key '{key}' (features: {Join(_features.Keys)})");

        if (config.Instruction == "task")
        {
            string tasksPath = Path.Combine(root, "meta", "tasks.jsonl");
            if (!File.Exists(tasksPath) || !_features.ContainsKey("task_index"))
                throw new DatasetException($"LeRobot dataset {root} has no language: instruction \"task\" needs meta/tasks.jsonl and a task_index feature");
            foreach (var t in ReadJsonLines(tasksPath))
                _tasks[Int(t, "task_index", "tasks.jsonl")] = t.TryGetProperty("task", out var s) ? s.GetString() ?? "" : "";
            if (_tasks.Values.All(string.IsNullOrWhiteSpace))
                throw new DatasetException($"LeRobot dataset {root} has no language: every task in meta/tasks.jsonl is empty");
        }
        else if (!_features.ContainsKey(config.Instruction!))
            throw new DatasetException($"LeRobot dataset {root} has no language: instruction column '{config.Instruction}' is not a feature");
    }

    internal static void CheckActionDim(int stored, DatasetConfig config, string what)
    {
        if (config.ActionDims is { } dims)
        {
            if (dims.Max() >= stored)
                throw new DatasetException($"{what}: mismatched action dimension: action_dims selects dim {dims.Max()} but the stored action has {stored} dims");
        }
        else if (stored != config.ActionDim)
            throw new DatasetException($"{what}: mismatched action dimension: the stored action has {stored} dims, the config expects {config.ActionDim} (set action_dims to select {config.ActionDim} of them)");
    }

    public RawEpisode Read(int episode, bool withFrames)
    {
        var (index, length) = _episodes[episode];
        string file = Path.Combine(_root, FormatPath(_dataPath, index, null));
        var wanted = new List<string>(_config.ActionKeys!);
        if (_hasProprio) wanted.Add(_config.ProprioKey!);
        foreach (var k in _config.AuxKeys ?? []) if (!wanted.Contains(k)) wanted.Add(k);
        wanted.Add(_config.Instruction == "task" ? "task_index" : _config.Instruction!);
        var imageKeys = withFrames ? _config.ImageKeys!.Where(k => _features[k].Dtype == "image").ToList() : [];
        bool needTimestamps = withFrames && _config.ImageKeys!.Any(k => _features[k].Dtype == "video");
        wanted.AddRange(imageKeys);
        if (needTimestamps) wanted.Add("timestamp");
        if (!File.Exists(file)) throw new DatasetException($"episode file not found: {file}");
        var cols = ParquetColumns.Read(file, wanted, optional: ["frame_index"]);
        int rows = cols.RowCount;
        if (rows != length) throw new DatasetException($"{file} has {rows} rows but meta/episodes.jsonl says episode {index} has {length}");

        // Rows are stored in frame order; frame_index, when present, confirms it.
        if (cols.Has("frame_index"))
        {
            var fi = cols.Numbers("frame_index");
            for (int i = 0; i < rows; i++)
                if (fi[i] != i) throw new DatasetException($"{file}: row {i} has frame_index {fi[i]}, expected rows in frame order");
        }

        var parts = _config.ActionKeys!.Select(k => ColumnAsVectors(cols, k)).ToArray();
        var actions = new float[rows][];
        for (int i = 0; i < rows; i++) actions[i] = parts.Length == 1 ? parts[0][i] : parts.SelectMany(p => p[i]).ToArray();
        float[][]? proprio = _hasProprio ? ColumnAsVectors(cols, _config.ProprioKey!) : null;
        float[][]? aux = null;
        if (_config.AuxKeys is { } auxKeys)
        {
            var auxParts = auxKeys.Select(k => ColumnAsVectors(cols, k)).ToArray();
            aux = new float[rows][];
            for (int i = 0; i < rows; i++) aux[i] = auxParts.SelectMany(p => p[i]).ToArray();
        }

        var instructions = new string[rows];
        if (_config.Instruction == "task")
        {
            var ti = cols.Numbers("task_index");
            for (int i = 0; i < rows; i++)
                instructions[i] = _tasks.TryGetValue((long)ti[i], out var t) ? t
                    : throw new DatasetException($"{file}: row {i} has task_index {ti[i]}, which meta/tasks.jsonl does not list");
        }
        else
        {
            var s = cols.Strings(_config.Instruction!);
            for (int i = 0; i < rows; i++) instructions[i] = s[i] ?? "";
        }

        Frame?[][]? frames = null;
        if (withFrames)
        {
            frames = new Frame?[_config.ImageKeys!.Count][];
            for (int c = 0; c < frames.Length; c++)
            {
                string key = _config.ImageKeys[c];
                frames[c] = _features[key].Dtype == "image"
                    ? cols.Binary(key).Select((b, i) => b is { Length: > 0 } ? Frame.FromEncoded(b)
                        : throw new DatasetException($"{file}: image '{key}' of row {i} has no bytes (images stored only by path are not supported)")).ToArray<Frame?>()
                    : ReadVideoFrames(Path.Combine(_root, FormatPath(_videoPath!, index, key)), cols.Numbers("timestamp"));
            }
        }
        return new RawEpisode(actions, proprio, instructions, frames, aux);
    }

    /// <summary>A list column per row; a feature of shape [1] may also be stored as a plain number column.</summary>
    private static float[][] ColumnAsVectors(ParquetColumns cols, string key) =>
        cols.IsNumberList(key) ? cols.NumberLists(key) : cols.Numbers(key).Select(x => new[] { (float)x }).ToArray();

    /// <summary>Frame i of the episode is the video frame at round(timestamp·fps) (one mp4 per episode, starting at 0).</summary>
    private Frame?[] ReadVideoFrames(string path, double[] timestamps)
    {
        if (!File.Exists(path)) throw new DatasetException($"video not found: {path}");
        var wanted = timestamps.Select(t => (int)Math.Round(t * _fps)).ToArray();
        var frames = new Frame?[wanted.Length];
        var byIndex = wanted.Select((f, row) => (f, row)).GroupBy(x => x.f).ToDictionary(g => g.Key, g => g.Select(x => x.row).ToArray());
        int last = wanted.Max();
        using var capture = new VideoCapture(path);
        if (!capture.IsOpened())
            throw new DatasetException($"could not open video {path} (OpenCV's FFmpeg cannot decode it; LeRobot's default AV1 needs re-encoding, e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4)");
        using var mat = new Mat();
        for (int f = 0; f <= last; f++)
        {
            if (!capture.Read(mat) || mat.Empty())
                throw new DatasetException($"video {path} ends after {f} frames (or its codec cannot be decoded by OpenCV's FFmpeg) but frame {last} is needed at {_fps} fps");
            if (byIndex.TryGetValue(f, out var rows))
            {
                var frame = Frame.FromPixels(ImageDecoder.FromBgr(mat));
                foreach (int row in rows) frames[row] = frame;
            }
        }
        return frames;
    }

    /// <summary>Python str.format for the templates in info.json: {name} and {name:0Nd}.</summary>
    private string FormatPath(string template, int episodeIndex, string? videoKey) => TemplateField().Replace(template, m =>
    {
        string name = m.Groups[1].Value;
        object value = name switch
        {
            "episode_chunk" => episodeIndex / _chunksSize,
            "episode_index" => episodeIndex,
            "video_key" => videoKey ?? throw new DatasetException($"template '{template}' needs a video key"),
            _ => throw new DatasetException($"meta/info.json path template '{template}' has an unknown field '{name}'"),
        };
        if (m.Groups[2].Success && value is int n) return n.ToString("D" + m.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture);
        return value.ToString()!;
    });

    [GeneratedRegex(@"\{(\w+)(?::0?(\d+)d)?\}")]
    private static partial Regex TemplateField();

    private static JsonDocument ParseJson(string path)
    {
        if (!File.Exists(path)) throw new DatasetException($"LeRobot metadata not found: {path}");
        try { return JsonDocument.Parse(File.ReadAllText(path)); }
        catch (JsonException e) { throw new DatasetException($"{path} is not valid JSON: {e.Message}", e); }
    }

    private static List<JsonElement> ReadJsonLines(string path)
    {
        if (!File.Exists(path)) throw new DatasetException($"LeRobot metadata not found: {path}");
        var result = new List<JsonElement>();
        int lineNo = 0;
        foreach (string line in File.ReadLines(path))
        {
            lineNo++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try { result.Add(JsonDocument.Parse(line).RootElement.Clone()); }
            catch (JsonException e) { throw new DatasetException($"{path} line {lineNo} is not valid JSON: {e.Message}", e); }
        }
        return result;
    }

    private static int Int(JsonElement e, string name, string file) =>
        e.TryGetProperty(name, out var v) && v.TryGetInt32(out int i) ? i : throw new DatasetException($"meta/{file}: an entry has no integer '{name}'");

    private static string Join(IEnumerable<string> names) => string.Join(", ", names) is { Length: > 0 } s ? s : "none";

    public void Dispose() { }
}
