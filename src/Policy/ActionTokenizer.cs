namespace OpenVLA.Policy;

/// <summary>
/// OpenVLA's action discretization (openvla-model.md §3.1): 256 uniform bin edges over [−1, 1], 255 bin centres,
/// token id = V − digitize(a, edges) where V is the tokenizer vocabulary size (32000 for openvla-7b), so the action tokens
/// are the last 256 ids. Decoding clips out-of-range ids exactly as the reference: ids below the action range land on the
/// top centre, ids at or above V on centre 0.
/// </summary>
public sealed class ActionTokenizer
{
    readonly double[] _edges;
    readonly double[] _centers;

    public int VocabSize { get; }
    public int NumBins { get; }
    /// <summary>First id that is an action token (V − NumBins).</summary>
    public int FirstActionId => VocabSize - NumBins;

    public ActionTokenizer(int vocabSize, int numBins = 256)
    {
        VocabSize = vocabSize;
        NumBins = numBins;
        _edges = new double[numBins];
        for (int i = 0; i < numBins; i++) _edges[i] = -1.0 + 2.0 * i / (numBins - 1);
        _centers = new double[numBins - 1];
        for (int i = 0; i < numBins - 1; i++) _centers[i] = (_edges[i] + _edges[i + 1]) / 2;
    }

    public IReadOnlyList<double> BinCenters => _centers;

    /// <summary>Normalized value in [−1, 1] (clipped) → token id.</summary>
    public int Encode(double normalized)
    {
        double a = Math.Clamp(normalized, -1.0, 1.0);
        // numpy.digitize(a, edges) with increasing edges: the index i with edges[i−1] ≤ a < edges[i] (numBins when a ≥ last edge).
        int lo = 0, hi = _edges.Length; // first edge > a
        while (lo < hi) { int mid = (lo + hi) / 2; if (_edges[mid] > a) hi = mid; else lo = mid + 1; }
        return VocabSize - lo;
    }

    /// <summary>Token id → normalized value (a bin centre).</summary>
    public double Decode(int tokenId)
    {
        int d = VocabSize - tokenId;
        return _centers[Math.Clamp(d - 1, 0, _centers.Length - 1)];
    }
}

/// <summary>OpenVLA BOUNDS_Q99 (un)normalization of actions with a dataset's q01/q99 and mask (openvla-model.md §3.2–3.3).</summary>
public static class ActionNormalizer
{
    /// <summary>a = 0.5·(n+1)·(q99−q01) + q01 where mask; the normalized value itself where not.</summary>
    public static float[] Unnormalize(IReadOnlyList<double> normalized, ActionStats stats)
    {
        if (normalized.Count != stats.Q01.Length)
            throw new ArgumentException($"action has {normalized.Count} dims, statistics have {stats.Q01.Length}");
        var a = new float[normalized.Count];
        for (int i = 0; i < a.Length; i++)
        {
            bool mask = stats.Mask.Length == 0 || stats.Mask[i];
            a[i] = mask ? (float)(0.5 * (normalized[i] + 1) * (stats.Q99[i] - stats.Q01[i]) + stats.Q01[i]) : (float)normalized[i];
        }
        return a;
    }

    /// <summary>n = clip(2(x−q01)/(q99−q01+1e-8) − 1, −1, 1) where mask; x where not.</summary>
    public static double[] Normalize(IReadOnlyList<float> action, ActionStats stats)
    {
        var n = new double[action.Count];
        for (int i = 0; i < n.Length; i++)
        {
            bool mask = stats.Mask.Length == 0 || stats.Mask[i];
            n[i] = mask ? Math.Clamp(2.0 * (action[i] - stats.Q01[i]) / (stats.Q99[i] - stats.Q01[i] + 1e-8) - 1.0, -1.0, 1.0) : action[i];
        }
        return n;
    }
}
