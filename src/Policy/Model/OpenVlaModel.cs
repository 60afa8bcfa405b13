// Field names follow Hugging Face OpenVLAForActionPrediction keys (see Layers.cs).
#pragma warning disable IDE1006
using OpenVLA.Policy.Checkpoint;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Model;

/// <summary>
/// OpenVLAForActionPrediction: fused DINOv2+SigLIP backbone → projector → Llama-2. The three fields are the three key
/// prefixes of the checkpoint (`vision_backbone.*`, `projector.*`, `language_model.*`).
/// </summary>
public sealed class OpenVlaModel : nn.Module
{
    public FusedVisionBackbone vision_backbone;
    public Projector projector;
    public LlamaForCausalLM language_model;

    public VlaConfig Config { get; }
    public ModelPrecision Precision { get; }

    public OpenVlaModel(VlaConfig config, ModelPrecision precision) : base(nameof(OpenVlaModel))
    {
        Config = config;
        Precision = precision;
        vision_backbone = new FusedVisionBackbone(config, precision);
        projector = new Projector(config, precision);
        language_model = new LlamaForCausalLM(config.Text, precision);
        RegisterComponents();
    }

    /// <summary>pixel_values [B, 6, H, W] → projected image tokens [B, numPatches, llm hidden].</summary>
    public Tensor EncodeImages(Tensor pixelValues)
    {
        using var scope = NewDisposeScope();
        return projector.forward(vision_backbone.forward(pixelValues)).MoveToOuterDisposeScope();
    }
}
