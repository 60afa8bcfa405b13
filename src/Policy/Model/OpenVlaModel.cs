// Field names follow Hugging Face OpenVLAForActionPrediction keys (see Layers.cs).
#pragma warning disable IDE1006
using OpenVLA.Policy.Checkpoint;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Model;

/// <summary>
/// OpenVLAForActionPrediction: fused DINOv2+SigLIP backbone → projector → Llama-2. The three fields are the three key
/// prefixes of the checkpoint (`vision_backbone.*`, `projector.*`, `language_model.*`). An OpenVLA-OFT model adds the
/// continuous action head and, when it takes the robot's state, the proprio projector (their fields carry the names the
/// openvla-oft component files use), and FiLM layers inside the vision blocks for OFT+.
/// </summary>
public sealed class OpenVlaModel : nn.Module
{
    public FusedVisionBackbone vision_backbone;
    public Projector projector;
    public LlamaForCausalLM language_model;
    public L1RegressionActionHead? action_head;
    public ProprioProjector? proprio_projector;

    public VlaConfig Config { get; }
    public ModelPrecision Precision { get; }
    /// <summary>The OFT constants this model was built for; null for plain OpenVLA.</summary>
    public OftSpec? Oft { get; }

    public OpenVlaModel(VlaConfig config, ModelPrecision precision, OftSpec? oft = null) : base(nameof(OpenVlaModel))
    {
        Config = config;
        Precision = precision;
        Oft = oft;
        int llm = config.Text.HiddenSize;
        vision_backbone = new FusedVisionBackbone(config, precision, oft is { UseFilm: true } ? llm : null);
        projector = new Projector(config, precision);
        language_model = new LlamaForCausalLM(config.Text, precision);
        if (oft is not null)
        {
            if (!oft.DiscreteTokens) action_head = new L1RegressionActionHead(llm, oft.ActionDim, precision);
            if (oft.ProprioDim > 0) proprio_projector = new ProprioProjector(oft.ProprioDim, llm, precision);
        }
        RegisterComponents();
    }

    /// <summary>Parameters that come from openvla-oft's component files rather than the safetensors.</summary>
    public static bool IsOftComponent(string parameterName) =>
        parameterName.StartsWith("action_head.", StringComparison.Ordinal) || parameterName.StartsWith("proprio_projector.", StringComparison.Ordinal)
        || (parameterName.StartsWith("vision_backbone.", StringComparison.Ordinal) && (parameterName.Contains(".scale.", StringComparison.Ordinal) || parameterName.Contains(".shift.", StringComparison.Ordinal)));

    /// <summary>pixel_values [B, 6·cameras, H, W] → projected image tokens [B, cameras·numPatches, llm hidden];
    /// <paramref name="language"/> [B, llm] is the average language embedding FiLM towers need.</summary>
    /// <remarks>A 3-D input is the fused backbone's output itself, [B, cameras·numPatches, vision dim], computed earlier
    /// by frozen towers (fine-tuning's vision cache): only the projector runs. FiLM towers depend on the instruction, so
    /// their features cannot be computed ahead.</remarks>
    public Tensor EncodeImages(Tensor pixelValues, Tensor? language = null)
    {
        using var scope = NewDisposeScope();
        if (pixelValues.dim() == 3)
        {
            if (language is not null) throw new InvalidOperationException("FiLM vision towers need pixels, not precomputed features");
            if (pixelValues.shape[2] != Config.VisionDim || pixelValues.shape[1] % Config.NumPatches != 0)
                throw new ArgumentException($"precomputed vision features must be [B, cameras·{Config.NumPatches}, {Config.VisionDim}], got [{string.Join(", ", pixelValues.shape)}]");
            return projector.forward(pixelValues.to(Precision.DType)).MoveToOuterDisposeScope();
        }
        return projector.forward(vision_backbone.Forward(pixelValues, language)).MoveToOuterDisposeScope();
    }

    /// <summary>What goes between BOS and the prompt: the image tokens of every camera, then the proprio token when
    /// <paramref name="proprio"/> (normalized, [B, P]) is given (openvla-oft _process_proprio_features).</summary>
    public Tensor VisualPrefix(Tensor pixelValues, Tensor? proprio = null, Tensor? language = null)
    {
        using var scope = NewDisposeScope();
        var patches = EncodeImages(pixelValues, language);
        if (proprio is not null)
        {
            if (proprio_projector is null) throw new InvalidOperationException("this model has no proprio projector");
            patches = cat([patches, proprio_projector.forward(proprio.to(patches.dtype)).unsqueeze(1)], 1);
        }
        return patches.MoveToOuterDisposeScope();
    }

    /// <summary>The multimodal sequence of PrismaticForConditionalGeneration: the first embedding (BOS), the prefix
    /// [B, P, H], then the rest of the embeddings. embeddings [B, T, H] → [B, 1+P+T−1, H].</summary>
    public static Tensor Splice(Tensor embeddings, Tensor prefix)
    {
        long t = embeddings.shape[1];
        return cat([embeddings.narrow(1, 0, 1), prefix.to(embeddings.dtype), embeddings.narrow(1, 1, t - 1)], 1);
    }

    /// <summary>Validity of the spliced sequence: the first position, P prefix positions (always real), the rest.</summary>
    public static Tensor SpliceValid(Tensor valid, long prefixLength)
    {
        long b = valid.shape[0], t = valid.shape[1];
        return cat([valid.narrow(1, 0, 1), ones([b, prefixLength], ScalarType.Bool, valid.device), valid.narrow(1, 1, t - 1)], 1);
    }

    /// <summary>
    /// OpenVLA-OFT parallel decoding (modeling_prismatic.py predict_action, _regression_or_discrete_prediction): ids [B, T]
    /// = prompt (with "▁"), chunk·A placeholders, the stop token, right-padded; the placeholders' embeddings are zeroed,
    /// the language model attends bidirectionally over the real positions, and the final hidden states from the last
    /// prompt token on (one before each placeholder) feed the action head. Returns the normalized chunk [B, chunk, A].
    /// Inference and training (the L1 loss) call this same code.
    /// </summary>
    /// <param name="placeholder">[B, T] bool, true at the chunk·A placeholder positions</param>
    /// <param name="valid">[B, T] bool, true at real (not padded) positions</param>
    /// <param name="promptLengths">per row, the prompt's length including BOS and "▁"</param>
    /// <param name="proprio">normalized proprio [B, P], or null for a model without a proprio projector</param>
    /// <param name="stageDone">called with "vision" and "language" as those stages end (inference timings)</param>
    public Tensor PredictChunk(Tensor pixelValues, Tensor ids, Tensor placeholder, Tensor valid, int[] promptLengths, Tensor? proprio,
        Func<LlamaDecoderLayer, Tensor, Func<Tensor, Tensor>, Tensor>? layerRunner = null, Action<string>? stageDone = null)
    {
        if (action_head is null) throw new InvalidOperationException("this OFT model decodes tokens (no L1 head); use ChunkHiddenStates and the lm_head");
        using var scope = NewDisposeScope();
        return action_head.forward(ChunkHiddenStates(pixelValues, ids, placeholder, valid, promptLengths, proprio, layerRunner, stageDone)).MoveToOuterDisposeScope();
    }

    /// <summary>The final hidden states that the chunk's action_dim·chunk values are read from [B, chunk·A, H] (see
    /// <see cref="PredictChunk"/>): an L1 head reads them, the discrete variant projects them through lm_head.</summary>
    public Tensor ChunkHiddenStates(Tensor pixelValues, Tensor ids, Tensor placeholder, Tensor valid, int[] promptLengths, Tensor? proprio,
        Func<LlamaDecoderLayer, Tensor, Func<Tensor, Tensor>, Tensor>? layerRunner = null, Action<string>? stageDone = null)
    {
        var oft = Oft ?? throw new InvalidOperationException("parallel decoding needs an OpenVLA-OFT model");
        using var scope = NewDisposeScope();
        var lm = language_model;
        long b = ids.shape[0];
        int positions = oft.ActionChunk * oft.ActionDim;
        var embeddings = lm.Embed(ids);                                                 // [B, T, H]
        var keep = valid & placeholder.logical_not();                                   // BOS, prompt, "▁", stop
        Tensor? language = null;
        if (oft.UseFilm)
        {
            // FiLM conditions on the mean embedding of every non-placeholder token of the row (the stop token included).
            var w = keep.unsqueeze(-1).to(ScalarType.Float32);
            language = (embeddings.to(ScalarType.Float32) * w).sum(1).div(w.sum(1));
        }
        embeddings = embeddings.masked_fill(placeholder.unsqueeze(-1), KeptScalars.Zero);
        var prefix = VisualPrefix(pixelValues, proprio, language);                      // [B, P, H]
        stageDone?.Invoke("vision");
        long p = prefix.shape[1];
        var hidden = lm.Forward(Splice(embeddings, prefix), SpliceValid(valid, p), layerRunner, causal: false);
        var start = tensor(promptLengths.Select(n => p + n - 1).ToArray(), device: hidden.device).view(b, 1);
        var index = (start + arange(positions, device: hidden.device).view(1, positions)).unsqueeze(-1).expand(b, positions, hidden.shape[2]);
        var actionHidden = hidden.gather(1, index);                                     // [B, chunk·A, H]
        stageDone?.Invoke("language");
        return actionHidden.MoveToOuterDisposeScope();
    }
}
