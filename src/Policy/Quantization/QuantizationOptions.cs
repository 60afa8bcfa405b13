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

    /// <summary>
    /// int4: search each group's range for the least squared error (<see cref="WeightQuantizer.ClipSearch"/>) instead of
    /// taking its min–max. About 13× the quantization time (7 s instead of 0.5 s for a 4096 × 11008 layer on 2 cores), so
    /// quantizing openvla-7b at load on a CPU takes ~17 min instead of ~1.5; pre-quantize it once (`openvla quantize`).
    /// Stored checkpoints have the same format either way, so a stored checkpoint's options say true, and int8 ignores it.
    /// </summary>
    public bool SearchRange { get; init; } = true;

    public static QuantizationOptions Parse(string mode, int groupSize = 128, bool includeVision = true, bool searchRange = true)
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
        return new QuantizationOptions(m, m == QuantMode.Int4 ? groupSize : 0, includeVision) { SearchRange = searchRange };
    }

    public string Name => Mode switch { QuantMode.Int8 => "int8", QuantMode.Int4 => $"int4-g{GroupSize}", _ => "none" };

    /// <summary>The scheme a layer [out, in] gets: int4 needs whole groups and the CPU kernel needs out % 16 == 0, so a layer
    /// the group size does not divide (SigLIP's fc2 reads 4304 = 16·269 features) or with another output count is stored
    /// int8 instead.</summary>
    public QuantMode ModeFor(long outFeatures, long inFeatures) =>
        Mode == QuantMode.Int4 && (inFeatures % GroupSize != 0 || outFeatures % 16 != 0) ? QuantMode.Int8 : Mode;

    /// <summary>Whether the linear layer at this module path is quantized.</summary>
    public bool Covers(string modulePath) => Mode != QuantMode.None &&
        (modulePath.StartsWith("language_model.") || modulePath.StartsWith("projector.") || (IncludeVision && modulePath.StartsWith("vision_backbone.")));
}
