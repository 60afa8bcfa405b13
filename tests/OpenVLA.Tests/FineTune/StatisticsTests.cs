using System.Text.Json;
using OpenVLA.FineTune.Data;

namespace OpenVLA.Tests.FineTune;

public class StatisticsTests
{
    // Five transitions over two episodes (3 + 2 steps). Dim 0: 0,1,2,3,10; dim 1: 1,2,4,8,16; dim 2 constant 5;
    // dims 3-5 zero; gripper 1,1,0,0,1.
    private static readonly float[][] Actions =
    [
        [0, 1, 5, 0, 0, 0, 1], [1, 2, 5, 0, 0, 0, 1], [2, 4, 5, 0, 0, 0, 0],
        [3, 8, 5, 0, 0, 0, 0], [10, 16, 5, 0, 0, 0, 1],
    ];

    private static VlaDataset WriteAndOpen(TempDir dir)
    {
        var frame = ImageCodec.EncodePng(TestDatasets.Frame(0, 0));
        RldsEpisode Episode(int from, int count) => new(
            new Dictionary<string, IReadOnlyList<byte[]>> { ["image"] = Enumerable.Repeat(frame, count).ToList() },
            Actions[from..(from + count)], Enumerable.Repeat("wipe the table", count).ToList());
        RldsWriter.WriteDataset(dir.Path, "hand_made", [Episode(0, 3), Episode(3, 2)]);
        return VlaDataset.Open(dir.Path);
    }

    [Fact]
    public void Statistics_match_a_hand_computation()
    {
        using var dir = new TempDir();
        using var data = WriteAndOpen(dir);
        var s = data.ComputeStatistics();

        Assert.Equal("hand_made", s.DatasetName);
        Assert.Equal(5, s.NumTransitions);
        Assert.Equal(2, s.NumTrajectories);
        var a = s.Action;
        // Means: 16/5 = 3.2 and 31/5 = 6.2. Population std of dim 0: sqrt((3.2² + 2.2² + 1.2² + 0.2² + 6.8²)/5) = sqrt(12.56).
        Assert.Equal(3.2f, a.Mean[0]);
        Assert.Equal(6.2f, a.Mean[1]);
        Assert.Equal((float)Math.Sqrt(12.56), a.Std[0]);
        Assert.Equal((float)Math.Sqrt(29.76), a.Std[1]);
        Assert.Equal(0f, a.Std[2]);
        // numpy linear quantiles with N = 5: h = 4·0.01 = 0.04 → x0 + 0.04·(x1 − x0); h = 4·0.99 = 3.96 → x3 + 0.96·(x4 − x3).
        Assert.Equal(0.04f, a.Q01[0]);
        Assert.Equal(3f + 0.96f * 7f, a.Q99[0], 5);      // 9.72
        Assert.Equal(1.04f, a.Q01[1]);
        Assert.Equal(8f + 0.96f * 8f, a.Q99[1], 5);      // 15.68
        Assert.Equal([0f, 1f, 5f, 0f, 0f, 0f, 0f], a.Min);
        Assert.Equal([10f, 16f, 5f, 0f, 0f, 0f, 1f], a.Max);
        Assert.Equal([true, true, true, true, true, true, false], a.Mask!);
        // No proprio configured: the reference stores statistics of zeros shaped like the action.
        Assert.Equal(new float[7], s.Proprio.Mean);
        Assert.Equal(new float[7], s.Proprio.Q99);
    }

    [Fact]
    public void Quantile_interpolates_like_numpy()
    {
        double[] sorted = [1, 2, 4, 8, 16];
        Assert.Equal(1.04, ArrayStatistics.Quantile(sorted, 0.01), 12);
        Assert.Equal(15.68, ArrayStatistics.Quantile(sorted, 0.99), 12);
        Assert.Equal(4, ArrayStatistics.Quantile(sorted, 0.5), 12);
        Assert.Equal(16, ArrayStatistics.Quantile(sorted, 1.0), 12);
        Assert.Equal(7, ArrayStatistics.Quantile([7], 0.99), 12);
        // 201 values (40 × {0, .25, .5, .75, 1} and one outlier 5): q99 at h = 198 is still 1, unaffected by the outlier.
        var many = Enumerable.Range(0, 200).Select(i => (i % 5) * 0.25).Append(5.0).Order().ToArray();
        Assert.Equal(0.0, ArrayStatistics.Quantile(many, 0.01), 12);
        Assert.Equal(1.0, ArrayStatistics.Quantile(many, 0.99), 12);
    }

    [Fact]
    public void Normalization_is_bounds_q99_with_mask_and_constant_dims_zeroed()
    {
        using var dir = new TempDir();
        using var data = WriteAndOpen(dir);
        var n = data.ComputeStatistics().Action;

        var x = n.Normalize([2, 8, 5, 0, 0, 0, 1]);
        Assert.Equal(2 * (2 - 0.04f) / (9.72f - 0.04f) - 1, x[0], 5);   // −0.595041
        Assert.Equal(-0.595041f, x[0], 5);
        Assert.Equal(2 * (8 - 1.04f) / (15.68f - 1.04f) - 1, x[1], 5);
        Assert.Equal(0f, x[2]);        // min == max → 0 although 5 is far outside [q01, q99]
        Assert.Equal(0f, x[3]);
        Assert.Equal(1f, x[6]);        // gripper not normalized (mask false): raw
        Assert.Equal(1f, n.Normalize([10, 16, 5, 0, 0, 0, 0])[0]);     // 1.058 clipped
        Assert.Equal(-1f, n.Normalize([0, 1, 5, 0, 0, 0, 0])[0]);      // −1.008 clipped
    }

    [Fact]
    public void Json_has_the_reference_layout_and_round_trips()
    {
        using var dir = new TempDir();
        using var data = WriteAndOpen(dir);
        var s = data.ComputeStatistics();
        string path = s.SaveTo(dir["run"]);
        Assert.Equal(dir["run/dataset_statistics.json"], path);

        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        var entry = doc.RootElement.GetProperty("hand_made");
        Assert.Equal(["mean", "std", "max", "min", "q01", "q99", "mask"], entry.GetProperty("action").EnumerateObject().Select(p => p.Name));
        Assert.Equal(["mean", "std", "max", "min", "q01", "q99"], entry.GetProperty("proprio").EnumerateObject().Select(p => p.Name));
        Assert.Equal(5, entry.GetProperty("num_transitions").GetInt32());
        Assert.Equal(2, entry.GetProperty("num_trajectories").GetInt32());
        Assert.Equal(0.04, entry.GetProperty("action").GetProperty("q01")[0].GetDouble(), 6);
        Assert.False(entry.GetProperty("action").GetProperty("mask")[6].GetBoolean());

        var loaded = DatasetStatistics.Load(path)["hand_made"];
        Assert.Equal(s.Action.Q99, loaded.Action.Q99);
        Assert.Equal(s.Action.Mask, loaded.Action.Mask);
        var policyStats = loaded.ToActionStats();
        Assert.Equal(s.Action.Q01.Select(v => (double)v), policyStats.Q01);
        Assert.Equal(s.Action.Mask, policyStats.Mask);
    }
}
