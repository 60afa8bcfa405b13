using OpenVLA.FineTune.Data;

namespace OpenVLA.Tests.FineTune;

public class RldsReaderTests
{
    [Fact]
    public void Reads_episodes_written_as_a_tfds_shard()
    {
        using var dir = new TempDir();
        RldsWriter.WriteDataset(dir.Path, "my_oxe_set", TestDatasets.RldsEpisodes([3, 5]));

        using var data = VlaDataset.Open(dir.Path);
        Assert.Equal(DatasetFormats.Rlds, data.Format);
        Assert.Equal("my_oxe_set", data.Name);   // from dataset_info.json
        Assert.Equal(2, data.EpisodeCount);
        Assert.Equal(8, data.StepCount);

        var ep = data.ReadEpisode(1);
        Assert.Equal(5, ep.Length);
        for (int t = 0; t < 5; t++)
        {
            Assert.Equal(TestDatasets.Action(1, t), ep.Actions[t]);
            Assert.Equal("put the block 1 in the bowl", ep.Instructions[t]);
            TestDatasets.AssertSameImage(TestDatasets.Frame(1, t), ep.Frames![0][t]!.Decode());
        }
        Assert.Empty(ep.Proprio[0]);   // the RLDS default config reads no proprio
    }

    [Fact]
    public void Reads_gzip_shards_jpeg_frames_and_a_second_camera()
    {
        using var dir = new TempDir();
        var paths = RldsWriter.WriteDataset(dir.Path, "gz", TestDatasets.RldsEpisodes([2, 3, 4], png: false, wrist: true), shards: 2, gzip: true);
        Assert.All(paths, p => Assert.True(TfRecordFormat.IsGzip(p)));

        var config = new DatasetConfig { ImageKeys = ["image", "wrist_image"], ProprioKey = "state" };
        using var data = VlaDataset.Open(dir.Path, config);
        // Episodes are numbered in shard order: shard 0 holds written episodes 0 and 2, shard 1 episode 1.
        Assert.Equal([2, 4, 3], Enumerable.Range(0, 3).Select(data.EpisodeLength));
        var ep = data.ReadEpisode(1);
        Assert.Equal(TestDatasets.Action(2, 3), ep.Actions[3]);
        Assert.Equal([2f, 3f], ep.Proprio[3]);
        var jpeg = ep.Frames![0][1]!.Decode();
        var expected = TestDatasets.Frame(2, 1);
        Assert.True(jpeg.Pixels.Zip(expected.Pixels).Max(p => Math.Abs(p.First - p.Second)) < 40, "JPEG frame should be close to the original");
        TestDatasets.AssertSameImage(TestDatasets.Frame(2, 1, camera: 1), ep.Frames[1][1]!.Decode());
        // Going back to an earlier episode of the same GZIP shard reopens it.
        TestDatasets.AssertSameImage(TestDatasets.Frame(0, 1, camera: 1), data.ReadEpisode(0).Frames![1][1]!.Decode());
    }

    [Fact]
    public void Reads_a_shard_written_by_another_tfrecord_implementation()
    {
        // Framed and encoded by @roboflow/tfrecords + google-protobuf (Fixtures/make_js_rlds.cjs): the same episode twice,
        // LIBERO's gripper convention (-1 open, +1 close).
        string dir = Path.Combine(AppContext.BaseDirectory, "FineTune", "Fixtures", "js_rlds");
        Assert.Equal(2, TfRecordReader.ReadAll(Directory.GetFiles(dir).Single()).Count());
        var config = new DatasetConfig { Name = "libero_like", Gripper = new GripperConvention { Clip = true, Invert = true } };
        using var data = VlaDataset.Open(dir, config);
        Assert.Equal(2, data.EpisodeCount);
        var ep = data.ReadEpisode(1);
        for (int t = 0; t < 4; t++)
        {
            Assert.Equal([0.5f * t, 0, 0, 0, 0, 0.25f, t % 2 == 0 ? 1f : 0f], ep.Actions[t]);
            Assert.Equal("open the top drawer", ep.Instructions[t]);
            Assert.Equal(Enumerable.Range(0, 72).Select(i => (byte)(50 * t + i)), ep.Frames![0][t]!.Decode().Pixels);
        }
    }

    [Fact]
    public void Libero_style_gripper_is_clipped_and_inverted_to_one_open_zero_closed()
    {
        using var dir = new TempDir();
        // LIBERO stores the gripper command as -1 = open, +1 = close.
        var episode = new RldsEpisode(
            new Dictionary<string, IReadOnlyList<byte[]>> { ["image"] = [OpenVLA.FineTune.Data.ImageCodec.EncodePng(TestDatasets.Frame(0, 0)), OpenVLA.FineTune.Data.ImageCodec.EncodePng(TestDatasets.Frame(0, 1))] },
            [new float[] { 0.1f, 0, 0, 0, 0, 0, -1f }, new float[] { 0.2f, 0, 0, 0, 0, 0, 1f }],
            ["open the drawer", "open the drawer"],
            [new float[8], new float[8]]);
        RldsWriter.WriteDataset(dir.Path, "libero_spatial_no_noops", [episode]);
        var config = DatasetConfig.Load(Path.Combine(AppContext.BaseDirectory, "FineTune", "libero_rlds.json"));

        using var data = VlaDataset.Open(dir.Path, config);
        var ep = data.ReadEpisode(0, withImages: false);
        Assert.Equal(1f, ep.Actions[0][6]);   // -1 (open) → clip 0 → invert 1
        Assert.Equal(0f, ep.Actions[1][6]);   // +1 (close) → clip 1 → invert 0
        Assert.Equal(0.1f, ep.Actions[0][0]);
        Assert.Equal("libero_spatial_no_noops", data.Name);
    }

    [Fact]
    public void Errors_name_the_missing_image_key_language_and_action_dimension()
    {
        using var dir = new TempDir();
        RldsWriter.WriteDataset(dir.Path, "set", TestDatasets.RldsEpisodes([2], actionDims: 8));

        var e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path, new DatasetConfig { ImageKeys = ["image_0"] }));
        Assert.Contains("has no image key 'image_0'", e.Message);
        Assert.Contains("observation/image", e.Message);   // lists what there is

        e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path, new DatasetConfig { Instruction = "natural_language_instruction" }));
        Assert.Contains("has no language", e.Message);

        e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path));
        Assert.Contains("mismatched action dimension: the stored action has 8 dims, the config expects 7", e.Message);

        // Selecting 7 of the 8 dims makes it usable.
        using var data = VlaDataset.Open(dir.Path, new DatasetConfig { ActionDims = [0, 1, 2, 3, 4, 5, 7] });
        Assert.Equal(TestDatasets.Action(0, 1, 8)[7], data.ReadEpisode(0, withImages: false).Actions[1][6]);
    }

    [Fact]
    public void Empty_instructions_are_an_error_unless_skipped()
    {
        using var dir = new TempDir();
        var episodes = TestDatasets.RldsEpisodes([2, 3]);
        episodes[0] = episodes[0] with { Instructions = ["", ""] };
        RldsWriter.WriteDataset(dir.Path, "set", episodes);

        var e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path));
        Assert.Equal($"dataset {dir.Path}: 1 of 2 episodes have no language (an empty instruction; first: episode 0); set skip_unlabeled to drop them", e.Message);
        using var skipping = VlaDataset.Open(dir.Path, new DatasetConfig { SkipUnlabeled = true });
        Assert.Equal([1], skipping.UsableEpisodes);
        Assert.Equal(1, skipping.ComputeStatistics().NumTrajectories);
    }

    [Fact]
    public void A_corrupted_shard_fails_at_open_naming_file_and_record()
    {
        using var dir = new TempDir();
        var path = RldsWriter.WriteDataset(dir.Path, "set", TestDatasets.RldsEpisodes([2, 2, 2]))[0];
        var bytes = File.ReadAllBytes(path);
        bytes[^10] ^= 0xFF;   // inside the last record's data
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path));
        Assert.Equal($"TFRecord file {path}: record 2 has a data CRC mismatch", e.Message[..e.Message.IndexOf(" (", StringComparison.Ordinal)]);
    }

    [Fact]
    public void An_unknown_layout_is_a_one_line_error()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir["notes.txt"], "hello");
        var e = Assert.Throws<DatasetException>(() => VlaDataset.Open(dir.Path));
        Assert.Equal($"unknown dataset layout in {dir.Path}: expected meta/info.json (LeRobot v2.1) or *.tfrecord* shards (RLDS/TFDS)", e.Message);
    }
}
