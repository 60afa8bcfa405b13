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
        if (name.EndsWith("norm.weight") || name.EndsWith("norm1.weight") || name.EndsWith("norm2.weight") || name.EndsWith("layernorm.weight"))
            return (1, 0.1);
        if (name.EndsWith("scale_factor")) return (0.1, 0.05);
        if (name.EndsWith(".bias")) return (0, 0.02);
        if (shape.Length >= 2 && !name.EndsWith("embed_tokens.weight") && !name.Contains("pos_embed") && !name.EndsWith("_token") && !name.EndsWith("latent"))
            return (0, 1 / Math.Sqrt(shape.Skip(1).Aggregate(1L, (a, b) => a * b)));
        return (0, 0.5);
    }

    /// <summary>
    /// Fills an (empty) model's parameters in place, in its own precision, quantizing each covered linear layer right
    /// after filling it, so a 7B model is built in the memory of its final form plus one layer.
    /// </summary>
    public static void Fill(OpenVlaModel model, int seed, QuantizationOptions quantization)
    {
        var gen = new Generator((ulong)seed);
        using var noGrad = torch.no_grad();
        var linears = model.named_modules().Where(m => m.module is Linear).ToDictionary(m => m.name + ".weight", m => (Linear)m.module);
        foreach (var (name, p) in model.named_parameters().ToList())
        {
            var (mean, std) = MeanStd(name, p.shape);
            p.normal_(mean, std, gen);
            if (quantization.Mode != QuantMode.None && linears.TryGetValue(name, out var lin) && quantization.Covers(name))
                lin.Quantize(quantization);
        }
    }
}
