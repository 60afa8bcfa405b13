using OpenVLA.Policy.Model;
using OpenVLA.Policy.Quantization;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>What loading found: tensors the reference keeps but inference never reads, and names no layout knows.</summary>
public sealed record LoadReport(IReadOnlyList<string> Unused, IReadOnlyList<string> Unexpected, long BytesRead);

/// <summary>
/// Fills a model's (empty) parameters from the checkpoint's safetensors files, one tensor at a time, converting dtype on
/// copy. Every parameter must be present with exactly the expected shape; otherwise loading fails naming the tensor.
/// With quantization, each covered linear weight is quantized as soon as it is read and its float copy freed, so peak
/// memory is the quantized model plus one float layer; a pre-quantized checkpoint (docs/quantization.md) is read in its
/// int8/int4 form and never materialised in float.
/// </summary>
public static class WeightLoader
{
    /// <param name="loadedElsewhere">parameters that other files fill (OpenVLA-OFT's component files): not expected here</param>
    public static LoadReport Load(nn.Module model, VlaCheckpoint checkpoint, QuantizationOptions? quantization = null, Func<string, bool>? loadedElsewhere = null)
    {
        var parameters = model.named_parameters().Where(p => loadedElsewhere?.Invoke(p.name) != true).ToDictionary(p => p.name, p => p.parameter);
        var quantized = new Dictionary<string, Linear>();
        var stored = checkpoint.Config.StoredQuantization;
        var quant = stored ?? quantization ?? QuantizationOptions.None;
        if (stored is not null && quantization is not null && quantization.Mode != QuantMode.None
            && quantization with { SearchRange = stored.SearchRange } != stored)   // how ranges were found is not stored
            throw new CheckpointException($"{checkpoint.Directory}: the checkpoint is pre-quantized as {stored.Name}; load it without --quantize or with --quantize {stored.Name.Split('-')[0]}");
        if (quant.Mode != QuantMode.None)
            foreach (var (name, module) in model.named_modules())
                if (module is Linear lin && quant.Covers(name + ".")) quantized[name + ".weight"] = lin;

        var layout = CheckpointLayout.Enumerate(checkpoint.Config).ToDictionary(s => s.Name);
        var found = new HashSet<string>();
        var unused = new List<string>();
        var unexpected = new List<string>();
        long bytes = 0;
        using var noGrad = torch.no_grad();
        foreach (var file in checkpoint.WeightFiles)
        {
            using var st = SafetensorsFile.Open(file);
            foreach (var info in st.Tensors.Values.OrderBy(t => t.Begin))
            {
                if (stored is not null && IsQuantPart(info.Name)) continue; // read with its weight below
                if (!parameters.TryGetValue(info.Name, out var param))
                {
                    (layout.TryGetValue(info.Name, out var spec) && !spec.UsedByInference ? unused : unexpected).Add(info.Name);
                    continue;
                }
                if (!found.Add(info.Name)) throw new CheckpointException($"{checkpoint.Directory}: tensor '{info.Name}' appears in more than one shard");
                if (stored is not null && quantized.TryGetValue(info.Name, out var qlin))
                {
                    qlin.SetQuantized(QuantizedWeight.FromPortable(ReadPortable(st, info.Name, qlin, stored, file), qlin.bias?.device ?? CPU));
                    bytes += info.End - info.Begin;
                    continue;
                }
                if (!info.Shape.SequenceEqual(param.shape))
                    throw new CheckpointException($"{Path.GetFileName(file)}: tensor '{info.Name}' has shape [{string.Join(", ", info.Shape)}], expected [{string.Join(", ", param.shape)}]");
                using (var t = st.Load(info.Name)) param.copy_(t);
                if (quantized.TryGetValue(info.Name, out var lin)) lin.Quantize(quant);
                bytes += info.End - info.Begin;
            }
        }
        var missing = parameters.Keys.Where(k => !found.Contains(k)).OrderBy(k => k, StringComparer.Ordinal).ToList();
        if (missing.Count > 0)
        {
            var first = missing[0];
            var shape = string.Join(", ", parameters[first].shape);
            throw new CheckpointException($"{checkpoint.Directory}: {missing.Count} tensor(s) missing, first '{first}' (expected shape [{shape}])");
        }
        return new LoadReport(unused, unexpected, bytes);
    }

    static bool IsQuantPart(string name) => name.EndsWith(".weight_scale") || name.EndsWith(".weight_zero");

    static PortableQuantized ReadPortable(SafetensorsFile st, string weightName, Linear lin, QuantizationOptions q, string file)
    {
        string baseName = weightName[..^".weight".Length];
        Tensor Part(string suffix, long[] shape, string dtype)
        {
            var name = baseName + suffix;
            if (!st.Tensors.TryGetValue(name, out var info))
                throw new CheckpointException($"{Path.GetFileName(file)}: pre-quantized tensor '{name}' is missing");
            if (!info.Shape.SequenceEqual(shape) || info.DType != dtype)
                throw new CheckpointException($"{Path.GetFileName(file)}: tensor '{name}' is {info.DType} [{string.Join(", ", info.Shape)}], expected {dtype} [{string.Join(", ", shape)}]");
            return st.Load(name);
        }
        long n = lin.OutFeatures, k = lin.InFeatures;
        if (q.ModeFor(n, k) == QuantMode.Int8)
            return new PortableQuantized(QuantMode.Int8, n, k, 0, Part(".weight", [n, k], "I8"), Part(".weight_scale", [n], "BF16"), null);
        long groups = k / q.GroupSize;
        return new PortableQuantized(QuantMode.Int4, n, k, q.GroupSize, Part(".weight", [n, k / 2], "U8"),
            Part(".weight_scale", [n, groups], "BF16"), Part(".weight_zero", [n, groups], "BF16"));
    }
}
