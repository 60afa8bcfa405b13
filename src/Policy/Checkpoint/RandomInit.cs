using OpenVLA.Policy.Model;
using OpenVLA.Policy.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>
/// Random weights of a plausible scale, for generated checkpoints and benchmarks: norms near 1, layer scales near 0.1,
/// small biases, linear weights with std 1/√fan_in so activations stay O(1) through the depth, embeddings and position
/// tables N(0, 0.5²).
/// </summary>
public static class RandomInit
{
    public static (double Mean, double Std) MeanStd(string name, long[] shape)
    {
        if (name.EndsWith("norm.weight") || name.EndsWith("norm1.weight") || name.EndsWith("norm2.weight") || name.EndsWith("layernorm.weight")
            || name.EndsWith(".ffn.0.weight"))   // the LayerNorm of an OFT MLP-ResNet block
            return (1, 0.1);
        if (name.EndsWith("scale_factor")) return (0.1, 0.05);
        if (name.EndsWith(".bias")) return (0, 0.02);
        if (shape.Length >= 2 && !name.EndsWith("embed_tokens.weight") && !name.Contains("pos_embed") && !name.EndsWith("_token") && !name.EndsWith("latent"))
            return (0, 1 / Math.Sqrt(shape.Skip(1).Aggregate(1L, (a, b) => a * b)));
        return (0, 0.5);
    }

    /// <summary>
    /// Fills an (empty) model's parameters in place, in its own precision. Covered linear layers of a quantized model get
    /// random weights built directly in int8/int4 (random levels, scales giving the same std as the float init), so a
    /// 7B model is built in the memory of its final form and never touches float copies of those weights.
    /// </summary>
    public static void Fill(OpenVlaModel model, int seed, QuantizationOptions quantization)
    {
        var gen = new Generator((ulong)seed);
        using var noGrad = torch.no_grad();
        var linears = model.named_modules().Where(m => m.module is Linear).ToDictionary(m => m.name + ".weight", m => (Linear)m.module);
        foreach (var (name, p) in model.named_parameters().ToList())
        {
            if (quantization.Mode != QuantMode.None && linears.TryGetValue(name, out var lin) && quantization.Covers(name))
            {
                lin.SetQuantized(QuantizedWeight.FromPortable(RandomQuantized(lin.OutFeatures, lin.InFeatures, quantization, gen), p.device));
                continue;
            }
            var (mean, std) = MeanStd(name, p.shape);
            if (p.dtype == ScalarType.Float32) p.normal_(mean, std, gen);
            else
            {
                // ATen draws bf16 normals one scalar at a time (about 12 min for the 7B model); float32 has a vectorized
                // path, so draw in float32, a slice at a time, and round.
                var flat = p.view(-1);
                const long Slice = 1 << 24;
                for (long start = 0; start < flat.shape[0]; start += Slice)
                {
                    long n = Math.Min(Slice, flat.shape[0] - start);
                    using var f = torch.empty(n, ScalarType.Float32, p.device).normal_(mean, std, gen);
                    flat.narrow(0, start, n).copy_(f);
                }
            }
        }
    }

    /// <summary>Uniform random levels with the scale that gives weights of std 1/√in, like the float init.</summary>
    static PortableQuantized RandomQuantized(long n, long k, QuantizationOptions options, Generator gen)
    {
        double std = 1 / Math.Sqrt(k);
        if (options.ModeFor(n, k) == QuantMode.Int8)
        {
            // Uniform on [−127, 127] has std 127/√3.
            var q = randint(-127, 128, [n, k], dtype: ScalarType.Int8, generator: gen);
            return new PortableQuantized(QuantMode.Int8, n, k, 0, q, full([n], std * Math.Sqrt(3) / 127, ScalarType.BFloat16), null);
        }
        int g = options.GroupSize;
        var packed = randint(0, 256, [n, k / 2], dtype: ScalarType.Byte, generator: gen);
        // Levels 0..15 uniform have std ≈ 4.6 around 7.5; zero = value of level 8 ≈ 0.
        var scale = full([n, k / g], std / 4.6, ScalarType.BFloat16);
        return new PortableQuantized(QuantMode.Int4, n, k, g, packed, scale, zeros([n, k / g], ScalarType.BFloat16));
    }
}
