using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Preprocessing;
using OpenVLA.Policy.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.FineTune.Training;

/// <summary>A batch of OpenVLA-OFT training rows, on the model's device.</summary>
public sealed class OftBatch(Tensor pixels, Tensor ids, Tensor placeholder, Tensor valid, int[] promptLengths, Tensor? proprio, Tensor targets) : IDisposable
{
    /// <summary>[B, 6·cameras, H, W] in the model's dtype, or the towers' cached features [B, cameras·patches, vision dim].</summary>
    public Tensor Pixels { get; } = pixels;
    public Tensor Ids { get; } = ids;
    public Tensor Placeholder { get; } = placeholder;
    public Tensor Valid { get; } = valid;
    public int[] PromptLengths { get; } = promptLengths;
    /// <summary>[B, P] normalized proprio, or null for a model without a proprio projector.</summary>
    public Tensor? Proprio { get; } = proprio;
    /// <summary>[B, chunk, A] float32: the normalized ground-truth chunk.</summary>
    public Tensor Targets { get; } = targets;
    public int Size => PromptLengths.Length;

    public void Dispose() { Pixels.Dispose(); Ids.Dispose(); Placeholder.Dispose(); Valid.Dispose(); Proprio?.Dispose(); Targets.Dispose(); }
}

/// <summary>
/// OpenVLA-OFT's L1-regression objective (vla-scripts/finetune.py run_forward_pass with use_l1_regression): the
/// sequence of inference — prompt, zeroed placeholders for the chunk, the stop token — through the same
/// <see cref="OpenVlaModel.PredictChunk"/> inference runs (bidirectional attention, the hidden states one position before
/// each placeholder, the MLP-ResNet head), and the mean absolute error to the normalized ground-truth chunk over every
/// (step, dimension): torch.nn.L1Loss's mean.
/// </summary>
public sealed class OftObjective(PolicyCore core, VlaTokenizer tokenizer, ImagePreprocessor preprocessor, OftSpec spec)
{
    public OftSpec Spec => spec;

    public static OftObjective ForCheckpoint(VlaCheckpoint checkpoint, VlaTokenizer tokenizer, OftSpec spec)
    {
        if (spec.DiscreteTokens) throw new ArgumentException("training the discrete-token OFT variant is not supported (train an L1 head with --oft)");
        var preprocessor = ImagePreprocessor.ForCheckpoint(checkpoint);
        return new OftObjective(new PolicyCore(checkpoint, tokenizer, preprocessor, spec), tokenizer, preprocessor, spec);
    }

    public OftBatch Build(IReadOnlyList<TrainingExample> examples, Device device, ScalarType dtype)
    {
        if (examples.Count == 0) throw new ArgumentException("empty batch", nameof(examples));
        int k = spec.ActionChunk, a = spec.ActionDim;
        var targets = new float[examples.Count * k * a];
        var images = new List<RgbImage>();
        var cached = VisionFeatureCache.Gather(examples, device, dtype);
        for (int b = 0; b < examples.Count; b++)
        {
            var e = examples[b];
            var chunk = e.NormalizedChunk ?? throw new ArgumentException("an OFT example needs its chunk of future actions (stream with an action chunk)");
            if (chunk.Length != k || chunk.Any(s => s.Length != a))
                throw new ArgumentException($"an example's chunk is {chunk.Length}×{chunk.FirstOrDefault()?.Length}, the model predicts {k}×{a}");
            for (int t = 0; t < k; t++) chunk[t].CopyTo(targets, (b * k + t) * a);
            if (cached is not null) continue;
            if (e.ExtraImages.Count != spec.NumImages - 1)
                throw new ArgumentException($"the model takes {spec.NumImages} cameras, an example has {1 + e.ExtraImages.Count} (name them with --image-keys)");
            images.Add(e.Image);
            images.AddRange(e.ExtraImages);
        }
        float[]? proprio = null;
        if (spec.ProprioDim > 0)
        {
            proprio = new float[examples.Count * spec.ProprioDim];
            for (int b = 0; b < examples.Count; b++)
            {
                var p = examples[b].NormalizedProprio ?? throw new ArgumentException("the model takes proprio, but the data has no proprio statistics or values");
                if (p.Length != spec.ProprioDim) throw new ArgumentException($"the data's proprio has {p.Length} values, the model takes {spec.ProprioDim}");
                p.CopyTo(proprio, b * spec.ProprioDim);
            }
        }
        var prompts = examples.Select(e => tokenizer.PromptIds(e.Instruction)).ToArray();
        var layout = core.ParallelLayout(prompts);
        var (h, w) = preprocessor.Config.OutputSize;
        long[] shape = [examples.Count, layout.Length];
        return new OftBatch(
            cached ?? tensor(preprocessor.PixelArray(images), [examples.Count, 6L * spec.NumImages, h, w]).to(dtype, device),
            tensor(layout.Ids, shape, device: device), tensor(layout.Placeholder, shape, device: device), tensor(layout.Valid, shape, device: device),
            prompts.Select(p => p.Length).ToArray(),
            proprio is null ? null : tensor(proprio, [examples.Count, spec.ProprioDim], device: device),
            tensor(targets, [examples.Count, k, a], device: device));
    }

    /// <summary>The L1 loss (a scalar with its graph) and its value.</summary>
    public (Tensor Loss, double Value) Forward(OpenVlaModel model, OftBatch batch, Func<LlamaDecoderLayer, Tensor, Func<Tensor, Tensor>, Tensor>? layerRunner = null)
    {
        var predicted = model.PredictChunk(batch.Pixels, batch.Ids, batch.Placeholder, batch.Valid, batch.PromptLengths, batch.Proprio, layerRunner);
        var loss = (predicted.to(ScalarType.Float32) - batch.Targets).abs().mean();
        return (loss, loss.item<float>());
    }
}
