using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using OpenVLA.Simulation.Workers;

namespace OpenVLA.RobotClients.Evaluation;

/// <summary>Success rate with its 95% Wilson score interval.</summary>
public sealed record Rate(int Successes, int Trials, double Value, double Low, double High)
{
    public static Rate Wilson(int successes, int trials, double z = 1.96)
    {
        if (trials == 0) return new Rate(0, 0, 0, 0, 1);
        double p = (double)successes / trials, z2 = z * z, denominator = 1 + z2 / trials;
        double centre = (p + z2 / (2 * trials)) / denominator;
        double half = z * Math.Sqrt(p * (1 - p) / trials + z2 / (4.0 * trials * trials)) / denominator;
        return new Rate(successes, trials, p, Math.Max(0, centre - half), Math.Min(1, centre + half));
    }
}

public sealed record TaskResult(string Task, Rate Success, double MeanSteps, double? MeanStepsSuccessful, int MaxSteps); // null: no success to average

/// <summary>
/// One (task, expert phase) of <c>eval --diagnose</c>: how often the policy was there and how closely it followed
/// (<see cref="ShadowTrace"/>'s per-step measures, averaged).
/// </summary>
public sealed record PhaseAgreement(string Task, string Phase, int Steps, double MeanTranslationErrorCm, double GripperAgreement, double Stalled);

/// <summary>How many failed episodes of a task got furthest to this expert phase.</summary>
public sealed record FailureStage(string Task, string FurthestPhase, int Episodes);

/// <summary>
/// The <c>--diagnose</c> summary: where failed episodes stopped making progress, and per phase how far the policy's
/// commands were from the clean expert's label of the same state (see <see cref="ExpertShadow"/>).
/// </summary>
public sealed record ExpertDiagnosis(IReadOnlyList<FailureStage> FailureStages, IReadOnlyList<PhaseAgreement> Phases)
{
    public static ExpertDiagnosis? From(IReadOnlyList<string> taskOrder, IReadOnlyList<EvalEpisode> episodes)
    {
        if (!episodes.Any(e => e.Shadow is not null)) return null;
        var stages = new List<FailureStage>();
        var phases = new List<PhaseAgreement>();
        foreach (var task in taskOrder)
        {
            var mine = episodes.Where(e => e.TaskId == task && e.Shadow is not null).ToList();
            stages.AddRange(mine.Where(e => !e.Success).GroupBy(e => e.Shadow!.FurthestPhase)
                .Select(g => new FailureStage(task, g.Key, g.Count())).OrderByDescending(f => f.Episodes).ThenBy(f => f.FurthestPhase, StringComparer.Ordinal));
            var steps = mine.Select(e => e.Shadow!).SelectMany(t => t.Phases.Select((p, i) =>
                (Phase: p, Error: t.TranslationErrorCm(i), Agrees: t.GripperAgrees(i), Stalled: t.Stalled(i))));
            phases.AddRange(steps.GroupBy(x => x.Phase) // first-seen order follows the task's script
                .Select(g => new PhaseAgreement(task, g.Key, g.Count(), g.Average(x => x.Error), g.Count(x => x.Agrees) / (double)g.Count(),
                    g.Count(x => x.Stalled) / (double)g.Count())));
        }
        return new ExpertDiagnosis(stages, phases);
    }

    public void AppendMarkdown(System.Text.StringBuilder s)
    {
        var ci = CultureInfo.InvariantCulture;
        s.AppendLine();
        s.AppendLine("## Against the scripted expert (`--diagnose`)");
        s.AppendLine();
        s.AppendLine("The clean expert ran beside the policy on the simulator state the policy never sees. Failed episodes by the furthest " +
                     "expert phase they reached:");
        s.AppendLine();
        s.AppendLine("| task | failed | furthest phase reached |");
        s.AppendLine("|---|---|---|");
        foreach (var g in FailureStages.GroupBy(f => f.Task))
            s.AppendLine($"| {g.Key} | {g.Sum(f => f.Episodes)} | {string.Join(" · ", g.Select(f => $"{f.FurthestPhase} {f.Episodes}"))} |");
        s.AppendLine();
        s.AppendLine("Every step (successes too), by the expert's phase: distance between the policy's and the expert's translation command, " +
                     "how often they agreed on the gripper, and how often the policy stood still (< 3 mm per axis) while the expert moved (≥ 5 mm).");
        s.AppendLine();
        s.AppendLine("| task | phase | steps | translation error (cm, mean) | gripper agrees | stalled |");
        s.AppendLine("|---|---|---|---|---|---|");
        foreach (var p in Phases)
            s.AppendLine(ci, $"| {p.Task} | {p.Phase} | {p.Steps} | {p.MeanTranslationErrorCm:F2} | {100 * p.GripperAgreement:F1}% | {100 * p.Stalled:F1}% |");
    }
}

public sealed record Latency(double MeanMs, double P50Ms, double P90Ms, double P99Ms, double MaxMs, long Steps);

/// <summary>Everything an evaluation measured; written as results.json, summary.md and success.png.</summary>
public sealed record EvalReport(
    string Suite, string Policy, int Seed, int TrialsPerTask, int ImageSize, int SettleSteps, int Workers, DateTime FinishedUtc,
    double WallSeconds, Rate Overall, IReadOnlyList<TaskResult> Tasks, Latency PolicyLatency, IReadOnlyList<WorkerCrash> WorkerCrashes,
    IReadOnlyList<EvalEpisode> Episodes, ExpertDiagnosis? Diagnosis = null, string? PolicySettings = null)
{
    private static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower, DefaultIgnoreCondition = JsonIgnoreCondition.Never,
    };

    public static EvalReport From(EvalOptions o, string policy, IReadOnlyList<EvalEpisode> episodes, IReadOnlyList<WorkerCrash> crashes, double seconds)
    {
        var tasks = o.Tasks.Select(t =>
        {
            var mine = episodes.Where(e => e.TaskId == t.Id).ToList();
            var ok = mine.Where(e => e.Success).ToList();
            return new TaskResult(t.Id, Rate.Wilson(ok.Count, mine.Count), mine.Count == 0 ? 0 : mine.Average(e => e.Steps),
                ok.Count == 0 ? null : ok.Average(e => e.Steps), t.MaxSteps);
        }).ToList();
        var latencies = episodes.SelectMany(e => e.LatenciesMs).Order().ToArray();
        return new EvalReport("tabletop", policy, o.Seed, o.TrialsPerTask, o.ImageSize, o.SettleSteps, o.Workers, DateTime.UtcNow, seconds,
            Rate.Wilson(episodes.Count(e => e.Success), episodes.Count), tasks,
            new Latency(latencies.Length == 0 ? 0 : latencies.Average(), Percentile(latencies, 0.5), Percentile(latencies, 0.9),
                Percentile(latencies, 0.99), latencies.Length == 0 ? 0 : latencies[^1], latencies.Length),
            crashes, episodes, ExpertDiagnosis.From(o.Tasks.Select(t => t.Id).ToList(), episodes), o.PolicySettings);
    }

    /// <summary>Linear-interpolated percentile of sorted values (numpy's default).</summary>
    public static double Percentile(IReadOnlyList<double> sorted, double q)
    {
        if (sorted.Count == 0) return 0;
        double pos = q * (sorted.Count - 1);
        int lo = (int)Math.Floor(pos), hi = Math.Min(lo + 1, sorted.Count - 1);
        return sorted[lo] + (pos - lo) * (sorted[hi] - sorted[lo]);
    }

    public string ToJson() => JsonSerializer.Serialize(this, Json);

    public string ToMarkdown()
    {
        string P(double v) => (100 * v).ToString("F1", CultureInfo.InvariantCulture);
        string F(double v) => double.IsNaN(v) ? "–" : v.ToString("F1", CultureInfo.InvariantCulture);
        var s = new StringBuilder();
        s.AppendLine($"# Tabletop evaluation: `{Policy}`");
        s.AppendLine();
        s.AppendLine($"Seed {Seed}, {TrialsPerTask} trials per task, {ImageSize}x{ImageSize} images, {SettleSteps} settling steps, " +
                     $"{Workers} worker(s), {WallSeconds:F1} s, finished {FinishedUtc:yyyy-MM-dd HH:mm} UTC.");
        if (PolicySettings is { Length: > 0 }) s.AppendLine().AppendLine($"Policy settings: {PolicySettings}.");
        s.AppendLine();
        s.AppendLine("| task | success | 95% CI (Wilson) | mean steps | mean steps (successes) | budget |");
        s.AppendLine("|---|---|---|---|---|---|");
        foreach (var t in Tasks)
            s.AppendLine($"| {t.Task} | {t.Success.Successes}/{t.Success.Trials} = {P(t.Success.Value)}% | {P(t.Success.Low)}–{P(t.Success.High)}% | {F(t.MeanSteps)} | {F(t.MeanStepsSuccessful ?? double.NaN)} | {t.MaxSteps} |");
        s.AppendLine($"| **overall** | **{Overall.Successes}/{Overall.Trials} = {P(Overall.Value)}%** | {P(Overall.Low)}–{P(Overall.High)}% | " +
                     $"{F(Episodes.Count == 0 ? double.NaN : Episodes.Average(e => e.Steps))} | | |");
        s.AppendLine();
        var l = PolicyLatency;
        s.AppendLine(CultureInfo.InvariantCulture, $"Policy latency per step ({l.Steps} steps): mean {l.MeanMs:F2} ms, p50 {l.P50Ms:F2} ms, p90 {l.P90Ms:F2} ms, p99 {l.P99Ms:F2} ms, max {l.MaxMs:F2} ms.");
        long calls = Episodes.Sum(e => (long)e.PolicyCalls);
        if (calls > 0 && Episodes.Count > 0)
            s.AppendLine(CultureInfo.InvariantCulture, $"Policy calls: {(double)calls / Episodes.Count:F1} per episode ({(double)l.Steps / calls:F2} executed actions per call), {l.MeanMs * l.Steps / calls:F2} ms per call on average.");
        if (WorkerCrashes.Count > 0)
        {
            s.AppendLine();
            s.AppendLine($"**{WorkerCrashes.Count} worker crash(es)**; the affected episodes were retried on fresh workers:");
            foreach (var c in WorkerCrashes) s.AppendLine($"- worker {c.Worker}, exit code {c.ExitCode?.ToString(CultureInfo.InvariantCulture) ?? "?"}: {c.StderrTail}");
        }
        if (Diagnosis is not null) Diagnosis.AppendMarkdown(s);
        var videos = Episodes.Where(e => e.Video is not null).ToList();
        if (videos.Count > 0)
        {
            s.AppendLine();
            s.AppendLine("Rollout videos: " + string.Join(", ", videos.Select(v => $"`{Path.GetFileName(v.Video)}` ({(v.Success ? "success" : "failure")})")));
        }
        return s.ToString();
    }

    /// <summary>Writes results.json, summary.md and success.png into <paramref name="dir"/>.</summary>
    public IReadOnlyList<string> WriteFiles(string dir)
    {
        Directory.CreateDirectory(dir);
        string json = Path.Combine(dir, "results.json"), md = Path.Combine(dir, "summary.md"), png = Path.Combine(dir, "success.png");
        File.WriteAllText(json, ToJson() + "\n");
        File.WriteAllText(md, ToMarkdown());
        SuccessChart.Write(this, png);
        return [json, md, png];
    }
}
