using System.Text.Json.Nodes;

namespace OpenVLA.FineTune.Training;

/// <summary>
/// `metrics.jsonl`: one JSON object per logged step (train) or evaluation (eval), appended and flushed as it happens, and
/// a PNG of the curves (loss, action-token accuracy, L1) drawn from it.
/// </summary>
public sealed class MetricsLog(string path)
{
    public const string FileName = "metrics.jsonl", PlotFileName = "metrics.png";

    public string Path { get; } = path;

    public void Append(StepMetrics m) => File.AppendAllText(Path, m.ToJson().ToJsonString() + "\n");

    public IReadOnlyList<JsonObject> Read() =>
        !File.Exists(Path) ? [] : File.ReadLines(Path).Where(l => l.Length > 0).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();

    /// <summary>Drops entries after <paramref name="step"/>: they belong to a run that died before its next checkpoint.</summary>
    public void TruncateAfter(long step)
    {
        if (!File.Exists(Path)) return;
        var kept = File.ReadLines(Path).Where(l => l.Length > 0 && JsonNode.Parse(l)!["step"]!.GetValue<long>() <= step).ToList();
        var tmp = Path + ".tmp";
        File.WriteAllLines(tmp, kept);
        File.Move(tmp, Path, overwrite: true);
    }

    /// <summary>One chart against the step: loss on the left axis; action-token accuracy and L1 (both in [0, 1]-ish
    /// units) on the right axis; train as lines, held-out evaluations as lines with markers.</summary>
    public void Plot(string pngPath)
    {
        var entries = Read();
        var plot = new ScottPlot.Plot();
        (string Key, string Label, bool Right)[] series = [("loss", "loss", false), ("action_accuracy", "action accuracy", true), ("l1_loss", "L1", true)];
        foreach (var (key, label, right) in series)
            foreach (var split in new[] { "train", "eval" })
            {
                var points = entries.Where(e => e["split"]?.GetValue<string>() == split && e[key] is not null)
                    .Select(e => (X: e["step"]!.GetValue<double>(), Y: e[key]!.GetValue<double>())).ToList();
                if (points.Count == 0) continue;
                var scatter = plot.Add.Scatter(points.Select(p => p.X).ToArray(), points.Select(p => p.Y).ToArray());
                scatter.LegendText = $"{split} {label}";
                scatter.MarkerSize = split == "eval" ? 6 : 0;
                if (right) scatter.Axes.YAxis = plot.Axes.Right;
            }
        plot.Title("OpenVLA fine-tuning");
        plot.XLabel("optimizer step");
        // An OFT run's loss is the L1 of normalized chunks and it has no token accuracy.
        bool tokens = entries.Any(e => e["action_accuracy"] is not null);
        plot.YLabel(tokens ? "cross-entropy loss" : "L1 loss (normalized actions)");
        plot.Axes.Right.Label.Text = "accuracy / L1";
        plot.ShowLegend();
        var tmp = pngPath + ".tmp.png";
        plot.SavePng(tmp, 900, 600);
        File.Move(tmp, pngPath, overwrite: true);
    }
}
