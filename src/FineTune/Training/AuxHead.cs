using OpenVLA.FineTune.Data;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace OpenVLA.FineTune.Training;

/// <summary>
/// The auxiliary head of <see cref="TrainerOptions.AuxWeight"/>: one linear map from all projected image tokens (flattened,
/// P·H inputs) to the standardized aux targets, scored by mean squared error. It gives the vision towers and projector a
/// direct, dense signal — where the gripper and objects are — from the first step, which the action loss alone delivers
/// only after the decoder has learned to look (the instruction-only plateau, docs/benchmarks.md). Kept in float32, saved
/// with the training state, never exported.
/// </summary>
public sealed class AuxHead : IDisposable
{
    /// <summary>Added to each target's std so constant targets (e.g. an unused rotation) standardize to 0, not to noise ÷ 0.</summary>
    public const float StdFloor = 1e-3f;

    readonly Parameter _weight, _bias;
    readonly Tensor _mean, _std;

    public int InputSize { get; }
    public int TargetSize { get; }
    public IEnumerable<(string Name, Parameter Parameter)> Parameters => [("aux_head.weight", _weight), ("aux_head.bias", _bias)];

    public AuxHead(int inputSize, ArrayStatistics statistics, ulong seed, Device device)
    {
        InputSize = inputSize;
        TargetSize = statistics.Dim;
        // Its own generator: turning the head on does not change the draws of the rest of the run.
        var gen = new Generator(seed + 99);
        using (torch.no_grad())
        {
            _weight = new Parameter(randn([TargetSize, inputSize], generator: gen).mul_(1.0 / Math.Sqrt(inputSize)).to(device), true);
            _bias = new Parameter(zeros([TargetSize], device: device), true);
        }
        _mean = tensor(statistics.Mean, [1, TargetSize], device: device).DetachFromDisposeScope();
        _std = tensor(statistics.Std.Select(s => s + StdFloor).ToArray(), [1, TargetSize], device: device).DetachFromDisposeScope();
    }

    /// <summary>Mean squared error over batch and targets (a scalar with the graph) of the head on <paramref name="patches"/> [B, P, H].</summary>
    public Tensor Loss(Tensor patches, IReadOnlyList<TrainingExample> examples)
    {
        if (patches.shape[1] * patches.shape[2] != InputSize)
            throw new ArgumentException($"aux head expects {InputSize} inputs per example, got [{string.Join(", ", patches.shape)}]");
        var values = new float[examples.Count * TargetSize];
        for (int i = 0; i < examples.Count; i++)
        {
            var aux = examples[i].Aux ?? throw new InvalidOperationException("a training example has no aux targets (the dataset config names no aux_keys?)");
            if (aux.Length != TargetSize) throw new InvalidOperationException($"a training example has {aux.Length} aux targets, the head {TargetSize}");
            aux.CopyTo(values, i * TargetSize);
        }
        var target = (tensor(values, [examples.Count, TargetSize], device: _weight.device) - _mean) / _std;
        var prediction = nn.functional.linear(patches.reshape(patches.shape[0], -1).to(ScalarType.Float32), _weight, _bias);
        return (prediction - target).pow(2).mean();
    }

    public void Save(string path) =>
        SafetensorsWriter.Write(path, [new("aux_head.weight", _weight), new("aux_head.bias", _bias)]);

    public void Load(string path)
    {
        if (!File.Exists(path)) throw new CheckpointException($"{path} is missing: the checkpoint was saved without an aux head");
        using var file = SafetensorsFile.Open(path);
        using var noGrad = torch.no_grad();
        foreach (var (name, target) in Parameters)
        {
            if (!file.Tensors.ContainsKey(name)) throw new CheckpointException($"{path}: '{name}' is missing");
            using var t = file.Load(name);
            if (!t.shape.SequenceEqual(target.shape))
                throw new CheckpointException($"{path}: '{name}' has shape [{string.Join(",", t.shape)}], expected [{string.Join(",", target.shape)}] (other aux targets or model size?)");
            target.copy_(t);
        }
    }

    public void Dispose() { _weight.Dispose(); _bias.Dispose(); _mean.Dispose(); _std.Dispose(); }
}
