using System.Text.Json;
using System.Text.Json.Serialization;
using OpenCvSharp;
using OpenVLA.FineTune.Data;
using OpenVLA.Policy;
using Parquet.Serialization;

namespace OpenVLA.Tests.FineTune;

/// <summary>A temporary directory removed after the test.</summary>
public sealed class TempDir : IDisposable
{
    public string Path { get; } = Directory.CreateTempSubdirectory("openvla-data-").FullName;
    public string this[string relative] => System.IO.Path.Combine(Path, relative);
    public void Dispose() { try { Directory.Delete(Path, recursive: true); } catch (IOException) { } }
}

/// <summary>Small datasets written the way the simulation (LeRobot) and Open X-Embodiment (RLDS) write them.</summary>
public static class TestDatasets
{
    /// <summary>A 6x4 frame whose pixels encode (episode, step, camera), so a test can tell frames apart exactly.</summary>
    public static RgbImage Frame(int episode, int step, int camera = 0, int width = 6, int height = 4)
    {
        var px = new byte[width * height * 3];
        for (int y = 0; y < height; y++)
            for (int x = 0; x < width; x++)
            {
                int i = (y * width + x) * 3;
                px[i] = (byte)(episode * 20 + camera * 100);
                px[i + 1] = (byte)(step * 10);
                px[i + 2] = (byte)(x * 30 + y * 5);
            }
        return new RgbImage(width, height, px);
    }

    /// <summary>Action of (episode, step): dims 0..5 = e + t/10 + d/100, gripper alternates with the step.</summary>
    public static float[] Action(int episode, int step, int dims = 7)
    {
        var a = new float[dims];
        for (int d = 0; d < dims - 1; d++) a[d] = episode + step / 10f + d / 100f;
        a[dims - 1] = step % 2;
        return a;
    }

    public static string Instruction(int episode) => $"put the block {episode} in the bowl";

    // ---- LeRobot v2.1 ----

    public sealed class ImageCell
    {
        [JsonPropertyName("bytes")] public byte[]? Bytes { get; set; }
        [JsonPropertyName("path")] public string? Path { get; set; }
    }

    public sealed class SimRow
    {
        [JsonPropertyName("observation.images.image")] public ImageCell? Image { get; set; }
        [JsonPropertyName("observation.images.wrist_image")] public ImageCell? WristImage { get; set; }
        [JsonPropertyName("observation.state")] public List<float>? State { get; set; }
        [JsonPropertyName("action")] public List<float>? Action { get; set; }
        [JsonPropertyName("timestamp")] public float Timestamp { get; set; }
        [JsonPropertyName("frame_index")] public long FrameIndex { get; set; }
        [JsonPropertyName("episode_index")] public long EpisodeIndex { get; set; }
        [JsonPropertyName("index")] public long Index { get; set; }
        [JsonPropertyName("task_index")] public long TaskIndex { get; set; }
    }

    public sealed class VideoRow
    {
        [JsonPropertyName("observation.state")] public List<float>? State { get; set; }
        [JsonPropertyName("action")] public List<float>? Action { get; set; }
        [JsonPropertyName("timestamp")] public float Timestamp { get; set; }
        [JsonPropertyName("frame_index")] public long FrameIndex { get; set; }
        [JsonPropertyName("episode_index")] public long EpisodeIndex { get; set; }
        [JsonPropertyName("index")] public long Index { get; set; }
        [JsonPropertyName("task_index")] public long TaskIndex { get; set; }
    }

    /// <summary>
    /// Writes a LeRobot v2.1 dataset like the simulation's: PNG frames in parquet image structs, float32 lists, int64 indices.
    /// Episode e has <paramref name="lengths"/>[e] steps and task e % <paramref name="tasks"/>.Length.
    /// </summary>
    public static void WriteLeRobot(string root, int[] lengths, string[]? tasks = null, bool wrist = false, int actionDims = 7,
        string codebaseVersion = "v2.1", int chunksSize = 1000)
    {
        tasks ??= lengths.Select((_, e) => Instruction(e)).ToArray();
        long index = 0;
        for (int e = 0; e < lengths.Length; e++)
        {
            var rows = new List<SimRow>();
            for (int t = 0; t < lengths[e]; t++)
                rows.Add(new SimRow
                {
                    Image = new ImageCell { Bytes = ImageCodec.EncodePng(Frame(e, t)) },
                    WristImage = wrist ? new ImageCell { Bytes = ImageCodec.EncodePng(Frame(e, t, camera: 1)) } : null,
                    State = [e, t, 0.5f * t],
                    Action = [.. Action(e, t, actionDims)],
                    Timestamp = t / 10f,
                    FrameIndex = t,
                    EpisodeIndex = e,
                    Index = index++,
                    TaskIndex = e % tasks.Length,
                });
            string file = Path.Combine(root, "data", $"chunk-{e / chunksSize:D3}", $"episode_{e:D6}.parquet");
            Directory.CreateDirectory(Path.GetDirectoryName(file)!);
            if (wrist) Serialize(rows, file);
            else Serialize(rows.Select(r => new NoWristRow
            {
                Image = r.Image, State = r.State, Action = r.Action, Timestamp = r.Timestamp,
                FrameIndex = r.FrameIndex, EpisodeIndex = r.EpisodeIndex, Index = r.Index, TaskIndex = r.TaskIndex,
            }).ToList(), file);
        }
        var features = new Dictionary<string, object>
        {
            ["observation.images.image"] = new { dtype = "image", shape = new[] { 4, 6, 3 }, names = new[] { "height", "width", "channel" } },
            ["observation.state"] = new { dtype = "float32", shape = new[] { 3 }, names = (string[]?)null },
            ["action"] = new { dtype = "float32", shape = new[] { actionDims }, names = (string[]?)null },
            ["timestamp"] = new { dtype = "float32", shape = new[] { 1 }, names = (string[]?)null },
            ["frame_index"] = new { dtype = "int64", shape = new[] { 1 }, names = (string[]?)null },
            ["episode_index"] = new { dtype = "int64", shape = new[] { 1 }, names = (string[]?)null },
            ["index"] = new { dtype = "int64", shape = new[] { 1 }, names = (string[]?)null },
            ["task_index"] = new { dtype = "int64", shape = new[] { 1 }, names = (string[]?)null },
        };
        if (wrist) features["observation.images.wrist_image"] = new { dtype = "image", shape = new[] { 4, 6, 3 }, names = new[] { "height", "width", "channel" } };
        WriteMeta(root, lengths, tasks, features, codebaseVersion, chunksSize, videoPath: null);
    }

    private sealed class NoWristRow
    {
        [JsonPropertyName("observation.images.image")] public ImageCell? Image { get; set; }
        [JsonPropertyName("observation.state")] public List<float>? State { get; set; }
        [JsonPropertyName("action")] public List<float>? Action { get; set; }
        [JsonPropertyName("timestamp")] public float Timestamp { get; set; }
        [JsonPropertyName("frame_index")] public long FrameIndex { get; set; }
        [JsonPropertyName("episode_index")] public long EpisodeIndex { get; set; }
        [JsonPropertyName("index")] public long Index { get; set; }
        [JsonPropertyName("task_index")] public long TaskIndex { get; set; }
    }

    private static void Serialize<T>(List<T> rows, string file)
    {
        using var fs = File.Create(file);
        ParquetSerializer.SerializeAsync(rows, fs).GetAwaiter().GetResult();
    }

    /// <summary>A LeRobot dataset whose camera is an mp4 per episode: frame t is a flat colour (40·e, 10·t, 200).</summary>
    public static void WriteLeRobotVideo(string root, int[] lengths, int fps = 10)
    {
        long index = 0;
        for (int e = 0; e < lengths.Length; e++)
        {
            var rows = Enumerable.Range(0, lengths[e]).Select(t => new VideoRow
            {
                State = [e, t, 0], Action = [.. Action(e, t)], Timestamp = t / (float)fps, FrameIndex = t, EpisodeIndex = e, Index = index++, TaskIndex = 0,
            }).ToList();
            string file = Path.Combine(root, "data", "chunk-000", $"episode_{e:D6}.parquet");
            Directory.CreateDirectory(Path.GetDirectoryName(file)!);
            Serialize(rows, file);

            string video = Path.Combine(root, "videos", "chunk-000", "observation.images.image", $"episode_{e:D6}.mp4");
            Directory.CreateDirectory(Path.GetDirectoryName(video)!);
            using var writer = new VideoWriter(video, FourCC.MP4V, fps, new Size(32, 24));
            if (!writer.IsOpened()) throw new InvalidOperationException("OpenCV cannot write mp4 here");
            for (int t = 0; t < lengths[e]; t++)
            {
                using var bgr = new Mat(24, 32, MatType.CV_8UC3, new Scalar(200, 10 * t, 40 * e)); // BGR order
                writer.Write(bgr);
            }
        }
        var features = new Dictionary<string, object>
        {
            ["observation.images.image"] = new { dtype = "video", shape = new[] { 24, 32, 3 }, names = new[] { "height", "width", "channel" } },
            ["observation.state"] = new { dtype = "float32", shape = new[] { 3 } },
            ["action"] = new { dtype = "float32", shape = new[] { 7 } },
            ["timestamp"] = new { dtype = "float32", shape = new[] { 1 } },
            ["frame_index"] = new { dtype = "int64", shape = new[] { 1 } },
            ["episode_index"] = new { dtype = "int64", shape = new[] { 1 } },
            ["index"] = new { dtype = "int64", shape = new[] { 1 } },
            ["task_index"] = new { dtype = "int64", shape = new[] { 1 } },
        };
        WriteMeta(root, lengths, ["stack the cups"], features, "v2.1", 1000,
            videoPath: "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4", fps: fps);
    }

    private static void WriteMeta(string root, int[] lengths, string[] tasks, Dictionary<string, object> features, string version, int chunksSize, string? videoPath, int fps = 10)
    {
        Directory.CreateDirectory(Path.Combine(root, "meta"));
        var info = new Dictionary<string, object?>
        {
            ["codebase_version"] = version,
            ["robot_type"] = "sim",
            ["total_episodes"] = lengths.Length,
            ["total_frames"] = lengths.Sum(),
            ["total_tasks"] = tasks.Length,
            ["chunks_size"] = chunksSize,
            ["fps"] = fps,
            ["splits"] = new { train = $"0:{lengths.Length}" },
            ["data_path"] = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            ["video_path"] = videoPath,
            ["features"] = features,
        };
        File.WriteAllText(Path.Combine(root, "meta", "info.json"), JsonSerializer.Serialize(info));
        File.WriteAllLines(Path.Combine(root, "meta", "episodes.jsonl"), lengths.Select((n, e) =>
            JsonSerializer.Serialize(new { episode_index = e, tasks = new[] { tasks[e % tasks.Length] }, length = n })));
        File.WriteAllLines(Path.Combine(root, "meta", "tasks.jsonl"), tasks.Select((t, i) => JsonSerializer.Serialize(new { task_index = i, task = t })));
    }

    // ---- RLDS ----

    /// <summary>RLDS episodes with JPEG or PNG frames under steps/observation/image and the given action width.</summary>
    public static List<RldsEpisode> RldsEpisodes(int[] lengths, int actionDims = 7, bool png = true, bool wrist = false)
    {
        return lengths.Select((n, e) =>
        {
            var images = new Dictionary<string, IReadOnlyList<byte[]>>
            {
                ["image"] = Enumerable.Range(0, n).Select(t => png ? ImageCodec.EncodePng(Frame(e, t)) : ImageCodec.EncodeJpeg(Frame(e, t))).ToList(),
            };
            if (wrist) images["wrist_image"] = Enumerable.Range(0, n).Select(t => ImageCodec.EncodePng(Frame(e, t, camera: 1))).ToList();
            return new RldsEpisode(images,
                Enumerable.Range(0, n).Select(t => Action(e, t, actionDims)).ToList(),
                Enumerable.Range(0, n).Select(_ => Instruction(e)).ToList(),
                Enumerable.Range(0, n).Select(t => new float[] { e, t }).ToList());
        }).ToList();
    }

    public static void AssertSameImage(RgbImage expected, RgbImage actual)
    {
        Assert.Equal(expected.Width, actual.Width);
        Assert.Equal(expected.Height, actual.Height);
        Assert.Equal(expected.Pixels, actual.Pixels);
    }
}
