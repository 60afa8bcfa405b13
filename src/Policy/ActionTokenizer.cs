using OpenVLA.Policy.Checkpoint;

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

/// <summary>
/// (Un)normalization of actions and proprio with a dataset's statistics, in plain arrays (openvla-model.md §3.2–3.3,
/// docs/oft.md). Plain OpenVLA un-normalizes with q01/q99 and no epsilon; OpenVLA-OFT adds 1e-8 to the range and may use
/// min/max (BOUNDS) instead of q01/q99. Dimensions whose mask is false pass through unchanged.
/// </summary>
public static class ActionNormalizer
{
    /// <summary>Plain OpenVLA: a = 0.5·(n+1)·(q99−q01) + q01 where mask; the normalized value itself where not.</summary>
    public static float[] Unnormalize(IReadOnlyList<double> normalized, ActionStats stats) => Unnormalize(normalized, stats, BoundsNormalization.Q99, 0);

    /// <summary>a = 0.5·(n+1)·(high−low+ε) + low where mask (openvla-oft _unnormalize_actions uses ε = 1e-8).</summary>
    public static float[] Unnormalize(IReadOnlyList<double> normalized, ActionStats stats, BoundsNormalization bounds, double epsilon)
    {
        var (low, high) = Bounds(stats, bounds);
        if (normalized.Count != low.Length)
            throw new ArgumentException($"action has {normalized.Count} dims, statistics have {low.Length}");
        var a = new float[normalized.Count];
        for (int i = 0; i < a.Length; i++)
        {
            bool mask = stats.Mask.Length == 0 || stats.Mask[i];
            a[i] = mask ? (float)(0.5 * (normalized[i] + 1) * (high[i] - low[i] + epsilon) + low[i]) : (float)normalized[i];
        }
        return a;
    }

    /// <summary>n = clip(2(x−low)/(high−low+1e-8) − 1, −1, 1) where mask; x where not, also clipped (openvla-oft
    /// normalize_proprio clips every dimension).</summary>
    public static double[] Normalize(IReadOnlyList<float> values, ActionStats stats, BoundsNormalization bounds = BoundsNormalization.Q99, bool clipUnmasked = false)
    {
        var (low, high) = Bounds(stats, bounds);
        if (values.Count != low.Length) throw new ArgumentException($"vector has {values.Count} dims, statistics have {low.Length}");
        var n = new double[values.Count];
        for (int i = 0; i < n.Length; i++)
        {
            bool mask = stats.Mask.Length == 0 || stats.Mask[i];
            double x = mask ? 2.0 * (values[i] - low[i]) / (high[i] - low[i] + 1e-8) - 1.0 : values[i];
            n[i] = mask || clipUnmasked ? Math.Clamp(x, -1.0, 1.0) : x;
        }
        return n;
    }

    /// <summary>
    /// The training pipeline's BOUNDS_Q99 rule (prismatic/vla/datasets/rlds/utils/data_utils.py
    /// normalize_action_and_proprio, for actions and proprio alike): where mask, n = clip(2(x − q01)/(q99 − q01 + 1e-8) − 1,
    /// −1, 1); elsewhere n = x; then every dim whose min equals its max → 0. In float32, like the reference's TensorFlow graph.
    /// </summary>
    /// <remarks>Inference normalizes proprio with <see cref="Normalize"/> instead, as openvla-oft's normalize_proprio does:
    /// it clips every dim and has no min == max rule, so a constant proprio dim is 0 in training and −1 at inference in the
    /// reference too. We keep both rules where the reference defines them.</remarks>
    public static float[] NormalizeForTraining(float[] values, float[] q01, float[] q99, float[] min, float[] max, bool[]? mask)
    {
        if (values.Length != q01.Length) throw new ArgumentException($"vector has {values.Length} dims, statistics have {q01.Length}");
        var n = new float[values.Length];
        for (int i = 0; i < n.Length; i++)
        {
            float x = values[i];
            if (mask is null || mask[i]) x = Math.Clamp(2f * (x - q01[i]) / (q99[i] - q01[i] + 1e-8f) - 1f, -1f, 1f);
            n[i] = min[i] == max[i] ? 0f : x;
        }
        return n;
    }

    static (double[] Low, double[] High) Bounds(ActionStats stats, BoundsNormalization bounds) => bounds switch
    {
        BoundsNormalization.Q99 => (stats.Q01, stats.Q99),
        _ => (stats.Min ?? throw new PolicyInputException("the statistics lack 'min', which BOUNDS normalization needs"),
              stats.Max ?? throw new PolicyInputException("the statistics lack 'max', which BOUNDS normalization needs")),
    };
}
