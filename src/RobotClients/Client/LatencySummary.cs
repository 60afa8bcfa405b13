namespace OpenVLA.RobotClients;

/// <summary>Percentiles of a set of latencies in milliseconds (nearest-rank), for clients and benchmarks.</summary>
public sealed record LatencySummary(int Count, double P50, double P90, double P99, double Max, double Mean)
{
    public static LatencySummary Of(IEnumerable<double> milliseconds)
    {
        var sorted = milliseconds.Order().ToArray();
        if (sorted.Length == 0) return new LatencySummary(0, double.NaN, double.NaN, double.NaN, double.NaN, double.NaN);
        return new LatencySummary(sorted.Length, Rank(sorted, 0.50), Rank(sorted, 0.90), Rank(sorted, 0.99), sorted[^1], sorted.Average());
    }

    static double Rank(double[] sorted, double q) => sorted[Math.Clamp((int)Math.Ceiling(q * sorted.Length) - 1, 0, sorted.Length - 1)];

    public override string ToString() =>
        Count == 0 ? "no samples" : $"p50 {P50:F1} ms, p90 {P90:F1} ms, p99 {P99:F1} ms, max {Max:F1} ms (n={Count})";
}
