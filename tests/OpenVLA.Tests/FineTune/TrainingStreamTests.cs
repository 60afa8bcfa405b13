using OpenVLA.FineTune.Data;

namespace OpenVLA.Tests.FineTune;

public class TrainingStreamTests
{
    private static readonly int[] Lengths = [5, 3, 4, 6, 2, 5, 3, 4];   // 32 steps

    private static (int Episode, int Step)[] Take(TrainingStream s, int n) =>
        Enumerable.Range(0, n).Select(_ => s.Next()).Select(x => (x.EpisodeIndex, x.StepIndex)).ToArray();

    [Fact]
    public void One_epoch_hands_out_every_step_once_shuffled_and_the_same_for_the_same_seed()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, Lengths);
        using var data = VlaDataset.Open(dir.Path);
        var stats = data.ComputeStatistics();
        var all = data.UsableEpisodes;
        var options = new StreamOptions { ShuffleBufferSize = 6, Seed = 3 };

        var first = Take(new TrainingStream(data, all, stats, options), 32);
        var again = Take(new TrainingStream(data, all, stats, options), 32);
        var other = Take(new TrainingStream(data, all, stats, options with { Seed = 4 }), 32);

        Assert.Equal(first, again);
        Assert.NotEqual(first, other);
        var expected = Lengths.SelectMany((n, e) => Enumerable.Range(0, n).Select(t => (e, t))).ToHashSet();
        Assert.True(expected.SetEquals(first), "each step of the epoch exactly once");
        Assert.Equal(32, first.Distinct().Count());
        Assert.NotEqual(first.OrderBy(x => x.Episode).ThenBy(x => x.Step), first);   // actually shuffled
    }

    [Fact]
    public void Samples_carry_frames_instruction_and_normalized_action()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, Lengths);
        using var data = VlaDataset.Open(dir.Path);
        var stats = data.ComputeStatistics();
        var stream = new TrainingStream(data, data.UsableEpisodes, stats, new StreamOptions { ShuffleBufferSize = 4 });
        var normalizer = stats.Action;
        foreach (var s in stream.Take(10))
        {
            TestDatasets.AssertSameImage(TestDatasets.Frame(s.EpisodeIndex, s.StepIndex), s.Images[0]);
            Assert.Equal(TestDatasets.Instruction(s.EpisodeIndex), s.Instruction);
            Assert.Equal(TestDatasets.Action(s.EpisodeIndex, s.StepIndex), s.Action);
            Assert.Equal(normalizer.Normalize(s.Action), s.NormalizedAction);
            Assert.All(s.NormalizedAction, v => Assert.InRange(v, -1f, 1f));
            Assert.Equal(data.Name, s.DatasetName);
            Assert.Equal((s.Instruction, data.Name), (s.ToObservation().Instruction, s.ToObservation().UnnormKey));
        }
    }

    [Fact]
    public void Frames_are_resized_then_augmented_when_asked()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, [3, 3]);
        using var data = VlaDataset.Open(dir.Path);
        int resizes = 0;
        var options = new StreamOptions
        {
            ImageSize = 16,
            Resizer = (image, w, h) => { resizes++; return ImageCodec.Resize(image, w, h); },
            Augmentation = ImageAugmentation.OpenVla,
        };
        var stream = new TrainingStream(data, data.UsableEpisodes, data.ComputeStatistics(), options);
        var samples = stream.Take(4).ToList();
        Assert.Equal(4, stream.Cursor.Position);   // LINQ's Take does not draw a fifth sample
        Assert.All(samples, s => Assert.Equal((16, 16), (s.Images[0].Width, s.Images[0].Height)));
        Assert.Equal(4, resizes);
    }

    [Fact]
    public void Memory_stays_within_the_buffer_plus_one_episode()
    {
        using var dir = new TempDir();
        int[] lengths = Enumerable.Range(0, 40).Select(e => 2 + e % 5).ToArray();   // 40 episodes, longest 6 steps
        RldsWriter.WriteDataset(dir.Path, "big", TestDatasets.RldsEpisodes(lengths), shards: 4, gzip: true);
        using var data = VlaDataset.Open(dir.Path);
        var stream = new TrainingStream(data, data.UsableEpisodes, data.ComputeStatistics(), new StreamOptions { ShuffleBufferSize = 5 });

        int total = lengths.Sum();
        var seen = Take(stream, total);
        Assert.Equal(total, seen.Distinct().Count());
        Assert.InRange(stream.PeakResidentFrames, 5, 5 + 6);
        Assert.Equal(0, stream.ResidentFrames);   // the epoch is done: nothing held
        Assert.Equal(0, stream.Epoch);
        stream.Next();                            // the next epoch starts, reshuffled, when the next sample is asked for
        Assert.Equal(1, stream.Epoch);
        Assert.Equal(new StreamCursor(1, 1, 7, 5, true, stream.Cursor.Fingerprint), stream.Cursor);
    }

    [Theory]
    [InlineData(0)]      // before anything
    [InlineData(7)]      // mid-epoch with a full buffer
    [InlineData(32)]     // exactly at the end of epoch 0
    [InlineData(45)]     // inside epoch 1
    public void A_resumed_stream_continues_exactly_where_it_stopped(int stopAfter)
    {
        using var dir = new TempDir();
        RldsWriter.WriteDataset(dir.Path, "resume", TestDatasets.RldsEpisodes(Lengths), shards: 2, gzip: true);
        using var data = VlaDataset.Open(dir.Path);
        var stats = data.ComputeStatistics();
        var options = new StreamOptions { ShuffleBufferSize = 6, Seed = 11, Augmentation = ImageAugmentation.OpenVla };

        var straight = new TrainingStream(data, data.UsableEpisodes, stats, options);
        var expected = straight.Take(stopAfter + 20).ToList();

        var first = new TrainingStream(data, data.UsableEpisodes, stats, options);
        for (int i = 0; i < stopAfter; i++) first.Next();
        var cursor = first.Cursor;
        if (stopAfter > 0)
        {
            // A trainer that prefetched: the cursor after the last trained sample, not the stream's current one.
            var prefetched = first.Next();
            Assert.NotEqual(cursor, prefetched.CursorAfter);
            Assert.Equal(first.Cursor, prefetched.CursorAfter);
        }
        var json = System.Text.Json.JsonSerializer.Serialize(cursor);                   // stored with the training state
        var restored = System.Text.Json.JsonSerializer.Deserialize<StreamCursor>(json)!;

        var resumed = new TrainingStream(data, data.UsableEpisodes, stats, options, resumeFrom: restored);
        Assert.InRange(resumed.ResidentFrames, 0, 6 + Lengths.Max());   // only the buffered steps and the open episode were read
        var rest = resumed.Take(20).ToList();
        for (int i = 0; i < 20; i++)
        {
            var (a, b) = (expected[stopAfter + i], rest[i]);
            Assert.Equal((a.EpisodeIndex, a.StepIndex), (b.EpisodeIndex, b.StepIndex));
            Assert.Equal(a.Images[0].Pixels, b.Images[0].Pixels);   // the same augmentation too
        }
    }

    [Fact]
    public void A_cursor_from_other_options_is_refused()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, Lengths);
        using var data = VlaDataset.Open(dir.Path);
        var stats = data.ComputeStatistics();
        var stream = new TrainingStream(data, data.UsableEpisodes, stats, new StreamOptions { ShuffleBufferSize = 6 });
        stream.Next();
        var e = Assert.Throws<DatasetException>(() => new TrainingStream(data, data.UsableEpisodes, stats, new StreamOptions { ShuffleBufferSize = 7 }, stream.Cursor));
        Assert.StartsWith("cannot resume", e.Message);
        e = Assert.Throws<DatasetException>(() => new TrainingStream(data, [0, 1, 2], stats, new StreamOptions { ShuffleBufferSize = 6 }, stream.Cursor));
        Assert.StartsWith("cannot resume", e.Message);
    }

    [Fact]
    public void Held_out_episodes_are_disjoint_and_the_evaluation_stream_is_in_order()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir.Path, Lengths);
        using var data = VlaDataset.Open(dir.Path);
        var split = data.SplitEpisodes(heldOutFraction: 0.25, seed: 7);
        Assert.Equal(2, split.HeldOut.Count);
        Assert.Equal(6, split.Train.Count);
        Assert.Empty(split.Train.Intersect(split.HeldOut));
        Assert.Equal(split.HeldOut, data.SplitEpisodes(0.25, 7).HeldOut);   // deterministic for the seed

        var eval = new TrainingStream(data, split.HeldOut, data.ComputeStatistics(), new StreamOptions { Shuffle = false, Repeat = false });
        var order = eval.Select(s => (s.EpisodeIndex, s.StepIndex)).ToArray();
        var expected = split.HeldOut.SelectMany(e => Enumerable.Range(0, Lengths[e]).Select(t => (e, t))).ToArray();
        Assert.Equal(expected, order);
        Assert.False(eval.TryNext(out _));

        var train = new TrainingStream(data, split.Train, data.ComputeStatistics(), new StreamOptions { ShuffleBufferSize = 8, Repeat = false });
        Assert.DoesNotContain(train, s => split.HeldOut.Contains(s.EpisodeIndex));
    }
}
