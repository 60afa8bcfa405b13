using System.CommandLine;
using System.Text;
using OpenVLA.Cli.Bench;
using TorchSharp;

namespace OpenVLA.Cli;

/// <summary>bench: inference latency/throughput/memory with roofline ratios, and a native-memory soak.</summary>
internal static class BenchVerbs
{
    public static IEnumerable<Command> Create() => [Bench()];

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
