using System.CommandLine;
using System.Text.Json;
using OpenVLA.RobotClients.Evaluation;
using OpenVLA.Simulation;
using OpenVLA.Simulation.Datasets;
using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.Cli;

/// <summary>demos, eval, render-tasks, sim-bench (and the hidden sim-worker): the verbs of the simulation suite.</summary>
internal static class SimulationVerbs
{
    public static IEnumerable<Command> Create()
    {
        yield return Demos();
        yield return Eval();
        yield return RenderTasks();
        yield return SimulationBenchmark.Command();
        yield return Worker();
    }

    private static Option<T> Opt<T>(string name, string description, T defaultValue) =>
        new(name) { Description = description, DefaultValueFactory = _ => defaultValue };

    private static Option<string> SuiteOption() => Opt("--suite", "Simulation suite (only 'tabletop').", TabletopTasks.SuiteName);

    private static IReadOnlyList<TabletopTask> ParseTasks(string suite, string tasks)
    {
        if (suite != TabletopTasks.SuiteName) throw new UsageException($"--suite '{suite}' is unknown (available: {TabletopTasks.SuiteName})");
        try { return TabletopTasks.Parse(tasks); }
        catch (ArgumentException e) { throw new UsageException($"--tasks: {e.Message}"); }
    }

    private static void Check(bool ok, string message)
    {
        if (!ok) throw new UsageException(message);
    }

    /// <summary>How to start this CLI again as a worker process: the apphost, or `dotnet openvla.dll`.</summary>
    internal static IReadOnlyList<string> WorkerCommand(string kind)
    {
        string process = Environment.ProcessPath ?? "dotnet";
        var command = new List<string> { process };
        if (Path.GetFileNameWithoutExtension(process) == "dotnet") command.Add(typeof(SimulationVerbs).Assembly.Location);
        command.AddRange(["sim-worker", "--kind", kind]);
        return command;
    }

    private static Command Demos()
    {
        var suite = SuiteOption();
        var tasks = Opt("--tasks", $"'all' or a comma-separated list of: {string.Join(", ", TabletopTasks.Ids)}.", "all");
        var episodes = new Option<int>("--episodes-per-task") { Description = "Successful demonstrations to record per task (with --policy: episodes, kept whether they succeed or not).", Required = true };
        var outDir = new Option<string>("--out") { Description = "Output directory (new or empty) for the LeRobot v2.1 dataset.", Required = true };
        var noise = Opt("--noise", "Noisy expert: std of Gaussian action noise in metres per step (plus pauses and detours); 0 = clean.", 0.0);
        var seed = Opt("--seed", "Suite seed; episode seeds derive from (seed, task, episode). Use a different seed from eval.", 0);
        var workers = Opt("--workers", "Worker processes (1 = in this process).", 1);
        var imageSize = Opt("--image-size", "Square camera frame size in pixels (the policy resolution).", 224);
        var wrist = Opt("--wrist", "Also record the wrist camera (observation.images.wrist_image).", false);
        var name = Opt("--name", "Dataset name: the key of dataset_statistics.json (the policy's unnorm key).", "tabletop");
        var labels = Opt("--labels", "Recorded action with --noise: 'executed' (what the robot was sent, LeRobot's meaning) or 'expert' " +
            "(the clean expert's command at that state, DART-style: noisy states, clean targets).", "executed");
        var json = Opt("--json", "Print the summary as JSON.", false);
        var driver = new Option<string?>("--policy")
        {
            Description = "DAgger: this learned policy (checkpoint:DIR | grpc://HOST:PORT) drives, the clean expert labels every state it reaches, " +
                          "and every episode is kept, failed or not (--episodes-per-task then counts episodes, not successes).",
        };
        var decode = new Option<string?>("--decode") { Description = $"with --policy checkpoint:DIR: action decoding, {OpenVLA.Policy.ActionDecoding.Syntax}." };
        var command = new Command("demos", "Record scripted-expert demonstrations of the tabletop suite as a LeRobot v2.1 dataset.")
        {
            suite, tasks, episodes, outDir, noise, seed, workers, imageSize, wrist, name, labels, json, driver, decode,
        };
        command.SetAction(parse =>
        {
            var selected = ParseTasks(parse.GetValue(suite)!, parse.GetValue(tasks)!);
            int n = parse.GetValue(episodes), w = parse.GetValue(workers), size = parse.GetValue(imageSize);
            double sigma = parse.GetValue(noise);
            string dir = parse.GetValue(outDir)!;
            Check(n >= 1, $"--episodes-per-task must be at least 1, got {n}");
            Check(w is >= 1 and <= 64, $"--workers must be 1..64, got {w}");
            Check(size is >= 16 and <= 1024, $"--image-size must be 16..1024, got {size}");
            Check(sigma is >= 0 and <= 0.05, $"--noise must be 0..0.05 (metres per step), got {sigma}");
            Check(!File.Exists(dir), $"--out {dir} is a file");
            Check(!Directory.Exists(dir) || !Directory.EnumerateFileSystemEntries(dir).Any(), $"--out {dir} is not empty; choose a new directory");
            string datasetName = parse.GetValue(name)!;
            Check(datasetName.Length > 0 && datasetName.All(c => char.IsAsciiLetterOrDigit(c) || c is '_' or '-'), $"--name '{datasetName}' must be letters, digits, '_' or '-'");
            string labelKind = parse.GetValue(labels)!;
            Check(labelKind is "executed" or "expert", $"--labels must be executed or expert, got '{labelKind}'");
            string? driverText = parse.GetValue(driver);
            if (driverText is not null)
            {
                RolloutPolicies.Spec spec;
                try { spec = RolloutPolicies.Parse(driverText); RolloutPolicies.EnsureAvailable(spec); }
                catch (Exception e) when (e is ArgumentException or PolicyUnavailableException or DirectoryNotFoundException) { throw new UsageException(e.Message); }
                Check(spec is not RolloutPolicies.Scripted, "--policy scripted: the expert already drives demos; --policy names a learned policy to drive");
                Check(sigma == 0, "--noise perturbs the expert's driving; with --policy the learned policy drives (leave --noise out)");
                driverText = spec.Text;
            }
            if (parse.GetValue(decode) is { } decodeText)
            {
                Check(driverText is not null && driverText.StartsWith("checkpoint:"), "--decode applies to --policy checkpoint:DIR");
                _ = OpenVLA.Policy.ActionDecoding.Parse(decodeText);
                Environment.SetEnvironmentVariable(PolicyBackends.DecodeVariable, decodeText);   // the workers load the policy
            }
            var options = new DemoOptions(selected, n, dir, sigma, parse.GetValue(seed), w, size, parse.GetValue(wrist), datasetName,
                ExpertLabels: labelKind == "expert", Driver: driverText);
            var summary = DemoSuite.Generate(options, w > 1 ? WorkerCommand("demos") : null, new ProgressBar("demos", selected.Count * n, "episodes"));
            if (parse.GetValue(json))
                Console.WriteLine(JsonSerializer.Serialize(new
                {
                    out_dir = Path.GetFullPath(dir), episodes = summary.Episodes, frames = summary.Frames, expert_attempts = summary.ExpertAttempts,
                    seconds = summary.Seconds, episodes_per_minute = summary.Episodes / summary.Seconds * 60,
                    worker_crashes = summary.Crashes.Count, mean_length = summary.MeanLengthByTask, successes = summary.Successes, driver = driverText,
                }));
            else
            {
                Console.WriteLine($"wrote {summary.Episodes} episodes ({summary.Frames} frames) to {Path.GetFullPath(dir)} in {summary.Seconds:F1} s " +
                                  $"({summary.Episodes / summary.Seconds * 60:F1} episodes/min); expert attempts {summary.ExpertAttempts}" +
                                  (summary.Crashes.Count > 0 ? $"; {summary.Crashes.Count} worker crash(es), retried" : ""));
                if (driverText is not null) Console.WriteLine($"  driven by {driverText}: {summary.Successes} of {summary.Episodes} episodes succeeded; every one is kept, with the expert's labels");
                foreach (var (task, length) in summary.MeanLengthByTask) Console.WriteLine($"  {task}: mean length {length:F1} steps");
            }
            return CliExit.Ok;
        });
        return command;
    }

    private static Command Eval()
    {
        var suite = SuiteOption();
        var tasks = Opt("--tasks", $"'all' or a comma-separated list of: {string.Join(", ", TabletopTasks.Ids)}.", "all");
        var policy = new Option<string?>("--policy") { Description = $"scripted | checkpoint:DIR | grpc://HOST:PORT (default: checkpoint: the embedded {DefaultModel.Name})" };
        var trials = Opt("--trials-per-task", "Rollouts per task (LIBERO uses 50).", 50);
        var seed = Opt("--seed", "Suite seed: fixes the initial state of every (task, trial).", 7);
        var workers = Opt("--workers", "Parallel worker processes, each with its own renderer (1 = in this process).", 1);
        var imageSize = new Option<int?>("--image-size") { Description = "Camera frame size given to the policy (default: the policy's own input size; 224 for scripted)." };
        var settle = Opt("--settle-steps", "No-op steps before the policy acts (LIBERO: 10).", 10);
        var videoDir = new Option<string?>("--video-dir") { Description = "Write MP4s of the first --videos-per-task rollouts of each task here." };
        var videos = Opt("--videos-per-task", "How many rollouts per task to record when --video-dir is given.", 1);
        var outDir = Opt("--out", "Directory for results.json, summary.md and success.png.", "eval-results");
        var json = Opt("--json", "Print results.json to stdout instead of the Markdown summary.", false);
        var quantize = Opt("--quantize", "checkpoint:DIR policies: weight-only quantization (none, int8, int4).", "none");
        var dtype = new Option<string?>("--dtype") { Description = "checkpoint:DIR policies: compute precision (f32 or bf16)." };
        var unnormKey = new Option<string?>("--unnorm-key") { Description = "checkpoint/grpc policies: dataset statistics to un-normalize with." };
        var adapter = new Option<string?>("--adapter") { Description = "checkpoint:DIR policies: PEFT LoRA adapter directory (from finetune) merged in at load." };
        var decode = new Option<string?>("--decode") { Description = $"checkpoint:DIR policies: action decoding, {OpenVLA.Policy.ActionDecoding.Syntax} (default: the checkpoint's generation_config.json)." };
        var diagnose = Opt("--diagnose", "Run the clean scripted expert beside a learned policy (on state the policy never sees) and report where failed " +
            "episodes stopped and, per expert phase, how far the policy's commands were from the expert's.", false);
        var executeSteps = new Option<int?>("--execute-steps")
        {
            Description = "Actions of each predicted chunk executed open loop before the policy is asked again (default: the whole chunk; OpenVLA's chunk is one action).",
        };
        var command = new Command("eval", "Evaluate a policy in closed loop on the tabletop suite (success rates with 95% Wilson intervals).")
        {
            suite, tasks, policy, trials, seed, workers, imageSize, settle, videoDir, videos, outDir, json, quantize, dtype, unnormKey, adapter,
            decode, diagnose, executeSteps,
        };
        command.SetAction(parse =>
        {
            // Worker processes inherit the environment, so each loads the checkpoint the same way (see PolicyBackends).
            var load = new OpenVLA.Policy.PolicyOptions { Quantize = parse.GetValue(quantize)!, DType = parse.GetValue(dtype), Decoding = parse.GetValue(decode) };
            _ = load.Quantization; _ = load.ScalarType; _ = load.ActionDecoding; // validate before starting workers
            Environment.SetEnvironmentVariable(PolicyBackends.QuantizeVariable, load.Quantize);
            Environment.SetEnvironmentVariable(PolicyBackends.DTypeVariable, load.DType);
            Environment.SetEnvironmentVariable(PolicyBackends.DecodeVariable, load.Decoding);
            Environment.SetEnvironmentVariable(PolicyBackends.UnnormKeyVariable, parse.GetValue(unnormKey));
            if (parse.GetValue(adapter) is { } adapterDir)
            {
                Check(Directory.Exists(adapterDir), $"--adapter directory '{adapterDir}' does not exist");
                Environment.SetEnvironmentVariable(PolicyBackends.AdapterVariable, Path.GetFullPath(adapterDir));
            }
            RolloutPolicies.UnnormKey = parse.GetValue(unnormKey);
            var selected = ParseTasks(parse.GetValue(suite)!, parse.GetValue(tasks)!);
            int n = parse.GetValue(trials), w = parse.GetValue(workers), settleSteps = parse.GetValue(settle);
            Check(n >= 1, $"--trials-per-task must be at least 1, got {n}");
            Check(w is >= 1 and <= 64, $"--workers must be 1..64, got {w}");
            Check(settleSteps is >= 0 and <= 100, $"--settle-steps must be 0..100, got {settleSteps}");
            // checkpoint:ORG/NAME[@REVISION] reads the Hugging Face cache, as --checkpoint does; no --policy: the default model.
            string? givenPolicy = parse.GetValue(policy);
            string policyText = givenPolicy is null || givenPolicy.StartsWith("checkpoint:", StringComparison.Ordinal) && givenPolicy.Length > "checkpoint:".Length
                ? "checkpoint:" + DefaultModel.Resolve(givenPolicy?["checkpoint:".Length..], "--policy")
                : givenPolicy;
            RolloutPolicies.Spec spec;
            try { spec = RolloutPolicies.Parse(policyText); RolloutPolicies.EnsureAvailable(spec); }
            catch (Exception e) when (e is ArgumentException or PolicyUnavailableException or DirectoryNotFoundException) { throw new UsageException(e.Message); }
            Check(!parse.GetValue(diagnose) || spec is not RolloutPolicies.Scripted, "--diagnose compares a learned policy with the scripted expert; the policy is the expert");
            Check(load.Decoding is null || spec is RolloutPolicies.Checkpoint,
                "--decode applies to checkpoint:DIR policies (a policy server takes its own --decode)");
            Check(parse.GetValue(adapter) is null || spec is RolloutPolicies.Checkpoint,
                "--adapter applies to checkpoint:DIR policies (a policy server takes its own --adapter)");
            Check(parse.GetValue(executeSteps) is null or > 0, "--execute-steps must be positive");
            Check(parse.GetValue(executeSteps) is null || spec is not RolloutPolicies.Scripted, "--execute-steps applies to learned policies; the scripted expert acts every step");
            int size = parse.GetValue(imageSize) ?? PolicyInputSize(spec);
            Check(size is >= 16 and <= 1024, $"--image-size must be 16..1024, got {size}");
            var options = new EvalOptions(selected, policyText, n, parse.GetValue(seed), w, size, settleSteps, parse.GetValue(videoDir), parse.GetValue(videos),
                parse.GetValue(diagnose), PolicySettings(spec, load, parse.GetValue(adapter)), parse.GetValue(executeSteps));
            var report = Evaluator.Run(options, w > 1 ? WorkerCommand("eval") : null, new ProgressBar("eval", selected.Count * n, "episodes"));
            var files = report.WriteFiles(parse.GetValue(outDir)!);
            Console.WriteLine(parse.GetValue(json) ? report.ToJson() : report.ToMarkdown());
            Console.Error.WriteLine($"openvla: wrote {string.Join(", ", files)}");
            return CliExit.Ok;
        });
        return command;
    }

    /// <summary>How a learned policy was run, for the report: a checkpoint's load options and the decoding in force (its
    /// generation_config.json's unless --decode says otherwise); a server's are its own.</summary>
    private static string? PolicySettings(RolloutPolicies.Spec spec, OpenVLA.Policy.PolicyOptions load, string? adapter)
    {
        switch (spec)
        {
            case RolloutPolicies.Checkpoint c:
                OpenVLA.Policy.ActionDecoding decoding;
                try { decoding = load.ActionDecoding ?? OpenVLA.Policy.ActionDecoding.FromGenerationConfig(Path.Combine(c.Directory, "generation_config.json")); }
                catch (OpenVLA.Policy.CheckpointException e) { throw new UsageException(e.Message); }
                return $"weights {(load.Quantize == "none" ? "float" : load.Quantize)}, precision {load.ScalarType.ToString().ToLowerInvariant()}, " +
                       $"decoding {decoding}{(adapter is null ? "" : $", adapter {adapter}")}";
            case RolloutPolicies.Grpc:
                return "quantization and decoding are the policy server's own (see its start-up log)";
            default:
                return null;
        }
    }

    /// <summary>
    /// The square size the policy takes, so frames are rendered at the resolution the model was trained on rather than
    /// rendered large and resized (a resize changes the pixels a small model learned from).
    /// </summary>
    private static int PolicyInputSize(RolloutPolicies.Spec spec)
    {
        switch (spec)
        {
            case RolloutPolicies.Checkpoint c:
                try { return OpenVLA.Policy.Checkpoint.VlaCheckpoint.Open(c.Directory, requireWeights: false).Config.ImageSize; }
                catch (OpenVLA.Policy.CheckpointException e) { throw new UsageException(e.Message); }
            case RolloutPolicies.Grpc g:
                // The same client the workers use, so an unreachable server fails here with the same one-line error.
                var remote = RolloutPolicies.GrpcFactory!(g.Host, g.Port);
                try { return remote.Description.ImageSize; }
                finally { (remote as IDisposable)?.Dispose(); }
            default:
                return 224;
        }
    }

    private static Command RenderTasks()
    {
        var outDir = new Option<string>("--out") { Description = "Directory for one PNG per task.", Required = true };
        var imageSize = Opt("--image-size", "Frame size in pixels.", 224);
        var seed = Opt("--seed", "Seed of the episode shown for each task.", 7);
        var wrist = Opt("--wrist", "Also write the wrist camera view.", false);
        var command = new Command("render-tasks", "Render the initial frame of one episode of every tabletop task as PNG files.") { outDir, imageSize, seed, wrist };
        command.SetAction(parse =>
        {
            int size = parse.GetValue(imageSize);
            Check(size is >= 16 and <= 1024, $"--image-size must be 16..1024, got {size}");
            string dir = parse.GetValue(outDir)!;
            Directory.CreateDirectory(dir);
            using var env = new TabletopEnv(size);
            foreach (var task in TabletopTasks.All)
            {
                var episode = task.Sample(TabletopTasks.EpisodeSeed(parse.GetValue(seed), task.Id, 0));
                env.Reset(episode.Layout);
                string path = Path.Combine(dir, $"tabletop_{task.Id}.png");
                File.WriteAllBytes(path, Png.EncodeRgb(env.Render(), size, size, System.IO.Compression.CompressionLevel.Optimal));
                if (parse.GetValue(wrist))
                    File.WriteAllBytes(Path.Combine(dir, $"tabletop_{task.Id}_wrist.png"), Png.EncodeRgb(env.Render(wrist: true), size, size, System.IO.Compression.CompressionLevel.Optimal));
                Console.WriteLine($"{path}\t{episode.Instruction}");
            }
            return CliExit.Ok;
        });
        return command;
    }

    private static Command Worker()
    {
        var kind = new Option<string>("--kind") { Description = "demos | eval | rollout", Required = true };
        var command = new Command("sim-worker", "Internal: a rollout worker process speaking JSON lines on stdin/stdout.") { kind };
        command.Hidden = true;
        command.SetAction(parse => parse.GetValue(kind) switch
        {
            "demos" => DemoSuite.ServeWorker(),
            "eval" => Evaluator.ServeWorker(),
            "rollout" => SampledRollouts.ServeWorker(),
            var k => throw new UsageException($"--kind '{k}' is not demos, eval or rollout"),
        });
        return command;
    }
}

/// <summary>sim-bench: simulator throughput for docs/benchmarks.md (physics, rendering, control steps; 1 or N processes).</summary>
internal static class SimulationBenchmark
{
    public static Command Command()
    {
        var imageSize = new Option<int>("--image-size") { Description = "Render size.", DefaultValueFactory = _ => 224 };
        var repeats = new Option<int>("--repeats") { Description = "Measured repeats after one warm-up repeat.", DefaultValueFactory = _ => 5 };
        var processes = new Option<int>("--processes") { Description = "Also measure control steps with this many concurrent processes (0 = skip).", DefaultValueFactory = _ => 2 };
        var only = new Option<string>("--only") { Description = "all | control", DefaultValueFactory = _ => "all" };
        var json = new Option<bool>("--json") { Description = "JSON output." };
        var command = new Command("sim-bench", "Measure simulator throughput (physics steps/s, rendered frames/s, control steps/s).") { imageSize, repeats, processes, only, json };
        command.SetAction(parse =>
        {
            int size = parse.GetValue(imageSize), reps = parse.GetValue(repeats), procs = parse.GetValue(processes);
            if (size is < 16 or > 1024) throw new UsageException($"--image-size must be 16..1024, got {size}");
            if (reps is < 1 or > 100) throw new UsageException($"--repeats must be 1..100, got {reps}");
            if (procs is < 0 or > 16) throw new UsageException($"--processes must be 0..16, got {procs}");
            var results = new List<Throughput>();
            using (var env = new TabletopEnv(size))
            {
                if (parse.GetValue(only) != "control")
                {
                    results.Add(SimBenchmark.Physics(env, reps));
                    results.Add(SimBenchmark.Render(env, reps));
                }
                results.Add(SimBenchmark.Control(env, reps));
            }
            if (procs > 1 && parse.GetValue(only) != "control")
            {
                // N copies of `sim-bench --only control` at once; their rates add up to the machine's throughput.
                var command = SimulationVerbs.WorkerCommand("x").SkipLast(3).Concat(["sim-bench", "--only", "control", "--json", "--processes", "0",
                    "--image-size", size.ToString(System.Globalization.CultureInfo.InvariantCulture), "--repeats", reps.ToString(System.Globalization.CultureInfo.InvariantCulture)]).ToList();
                var children = Enumerable.Range(0, procs).Select(_ =>
                {
                    var start = new System.Diagnostics.ProcessStartInfo(command[0]) { RedirectStandardOutput = true, UseShellExecute = false };
                    foreach (var a in command.Skip(1)) start.ArgumentList.Add(a);
                    return System.Diagnostics.Process.Start(start)!;
                }).ToList();
                var each = children.Select(c =>
                {
                    string output = c.StandardOutput.ReadToEnd();
                    c.WaitForExit();
                    return JsonSerializer.Deserialize<List<Throughput>>(output)![0];
                }).ToList();
                results.Add(new Throughput($"control step, {procs} processes together", "steps/s",
                    each.Sum(t => t.Median), each.Sum(t => t.Min), each.Sum(t => t.Max), reps));
            }
            if (parse.GetValue(json)) Console.WriteLine(JsonSerializer.Serialize(results));
            else
                foreach (var r in results)
                    Console.WriteLine($"{r.Name}: median {r.Median:F0} {r.Unit} (range {r.Min:F0}–{r.Max:F0}, {r.Repeats} repeats after 1 warm-up)");
            return CliExit.Ok;
        });
        return command;
    }
}
