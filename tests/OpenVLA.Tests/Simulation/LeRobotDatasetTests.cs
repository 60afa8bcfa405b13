using System.Text.Json.Nodes;
using OpenVLA.Simulation.Datasets;
using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.Tests.Simulation;

[Collection("MuJoCo")]
public sealed class LeRobotDatasetTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), $"openvla-demos-test-{Guid.NewGuid():N}");

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    [Fact]
    public void A_written_dataset_reads_back_with_matching_frames_actions_and_statistics()
    {
        var tasks = TabletopTasks.Parse("pick_up,stack");
        var summary = DemoSuite.Generate(new DemoOptions(tasks, EpisodesPerTask: 1, _dir, Seed: 3, ImageSize: 32), workerCommand: null);
        Assert.Equal(2, summary.Episodes);

        var info = JsonNode.Parse(File.ReadAllText(Path.Combine(_dir, "meta", "info.json")))!;
        Assert.Equal("v2.1", (string?)info["codebase_version"]);
        Assert.Equal(10, (int)info["fps"]!);
        Assert.Equal(summary.Frames, (long)info["total_frames"]!);
        Assert.Equal("image", (string?)info["features"]!["observation.images.image"]!["dtype"]);
        Assert.Equal(7, (int)info["features"]!["action"]!["shape"]![0]!);
        var environment = info["features"]!["observation.environment_state"]!;
        Assert.Equal(18, (int)environment["shape"]![0]!);
        Assert.Equal(["red_x", "red_y", "red_z"], environment["names"]!.AsArray().Take(3).Select(n => (string)n!));
        Assert.Equal(["plate_x", "plate_y", "purple_x", "purple_y", "orange_x", "orange_y"], environment["names"]!.AsArray().Skip(12).Select(n => (string)n!));
        var taskLines = File.ReadAllLines(Path.Combine(_dir, "meta", "tasks.jsonl"));
        Assert.Equal(TabletopTasks.InstructionCatalogue(tasks).Count, taskLines.Length);
        var episodeLines = File.ReadAllLines(Path.Combine(_dir, "meta", "episodes.jsonl")).Select(l => JsonNode.Parse(l)!).ToArray();
        Assert.Equal(2, episodeLines.Length);

        // Replay each episode's recorded actions from its seed: the simulator must show exactly the stored frames.
        var allActions = new List<float[]>();
        long expectedIndex = 0;
        using var env = new TabletopEnv(32);
        for (int e = 0; e < 2; e++)
        {
            var rows = LeRobotFiles.ReadRows(LeRobotLayout.EpisodeFile(_dir, e));
            var meta = episodeLines[e];
            Assert.Equal((int)meta["length"]!, rows.Count);
            var episode = TabletopTasks.Get((string)meta["suite_task"]!).Sample((int)meta["seed"]!);
            Assert.Equal((string)meta["tasks"]![0]!, episode.Instruction);
            Assert.Equal(episode.Instruction, JsonNode.Parse(taskLines[rows[0].TaskIndex])!["task"]!.GetValue<string>());
            env.Reset(episode.Layout);
            var start = TabletopScene.CubeColours.ToDictionary(c => c, env.CubePosition);
            for (int t = 0; t < rows.Count; t++)
            {
                var row = rows[t];
                Assert.Equal(t, row.FrameIndex);
                Assert.Equal(e, row.EpisodeIndex);
                Assert.Equal(expectedIndex++, row.Index);
                Assert.Equal(t / 10f, row.Timestamp);
                var (w, h, rgb) = Png.DecodeRgb(row.Image!.Bytes);
                Assert.Equal((32, 32), (w, h));
                Assert.Equal(env.Render(), rgb);
                Assert.Equal(env.State(), row.State!.ToArray());
                Assert.Equal(env.EnvironmentState(), row.EnvironmentState!.ToArray());
                if (t == 0)
                    foreach (var (colour, i) in TabletopScene.CubeColours.Select((c, i) => (c, i)))
                    {
                        // Cubes start where the layout put them (x, y), resting on the table (z = half the cube).
                        Assert.Equal(episode.Layout.Cubes[colour].X, row.EnvironmentState![3 * i], 2);
                        Assert.Equal(episode.Layout.Cubes[colour].Y, row.EnvironmentState![3 * i + 1], 2);
                        Assert.Equal(TabletopScene.CubeHalfSize, row.EnvironmentState![3 * i + 2], 2);
                    }
                Assert.Equal(7, row.Action!.Count);
                env.Step(row.Action!.ToArray());
                allActions.Add(row.Action!.ToArray());
            }
            Assert.True(episode.Task.IsSuccess(env, episode.Args, start), "the recorded actions solve the task when replayed");
        }

        // OpenVLA statistics: recomputed from the parquet actions (numpy semantics), gripper unnormalized.
        var stats = JsonNode.Parse(File.ReadAllText(Path.Combine(_dir, "dataset_statistics.json")))!["tabletop"]!;
        Assert.Equal(allActions.Count, (int)stats["num_transitions"]!);
        Assert.Equal(2, (int)stats["num_trajectories"]!);
        Assert.Equal([true, true, true, true, true, true, false], stats["action"]!["mask"]!.AsArray().Select(n => (bool)n!));
        var q99 = FeatureStats.Quantile(allActions, 0.99);
        for (int d = 0; d < 7; d++)
        {
            Assert.Equal(q99[d], (double)stats["action"]!["q99"]![d]!, 9);
            Assert.Equal(allActions.Average(a => (double)a[d]), (double)stats["action"]!["mean"]![d]!, 9);
            Assert.Equal(allActions.Min(a => a[d]), (double)stats["action"]!["min"]![d]!, 9);
        }
        Assert.Equal(0.0, (double)stats["action"]!["min"]![6]!); // the gripper closes (0) ...
        Assert.Equal(1.0, (double)stats["action"]!["max"]![6]!); // ... and opens (1)
        Assert.Equal(8, stats["proprio"]!["q01"]!.AsArray().Count);

        var lerobot = JsonNode.Parse(File.ReadAllText(Path.Combine(_dir, "meta", "stats.json")))!;
        Assert.Equal(allActions.Count, (long)lerobot["action"]!["count"]![0]!);
        Assert.Equal(3, lerobot["observation.images.image"]!["mean"]!.AsArray().Count);
        Assert.Equal(allActions.Count, (long)lerobot["observation.images.image"]!["count"]![0]!); // frames, not pixels
        Assert.InRange((double)lerobot["observation.images.image"]!["mean"]![0]![0]![0]!, 0.2, 1.0); // red channel, scaled to [0, 1] (the pale table fills most of the frame)
        Assert.Equal(2, File.ReadAllLines(Path.Combine(_dir, "meta", "episodes_stats.jsonl")).Length);
    }

    [Fact]
    public void Expert_labels_keep_the_noisy_trajectory_and_record_the_clean_commands()
    {
        var tasks = TabletopTasks.Parse("pick_up");
        string executedDir = Path.Combine(_dir, "executed"), expertDir = Path.Combine(_dir, "expert");
        DemoSuite.Generate(new DemoOptions(tasks, 1, executedDir, Noise: 0.005, Seed: 3, ImageSize: 32), workerCommand: null);
        DemoSuite.Generate(new DemoOptions(tasks, 1, expertDir, Noise: 0.005, Seed: 3, ImageSize: 32, ExpertLabels: true), workerCommand: null);

        var executed = LeRobotFiles.ReadRows(LeRobotLayout.EpisodeFile(executedDir, 0));
        var expert = LeRobotFiles.ReadRows(LeRobotLayout.EpisodeFile(expertDir, 0));
        Assert.Equal(executed.Count, expert.Count); // the same noisy episode was executed
        Assert.Equal(executed.Select(r => r.Image!.Bytes), expert.Select(r => r.Image!.Bytes));
        Assert.All(expert, r => Assert.All(r.Action!.Take(3), v => Assert.InRange(v, -0.02f, 0.02f))); // the expert's step limit
        Assert.Contains(executed, r => r.Action!.Take(3).Any(v => Math.Abs(v) > 0.02f)); // noise pushed some past it
        Assert.NotEqual(executed.Select(r => r.Action![0]), expert.Select(r => r.Action![0]));
    }

    [Fact]
    public void The_wrist_camera_is_an_optional_second_image_column()
    {
        DemoSuite.Generate(new DemoOptions(TabletopTasks.Parse("pick_up"), 1, _dir, ImageSize: 32, Wrist: true), workerCommand: null);
        var info = JsonNode.Parse(File.ReadAllText(Path.Combine(_dir, "meta", "info.json")))!;
        Assert.Equal("image", (string?)info["features"]!["observation.images.wrist_image"]!["dtype"]);
        var rows = LeRobotFiles.ReadRows(LeRobotLayout.EpisodeFile(_dir, 0));
        var third = Png.DecodeRgb(rows[0].Image!.Bytes).Rgb;
        var wrist = Png.DecodeRgb(rows[0].WristImage!.Bytes).Rgb;
        Assert.Equal(third.Length, wrist.Length);
        Assert.NotEqual(third, wrist);
        var stats = JsonNode.Parse(File.ReadAllText(Path.Combine(_dir, "meta", "stats.json")))!;
        Assert.Equal(rows.Count, (long)stats["observation.images.wrist_image"]!["count"]![0]!);
    }

    [Fact]
    public void Quantiles_follow_numpy_linear_interpolation()
    {
        var rows = new[] { new[] { 1f, 10f }, new[] { 2f, 20f }, new[] { 3f, 30f }, new[] { 4f, 40f } };
        // numpy.quantile([1,2,3,4], 0.01) = 1.03, numpy.quantile([1,2,3,4], 0.99) = 3.97
        Assert.Equal(1.03, FeatureStats.Quantile(rows, 0.01)[0], 12);
        Assert.Equal(3.97, FeatureStats.Quantile(rows, 0.99)[0], 12);
        Assert.Equal(39.7, FeatureStats.Quantile(rows, 0.99)[1], 12);
    }

    [Fact]
    public void Png_round_trips_rgb_frames()
    {
        var rng = new Random(1);
        var rgb = new byte[17 * 9 * 3];
        rng.NextBytes(rgb);
        var (w, h, back) = Png.DecodeRgb(Png.EncodeRgb(rgb, 17, 9));
        Assert.Equal((17, 9), (w, h));
        Assert.Equal(rgb, back);
    }
}
