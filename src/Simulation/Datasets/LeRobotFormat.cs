using System.Text.Json.Serialization;

namespace OpenVLA.Simulation.Datasets;

/// <summary>
/// One row of a LeRobot v2.1 episode parquet file. Column names and types follow LeRobot: images are the Hugging Face
/// `datasets` Image struct {bytes: PNG, path: string}; vectors are lists of float32; indices are int64. See docs/datasets.md.
/// </summary>
public sealed class LeRobotFrame
{
    [JsonPropertyName("observation.images.image")] public ImageCell? Image { get; set; }
    [JsonPropertyName("observation.images.wrist_image")] public ImageCell? WristImage { get; set; }
    [JsonPropertyName("observation.state")] public List<float>? State { get; set; }
    [JsonPropertyName("observation.environment_state")] public List<float>? EnvironmentState { get; set; }
    [JsonPropertyName("action")] public List<float>? Action { get; set; }
    [JsonPropertyName("timestamp")] public float Timestamp { get; set; }
    [JsonPropertyName("frame_index")] public long FrameIndex { get; set; }
    [JsonPropertyName("episode_index")] public long EpisodeIndex { get; set; }
    [JsonPropertyName("index")] public long Index { get; set; }
    [JsonPropertyName("task_index")] public long TaskIndex { get; set; }
}

/// <summary>Same row without the wrist camera column (datasets written without <c>--wrist</c>).</summary>
public sealed class LeRobotFrameNoWrist
{
    [JsonPropertyName("observation.images.image")] public ImageCell? Image { get; set; }
    [JsonPropertyName("observation.state")] public List<float>? State { get; set; }
    [JsonPropertyName("observation.environment_state")] public List<float>? EnvironmentState { get; set; }
    [JsonPropertyName("action")] public List<float>? Action { get; set; }
    [JsonPropertyName("timestamp")] public float Timestamp { get; set; }
    [JsonPropertyName("frame_index")] public long FrameIndex { get; set; }
    [JsonPropertyName("episode_index")] public long EpisodeIndex { get; set; }
    [JsonPropertyName("index")] public long Index { get; set; }
    [JsonPropertyName("task_index")] public long TaskIndex { get; set; }
}

/// <summary>The Hugging Face `datasets` Image feature as stored in parquet.</summary>
public sealed class ImageCell
{
    [JsonPropertyName("bytes")] public byte[]? Bytes { get; set; }
    [JsonPropertyName("path")] public string? Path { get; set; }
}

/// <summary>Paths and constants of the layout.</summary>
public static class LeRobotLayout
{
    public const string CodebaseVersion = "v2.1";
    public const int ChunksSize = 1000;
    public const string DataPath = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet";
    public const string ImageKey = "observation.images.image", WristKey = "observation.images.wrist_image";
    public const string EnvironmentStateKey = "observation.environment_state";

    public static string EpisodeFile(string root, int episodeIndex) =>
        Path.Combine(root, "data", $"chunk-{episodeIndex / ChunksSize:000}", $"episode_{episodeIndex:000000}.parquet");
}
