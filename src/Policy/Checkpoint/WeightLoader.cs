using OpenVLA.Policy.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>What loading found: tensors the reference keeps but inference never reads, and names no layout knows.</summary>
public sealed record LoadReport(IReadOnlyList<string> Unused, IReadOnlyList<string> Unexpected, long BytesRead);

/// <summary>
/// Fills a model's (empty) parameters from the checkpoint's safetensors files, one tensor at a time, converting dtype on
/// copy. Every parameter must be present with exactly the expected shape; otherwise loading fails naming the tensor.
/// </summary>
public static class WeightLoader
{
    public static LoadReport Load(nn.Module model, VlaCheckpoint checkpoint)
    {
        var parameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
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
                if (!parameters.TryGetValue(info.Name, out var param))
                {
                    (layout.TryGetValue(info.Name, out var spec) && !spec.UsedByInference ? unused : unexpected).Add(info.Name);
                    continue;
                }
                if (!found.Add(info.Name)) throw new CheckpointException($"{checkpoint.Directory}: tensor '{info.Name}' appears in more than one shard");
                if (!info.Shape.SequenceEqual(param.shape))
                    throw new CheckpointException($"{Path.GetFileName(file)}: tensor '{info.Name}' has shape [{string.Join(", ", info.Shape)}], expected [{string.Join(", ", param.shape)}]");
                using var t = st.Load(info.Name);
                param.copy_(t);
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
}
