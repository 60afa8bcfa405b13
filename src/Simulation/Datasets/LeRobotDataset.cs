using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.Simulation.Tabletop;
using Parquet.Serialization;

namespace OpenVLA.Simulation.Datasets;

/// <summary>Reading and writing the files of a LeRobot v2.1 dataset (layout in docs/datasets.md).</summary>
public static class LeRobotFiles
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    /// <summary>Writes one episode parquet file, with the Hugging Face `datasets` feature metadata so the image column decodes as Image.</summary>
    public static void WriteRows(string path, IReadOnlyList<LeRobotFrame> rows, bool wrist)
    {
        var metadata = new Dictionary<string, string> { ["huggingface"] = HuggingFaceFeatures(rows[0].State!.Count, rows[0].EnvironmentState?.Count, rows[0].Action!.Count, wrist) };
        string temp = path + ".tmp";
        using (var stream = File.Create(temp))
        {
            if (wrist) ParquetSerializer.SerializeAsync(rows, stream, null, metadata).GetAwaiter().GetResult();
            else
                ParquetSerializer.SerializeAsync(rows.Select(r => new LeRobotFrameNoWrist
                {
                    Image = r.Image, State = r.State, EnvironmentState = r.EnvironmentState, Action = r.Action, Timestamp = r.Timestamp, FrameIndex = r.FrameIndex,
                    EpisodeIndex = r.EpisodeIndex, Index = r.Index, TaskIndex = r.TaskIndex,
                }), stream, null, metadata).GetAwaiter().GetResult();
        }
        File.Move(temp, path, overwrite: true);
    }

    public static List<LeRobotFrame> ReadRows(string path)
    {
        using var stream = File.OpenRead(path);
        return ParquetSerializer.DeserializeAsync<LeRobotFrame>(stream).GetAwaiter().GetResult().Data.ToList();
    }

    private static string HuggingFaceFeatures(int stateDim, int? environmentDim, int actionDim, bool wrist)
    {
        JsonObject Value(string dtype) => new() { ["dtype"] = dtype, ["_type"] = "Value" };
        JsonObject Sequence(int length) => new() { ["feature"] = Value("float32"), ["length"] = length, ["_type"] = "Sequence" };
        var features = new JsonObject { [LeRobotLayout.ImageKey] = new JsonObject { ["_type"] = "Image" } };
        if (wrist) features[LeRobotLayout.WristKey] = new JsonObject { ["_type"] = "Image" };
        features["observation.state"] = Sequence(stateDim);
        if (environmentDim is { } e) features[LeRobotLayout.EnvironmentStateKey] = Sequence(e);
        features["action"] = Sequence(actionDim);
        features["timestamp"] = Value("float32");
        foreach (var k in new[] { "frame_index", "episode_index", "index", "task_index" }) features[k] = Value("int64");
        return new JsonObject { ["info"] = new JsonObject { ["features"] = features } }.ToJsonString();
    }

    /// <summary>
    /// Completes a dataset whose episode files are written: sets the global frame <c>index</c> column (known only once
    /// every episode length is), then writes meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl, meta/stats.json,
    /// meta/episodes_stats.jsonl and the OpenVLA dataset_statistics.json.
    /// </summary>
    public static void Finish(string root, string datasetName, IReadOnlyList<string> tasks, IReadOnlyList<DemoEpisode> episodes,
        int imageSize, bool wrist)
    {
        episodes = episodes.OrderBy(e => e.EpisodeIndex).ToList();
        for (int i = 0; i < episodes.Count; i++)
            if (episodes[i].EpisodeIndex != i) throw new InvalidOperationException($"episode {i} is missing from the dataset");
        var starts = new long[episodes.Count];
        for (int i = 1; i < episodes.Count; i++) starts[i] = starts[i - 1] + episodes[i - 1].Length;
        Parallel.For(0, episodes.Count, new ParallelOptions { MaxDegreeOfParallelism = 2 }, i =>
        {
            string path = LeRobotLayout.EpisodeFile(root, i);
            var rows = ReadRows(path);
            if (rows.Count != episodes[i].Length) throw new InvalidDataException($"{path} has {rows.Count} rows, expected {episodes[i].Length}");
            if (rows[0].Index == starts[i]) return;
            for (int t = 0; t < rows.Count; t++) rows[t].Index = starts[i] + t;
            WriteRows(path, rows, wrist);
        });

        long totalFrames = episodes.Sum(e => (long)e.Length);
        string meta = Path.Combine(root, "meta");
        Directory.CreateDirectory(meta);
        var features = new JsonObject
        {
            [LeRobotLayout.ImageKey] = ImageFeature(imageSize),
        };
        if (wrist) features[LeRobotLayout.WristKey] = ImageFeature(imageSize);
        features["observation.state"] = new JsonObject { ["dtype"] = "float32", ["shape"] = new JsonArray(TabletopEnv.StateNames.Length), ["names"] = Names(TabletopEnv.StateNames) };
        features[LeRobotLayout.EnvironmentStateKey] = new JsonObject
        {
            ["dtype"] = "float32", ["shape"] = new JsonArray(TabletopEnv.EnvironmentStateNames.Length), ["names"] = Names(TabletopEnv.EnvironmentStateNames),
        };
        features["action"] = new JsonObject { ["dtype"] = "float32", ["shape"] = new JsonArray(TabletopEnv.ActionNames.Length), ["names"] = Names(TabletopEnv.ActionNames) };
        features["timestamp"] = Scalar("float32");
        foreach (var k in new[] { "frame_index", "episode_index", "index", "task_index" }) features[k] = Scalar("int64");
        var info = new JsonObject
        {
            ["codebase_version"] = LeRobotLayout.CodebaseVersion,
            ["robot_type"] = "openvla_tabletop_7dof",
            ["total_episodes"] = episodes.Count,
            ["total_frames"] = totalFrames,
            ["total_tasks"] = tasks.Count,
            ["total_videos"] = 0,
            ["total_chunks"] = episodes.Count == 0 ? 0 : (episodes.Count - 1) / LeRobotLayout.ChunksSize + 1,
            ["chunks_size"] = LeRobotLayout.ChunksSize,
            ["fps"] = TabletopEnv.ControlHz,
            ["splits"] = new JsonObject { ["train"] = $"0:{episodes.Count}" },
            ["data_path"] = LeRobotLayout.DataPath,
            ["video_path"] = null,
            ["features"] = features,
        };
        File.WriteAllText(Path.Combine(meta, "info.json"), info.ToJsonString(Indented) + "\n");
        File.WriteAllLines(Path.Combine(meta, "tasks.jsonl"),
            tasks.Select((t, i) => new JsonObject { ["task_index"] = i, ["task"] = t }.ToJsonString()));
        File.WriteAllLines(Path.Combine(meta, "episodes.jsonl"), episodes.Select(e => new JsonObject
        {
            ["episode_index"] = e.EpisodeIndex,
            ["tasks"] = new JsonArray(e.Instruction),
            ["length"] = e.Length,
            // Our additions (LeRobot ignores unknown keys): the suite task, the layout seed, how many expert attempts it took
            // and whether the episode succeeded (false only for DAgger episodes, which are kept either way).
            ["suite_task"] = e.TaskId,
            ["seed"] = e.Seed,
            ["attempts"] = e.Attempts,
            ["success"] = e.Success,
        }.ToJsonString()));

        var all = new Stats(imageSize, wrist);
        var perEpisode = new List<string>();
        for (int i = 0; i < episodes.Count; i++)
        {
            var one = new Stats(imageSize, wrist);
            one.Add(episodes[i], starts[i]);
            all.Merge(one);
            perEpisode.Add(new JsonObject { ["episode_index"] = i, ["stats"] = one.ToJson() }.ToJsonString());
        }
        File.WriteAllLines(Path.Combine(meta, "episodes_stats.jsonl"), perEpisode);
        File.WriteAllText(Path.Combine(meta, "stats.json"), all.ToJson().ToJsonString(Indented) + "\n");

        var actions = episodes.SelectMany(e => e.Actions).ToList();
        var states = episodes.SelectMany(e => e.States).ToList();
        File.WriteAllText(Path.Combine(root, "dataset_statistics.json"),
            OpenVlaStatistics(datasetName, actions, states, episodes.Count).ToJsonString(Indented) + "\n");
    }

    /// <summary>OpenVLA's norm_stats entry (openvla-model.md §3.4): BOUNDS_Q99 bounds, gripper left unnormalized by the mask.</summary>
    public static JsonObject OpenVlaStatistics(string datasetName, IReadOnlyList<float[]> actions, IReadOnlyList<float[]> states, int trajectories)
    {
        JsonObject Block(IReadOnlyList<float[]> rows)
        {
            var s = FeatureStats.Create(rows[0].Length);
            foreach (var r in rows) s.Add(r);
            return new JsonObject
            {
                ["mean"] = Array(s.Mean), ["std"] = Array(s.Std), ["max"] = Array(s.Max), ["min"] = Array(s.Min),
                ["q01"] = Array(FeatureStats.Quantile(rows, 0.01)), ["q99"] = Array(FeatureStats.Quantile(rows, 0.99)),
            };
        }
        var action = Block(actions);
        action["mask"] = new JsonArray(Enumerable.Range(0, actions[0].Length).Select(i => (JsonNode)JsonValue.Create(i < actions[0].Length - 1)!).ToArray());
        return new JsonObject
        {
            [datasetName] = new JsonObject
            {
                ["action"] = action,
                ["proprio"] = Block(states),
                ["num_transitions"] = actions.Count,
                ["num_trajectories"] = trajectories,
            },
        };
    }

    private static JsonObject ImageFeature(int size) => new()
    {
        ["dtype"] = "image", ["shape"] = new JsonArray(size, size, 3), ["names"] = Names(["height", "width", "channel"]),
    };

    private static JsonObject Scalar(string dtype) => new() { ["dtype"] = dtype, ["shape"] = new JsonArray(1), ["names"] = null };
    private static JsonArray Names(IEnumerable<string> names) => new(names.Select(n => (JsonNode)JsonValue.Create(n)!).ToArray());
    internal static JsonArray Array(IEnumerable<double> values) => new(values.Select(v => (JsonNode)JsonValue.Create(v)).ToArray());

    /// <summary>LeRobot per-feature statistics (min/max/mean/std/count); image channels are [3,1,1] arrays of [0,1] values.</summary>
    private sealed class Stats(int imageSize, bool wrist)
    {
        private readonly Dictionary<string, FeatureStats> _features = new()
        {
            [LeRobotLayout.ImageKey] = FeatureStats.Create(3),
            ["observation.state"] = FeatureStats.Create(TabletopEnv.StateNames.Length),
            [LeRobotLayout.EnvironmentStateKey] = FeatureStats.Create(TabletopEnv.EnvironmentStateNames.Length),
            ["action"] = FeatureStats.Create(TabletopEnv.ActionNames.Length),
            ["timestamp"] = FeatureStats.Create(1),
            ["frame_index"] = FeatureStats.Create(1),
            ["episode_index"] = FeatureStats.Create(1),
            ["index"] = FeatureStats.Create(1),
            ["task_index"] = FeatureStats.Create(1),
        };
        private readonly int _imageSize = imageSize;

        public void Add(DemoEpisode e, long start)
        {
            _features[LeRobotLayout.ImageKey].Merge(e.ImageStats);
            if (wrist && e.WristStats is not null)
            {
                if (!_features.ContainsKey(LeRobotLayout.WristKey)) _features[LeRobotLayout.WristKey] = FeatureStats.Create(3);
                _features[LeRobotLayout.WristKey].Merge(e.WristStats);
            }
            for (int t = 0; t < e.Length; t++)
            {
                _features["observation.state"].Add(e.States[t]);
                _features[LeRobotLayout.EnvironmentStateKey].Add(e.EnvironmentStates[t]);
                _features["action"].Add(e.Actions[t]);
                _features["timestamp"].Add([t / (float)TabletopEnv.ControlHz]);
                AddScalar("frame_index", t);
                AddScalar("episode_index", e.EpisodeIndex);
                AddScalar("index", start + t);
                AddScalar("task_index", e.TaskIndex);
            }
        }

        private void AddScalar(string key, double v) { _features[key].AddValue(0, v); _features[key].Count++; }

        public void Merge(Stats other)
        {
            foreach (var (k, v) in other._features)
                if (_features.TryGetValue(k, out var mine)) mine.Merge(v);
                else { var copy = FeatureStats.Create(v.Sum.Length); copy.Merge(v); _features[k] = copy; }
        }

        public JsonObject ToJson()
        {
            var o = new JsonObject();
            foreach (var (k, s) in _features)
            {
                bool image = k.StartsWith("observation.images.", StringComparison.Ordinal);
                JsonNode Values(double[] v) => image
                    ? new JsonArray(v.Select(x => (JsonNode)new JsonArray(new JsonArray(JsonValue.Create(x)))).ToArray())
                    : Array(v);
                o[k] = new JsonObject
                {
                    ["min"] = Values(s.Min), ["max"] = Values(s.Max), ["mean"] = Values(s.Mean), ["std"] = Values(s.Std),
                    ["count"] = new JsonArray(image ? s.Count / ((long)_imageSize * _imageSize) : s.Count), // images: frames, not pixels
                };
            }
            return o;
        }
    }
}
