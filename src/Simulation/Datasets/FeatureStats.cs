namespace OpenVLA.Simulation.Datasets;

/// <summary>
/// Running min/max/sum/sum² per dimension, mergeable across episodes and worker processes. Mean and std are population
/// statistics (numpy's default ddof=0), as LeRobot and OpenVLA compute them.
/// </summary>
public sealed class FeatureStats
{
    public double[] Min { get; set; } = [];
    public double[] Max { get; set; } = [];
    public double[] Sum { get; set; } = [];
    public double[] SumSquares { get; set; } = [];
    public long Count { get; set; }

    public static FeatureStats Create(int dims) => new()
    {
        Min = Enumerable.Repeat(double.PositiveInfinity, dims).ToArray(),
        Max = Enumerable.Repeat(double.NegativeInfinity, dims).ToArray(),
        Sum = new double[dims],
        SumSquares = new double[dims],
    };

    public void Add(ReadOnlySpan<float> values)
    {
        for (int i = 0; i < values.Length; i++) AddValue(i, values[i]);
        Count++;
    }

    public void AddValue(int dim, double v)
    {
        if (v < Min[dim]) Min[dim] = v;
        if (v > Max[dim]) Max[dim] = v;
        Sum[dim] += v;
        SumSquares[dim] += v * v;
    }

    /// <summary>Adds the pixels of an RGB8 frame, scaled to [0, 1] per channel (LeRobot image statistics).</summary>
    public void AddImage(ReadOnlySpan<byte> rgb)
    {
        long n = rgb.Length / 3;
        Span<long> sum = stackalloc long[3], sumSq = stackalloc long[3];
        Span<int> min = [255, 255, 255], max = [0, 0, 0];
        for (int i = 0; i < rgb.Length; i += 3)
            for (int c = 0; c < 3; c++)
            {
                int v = rgb[i + c];
                sum[c] += v; sumSq[c] += v * v;
                if (v < min[c]) min[c] = v;
                if (v > max[c]) max[c] = v;
            }
        for (int c = 0; c < 3; c++)
        {
            Min[c] = Math.Min(Min[c], min[c] / 255.0);
            Max[c] = Math.Max(Max[c], max[c] / 255.0);
            Sum[c] += sum[c] / 255.0;
            SumSquares[c] += sumSq[c] / (255.0 * 255.0);
        }
        Count += n;
    }

    public void Merge(FeatureStats other)
    {
        for (int i = 0; i < Sum.Length; i++)
        {
            Min[i] = Math.Min(Min[i], other.Min[i]);
            Max[i] = Math.Max(Max[i], other.Max[i]);
            Sum[i] += other.Sum[i];
            SumSquares[i] += other.SumSquares[i];
        }
        Count += other.Count;
    }

    public double[] Mean => Sum.Select(s => Count == 0 ? 0 : s / Count).ToArray();
    public double[] Std => Sum.Select((s, i) => Count == 0 ? 0 : Math.Sqrt(Math.Max(0, SumSquares[i] / Count - (s / Count) * (s / Count)))).ToArray();

    /// <summary>numpy.quantile(values, q, axis=0) with the default linear interpolation, per column.</summary>
    public static double[] Quantile(IReadOnlyList<float[]> rows, double q)
    {
        if (rows.Count == 0) throw new ArgumentException("no rows");
        int dims = rows[0].Length;
        var result = new double[dims];
        var column = new double[rows.Count];
        for (int d = 0; d < dims; d++)
        {
            for (int i = 0; i < rows.Count; i++) column[i] = rows[i][d];
            Array.Sort(column);
            double pos = q * (column.Length - 1);
            int lo = (int)Math.Floor(pos), hi = Math.Min(lo + 1, column.Length - 1);
            result[d] = column[lo] + (pos - lo) * (column[hi] - column[lo]);
        }
        return result;
    }
}
