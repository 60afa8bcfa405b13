namespace OpenVLA.Policy.Quantization;

public enum QuantMode { None, Int8, Int4 }

/// <summary>
/// Weight-only quantization settings. int8: symmetric per output channel. int4: asymmetric per group of
/// <see cref="GroupSize"/> input features. Activations stay bf16. The language model (incl. lm_head) and the projector
/// are always quantized; the vision towers too unless <see cref="IncludeVision"/> is false (they hold 0.69 B of the
/// 7.5 B parameters, so the 8 GB / 4.6 GB memory targets of openvla-7b need them).
/// </summary>
public sealed record QuantizationOptions(QuantMode Mode, int GroupSize = 128, bool IncludeVision = true)
// GroupSize is 0 for int8 (per channel), so two int8 settings compare equal whatever group size was asked for.
{
    public static readonly QuantizationOptions None = new(QuantMode.None);

    public static QuantizationOptions Parse(string mode, int groupSize = 128, bool includeVision = true)
    {
        var m = mode switch
        {
            "none" => QuantMode.None,
            "int8" => QuantMode.Int8,
            "int4" => QuantMode.Int4,
            _ => throw new PolicyInputException($"unknown quantization '{mode}' (valid: none, int8, int4)"),
        };
        if (m == QuantMode.Int4 && groupSize is not (32 or 64 or 128 or 256))
            throw new PolicyInputException($"int4 group size must be 32, 64, 128 or 256, got {groupSize}");
        return new QuantizationOptions(m, m == QuantMode.Int4 ? groupSize : 0, includeVision);
    }

    public string Name => Mode switch { QuantMode.Int8 => "int8", QuantMode.Int4 => $"int4-g{GroupSize}", _ => "none" };

    /// <summary>The scheme a layer of input width <paramref name="inFeatures"/> gets: int4 needs whole groups, so a layer whose
    /// width the group size does not divide (SigLIP's fc2 reads 4304 = 16·269 features) is stored int8 instead.</summary>
    public QuantMode ModeFor(long inFeatures) => Mode == QuantMode.Int4 && inFeatures % GroupSize != 0 ? QuantMode.Int8 : Mode;

    /// <summary>Whether the linear layer at this module path is quantized.</summary>
    public bool Covers(string modulePath) => Mode != QuantMode.None &&
        (modulePath.StartsWith("language_model.") || modulePath.StartsWith("projector.") || (IncludeVision && modulePath.StartsWith("vision_backbone.")));
}
