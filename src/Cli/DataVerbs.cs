using System.CommandLine;
using System.Text.Json;
using OpenVLA.FineTune.Data;

namespace OpenVLA.Cli;

/// <summary>dataset inspect, dataset stats: look at a fine-tuning dataset and compute its dataset_statistics.json.</summary>
internal static class DataVerbs
{
    public static IEnumerable<Command> Create()
    {
        var dataset = new Command("dataset", "Inspect LeRobot v2.1 / RLDS datasets and compute dataset_statistics.json for fine-tuning.");
        dataset.Subcommands.Add(Inspect());
        dataset.Subcommands.Add(Stats());
        yield return dataset;
    }

    private static Option<string> PathOption() => new("--path") { Description = "Dataset directory (LeRobot: holds meta/info.json; RLDS: holds *.tfrecord* shards)", Required = true };

    private static Option<string> FormatOption()
    {
        var o = new Option<string>("--format") { Description = "Dataset layout", DefaultValueFactory = _ => "auto" };
        o.AcceptOnlyFromAmong("auto", DatasetFormats.LeRobot, DatasetFormats.Rlds);
        return o;
    }

    private static Option<string?> ConfigOption() => new("--config") { Description = "Per-dataset config JSON (image key, instruction, action keys, gripper convention, mask); default: the layout's defaults" };
    private static Option<bool> JsonOption() => new("--json") { Description = "Machine-readable output" };

    private static Command Inspect()
    {
        var path = PathOption(); var format = FormatOption(); var config = ConfigOption(); var json = JsonOption();
        var episodes = new Option<int>("--episodes") { Description = "How many episodes to describe", DefaultValueFactory = _ => 3 };
        var command = new Command("inspect", "Print the layout, episode and step counts, and the first steps of a few episodes.") { path, format, config, json, episodes };
        command.SetAction(pr => Run(() =>
        {
            using var data = Open(pr.GetValue(path)!, pr.GetValue(format)!, pr.GetValue(config));
            var shown = data.UsableEpisodes.Take(Math.Max(0, pr.GetValue(episodes))).Select(e =>
            {
                var ep = data.ReadEpisode(e);
                var frames = ep.Frames!.Select(c => c[0]!.Decode()).Select(f => $"{f.Width}x{f.Height}").ToArray();
                return new { episode = e, steps = ep.Length, instruction = ep.Instructions[0], first_action = ep.Actions[0], frame_sizes = frames };
            }).ToList();
            var summary = new
            {
                path = data.Path, format = data.Format, name = data.Name, episodes = data.EpisodeCount, usable_episodes = data.UsableEpisodes.Count,
                steps = data.StepCount, action_dim = data.Config.ActionDim, image_keys = data.Config.ImageKeys, instruction = data.Config.Instruction,
                first_episodes = shown,
            };
            if (pr.GetValue(json)) Console.WriteLine(JsonSerializer.Serialize(summary, Indented));
            else
            {
                Console.WriteLine($"{data.Name}: {data.Format} dataset at {data.Path}");
                Console.WriteLine($"  episodes {data.EpisodeCount} (usable {data.UsableEpisodes.Count}), steps {data.StepCount}, action dim {data.Config.ActionDim}");
                Console.WriteLine($"  images {string.Join(", ", data.Config.ImageKeys!)}; instruction from {data.Config.Instruction}");
                foreach (var s in shown)
                    Console.WriteLine($"  episode {s.episode}: {s.steps} steps, \"{s.instruction}\", frames {string.Join(" ", s.frame_sizes)}, first action [{string.Join(", ", s.first_action.Select(v => v.ToString("0.####", System.Globalization.CultureInfo.InvariantCulture)))}]");
            }
        }));
        return command;
    }

    private static Command Stats()
    {
        var path = PathOption(); var format = FormatOption(); var config = ConfigOption(); var json = JsonOption();
        var output = new Option<string?>("--out") { Description = "Where to write dataset_statistics.json (a file, or a directory to write it into); default: only print" };
        var command = new Command("stats", "Compute the dataset's normalization statistics (q01/q99/mean/std/min/max/mask) the way OpenVLA does.") { path, format, config, output, json };
        command.SetAction(pr => Run(() =>
        {
            using var data = Open(pr.GetValue(path)!, pr.GetValue(format)!, pr.GetValue(config));
            Console.Error.WriteLine($"openvla: reading the actions of {data.UsableEpisodes.Count} episodes ({data.StepCount} steps)");
            var stats = data.ComputeStatistics();
            string text = DatasetStatistics.ToJson([stats]);
            if (pr.GetValue(output) is { } target)
            {
                string file = Directory.Exists(target) || target.EndsWith('/') ? System.IO.Path.Combine(target, DatasetStatistics.FileName) : target;
                string? dir = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(file));
                if (dir is not null) Directory.CreateDirectory(dir);
                File.WriteAllText(file + ".tmp", text);
                File.Move(file + ".tmp", file, overwrite: true);
                Console.Error.WriteLine($"openvla: wrote {file}");
            }
            if (pr.GetValue(json) || pr.GetValue(output) is null) Console.WriteLine(text);
            else
            {
                var a = stats.Action;
                string F(float[] v) => "[" + string.Join(", ", v.Select(x => x.ToString("0.#####", System.Globalization.CultureInfo.InvariantCulture))) + "]";
                Console.WriteLine($"{stats.DatasetName}: {stats.NumTrajectories} trajectories, {stats.NumTransitions} transitions");
                Console.WriteLine($"  q01  {F(a.Q01)}");
                Console.WriteLine($"  q99  {F(a.Q99)}");
                Console.WriteLine($"  mask [{string.Join(", ", a.Mask!.Select(b => b ? "true" : "false"))}]");
            }
        }));
        return command;
    }

    private static VlaDataset Open(string path, string format, string? configPath) =>
        VlaDataset.Open(path, configPath is null ? null : DatasetConfig.Load(configPath), format == "auto" ? null : format,
            progress: line => Console.Error.WriteLine($"openvla: {line}"));

    /// <summary>A dataset that cannot be read as configured is an input error: one line, exit code 2.</summary>
    private static int Run(Action body)
    {
        try { body(); }
        catch (DatasetException e) { throw new UsageException(e.Message); }
        return CliExit.Ok;
    }

    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };
}
