using TorchSharp;

namespace OpenVLA.Policy.Model;

/// <summary>Bytes held by a model's weights, counting quantized layers by their int8/int4 storage.</summary>
public static class WeightMemory
{
    public static Dictionary<string, long> ByComponent(OpenVlaModel model)
    {
        var parts = new Dictionary<string, long>
        {
            ["vision_backbone"] = Bytes(model.vision_backbone),
            ["projector"] = Bytes(model.projector),
            ["language_model"] = Bytes(model.language_model),
        };
        if (model.action_head is not null) parts["action_head"] = Bytes(model.action_head);
        if (model.proprio_projector is not null) parts["proprio_projector"] = Bytes(model.proprio_projector);
        return parts;
    }

    public static long Bytes(torch.nn.Module module)
    {
        long total = 0;
        var counted = new HashSet<string>();
        foreach (var (name, m) in module.named_modules())
            if (m is Linear lin)
            {
                total += lin.WeightBytes;
                counted.Add(name + ".weight");
                counted.Add(name + ".bias");
            }
        foreach (var (name, p) in module.named_parameters())
            if (!counted.Contains(name)) total += p.NumberOfElements * p.ElementSize;
        return total;
    }
}
