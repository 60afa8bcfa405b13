using OpenVLA.Policy;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Preprocessing;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.FineTune.Training;

/// <summary>One example's row in a <see cref="VisionFeatureCache"/>.</summary>
public sealed record VisionFeatureRow(VisionFeatureCache Cache, int Row);

/// <summary>
/// The fused vision backbone's output computed once per frame and camera. Towers that do not train (--freeze-vision)
/// give a frame the same features at every step, so a fine-tune can run them once, keep the features and train the
/// projector, the language model and the heads on them: a step then costs what the decoder costs. The features are
/// kept in float16 ([rows, cameras·patches, vision dim], 2 bytes a value; the fused features of trained towers are
/// O(1–100), where float16 keeps 11 significant bits), and the examples keep everything but their frames.
/// </summary>
/// <remarks>The cached examples carry <see cref="NoImage"/> in place of their frames; the objectives read
/// <see cref="TrainingExample.Vision"/> instead (<see cref="Gather"/>) and refuse a batch that mixes the two.
/// Augmentation happens before the towers: several passes over the data give each frame several augmented views.</remarks>
public sealed class VisionFeatureCache : IDisposable
{
    /// <summary>What a cached example carries where its frame was: 1×1 black, never read.</summary>
    public static readonly RgbImage NoImage = new(1, 1, new byte[3]);

    /// <summary>The largest magnitude float16 holds with room to spare; larger features are refused, not clipped.</summary>
    const float Float16Limit = 60_000f;

    readonly Tensor _features;

    public IReadOnlyList<TrainingExample> Examples { get; private set; } = [];
    public long Rows => _features.shape[0];
    public long Bytes => _features.NumberOfElements * 2;
    /// <summary>Largest absolute feature value seen (what float16 had to hold).</summary>
    public double MaxAbs { get; }

    VisionFeatureCache(Tensor features, double maxAbs)
    {
        _features = features;
        MaxAbs = maxAbs;
    }

    /// <summary>
    /// Runs <paramref name="model"/>'s towers (eval mode, no gradients) over <paramref name="examples"/> in batches and
    /// keeps their features; the returned cache's <see cref="Examples"/> are the same examples, in order, with
    /// <see cref="TrainingExample.Vision"/> set and their frames dropped.
    /// </summary>
    /// <param name="cameras">Frames per example the model takes (the primary and the extra cameras, in order).</param>
    /// <param name="progress">Called with the number of examples done after each batch.</param>
    public static VisionFeatureCache Build(OpenVlaModel model, ImagePreprocessor preprocessor, IEnumerable<TrainingExample> examples, int cameras,
        int batchSize = 128, Action<long>? progress = null)
    {
        if (model.Oft is { UseFilm: true }) throw new ArgumentException("FiLM towers depend on the instruction: their features cannot be cached");
        if (cameras < 1) throw new ArgumentOutOfRangeException(nameof(cameras), "at least one camera");
        var chunks = new List<Tensor>();
        var kept = new List<TrainingExample>();
        var batch = new List<TrainingExample>(batchSize);
        double maxAbs = 0;
        var (h, w) = preprocessor.Config.OutputSize;
        bool wasTraining = model.training;
        model.eval();
        try
        {
            void Flush()
            {
                if (batch.Count == 0) return;
                using var scope = NewDisposeScope();
                using var noGrad = no_grad();
                var images = new List<RgbImage>(batch.Count * cameras);
                foreach (var e in batch)
                {
                    if (e.Vision is not null) throw new ArgumentException("an example is already cached");
                    if (1 + e.ExtraImages.Count != cameras)
                        throw new ArgumentException($"the model takes {cameras} camera(s), an example has {1 + e.ExtraImages.Count} (name them with --image-keys)");
                    images.Add(e.Image);
                    images.AddRange(e.ExtraImages);
                }
                var pixels = tensor(preprocessor.PixelArray(images), [batch.Count, 6L * cameras, h, w]).to(model.Precision.DType, model.Precision.Device);
                var features = model.vision_backbone.Forward(pixels, null).to(ScalarType.Float32);
                double m = features.abs().max().item<float>();
                if (!double.IsFinite(m) || m > Float16Limit)
                    throw new InvalidOperationException($"the towers' features reach {m:G4}, beyond what float16 holds: train without the vision cache");
                maxAbs = Math.Max(maxAbs, m);
                chunks.Add(features.to(ScalarType.Float16, CPU).MoveToOuterDisposeScope());
                kept.AddRange(batch);
                batch.Clear();
                progress?.Invoke(kept.Count);
            }
            foreach (var e in examples)
            {
                batch.Add(e);
                if (batch.Count == batchSize) Flush();
            }
            Flush();
        }
        finally
        {
            if (wasTraining) model.train();
        }
        if (kept.Count == 0)
        {
            foreach (var c in chunks) c.Dispose();
            throw new ArgumentException("no examples to cache");
        }
        var all = chunks.Count == 1 ? chunks[0] : cat(chunks, 0);
        if (chunks.Count > 1) foreach (var c in chunks) c.Dispose();
        var cache = new VisionFeatureCache(all, maxAbs);
        var rows = new TrainingExample[kept.Count];
        for (int i = 0; i < rows.Length; i++)
            rows[i] = kept[i] with { Image = NoImage, ExtraImages = [], Vision = new VisionFeatureRow(cache, i) };
        cache.Examples = rows;
        return cache;
    }

    /// <summary>
    /// What <c>finetune --vision-cache N</c> trains on: <paramref name="passes"/> full passes over
    /// <paramref name="episodes"/>, pass p streamed with the stream's seed + p (its own order and augmentation draw). The
    /// same arguments give the same cache, so a resumed run rebuilds it. <paramref name="progress"/> gets (done, total).
    /// </summary>
    public static VisionFeatureCache FromPasses(OpenVlaModel model, ImagePreprocessor preprocessor, OpenVLA.FineTune.Data.VlaDataset data,
        IReadOnlyList<int> episodes, OpenVLA.FineTune.Data.DatasetStatistics statistics, OpenVLA.FineTune.Data.StreamOptions options, int cameras, int passes,
        Action<long, long>? progress = null)
    {
        if (passes < 1) throw new ArgumentOutOfRangeException(nameof(passes), "at least one pass");
        OpenVLA.FineTune.Data.TrainingStream Pass(int p) => new(data, episodes, statistics, options with { Repeat = false, Seed = options.Seed + (ulong)p });
        var first = Pass(0);
        long total = first.SamplesPerEpoch * passes;
        var examples = Enumerable.Range(0, passes).SelectMany(p => (p == 0 ? first : Pass(p)).Select(StreamExampleSource.ToExample));
        return Build(model, preprocessor, examples, cameras, progress: done => progress?.Invoke(done, total));
    }

    /// <summary>
    /// The cached features of a batch, [B, cameras·patches, vision dim] in <paramref name="dtype"/> on
    /// <paramref name="device"/> (what <see cref="OpenVlaModel.EncodeImages"/> takes in place of pixels); null when no
    /// example is cached. A batch that mixes cached and uncached examples, or two caches, is refused.
    /// </summary>
    public static Tensor? Gather(IReadOnlyList<TrainingExample> examples, Device device, ScalarType dtype)
    {
        var first = examples[0].Vision;
        if (first is null)
        {
            if (examples.Any(e => e.Vision is not null)) throw new ArgumentException("a batch mixes cached vision features and frames");
            return null;
        }
        var rows = new long[examples.Count];
        for (int i = 0; i < rows.Length; i++)
        {
            var v = examples[i].Vision ?? throw new ArgumentException("a batch mixes cached vision features and frames");
            if (!ReferenceEquals(v.Cache, first.Cache)) throw new ArgumentException("a batch mixes two vision caches");
            rows[i] = v.Row;
        }
        using var index = tensor(rows);
        using var picked = first.Cache._features.index_select(0, index);
        return picked.to(dtype, device);
    }

    public void Dispose() => _features.Dispose();
}
