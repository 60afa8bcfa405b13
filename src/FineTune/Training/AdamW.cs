using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using TorchSharp;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;

namespace OpenVLA.FineTune.Training;

/// <summary>
/// AdamW exactly as torch.optim.AdamW (decoupled weight decay, bias-corrected moments, eps added to the corrected
/// square root), with torch's defaults made explicit (betas 0.9/0.999, eps 1e-8, weight_decay 0.01 — TorchSharp's own
/// AdamW defaults differ, beta2 0.99 and no decay). Moments are float32; a parameter stored in a lower precision (a
/// bf16 model under --full) gets a float32 master copy that the update runs on, rounded into the parameter after each step.
/// Written out rather than TorchSharp's optimizer so its whole state is a set of named tensors a resume can restore.
/// </summary>
public sealed class AdamW : IDisposable
{
    public sealed record Settings(double LearningRate = 5e-4, double Beta1 = 0.9, double Beta2 = 0.999, double Eps = 1e-8, double WeightDecay = 0.01);

    sealed class Slot(string name, Parameter parameter, Tensor expAvg, Tensor expAvgSq, Tensor? master)
    {
        public string Name { get; } = name;
        public Parameter Parameter { get; } = parameter;
        public Tensor ExpAvg { get; } = expAvg;
        public Tensor ExpAvgSq { get; } = expAvgSq;
        public Tensor? Master { get; } = master;
    }

    readonly List<Slot> _slots = [];
    public Settings Hyper { get; }
    public long Step { get; private set; }

    public AdamW(IEnumerable<(string Name, Parameter Parameter)> parameters, Settings settings)
    {
        Hyper = settings;
        using var noGrad = torch.no_grad();
        foreach (var (name, p) in parameters)
        {
            var master = p.dtype == ScalarType.Float32 ? null : p.detach().to(ScalarType.Float32).DetachFromDisposeScope();
            _slots.Add(new Slot(name, p,
                zeros(p.shape, ScalarType.Float32, p.device).DetachFromDisposeScope(),
                zeros(p.shape, ScalarType.Float32, p.device).DetachFromDisposeScope(), master));
        }
    }

    public IEnumerable<Parameter> Parameters => _slots.Select(s => s.Parameter);
    public long ParameterCount => _slots.Sum(s => s.Parameter.numel());

    public void ZeroGrad()
    {
        foreach (var s in _slots)
            if (s.Parameter.grad is { } g) { g.Dispose(); s.Parameter.grad = null; }
    }

    /// <summary>One update with learning rate <paramref name="lr"/> (the schedule's value for this step).</summary>
    public void Update(double lr)
    {
        Step++;
        double bc1 = 1 - Math.Pow(Hyper.Beta1, Step), bc2 = 1 - Math.Pow(Hyper.Beta2, Step);
        double stepSize = lr / bc1, bc2Sqrt = Math.Sqrt(bc2);
        using var noGrad = torch.no_grad();
        // Held for the whole update (see KeptScalars): numbers passed straight to the in-place ops would be implicit
        // Scalars the garbage collector may free mid-call.
        using Scalar decay = (1 - lr * Hyper.WeightDecay).ToScalar(), beta2 = Hyper.Beta2.ToScalar(), keep2 = (1 - Hyper.Beta2).ToScalar(),
            bias2 = bc2Sqrt.ToScalar(), eps = Hyper.Eps.ToScalar(), step = (-stepSize).ToScalar();
        using Tensor keep1 = torch.tensor(1 - Hyper.Beta1); // lerp_ takes its weight as a tensor (a 0-d float64, as before)
        foreach (var s in _slots)
        {
            if (s.Parameter.grad is not { } grad) continue;
            using var scope = NewDisposeScope();
            var g = grad.dtype == ScalarType.Float32 ? grad : grad.to(ScalarType.Float32);
            var w = s.Master ?? s.Parameter;
            w.mul_(decay);
            s.ExpAvg.lerp_(g, keep1);
            s.ExpAvgSq.mul_(beta2).addcmul_(g, g, keep2);
            var denom = s.ExpAvgSq.sqrt().div_(bias2).add_(eps, KeptScalars.One);
            w.addcdiv_(s.ExpAvg, denom, step);
            if (s.Master is not null) s.Parameter.copy_(s.Master);
        }
    }

    /// <summary>Moments (and master copies) under "&lt;param&gt;.exp_avg", ".exp_avg_sq", ".master".</summary>
    public void Save(string path)
    {
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var s in _slots)
        {
            tensors.Add(new(s.Name + ".exp_avg", s.ExpAvg));
            tensors.Add(new(s.Name + ".exp_avg_sq", s.ExpAvgSq));
            if (s.Master is not null) tensors.Add(new(s.Name + ".master", s.Master));
        }
        SafetensorsWriter.Write(path, tensors, new Dictionary<string, string> { ["step"] = Step.ToString(), ["format"] = "pt" });
    }

    public void Load(string path)
    {
        using var file = SafetensorsFile.Open(path);
        using var noGrad = torch.no_grad();
        foreach (var s in _slots)
        {
            foreach (var (suffix, target) in new[] { (".exp_avg", s.ExpAvg), (".exp_avg_sq", s.ExpAvgSq), (".master", s.Master) })
            {
                if (target is null) continue;
                if (!file.Tensors.ContainsKey(s.Name + suffix)) throw new CheckpointException($"{path}: optimizer state lacks '{s.Name + suffix}' (saved for other trainable parameters?)");
                using var t = file.Load(s.Name + suffix);
                if (!t.shape.SequenceEqual(target.shape)) throw new CheckpointException($"{path}: '{s.Name + suffix}' has shape [{string.Join(",", t.shape)}], expected [{string.Join(",", target.shape)}]");
                target.copy_(t);
            }
        }
        Step = file.Metadata.TryGetValue("step", out var step) ? long.Parse(step) : throw new CheckpointException($"{path}: no step in the metadata");
        int expected = _slots.Sum(s => s.Master is null ? 2 : 3);
        if (file.Tensors.Count != expected) throw new CheckpointException($"{path}: holds {file.Tensors.Count} tensors, the trainable parameters need {expected}");
    }

    public void Dispose()
    {
        foreach (var s in _slots) { s.ExpAvg.Dispose(); s.ExpAvgSq.Dispose(); s.Master?.Dispose(); }
    }
}

/// <summary>Learning rate per optimizer step: linear warm-up from 0, then constant (finetune.py) or cosine decay to
/// <see cref="MinRatio"/>·peak at <see cref="TotalSteps"/>.</summary>
public sealed record LearningRateSchedule(string Kind, double Peak, int WarmupSteps, int TotalSteps, double MinRatio = 0.0)
{
    public static IReadOnlyList<string> Kinds => ["constant", "cosine"];

    /// <summary>The rate for the update numbered <paramref name="step"/> (0-based).</summary>
    public double At(long step)
    {
        if (WarmupSteps > 0 && step < WarmupSteps) return Peak * (step + 1) / WarmupSteps;
        if (Kind == "constant") return Peak;
        long decay = Math.Max(1, TotalSteps - WarmupSteps);
        double progress = Math.Clamp((double)(step - WarmupSteps) / decay, 0, 1);
        return Peak * (MinRatio + (1 - MinRatio) * 0.5 * (1 + Math.Cos(Math.PI * progress)));
    }
}
