using OpenVLA.Policy.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>
/// The openvla-oft component files of a checkpoint, read (without pickle code, <see cref="TorchStateDict"/>) and matched
/// to an <see cref="OpenVlaModel"/>: action_head--*.pt → <c>action_head.*</c>, proprio_projector--*.pt →
/// <c>proprio_projector.*</c>, and for FiLM vision_backbone--*.pt → <c>vision_backbone.*</c>. Keys may carry DDP's
/// <c>module.</c>. The FiLM file is the state dict of a PEFT-LoRA-wrapped, FiLM-wrapped backbone (docs/oft.md):
/// <c>blocks.{i}.block.&lt;timm name&gt;</c>, each linear layer as <c>base_layer</c> plus <c>lora_A/lora_B.default</c>,
/// folded here as W + (alpha/r)·B·A with the reference's alpha = min(r, 16).
/// </summary>
public sealed class OftWeights
{
    public required OftSpec Spec { get; init; }
    public required Dictionary<string, TorchTensor> ActionHead { get; init; }
    public Dictionary<string, TorchTensor>? ProprioProjector { get; init; }
    /// <summary>The FiLM backbone, already mapped to our parameter names with LoRA folded in.</summary>
    public Dictionary<string, TorchTensor>? VisionBackbone { get; init; }

    /// <summary>Reads the component files of an OFT checkpoint directory and resolves its constants; null for a plain
    /// OpenVLA directory.</summary>
    public static OftWeights? Read(string dir, VlaConfig config, IEnumerable<string> statisticsKeys, OftOverrides overrides)
    {
        if (!OftSpec.IsOft(dir, config))
        {
            if (overrides.ActionChunk is not null || overrides.NumImages is not null)
                throw new PolicyInputException($"{dir} is a plain OpenVLA checkpoint (no action_head--*_checkpoint.pt); --action-chunk and --num-images apply to OpenVLA-OFT checkpoints");
            return null;
        }
        var headFile = OftSpec.FindComponent(dir, "action_head");
        bool discrete = OftSpec.StatesDiscrete(config);
        if (headFile is null && !discrete)
            throw new CheckpointException($"{dir}: config.json has an \"oft\" block but there is no action_head--<step>_checkpoint.pt");
        if (headFile is not null && discrete)
            throw new CheckpointException($"{dir}: config.json states oft.action_head \"discrete\" but {Path.GetFileName(headFile)} is an L1 head");
        var proprioFile = OftSpec.FindComponent(dir, "proprio_projector");
        var visionFile = OftSpec.FindComponent(dir, "vision_backbone");
        if (OftSpec.FindComponent(dir, "noisy_action_projector") is string diffusion)
            throw new CheckpointException($"{dir}: {Path.GetFileName(diffusion)} belongs to a diffusion action head, which this runtime does not run (L1-regression heads only)");

        Dictionary<string, TorchTensor> head = [];
        long[] fc1Shape, fc2Shape;
        int llm = config.Text.HiddenSize;
        if (headFile is not null)
        {
            head = TorchStateDict.StripPrefix(TorchStateDict.Load(headFile), "module.");
            fc1Shape = Require(head, "model.fc1.weight", headFile).Shape;
            fc2Shape = Require(head, "model.fc2.weight", headFile).Shape;
        }
        else
        {
            // The discrete variant has no head: the action dimension comes from the block (no weights state it).
            int a = (config.Raw["oft"] as System.Text.Json.Nodes.JsonObject)?["action_dim"]?.GetValue<int>()
                ?? throw new CheckpointException($"{dir}/config.json: the discrete variant needs oft.action_dim");
            (fc1Shape, fc2Shape) = ([llm, (long)llm * a], [a, llm]);
        }
        Dictionary<string, TorchTensor>? proprio = null;
        int? proprioInput = null;
        if (proprioFile is not null)
        {
            proprio = TorchStateDict.StripPrefix(TorchStateDict.Load(proprioFile), "module.");
            var w = Require(proprio, "fc1.weight", proprioFile);
            if (w.Shape.Length != 2) throw new CheckpointException($"{Path.GetFileName(proprioFile)}: fc1.weight has shape {w.ShapeText}");
            proprioInput = (int)w.Shape[1];
        }
        Dictionary<string, TorchTensor>? vision = null;
        bool film = false;
        if (visionFile is not null)
        {
            vision = FoldFilmBackbone(TorchStateDict.StripPrefix(TorchStateDict.Load(visionFile), "module."), visionFile);
            film = vision.Keys.Any(k => k.Contains(".scale.", StringComparison.Ordinal));
        }
        var spec = OftSpec.Resolve(dir, config, statisticsKeys, overrides, headFile ?? "(discrete: no head file)", fc2Shape, fc1Shape, proprioInput, proprioFile, visionFile, film)
            with { DiscreteTokens = discrete };
        return new OftWeights { Spec = spec, ActionHead = head, ProprioProjector = proprio, VisionBackbone = film ? vision : null };
    }

    /// <summary>Copies the component weights into the model (converted to its dtype). Every parameter of the head and
    /// the projector must be present with its exact shape, and nothing else may be in their files (load_state_dict's
    /// strict rule); the FiLM file must hold every vision parameter the model runs.</summary>
    public void Fill(OpenVlaModel model, List<string> unused)
    {
        var parameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        using var noGrad = torch.no_grad();
        Strict(parameters, "action_head.", ActionHead, Spec.ActionHeadFile);
        if (ProprioProjector is not null) Strict(parameters, "proprio_projector.", ProprioProjector, Spec.ProprioProjectorFile!);
        if (VisionBackbone is not null)
        {
            var file = Path.GetFileName(Spec.VisionBackboneFile!);
            foreach (var (name, param) in parameters.Where(p => p.Key.StartsWith("vision_backbone.", StringComparison.Ordinal)))
            {
                if (!VisionBackbone.TryGetValue(name, out var t))
                    throw new CheckpointException($"{file}: no tensor for '{name}' (expected shape [{string.Join(", ", param.shape)}])");
                Copy(param, t, name, file);
            }
            unused.AddRange(VisionBackbone.Keys.Where(k => !parameters.ContainsKey(k)).Select(k => $"{file}:{k}"));
        }
    }

    /// <summary>
    /// Writes the model's OFT components as openvla-oft's finetune.py saves them from its DDP-wrapped modules: keys
    /// prefixed <c>module.</c>, in the model's own precision (openvla-oft trains the head in bf16 and the projector in
    /// float32; a float32 run keeps every bit, so a resume continues exactly, and openvla-oft's loader casts either); files <c>action_head--&lt;label&gt;_checkpoint.pt</c> and <c>proprio_projector--&lt;label&gt;_checkpoint.pt</c>
    /// (label: the step, or "latest"). Component files already in the directory are replaced.
    /// </summary>
    public static void Save(string dir, OpenVlaModel model, string label)
    {
        if (model.action_head is null) throw new InvalidOperationException("the model has no OFT action head");
        foreach (var stale in Directory.EnumerateFiles(dir, "*--*_checkpoint.pt").Where(f => Path.GetFileName(f).StartsWith("action_head--") || Path.GetFileName(f).StartsWith("proprio_projector--")))
            File.Delete(stale);
        static List<(string, long[], float[])> Tensors(nn.Module module)
        {
            using var noGrad = torch.no_grad();
            return module.named_parameters().Select(p =>
            {
                using var t = p.parameter.detach().to(ScalarType.Float32, CPU).contiguous();
                return ("module." + p.name, p.parameter.shape, t.data<float>().ToArray());
            }).ToList();
        }
        string dtype = model.Precision.DType == ScalarType.Float32 ? "Float" : "BFloat16";
        TorchStateDict.Save(Path.Combine(dir, $"action_head--{label}_checkpoint.pt"), Tensors(model.action_head), dtype);
        if (model.proprio_projector is not null)
            TorchStateDict.Save(Path.Combine(dir, $"proprio_projector--{label}_checkpoint.pt"), Tensors(model.proprio_projector), "Float");
    }

    /// <summary>openvla-oft's initialisation of new components (init_module: the modules' PyTorch defaults): every
    /// Linear U(−1/√fan_in, 1/√fan_in) for weight and bias (kaiming_uniform with a = √5), LayerNorm weight 1 and bias 0.</summary>
    public static void InitializeNew(OpenVlaModel model, Generator generator)
    {
        using var noGrad = torch.no_grad();
        foreach (var component in new nn.Module?[] { model.action_head, model.proprio_projector })
        {
            if (component is null) continue;
            foreach (var (_, module) in component.named_modules())
                switch (module)
                {
                    case Linear lin:
                        double bound = 1 / Math.Sqrt(lin.InFeatures);
                        lin.weight.uniform_(-bound, bound, generator);
                        lin.bias?.uniform_(-bound, bound, generator);
                        break;
                    case LayerNorm norm:
                        norm.weight.fill_(1);
                        norm.bias.fill_(0);
                        break;
                }
        }
    }

    static void Strict(Dictionary<string, TorchSharp.Modules.Parameter> parameters, string prefix, Dictionary<string, TorchTensor> stateDict, string path)
    {
        var file = Path.GetFileName(path);
        var expected = parameters.Where(p => p.Key.StartsWith(prefix, StringComparison.Ordinal)).ToList();
        foreach (var (name, param) in expected)
        {
            var key = name[prefix.Length..];
            if (!stateDict.TryGetValue(key, out var t))
                throw new CheckpointException($"{file}: tensor '{key}' is missing (expected shape [{string.Join(", ", param.shape)}])");
            Copy(param, t, key, file);
        }
        var extra = stateDict.Keys.Where(k => !parameters.ContainsKey(prefix + k)).OrderBy(k => k, StringComparer.Ordinal).ToList();
        if (extra.Count > 0) throw new CheckpointException($"{file}: {extra.Count} unexpected tensor(s), first '{extra[0]}' (not an L1-regression head / proprio projector of this model)");
    }

    static void Copy(TorchSharp.Modules.Parameter param, TorchTensor t, string key, string file)
    {
        if (!t.Shape.SequenceEqual(param.shape))
            throw new CheckpointException($"{file}: tensor '{key}' has shape {t.ShapeText}, expected [{string.Join(", ", param.shape)}]");
        using var src = torch.tensor(t.Data, t.Shape);
        param.copy_(src);
    }

    static TorchTensor Require(Dictionary<string, TorchTensor> sd, string key, string path) =>
        sd.TryGetValue(key, out var t) ? t : throw new CheckpointException($"{Path.GetFileName(path)}: tensor '{key}' is missing (not an openvla-oft L1-regression component)");

    /// <summary>PEFT+FiLM keys → our names: "blocks.{i}.block." → "blocks.{i}.", base_layer + LoRA folded.</summary>
    static Dictionary<string, TorchTensor> FoldFilmBackbone(Dictionary<string, TorchTensor> sd, string path)
    {
        var file = Path.GetFileName(path);
        var result = new Dictionary<string, TorchTensor>(StringComparer.Ordinal);
        foreach (var (key, t) in sd)
        {
            if (!key.StartsWith("vision_backbone.", StringComparison.Ordinal))
                throw new CheckpointException($"{file}: key '{key}' is outside vision_backbone.* (not a FiLM vision backbone)");
            if (key.Contains(".lora_A.", StringComparison.Ordinal) || key.Contains(".lora_B.", StringComparison.Ordinal)) continue;
            var name = key.Replace(".block.", ".", StringComparison.Ordinal);
            if (name.Contains(".base_layer.", StringComparison.Ordinal))
            {
                var module = key[..key.IndexOf(".base_layer.", StringComparison.Ordinal)];
                name = name.Replace(".base_layer.", ".", StringComparison.Ordinal);
                if (key.EndsWith(".weight", StringComparison.Ordinal) && sd.TryGetValue(module + ".lora_A.default.weight", out var a))
                {
                    var b = sd.TryGetValue(module + ".lora_B.default.weight", out var bb) ? bb
                        : throw new CheckpointException($"{file}: '{module}' has lora_A but no lora_B");
                    result[name] = FoldLora(t, a, b, module, file);
                    continue;
                }
            }
            if (!result.TryAdd(name, t)) throw new CheckpointException($"{file}: '{name}' is stored twice");
        }
        return result;
    }

    /// <summary>W + (alpha/r)·B·A (in float64), with PEFT's scaling for the reference's alpha = min(r, 16). A Conv2d
    /// (the patch embedding: PEFT's "all-linear" matches it by its name "proj") has A [r, in, k, k] and B [out, r, 1, 1]:
    /// the same product over the flattened kernel.</summary>
    static TorchTensor FoldLora(TorchTensor w, TorchTensor a, TorchTensor b, string module, string file)
    {
        long n = w.Shape[0], k = w.NumElements / Math.Max(1, n), r = a.Shape.Length > 0 ? a.Shape[0] : 0;
        bool fits = w.Shape.Length >= 2 && a.Shape.Length == w.Shape.Length && b.Shape.Length == w.Shape.Length
            && r > 0 && a.NumElements == r * k && a.Shape.Skip(1).SequenceEqual(w.Shape.Skip(1))
            && b.Shape[0] == n && b.Shape[1] == r && b.NumElements == n * r;
        if (!fits) throw new CheckpointException($"{file}: LoRA of '{module}' has shapes A {a.ShapeText}, B {b.ShapeText} for a weight {w.ShapeText}");
        double scaling = Math.Min(r, 16) / (double)r;
        using var scope = NewDisposeScope();
        var delta = torch.tensor(b.Data, [n, r]).to(ScalarType.Float64).matmul(torch.tensor(a.Data, [r, k]).to(ScalarType.Float64));
        var merged = torch.tensor(w.Data, [n, k]).to(ScalarType.Float64).add(delta.mul(scaling)).to(ScalarType.Float32);
        return new TorchTensor(w.DType, w.Shape, merged.data<float>().ToArray());
    }
}
