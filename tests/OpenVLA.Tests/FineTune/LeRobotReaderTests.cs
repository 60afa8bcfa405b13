using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.FineTune.Data;

namespace OpenVLA.Tests.FineTune;

public class LeRobotReaderTests
{
    [Fact]
    public void Reads_a_simulation_dataset_with_the_default_config()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, [4, 2, 3], tasks: ["pick up the cup", "open the drawer"]);

        using var data = VlaDataset.Open(dir.Path);
        Assert.Equal(DatasetFormats.LeRobot, data.Format);
        Assert.Equal(3, data.EpisodeCount);
        Assert.Equal(9, data.StepCount);
        Assert.Equal(new DirectoryInfo(dir.Path).Name, data.Name);

        var ep = data.ReadEpisode(2);
        Assert.Equal(3, ep.Length);
        for (int t = 0; t < 3; t++)
        {
            Assert.Equal(TestDatasets.Action(2, t), ep.Actions[t]);
            Assert.Equal("pick up the cup", ep.Instructions[t]);   // task_index 2 % 2 = 0
            Assert.Equal([2f, t, 0.5f * t], ep.Proprio[t]);
            TestDatasets.AssertSameImage(TestDatasets.Frame(2, t), ep.Frames![0][t]!.Decode());
        }
        Assert.Equal("open the drawer", data.ReadEpisode(1, withImages: false).Instructions[0]);
        Assert.Null(data.ReadEpisode(1, withImages: false).Frames);
        Assert.Null(ep.Aux);
    }

    [Fact]
    public void Aux_keys_are_read_concatenated_per_step_and_their_statistics_span_every_episode()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, [4, 2]);
        using var data = VlaDataset.Open(dir.Path, new DatasetConfig { AuxKeys = ["observation.state", "action"] });
        var ep = data.ReadEpisode(1, withImages: false);
        for (int t = 0; t < 2; t++) Assert.Equal([1f, t, 0.5f * t, .. TestDatasets.Action(1, t)], ep.Aux![t]);

        // Over the 6 steps: state dim 0 is the episode (0,0,0,0,1,1), dim 1 the step (0,1,2,3,0,1).
        var stats = data.ComputeStatistics().Aux!;
        Assert.Equal(10, stats.Dim);
        Assert.Equal(2 / 6.0, stats.Mean[0], 6);
        Assert.Equal(Math.Sqrt(2 / 6.0 - 4 / 36.0), stats.Std[0], 6);
        Assert.Equal(7 / 6.0, stats.Mean[1], 6);

        var e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path, new DatasetConfig { AuxKeys = ["observation.environment_state"] }));
        Assert.StartsWith($"LeRobot dataset {dir.Path} has no aux key 'observation.environment_state' (features: ", e.Message);
        Assert.Null(VlaDataset.Open(dir.Path).ComputeStatistics().Aux);
        e = Assert.Throws<DatasetException>(() => DatasetConfig.Parse("{\"aux_keys\": []}"));
        Assert.Contains("aux_keys must list one or more distinct keys", e.Message);
    }

    [Fact]
    public void Reads_the_wrist_camera_when_configured_and_chunked_paths()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, [2, 2, 2], wrist: true, chunksSize: 2);   // episode 2 lives in data/chunk-001
        Assert.True(File.Exists(dir["data/chunk-001/episode_000002.parquet"]));

        var config = new DatasetConfig { ImageKeys = ["observation.images.image", "observation.images.wrist_image"] };
        using var data = VlaDataset.Open(dir.Path, config);
        var ep = data.ReadEpisode(2);
        TestDatasets.AssertSameImage(TestDatasets.Frame(2, 1), ep.Frames![0][1]!.Decode());
        TestDatasets.AssertSameImage(TestDatasets.Frame(2, 1, camera: 1), ep.Frames[1][1]!.Decode());
    }

    [Fact]
    public void Reads_video_frames_at_timestamp_times_fps()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobotVideo(dir.Path, [5, 3]);

        using var data = VlaDataset.Open(dir.Path);
        var ep = data.ReadEpisode(1);
        Assert.Equal(3, ep.Length);
        Assert.Equal("stack the cups", ep.Instructions[2]);
        for (int t = 0; t < 3; t++)
        {
            var frame = ep.Frames![0][t]!.Decode();
            Assert.Equal((32, 24), (frame.Width, frame.Height));
            // Frame t was written as the flat colour RGB (40·e, 10·t, 200); MPEG-4 is lossy, so compare the centre pixel loosely.
            int centre = (12 * 32 + 16) * 3;
            Assert.InRange(frame.Pixels[centre], 40 - 12, 40 + 12);
            Assert.InRange(frame.Pixels[centre + 1], 10 * t - 12, 10 * t + 12);
            Assert.InRange(frame.Pixels[centre + 2], 200 - 12, 200 + 12);
        }
    }

    [Fact]
    public void Errors_name_the_image_key_action_dimension_language_and_version()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, [2], actionDims: 6);

        var e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path, new DatasetConfig { ImageKeys = ["observation.images.top"] }));
        Assert.Equal($"LeRobot dataset {dir.Path} has no image key 'observation.images.top' (image/video features: observation.images.image)", e.Message);

        e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path));
        Assert.Equal($"LeRobot dataset {dir.Path}: mismatched action dimension: the stored action has 6 dims, the config expects 7 (set action_dims to select 7 of them)", e.Message);

        File.WriteAllText(dir["meta/tasks.jsonl"], "{\"task_index\": 0, \"task\": \"\"}\n");
        e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path, new DatasetConfig { ActionDim = 6, Gripper = new GripperConvention { Index = 5 } }));
        Assert.Contains("has no language", e.Message);

        var info = JsonNode.Parse(File.ReadAllText(dir["meta/info.json"]))!;
        info["codebase_version"] = "v3.0";
        File.WriteAllText(dir["meta/info.json"], info.ToJsonString());
        e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path));
        Assert.Equal($"unknown LeRobot layout in {dir.Path}: codebase_version is 'v3.0', this reader supports v2.0/v2.1", e.Message);
    }

    /// <summary>Hugging Face datasets (pyarrow) write every column nullable; long episodes span several row groups.</summary>
    private sealed class HubRow
    {
        [System.Text.Json.Serialization.JsonPropertyName("observation.images.image")] public TestDatasets.ImageCell? Image { get; set; }
        [System.Text.Json.Serialization.JsonPropertyName("observation.state")] public List<float?>? State { get; set; }
        [System.Text.Json.Serialization.JsonPropertyName("action")] public List<float?>? Action { get; set; }
        [System.Text.Json.Serialization.JsonPropertyName("timestamp")] public float? Timestamp { get; set; }
        [System.Text.Json.Serialization.JsonPropertyName("frame_index")] public long? FrameIndex { get; set; }
        [System.Text.Json.Serialization.JsonPropertyName("episode_index")] public long? EpisodeIndex { get; set; }
        [System.Text.Json.Serialization.JsonPropertyName("index")] public long? Index { get; set; }
        [System.Text.Json.Serialization.JsonPropertyName("task_index")] public long? TaskIndex { get; set; }
    }

    [Fact]
    public async Task Reads_nullable_columns_split_over_row_groups()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, [7]);
        var rows = Enumerable.Range(0, 7).Select(t => new HubRow
        {
            Image = new TestDatasets.ImageCell { Bytes = ImageCodec.EncodePng(TestDatasets.Frame(0, t)), Path = $"frame_{t}.png" },
            State = [0, t, 0.5f * t],
            Action = TestDatasets.Action(0, t).Select(v => (float?)v).ToList(),
            Timestamp = t / 10f, FrameIndex = t, EpisodeIndex = 0, Index = t, TaskIndex = 0,
        }).ToList();
        await using (var fs = File.Create(dir["data/chunk-000/episode_000000.parquet"]))
            await Parquet.Serialization.ParquetSerializer.SerializeAsync(rows, fs, new Parquet.ParquetOptions { RowGroupSize = 3 });
        await using (var check = await Parquet.ParquetReader.CreateAsync(dir["data/chunk-000/episode_000000.parquet"]))
            Assert.Equal(3, check.RowGroupCount);

        using var data = VlaDataset.Open(dir.Path);
        var ep = data.ReadEpisode(0);
        Assert.Equal(7, ep.Length);
        for (int t = 0; t < 7; t++)
        {
            Assert.Equal(TestDatasets.Action(0, t), ep.Actions[t]);
            Assert.Equal([0f, t, 0.5f * t], ep.Proprio[t]);
            TestDatasets.AssertSameImage(TestDatasets.Frame(0, t), ep.Frames![0][t]!.Decode());
        }
    }

    [Fact]
    public void Reads_a_parquet_file_written_by_arrow()
    {
        // Written by arrow-rs (Fixtures/make_arrow_lerobot.mjs), the way pyarrow / Hugging Face datasets lay files out.
        using var data = VlaDataset.Open(Path.Combine(AppContext.BaseDirectory, "FineTune", "Fixtures", "arrow_lerobot"));
        Assert.Equal(4, data.StepCount);
        var ep = data.ReadEpisode(0);
        for (int t = 0; t < 4; t++)
        {
            Assert.Equal([0.1f * t, 0, 0, 0, 0, 0.2f, t % 2], ep.Actions[t]);
            Assert.Equal([t, 0.5f * t], ep.Proprio[t]);
            Assert.Equal("Pick the cube", ep.Instructions[t]);
            var frame = ep.Frames![0][t]!.Decode();
            Assert.Equal((6, 4), (frame.Width, frame.Height));
            Assert.Equal(Enumerable.Range(0, 72).Select(i => (byte)(50 * t + i)), frame.Pixels);
        }
    }

    [Fact]
    public void A_row_count_that_disagrees_with_episodes_jsonl_is_reported()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, [3]);
        File.WriteAllText(dir["meta/episodes.jsonl"], JsonSerializer.Serialize(new { episode_index = 0, tasks = new[] { "x" }, length = 4 }) + "\n");
        using var data = VlaDataset.Open(dir.Path);
        var e = Assert.Throws<DatasetException>(() => data.ReadEpisode(0));
        Assert.Contains("has 3 rows but meta/episodes.jsonl says episode 0 has 4", e.Message);
    }
}
