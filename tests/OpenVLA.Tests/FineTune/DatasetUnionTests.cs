using OpenVLA.FineTune.Data;

namespace OpenVLA.Tests.FineTune;

/// <summary>Several datasets opened as one (DAgger's aggregated data): numbering, reading, statistics, streaming, errors.</summary>
public class DatasetUnionTests
{
    [Fact]
    public void Episodes_are_numbered_in_the_order_given_and_read_from_their_own_dataset()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir["demos"], [4, 2], tasks: ["pick up the cup", "open the drawer"]);
        TestDatasets.WriteLeRobot(dir["dagger"], [3], tasks: ["push the cube"]);

        using var data = VlaDataset.Open([dir["demos"], dir["dagger"]]);
        Assert.Equal(3, data.EpisodeCount);
        Assert.Equal(9, data.StepCount);
        Assert.Equal("demos", data.Name);   // the first dataset's name keys dataset_statistics.json
        Assert.Equal([4, 2, 3], Enumerable.Range(0, 3).Select(data.EpisodeLength));

        // Combined episode 2 is the second dataset's episode 0, with that dataset's instruction table.
        var ep = data.ReadEpisode(2);
        Assert.Equal(3, ep.Length);
        for (int t = 0; t < 3; t++)
        {
            Assert.Equal(TestDatasets.Action(0, t), ep.Actions[t]);
            Assert.Equal("push the cube", ep.Instructions[t]);
            TestDatasets.AssertSameImage(TestDatasets.Frame(0, t), ep.Frames![0][t]!.Decode());
        }
        Assert.Equal("open the drawer", data.ReadEpisode(1, withImages: false).Instructions[0]);
        Assert.Throws<ArgumentOutOfRangeException>(() => data.ReadEpisode(3));
    }

    [Fact]
    public void Statistics_and_the_split_cover_the_union()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir["a"], [4, 2]);
        TestDatasets.WriteLeRobot(dir["b"], [5, 1, 3]);
        using var data = VlaDataset.Open([dir["a"], dir["b"]]);

        // Every step of both datasets, by the generator's formula: episode e's step t has dims e + t/10 + d/100.
        var rows = new List<float[]>();
        foreach (var (lengths, _) in new[] { (new[] { 4, 2 }, 0), (new[] { 5, 1, 3 }, 1) })
            for (int e = 0; e < lengths.Length; e++)
                for (int t = 0; t < lengths[e]; t++) rows.Add(TestDatasets.Action(e, t));
        var stats = data.ComputeStatistics();
        Assert.Equal([true, true, true, true, true, true, false], stats.Action.Mask!);   // the gripper is not normalized
        var expected = ArrayStatistics.Compute(rows, 7, stats.Action.Mask);
        Assert.Equal(15, stats.NumTransitions);
        Assert.Equal(5, stats.NumTrajectories);
        Assert.Equal(expected.Mean, stats.Action.Mean);
        Assert.Equal(expected.Q99, stats.Action.Q99);

        var split = data.SplitEpisodes(0.4, 7);
        Assert.Equal(2, split.HeldOut.Count);
        Assert.Equal(Enumerable.Range(0, 5), split.Train.Concat(split.HeldOut).Order());
    }

    [Fact]
    public void A_union_of_gzip_shards_streams_every_step_once_per_epoch()
    {
        using var dir = new TempDir();
        RldsWriter.WriteDataset(dir["one"], "one", TestDatasets.RldsEpisodes([2, 3, 4]), shards: 2, gzip: true);
        RldsWriter.WriteDataset(dir["two"], "two", TestDatasets.RldsEpisodes([3, 1]), shards: 2, gzip: true);
        using var data = VlaDataset.Open([dir["one"], dir["two"]]);
        Assert.Equal(5, data.EpisodeCount);
        Assert.Equal(13, data.StepCount);

        var stream = new TrainingStream(data, Enumerable.Range(0, 5).ToList(), data.ComputeStatistics(),
            new StreamOptions { ShuffleBufferSize = 4, Repeat = false, Seed = 3 });
        var seen = stream.Select(s => (s.EpisodeIndex, s.StepIndex)).ToList();
        var all = Enumerable.Range(0, 5).SelectMany(e => Enumerable.Range(0, data.EpisodeLength(e)).Select(t => (e, t)));
        Assert.Equal(all.Order(), seen.Order());
    }

    [Fact]
    public void Dataset_weights_sample_each_dataset_in_proportion_with_fresh_subsets_each_epoch()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir["demos"], Enumerable.Repeat(2, 12).ToArray());   // episodes 0-11
        TestDatasets.WriteLeRobot(dir["dagger"], Enumerable.Repeat(2, 4).ToArray());   // episodes 12-15
        using var data = VlaDataset.Open([dir["demos"], dir["dagger"]]);
        Assert.Equal(2, data.PartCount);
        Assert.Equal([0, 0, 1], new[] { 0, 11, 12 }.Select(data.PartOf));
        var stats = data.ComputeStatistics();
        var all = Enumerable.Range(0, 16).ToList();

        // Weights 1 : 2. The dagger frames, a quarter of the data, are to be sampled twice as often per frame, so each epoch
        // keeps all 4 dagger episodes and round(12 / 2) = 6 of the 12 demos, a different half each epoch.
        var options = new StreamOptions { ShuffleBufferSize = 5, Seed = 3, DatasetWeights = [1, 2] };
        var epochs = new List<List<int>>();
        using (var stream = new TrainingStream(data, all, stats, options).GetEnumerator())
            for (int n = 0; n < 3 * 10 * 2 && stream.MoveNext(); n++)
            {
                if (n % 20 == 0) epochs.Add([]);
                epochs[^1].Add(stream.Current.EpisodeIndex);
            }
        Assert.Equal(3, epochs.Count);
        foreach (var epoch in epochs)
        {
            var episodes = epoch.Distinct().ToList();
            Assert.Equal(10, episodes.Count);
            Assert.Equal([12, 13, 14, 15], episodes.Where(e => e >= 12).Order());
            Assert.Equal(6, episodes.Count(e => e < 12));
            Assert.All(episodes, e => Assert.Equal(2, epoch.Count(x => x == e)));   // every step of a kept episode, once
        }
        Assert.NotEqual(epochs[0].Where(e => e < 12).Distinct().Order(), epochs[1].Where(e => e < 12).Distinct().Order());

        // Deterministic for the seed, and a cursor replays the mixture: resuming after 25 samples continues identically.
        var first = new TrainingStream(data, all, stats, options).Take(40).Select(s => (s.EpisodeIndex, s.StepIndex)).ToList();
        var run = new TrainingStream(data, all, stats, options);
        var head = run.Take(25).ToList();
        var resumed = new TrainingStream(data, all, stats, options, head[^1].CursorAfter).Take(15).Select(s => (s.EpisodeIndex, s.StepIndex));
        Assert.Equal(first, head.Select(s => (s.EpisodeIndex, s.StepIndex)).Concat(resumed));

        // Equal weights are plain concatenation, and a cursor does not resume under another mixture.
        var plain = new TrainingStream(data, all, stats, new StreamOptions { ShuffleBufferSize = 5, Seed = 3 }).Take(32).Select(s => (s.EpisodeIndex, s.StepIndex));
        var equal = new TrainingStream(data, all, stats, new StreamOptions { ShuffleBufferSize = 5, Seed = 3, DatasetWeights = [2, 2] }).Take(32).Select(s => (s.EpisodeIndex, s.StepIndex));
        Assert.Equal(plain, equal);
        var e = Assert.Throws<DatasetException>(() => new TrainingStream(data, all, stats, options with { DatasetWeights = [1, 3] }, head[^1].CursorAfter));
        Assert.StartsWith("cannot resume", e.Message);
    }

    [Fact]
    public void Dataset_weights_must_be_one_positive_number_per_dataset()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir["a"], [2]);
        TestDatasets.WriteLeRobot(dir["b"], [2]);
        using var data = VlaDataset.Open([dir["a"], dir["b"]]);
        var stats = data.ComputeStatistics();
        var e = Assert.Throws<DatasetException>(() => new TrainingStream(data, [0, 1], stats, new StreamOptions { DatasetWeights = [1] }));
        Assert.Equal("1 dataset weight(s) for 2 dataset(s); give one per dataset, in order", e.Message);
        e = Assert.Throws<DatasetException>(() => new TrainingStream(data, [0, 1], stats, new StreamOptions { DatasetWeights = [1, 0] }));
        Assert.StartsWith("dataset weights must be positive", e.Message);
    }

    [Fact]
    public void Mixed_layouts_a_repeated_dataset_and_a_missing_one_are_refused_with_one_line()
    {
        using var dir = new TempDir();
        TestDatasets.WriteLeRobot(dir["sim"], [2]);
        RldsWriter.WriteDataset(dir["oxe"], "oxe", TestDatasets.RldsEpisodes([2]));

        var e = Assert.Throws<DatasetException>(() => VlaDataset.Open([dir["sim"], dir["oxe"]]));
        Assert.Equal($"datasets to combine must have one layout; {dir["sim"]} is lerobot, {dir["oxe"]} is rlds", e.Message);
        e = Assert.Throws<DatasetException>(() => VlaDataset.Open([dir["sim"], dir["sim"] + "/"]));
        Assert.StartsWith("a dataset is named twice", e.Message);
        e = Assert.Throws<DatasetException>(() => VlaDataset.Open([dir["sim"], dir["nowhere"]], format: DatasetFormats.LeRobot));
        Assert.Equal($"dataset directory not found: {dir["nowhere"]}", e.Message);
    }
}
