using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;

namespace OpenVLA.Cli.Bench;

/// <summary>Arithmetic and memory traffic of one action, from the architecture, for the roofline floors.</summary>
internal static class Costs
{
    /// <summary>FLOPs of both towers up to their feature block plus the projector, for <paramref name="batch"/> frames.</summary>
    public static double VisionFlops(VlaConfig c, int batch)
    {
        double total = 0;
        foreach (var v in c.VisionTowers)
        {
            double t = v.NumPatches + v.NumPrefixTokens, d = v.EmbedDim;
            double perBlock = 2 * t * (4 * d * d + 2 * d * v.MlpHiddenDim) + 4 * t * t * d; // linears + QKᵀ and AV
            total += 2 * v.NumPatches * 3.0 * v.PatchSize * v.PatchSize * d + (v.FeatureBlockIndex + 1) * perBlock;
        }
        double n = c.NumPatches, dv = c.VisionDim, h = c.Text.HiddenSize;
        total += 2 * n * (dv * 4 * dv + 4 * dv * h + h * h);
        return total * batch;
    }

    /// <summary>FLOPs of the prefill over <paramref name="tokens"/> positions (lm_head on the last position only). OFT's
    /// parallel pass (<paramref name="causal"/> false) attends over the full square and runs no lm_head.</summary>
    public static double PrefillFlops(VlaConfig c, int tokens, int batch, bool causal = true)
    {
        var t = c.Text;
        double perTokenLayer = 2.0 * (2 * t.HiddenSize * t.HiddenSize + 2 * t.HiddenSize * t.NumKeyValueHeads * t.HeadDim + 3 * t.HiddenSize * t.IntermediateSize);
        double attention = 4.0 * tokens * tokens * t.HiddenSize / (causal ? 2 : 1);
        return batch * (t.NumHiddenLayers * (tokens * perTokenLayer + attention) + (causal ? 2.0 * t.HiddenSize * t.VocabSize : 0));
    }

    /// <summary>FLOPs of the OFT L1 head (MLP-ResNet: fc1 from A·H to H, two H×H blocks, fc2 to A) over a chunk.</summary>
    public static double OftHeadFlops(VlaConfig c, OftSpec oft, int batch)
    {
        double h = c.Text.HiddenSize, a = oft.ActionDim;
        return batch * oft.ActionChunk * 2.0 * (a * h * h + 2 * h * h + h * a);
    }

    /// <summary>Bytes one decode step must read: every language-model weight once (as stored) plus the KV cache.</summary>
    public static double DecodeBytes(OpenVlaModel model, int cachedTokens, int batch)
    {
        var t = model.Config.Text;
        double weights = WeightMemory.Bytes(model.language_model) - (double)t.VocabSize * t.HiddenSize * ElementBytes(model); // embeddings: one row read
        double kv = 2.0 * t.NumHiddenLayers * cachedTokens * t.NumKeyValueHeads * t.HeadDim * ElementBytes(model) * batch;
        return weights + kv;
    }

    static double ElementBytes(OpenVlaModel model) => model.Precision.DType == TorchSharp.torch.ScalarType.Float32 ? 4 : 2;
}
