using ScottPlot;

namespace OpenVLA.RobotClients.Evaluation;

/// <summary>Bar chart of per-task success with 95% Wilson intervals (ScottPlot, rendered by SkiaSharp without a display).</summary>
public static class SuccessChart
{
    // SkiaSharp's self-contained Linux build cannot ask fontconfig for fonts, so hand it DejaVu Sans (fonts-dejavu-core).
    private const string DejaVu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    private static readonly Lazy<string?> FontName = new(() =>
    {
        if (!File.Exists(DejaVu)) return null;
        Fonts.AddFontFile("DejaVu Sans", DejaVu);
        return "DejaVu Sans";
    });

    public static void Write(EvalReport report, string path, int width = 800, int height = 450)
    {
        var plot = new Plot();
        if (FontName.Value is { } font) plot.Font.Set(font);
        var tasks = report.Tasks;
        var bars = tasks.Select((t, i) => new Bar
        {
            Position = i,
            Value = 100 * t.Success.Value,
            Error = 0,
            FillColor = Colors.SteelBlue,
        }).Append(new Bar { Position = tasks.Count + 0.5, Value = 100 * report.Overall.Value, FillColor = Colors.DarkOrange }).ToList();
        plot.Add.Bars(bars);
        // Asymmetric Wilson intervals as vertical error lines.
        var positions = tasks.Select((_, i) => (double)i).Append(tasks.Count + 0.5).ToArray();
        var rates = tasks.Select(t => t.Success).Append(report.Overall).ToArray();
        for (int i = 0; i < positions.Length; i++)
        {
            var line = plot.Add.Line(positions[i], 100 * rates[i].Low, positions[i], 100 * rates[i].High);
            line.LineWidth = 2;
            line.Color = Colors.Black;
        }
        var ticks = tasks.Select((t, i) => new Tick(i, t.Task)).Append(new Tick(tasks.Count + 0.5, "overall")).ToArray();
        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(ticks);
        plot.Axes.SetLimitsY(0, 105);
        plot.Axes.Margins(bottom: 0);
        plot.YLabel("success rate (%)");
        plot.Title($"{report.Policy}: {report.TrialsPerTask} trials/task, seed {report.Seed} (bars: 95% Wilson CI)");
        plot.SavePng(path, width, height);
    }
}
