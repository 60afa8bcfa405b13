using System.Text.Json.Nodes;
using OpenVLA.Policy;

namespace OpenVLA.FineTune.Training;

/// <summary>What the trainer consumes: one camera frame, the instruction, and the action already normalized to [−1, 1]
/// on its masked dims (BOUNDS_Q99, openvla-model.md §3.3) — the values the action tokenizer bins — and, when the dataset
/// config names aux_keys, the auxiliary targets (not normalized) an auxiliary head learns to read from the image.</summary>
/// <remarks>OpenVLA-OFT adds the other cameras' frames (<see cref="ExtraImages"/>, in the model's camera order), the
/// chunk of normalized actions from this step on (<see cref="NormalizedChunk"/>) and the normalized proprio.</remarks>
public sealed record TrainingExample(RgbImage Image, string Instruction, float[] NormalizedAction, string DatasetName, float[]? Aux = null)
{
    public IReadOnlyList<RgbImage> ExtraImages { get; init; } = [];
    public float[][]? NormalizedChunk { get; init; }
    public float[]? NormalizedProprio { get; init; }
    /// <summary>The action as the token ids themselves (post-training's sampled tokens), instead of binning
    /// <see cref="NormalizedAction"/>: a token's id is what its log-probability is about.</summary>
    public int[]? ActionTokenIds { get; init; }
    /// <summary>The frames' vision features, computed once by frozen towers (<see cref="VisionFeatureCache"/>); the
    /// frames themselves are then <see cref="VisionFeatureCache.NoImage"/>.</summary>
    public VisionFeatureRow? Vision { get; init; }
}

/// <summary>
/// An endless, deterministic supply of training examples whose position can be saved and restored, so a resumed run
/// sees exactly the examples the uninterrupted run would have seen.
/// </summary>
public interface IExampleSource
{
    TrainingExample Next();
    /// <summary>Where the source stands: enough to continue exactly here in a new process.</summary>
    JsonNode Cursor { get; }
    /// <summary>Moves to a position saved earlier with <see cref="Cursor"/> (by the same source over the same data).</summary>
    void Restore(JsonNode cursor);
}

/// <summary>
/// Examples held in memory, shuffled anew every epoch by a permutation derived from (seed, epoch) alone, so the cursor is
/// just (epoch, position). An optional augmentation is applied per draw with a key derived from (seed, epoch, position).
/// Used by tests and by small datasets; the streaming readers of <c>OpenVLA.FineTune.Data</c> implement the same contract.
/// </summary>
public sealed class InMemoryExampleSource : IExampleSource
{
    readonly IReadOnlyList<TrainingExample> _examples;
    readonly ulong _seed;
    readonly bool _shuffle;
    readonly Func<RgbImage, ulong, RgbImage>? _augment;
    int _epoch;
    int _position;
    int[] _order;

    public InMemoryExampleSource(IReadOnlyList<TrainingExample> examples, ulong seed, bool shuffle = true, Func<RgbImage, ulong, RgbImage>? augment = null)
    {
        if (examples.Count == 0) throw new ArgumentException("no training examples", nameof(examples));
        _examples = examples;
        _seed = seed;
        _shuffle = shuffle;
        _augment = augment;
        _order = Order(0);
    }

    public int Count => _examples.Count;

    public TrainingExample Next()
    {
        if (_position == _order.Length) { _epoch++; _position = 0; _order = Order(_epoch); }
        var e = _examples[_order[_position]];
        ulong key = Mix(_seed, (ulong)_epoch, (ulong)_position);
        _position++;
        return _augment is null ? e : e with { Image = _augment(e.Image, key) };
    }

    public JsonNode Cursor => new JsonObject { ["epoch"] = _epoch, ["position"] = _position, ["count"] = _examples.Count };

    public void Restore(JsonNode cursor)
    {
        int count = cursor["count"]?.GetValue<int>() ?? -1;
        if (count != _examples.Count) throw new InvalidOperationException($"cannot resume: the cursor was saved over {count} examples, this source has {_examples.Count}");
        _epoch = cursor["epoch"]!.GetValue<int>();
        _position = cursor["position"]!.GetValue<int>();
        _order = Order(_epoch);
    }

    int[] Order(int epoch)
    {
        var order = Enumerable.Range(0, _examples.Count).ToArray();
        if (!_shuffle) return order;
        // Fisher–Yates with our own mixing function: System.Random's seeded sequence is not part of .NET's contract.
        for (int i = order.Length - 1; i > 0; i--)
        {
            int j = (int)(Mix(_seed, 0x5A5A + (ulong)epoch, (ulong)i) % (ulong)(i + 1));
            (order[i], order[j]) = (order[j], order[i]);
        }
        return order;
    }

    /// <summary>SplitMix64 over the inputs: a well-spread 64-bit key from small integers.</summary>
    internal static ulong Mix(ulong a, ulong b, ulong c)
    {
        ulong z = a * 0x9E3779B97F4A7C15UL ^ (b + 0xBF58476D1CE4E5B9UL) * 0x94D049BB133111EBUL ^ c * 0xD6E8FEB86659FD93UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
