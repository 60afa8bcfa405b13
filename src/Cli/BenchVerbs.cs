using System.CommandLine;
using System.Text;
using OpenVLA.Cli.Bench;
using TorchSharp;

namespace OpenVLA.Cli;

/// <summary>bench: inference latency/throughput/memory with roofline ratios, and a native-memory soak.</summary>
internal static class BenchVerbs
{
    public static IEnumerable<Command> Create() => [Bench(), FuzzDecode()];

    /// <summary>The long version of the decode path's mutation test: many more mutations, any frames the user gives.</summary>
    static Command FuzzDecode()
    {
        var images = new Argument<string[]>("images") { Description = "JPEG or PNG files to mutate (default: two frames of the tabletop scene's size)", Arity = ArgumentArity.ZeroOrMore };
        var mutations = new Option<int>("--mutations") { Description = "how many mutated frames to decode", DefaultValueFactory = _ => 200_000 };
        var seed = new Option<int>("--seed") { Description = "seed of the mutations (a failure names it, with the mutation, to replay)", DefaultValueFactory = _ => 1 };
        var maxPixels = new Option<long>("--max-image-pixels") { Description = "the pixel cap of the decode path under test", DefaultValueFactory = _ => 2048L * 2048 };
        var cmd = new Command("fuzz-decode", "Mutation-fuzz the image decode path (bit flips, truncations, inserted bytes, extreme length fields): every frame must decode or be refused in one line, with bounded memory.")
            { images, mutations, seed, maxPixels };
        cmd.SetAction(r =>
        {
            if (r.GetValue(mutations) < 1) throw new UsageException("--mutations must be at least 1");
            var files = r.GetValue(images) ?? [];
            var seeds = files.Length > 0 ? files.Select(f => File.Exists(f) ? File.ReadAllBytes(f) : throw new UsageException($"image file not found: {f}")).ToList()
                : OpenVLA.Policy.Preprocessing.ImageFuzz.SampleFrames();
            var limits = new OpenVLA.Policy.Preprocessing.ImageLimits(MaxSide: 16384, MaxPixels: r.GetValue(maxPixels));
            long rss = Environment.WorkingSet, peak = rss;
            int n = r.GetValue(mutations);
            using var progress = new ConsoleProgress("fuzz-decode");
            var result = OpenVLA.Policy.Preprocessing.ImageFuzz.Run(seeds, n, r.GetValue(seed), limits, i =>
            {
                if (i % 1000 == 0) { peak = Math.Max(peak, Environment.WorkingSet); progress.Report((double)i / n); }
            });
            Console.WriteLine($"fuzz-decode: {n} mutations of {seeds.Count} frames (seed {r.GetValue(seed)}) in {result.Elapsed.TotalSeconds:0.0} s " +
                              $"({n / result.Elapsed.TotalSeconds:0} frames/s): {result.Decoded} decoded, {result.Refused} refused, none escaped; " +
                              $"resident memory {rss / 1e6:0} MB at start, {peak / 1e6:0} MB at most; one decode allocated at most {result.MaxManagedBytes / 1024} KB of managed memory");
            foreach (var frame in seeds)
            {
                var header = OpenVLA.Policy.Preprocessing.ImageContainer.Validate(frame, limits);
                double check = MedianMs(() => OpenVLA.Policy.Preprocessing.ImageContainer.Validate(frame, limits));
                double decode = MedianMs(() => OpenVLA.Policy.Preprocessing.ImageDecoder.Decode(frame, limits));
                Console.WriteLine($"  valid {header.Name} {header.Width}x{header.Height} ({frame.Length} B): decode {decode:0.000} ms, of which the container check {check:0.000} ms (median of 200)");
            }
            foreach (var (reason, count) in result.Reasons.OrderByDescending(kv => kv.Value).Take(15)) Console.WriteLine($"  {count,8}  {reason}");
            return CliExit.Ok;
        });
        return cmd;
    }

    /// <summary>Resident growth per 1000 predictions, after warm-up, above which the soak fails (a leak of one small
    /// tensor per prediction already exceeds it).</summary>
    const double SoakLimitMbPer1000 = 1.0;

    static Command Bench()
    {
        var presets = new Option<string>("--presets") { Description = "comma-separated: tiny, mini, openvla-7b", DefaultValueFactory = _ => "mini" };
        var precisions = new Option<string>("--precisions") { Description = "comma-separated: f32, bf16, int8, int4", DefaultValueFactory = _ => "f32,bf16,int8,int4" };
        var batches = new Option<string>("--batches") { Description = "comma-separated batch sizes", DefaultValueFactory = _ => "1,4,8" };
        var warmup = new Option<int>("--warmup") { Description = "untimed batches per row", DefaultValueFactory = _ => 1 };
        var repeats = new Option<int>("--repeats") { Description = "timed batches per row", DefaultValueFactory = _ => 5 };
        var threads = new Option<int?>("--threads") { Description = "torch threads (default: one per core)" };
        var soak = new Option<int>("--soak") { Description = "also run N predictions of the tiny preset and report RSS growth (0 = no soak)", DefaultValueFactory = _ => 0 };
        var output = new Option<string?>("--update-doc") { Description = "write the tables into this Markdown file (e.g. docs/benchmarks.md), replacing the previous run" };
        var cmd = new Command("bench", "Benchmark inference (vision, prefill, decode, actions/s, peak RSS, roofline ratios) on random weights.")
            { presets, precisions, batches, warmup, repeats, threads, soak, output };
        cmd.SetAction(r =>
        {
            if (r.GetValue(threads) is int t) { if (t <= 0) throw new UsageException("--threads must be positive"); torch.set_num_threads(t); }
            if (r.GetValue(repeats) < 1 || r.GetValue(warmup) < 0) throw new UsageException("--repeats must be ≥ 1 and --warmup ≥ 0");
            var presetList = Split(r.GetValue(presets)!);
            foreach (var p in presetList) OpenVLA.Policy.Checkpoint.CheckpointPreset.Get(p);
            var batchList = Split(r.GetValue(batches)!).Select(b => int.TryParse(b, out var n) && n > 0 ? n : throw new UsageException($"bad batch size '{b}'")).ToList();
            Console.Error.WriteLine("bench: measuring this machine's bf16 GEMM rate and read bandwidth");
            var machine = Machine.Measure();
            var results = InferenceBench.Run(machine, presetList, Split(r.GetValue(precisions)!), batchList, r.GetValue(warmup), r.GetValue(repeats),
                line => Console.Error.WriteLine("bench: " + line));
            var md = new StringBuilder(InferenceBench.Markdown(machine, results, r.GetValue(warmup), r.GetValue(repeats)));
            if (r.GetValue(soak) > 0)
            {
                using var progress = new ConsoleProgress("soak");
                var (samples, growth) = SoakBench.Run("tiny", r.GetValue(soak), progress.Report);
                md.AppendLine();
                bool flat = growth <= SoakLimitMbPer1000;
                md.AppendLine($"Soak: {r.GetValue(soak)} predictions of the tiny preset (bf16) in one process; RSS after each {samples[0].Prediction}: " +
                              string.Join(", ", samples.Select(s => $"{s.RssBytes / 1e6:0}")) + $" MB; growth over the second half (least-squares slope) {growth:0.00} MB per 1000 predictions " +
                              (flat ? $"(flat: limit {SoakLimitMbPer1000} MB)." : $"— FAILED: over the {SoakLimitMbPer1000} MB limit."));
                if (!flat)
                {
                    Console.WriteLine(md.ToString());
                    Console.Error.WriteLine($"openvla: soak failed: resident memory grew {growth:0.00} MB per 1000 predictions");
                    return CliExit.Failure;
                }
            }
            Console.WriteLine(md.ToString());
            if (r.GetValue(output) is string path) DocSections.Replace(path, "inference", md.ToString());
            return CliExit.Ok;
        });
        return cmd;
    }

    static double MedianMs(Action action)
    {
        for (int i = 0; i < 20; i++) action();
        var times = new double[200];
        for (int i = 0; i < times.Length; i++)
        {
            long start = System.Diagnostics.Stopwatch.GetTimestamp();
            action();
            times[i] = System.Diagnostics.Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        }
        Array.Sort(times);
        return times[times.Length / 2];
    }

    static List<string> Split(string s) => s.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToList();
}

/// <summary>Replaces a generated section (between &lt;!-- bench:NAME --&gt; markers) of a Markdown file, keeping the rest.</summary>
internal static class DocSections
{
    public static void Replace(string path, string name, string content)
    {
        string begin = $"<!-- bench:{name} -->", end = $"<!-- /bench:{name} -->";
        var text = File.Exists(path) ? File.ReadAllText(path) : "# Benchmarks\n";
        int a = text.IndexOf(begin, StringComparison.Ordinal), b = text.IndexOf(end, StringComparison.Ordinal);
        var block = $"{begin}\n{content.TrimEnd()}\n{end}";
        text = a >= 0 && b > a ? text[..a] + block + text[(b + end.Length)..] : text.TrimEnd() + "\n\n" + block + "\n";
        File.WriteAllText(path, text);
    }
}
