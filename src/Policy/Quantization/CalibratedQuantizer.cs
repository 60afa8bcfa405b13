using OpenVLA.Policy.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Quantization;

/// <summary>One layer of a calibrated quantization: how many input rows it saw and its relative output error on them
/// (<see cref="Gptq.RelativeOutputError"/>) with round-to-nearest and with GPTQ.</summary>
public sealed record CalibratedLayer(string Name, QuantMode Mode, long Rows, double RoundToNearestError, double GptqError);

/// <summary>What <see cref="CalibratedQuantizer.Run"/> produced: the quantized weights by checkpoint tensor name.</summary>
public sealed record CalibrationResult(IReadOnlyDictionary<string, PortableQuantized> Weights, IReadOnlyList<CalibratedLayer> Layers,
    int Observations, int Passes);

/// <summary>
/// Calibrated (GPTQ) quantization of a checkpoint: runs the float model on calibration observations, collects each
/// covered linear layer's input second moment, and quantizes every such layer with <see cref="Gptq"/>. The second
/// moments are those of the float model (every layer sees float inputs), not the sequential variant in which later
/// layers see the already-quantized earlier ones. Layers are taken in groups whose float64 [K, K] accumulators fit
/// <paramref name="hessianBudgetBytes"/>, one pass over the observations per group: the default model needs one pass;
/// openvla-7b (~22 GB of accumulators over its 32 decoder layers) about six at the default 4 GB. Observations run in
/// batches of <paramref name="batchSize"/>, so the few left-padding positions of a batch's shorter prompts are counted too.
/// </summary>
public static class CalibratedQuantizer
{
    public static CalibrationResult Run(string checkpointDir, IReadOnlyList<VlaObservation> observations, QuantizationOptions options,
        double damp = 0.01, bool actOrder = false, long hessianBudgetBytes = 4L << 30, string device = "cpu", int batchSize = 8, IProgress<double>? progress = null)
    {
        if (options.Mode == QuantMode.None) throw new PolicyInputException("choose int8 or int4 to quantize");
        if (observations.Count == 0) throw new PolicyInputException("calibration needs at least one observation");
        if (damp is <= 0 or > 1) throw new PolicyInputException($"the GPTQ damping must be in (0, 1], got {damp}");
        // The float model in f32, decoding greedily: the decoded tokens feed the language model's later positions.
        using var policy = VlaPolicy.Load(checkpointDir, new PolicyOptions { DType = "f32", Decoding = "greedy", Device = device });
        if (policy.Checkpoint.Config.StoredQuantization is not null) throw new PolicyInputException($"{checkpointDir} is already quantized; calibrate its float checkpoint");
        var linears = policy.Model.named_modules().Where(m => m.module is Linear && options.Covers(m.name + "."))
            .Select(m => (Name: m.name + ".weight", Layer: (Linear)m.module)).ToList();

        var groups = new List<List<(string Name, Linear Layer)>>();
        long used = 0;
        foreach (var l in linears)
        {
            long bytes = l.Layer.InFeatures * l.Layer.InFeatures * 8;
            if (groups.Count == 0 || (used + bytes > hessianBudgetBytes && groups[^1].Count > 0)) { groups.Add([]); used = 0; }
            groups[^1].Add(l);
            used += bytes;
        }

        var weights = new Dictionary<string, PortableQuantized>();
        var report = new List<CalibratedLayer>();
        double steps = groups.Count * observations.Count + linears.Count, done = 0;
        foreach (var group in groups)
        {
            var accumulators = group.Select(l => new HessianAccumulator(l.Layer.InFeatures, policy.Device)).ToList();
            try
            {
                for (int i = 0; i < group.Count; i++) { var acc = accumulators[i]; group[i].Layer.InputObserver = acc.Add; }
                foreach (var batch in observations.Chunk(batchSize))
                {
                    policy.PredictBatch(batch);
                    progress?.Report((done += batch.Length) / steps);
                }
            }
            finally { foreach (var l in group) l.Layer.InputObserver = null; }

            for (int i = 0; i < group.Count; i++)
            {
                using var scope = NewDisposeScope();
                var (name, layer) = group[i];
                var acc = accumulators[i];
                // A layer inference never reaches (the towers' blocks past the feature layer) sees no rows; the checkpoint
                // writer leaves such weights as they are.
                if (acc.Rows > 0)
                {
                    var h = acc.Mean();
                    var w = layer.weight.detach();
                    var mode = options.ModeFor(w.shape[0], w.shape[1]);
                    var gptq = Gptq.Quantize(w, h, mode, options.GroupSize, options.SearchRange, damp, actOrder: actOrder);
                    var rtn = WeightQuantizer.Quantize(w, mode, options.GroupSize, options.SearchRange);
                    report.Add(new CalibratedLayer(name, mode, acc.Rows,
                        Gptq.RelativeOutputError(w, WeightQuantizer.Dequantize(rtn), h), Gptq.RelativeOutputError(w, WeightQuantizer.Dequantize(gptq), h)));
                    if (gptq.Q.device_type != DeviceType.CPU) gptq = gptq with { Q = gptq.Q.cpu(), Scale = gptq.Scale.cpu(), Zero = gptq.Zero?.cpu() };
                    gptq.Q.MoveToOuterDisposeScope(); gptq.Scale.MoveToOuterDisposeScope(); gptq.Zero?.MoveToOuterDisposeScope();
                    weights[name] = gptq;
                }
                acc.Dispose();
                progress?.Report(++done / steps);
            }
        }
        return new CalibrationResult(weights, report, observations.Count, groups.Count);
    }
}
