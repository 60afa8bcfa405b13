using System.Diagnostics;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Preprocessing;
using OpenVLA.Policy.Quantization;
using OpenVLA.Policy.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy;

/// <summary>How to load a policy. Device is a TorchSharp device string ("cpu", "cuda", "cuda:1"): with the
/// TorchSharp-cuda-linux package referenced instead of TorchSharp-cpu, "cuda" runs on the GPU with no other change.</summary>
public sealed record PolicyOptions
{
    public string Device { get; init; } = "cpu";
    /// <summary>Compute and weight precision: "f32" or "bf16"; null = f32, or bf16 when quantized (the int8/int4
    /// kernels take bf16 activations).</summary>
    public string? DType { get; init; }
    /// <summary>Weight-only quantization applied at load: "none", "int8" or "int4" (a pre-quantized checkpoint keeps its own).</summary>
    public string Quantize { get; init; } = "none";
    /// <summary>int4 group size (32, 64, 128 or 256).</summary>
    public int GroupSize { get; init; } = 128;
    /// <summary>Quantize the vision towers too (default) or keep them in the compute precision.</summary>
    public bool QuantizeVision { get; init; } = true;
    /// <summary>int4: search each group's range (default) or take its min–max; see <see cref="Quantization.QuantizationOptions.SearchRange"/>.</summary>
    public bool Int4RangeSearch { get; init; } = true;
    /// <summary>Evaluation-time center crop (area 0.9, resized back) for checkpoints trained with image augmentation.</summary>
    public bool CenterCrop { get; init; }
    /// <summary>Intra-op threads for CPU inference; null keeps TorchSharp's default (one per core).</summary>
    public int? Threads { get; init; }
    /// <summary>A PEFT LoRA adapter directory (as `finetune` writes it) folded into the float base at load, before any
    /// quantization; its dataset_statistics.json, when present, replaces the base's statistics.</summary>
    public string? Adapter { get; init; }
    /// <summary>How action tokens become an action, in <see cref="ActionDecoding.Syntax"/>; null = what the checkpoint's
    /// generation_config.json states (greedy, the reference, when it states no sampling).</summary>
    public string? Decoding { get; init; }

    /// <summary>The parsed <see cref="Decoding"/> (null when the checkpoint decides).</summary>
    public ActionDecoding? ActionDecoding => Decoding is null ? null : OpenVLA.Policy.ActionDecoding.Parse(Decoding);

    public Quantization.QuantizationOptions Quantization => OpenVLA.Policy.Quantization.QuantizationOptions.Parse(Quantize, GroupSize, QuantizeVision, Int4RangeSearch);

    public ScalarType ScalarType => DType switch
    {
        null => Quantize == "none" ? ScalarType.Float32 : ScalarType.BFloat16,
        // Quantized with f32 activations runs the kernels' exact scalar path: a reference, 10–20× slower than bf16.
        "f32" or "float32" => ScalarType.Float32,
        "bf16" or "bfloat16" => ScalarType.BFloat16,
        _ => throw new PolicyInputException($"unknown dtype '{DType}' (valid: f32, bf16)"),
    };

}

/// <summary>
/// An OpenVLA policy loaded from a Hugging Face checkpoint directory: frame(s) + instruction → 7-D action, following the
/// reference predict_action (openvla-model.md §3.2): prompt with the lone "▁" appended, image tokens right after BOS,
/// greedy decoding (or another <see cref="ActionDecoding"/>) of action_dim tokens with a KV cache, bin-centre de-tokenization, q01/q99 un-normalization.
/// Several observations run as one batch: prompts are left-padded so all rows decode in lock-step.
/// </summary>
public sealed class VlaPolicy : IActionPolicy, IDisposable
{
    readonly object _gate = new();
    readonly ImagePreprocessor _preprocessor;
    readonly Generator? _sampler;
    readonly Tensor _binCentres;   // [NumBins] f32: the normalized value of action token FirstActionId + j

    public VlaCheckpoint Checkpoint { get; }
    public OpenVlaModel Model { get; }
    public VlaTokenizer Tokenizer { get; }
    public ActionTokenizer ActionTokenizer { get; }
    public PolicyOptions Options { get; }
    public LoadReport LoadReport { get; }
    public PolicyDescription Description { get; }
    public Device Device { get; }
    /// <summary>The decoding rule in force: the options' --decode, else the checkpoint's generation_config.json.</summary>
    public ActionDecoding Decoding { get; }

    VlaPolicy(VlaCheckpoint checkpoint, OpenVlaModel model, VlaTokenizer tokenizer, PolicyOptions options, LoadReport report, Device device)
    {
        Checkpoint = checkpoint; Model = model; Tokenizer = tokenizer; Options = options; LoadReport = report; Device = device;
        ActionTokenizer = new ActionTokenizer(checkpoint.Config.TokenizerVocabSize, checkpoint.Config.NActionBins);
        Decoding = options.ActionDecoding ?? ActionDecoding.FromGenerationConfig(Path.Combine(checkpoint.Directory, "generation_config.json"));
        _binCentres = tensor(Enumerable.Range(0, ActionTokenizer.NumBins).Select(j => (float)ActionTokenizer.Decode(ActionTokenizer.FirstActionId + j)).ToArray(), device: device);
        if (Decoding.Mode == DecodingMode.Sample) _sampler = new Generator((ulong)Decoding.Seed, torch.CPU);   // probabilities are sampled on the CPU
        _preprocessor = new ImagePreprocessor(File.Exists(checkpoint.PreprocessorConfigPath)
            ? PreprocessorConfig.Load(checkpoint.PreprocessorConfigPath)
            : PreprocessorConfig.CreateDefault(checkpoint.Config.ImageSize));
        var (h, w) = _preprocessor.Config.OutputSize;
        if (h != checkpoint.Config.ImageSize || w != checkpoint.Config.ImageSize)
            throw new CheckpointException($"{checkpoint.PreprocessorConfigPath}: output size {h}x{w} differs from config.json image_sizes {checkpoint.Config.ImageSize}");
        Description = new PolicyDescription(
            ModelId: Path.GetFileName(Path.GetFullPath(checkpoint.Directory).TrimEnd('/')),
            Architecture: "OpenVLAForActionPrediction",
            ActionDim: checkpoint.NormStats.Values.FirstOrDefault()?.Q01.Length ?? 7,
            ImageSize: checkpoint.Config.ImageSize,
            ImagesPerObservation: 1,
            ResizeStrategy: checkpoint.Config.ImageResizeStrategy,
            Precision: model.Precision.DType == ScalarType.Float32 ? "f32" : "bf16",
            Quantization: checkpoint.Config.StoredQuantization?.Name ?? options.Quantization.Name,
            UnnormStats: checkpoint.NormStats);
    }

    public static VlaPolicy Load(string checkpointDir, PolicyOptions? options = null) => Create(checkpointDir, options, randomSeed: null);

    /// <summary>A policy of the directory's architecture with random weights built in place (no safetensors needed):
    /// benchmarks of the 7B architecture use this, since the real weights are not available.</summary>
    public static VlaPolicy CreateWithRandomWeights(string metadataDir, PolicyOptions? options, int seed) => Create(metadataDir, options, seed);

    static VlaPolicy Create(string checkpointDir, PolicyOptions? options, int? randomSeed)
    {
        options ??= new PolicyOptions();
        _ = options.ActionDecoding;   // a bad decoding fails before the weights are read
        if (options.Threads is int n) torch.set_num_threads(n);
        var checkpoint = VlaCheckpoint.Open(checkpointDir, requireWeights: randomSeed is null);
        var tokenizer = VlaTokenizer.Load(checkpoint.TokenizerPath);
        if (tokenizer.VocabSize != checkpoint.Config.TokenizerVocabSize)
            throw new CheckpointException($"{checkpointDir}: tokenizer.model has {tokenizer.VocabSize} pieces but config.json implies {checkpoint.Config.TokenizerVocabSize} (text vocab_size − pad_to_multiple_of)");
        Device device;
        try { device = torch.device(options.Device); }
        catch (Exception e) { throw new PolicyInputException($"unknown device '{options.Device}' ({e.Message.ReplaceLineEndings(" ")})"); }
        var dtype = checkpoint.Config.StoredQuantization is null ? options.ScalarType : ScalarType.BFloat16;
        var model = new OpenVlaModel(checkpoint.Config, new ModelPrecision(dtype, device));
        try
        {
            LoadReport report;
            if (randomSeed is int seed)
            {
                RandomInit.Fill(model, seed, options.Quantization);
                report = new LoadReport([], [], 0);
            }
            else if (options.Adapter is string adapterDir) (report, checkpoint) = LoadWithAdapter(model, checkpoint, adapterDir, options.Quantization);
            else report = WeightLoader.Load(model, checkpoint, options.Quantization);
            model.eval();
            return new VlaPolicy(checkpoint, model, tokenizer, options, report, device);
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>Float base, then the adapter merged in (W + (alpha/r)·B·A, rounded once to the model precision), then the
    /// requested quantization of the merged weights — the same model `merge` followed by a quantized load gives.</summary>
    static (LoadReport, VlaCheckpoint) LoadWithAdapter(OpenVlaModel model, VlaCheckpoint checkpoint, string adapterDir, QuantizationOptions quantization)
    {
        if (checkpoint.Config.StoredQuantization is not null)
            throw new PolicyInputException($"{checkpoint.Directory} is pre-quantized; an adapter needs the float base (quantize with --quantize after merging)");
        var report = WeightLoader.Load(model, checkpoint, QuantizationOptions.None);
        PeftAdapter.Load(adapterDir, model);
        PeftAdapter.MergeAll(model);
        if (quantization.Mode != QuantMode.None)
            foreach (var (name, module) in model.named_modules())
                if (module is Linear lin && quantization.Covers(name + ".")) lin.Quantize(quantization);
        var statsPath = Path.Combine(adapterDir, "dataset_statistics.json");
        return (report, File.Exists(statsPath) ? checkpoint.WithNormStats(NormStats.Load(statsPath)) : checkpoint);
    }

    /// <summary>Resident bytes of weights per component (vision_backbone, projector, language_model).</summary>
    public IReadOnlyDictionary<string, long> WeightBytesByComponent() => WeightMemory.ByComponent(Model);

    public ActionPrediction Predict(VlaObservation observation) => PredictBatch([observation])[0];

    public IReadOnlyList<ActionPrediction> PredictBatch(IReadOnlyList<VlaObservation> observations, CancellationToken cancellationToken = default)
    {
        if (observations.Count == 0) return [];
        // Validate everything before any compute, so one bad observation fails fast with its own message.
        var keys = observations.Select(o => Checkpoint.ResolveUnnormKey(o.UnnormKey)).ToArray();
        var prompts = observations.Select(o => Tokenizer.PromptIds(o.Instruction)).ToArray();
        int actionDim = Checkpoint.NormStats[keys[0]].Q01.Length;
        if (keys.Any(k => Checkpoint.NormStats[k].Q01.Length != actionDim))
            throw new PolicyInputException("observations of one batch must use statistics with the same action dimension");
        foreach (var o in observations)
            if (o.Images.Count != 1) throw new PolicyInputException($"the model takes 1 image per observation, got {o.Images.Count}");

        lock (_gate)
        {
            using var inference = torch.inference_mode();
            using var scope = NewDisposeScope();
            var total = Stopwatch.StartNew();
            var sw = Stopwatch.StartNew();
            var pixels = _preprocessor.PreprocessBatch(observations.Select(o => o.Images[0]).ToList(), Options.CenterCrop, Device, Model.Precision.DType);
            double preprocessMs = Lap(sw);

            var patches = Model.EncodeImages(pixels);
            SyncDevice();
            double visionMs = Lap(sw);
            cancellationToken.ThrowIfCancellationRequested();

            var (tokens, values, prefillMs, decodeMs) = Generate(patches, prompts, actionDim);
            var timings = new StageTimings(preprocessMs, visionMs, prefillMs, decodeMs, total.Elapsed.TotalMilliseconds);

            var results = new ActionPrediction[observations.Count];
            for (int b = 0; b < results.Length; b++)
            {
                var normalized = values?[b] ?? tokens[b].Select(id => ActionTokenizer.Decode(id)).ToArray();
                var action = ActionNormalizer.Unnormalize(normalized, Checkpoint.NormStats[keys[b]]);
                results[b] = new ActionPrediction(action, normalized.Select(v => (float)v).ToArray(), tokens[b], prompts[b], keys[b], timings);
            }
            return results;
        }
    }

    /// <summary>Prefill [BOS, image tokens, prompt…] for every row (left-padded to a common length), then decoding of one
    /// token per action dimension by the policy's <see cref="ActionDecoding"/>. Values is null for greedy (the caller
    /// takes bin centres of the tokens); for expected decoding it holds each dimension's mean over the bin centres.</summary>
    (int[][] Tokens, double[][]? Values, double PrefillMs, double DecodeMs) Generate(Tensor patches, int[][] prompts, int steps)
    {
        var lm = Model.language_model;
        int batch = prompts.Length, numPatches = (int)patches.shape[1];
        int[] lengths = prompts.Select(p => p.Length + numPatches).ToArray();
        int maxLen = lengths.Max();
        long[] pads = lengths.Select(l => (long)(maxLen - l)).ToArray();
        var sw = Stopwatch.StartNew();

        var rows = new List<Tensor>();
        for (int b = 0; b < batch; b++)
        {
            var ids = tensor(prompts[b].Select(i => (long)i).ToArray(), device: Device).view(1, -1);
            var emb = lm.Embed(ids);                                       // [1, T, H]
            var parts = new List<Tensor>();
            if (pads[b] > 0) parts.Add(zeros([1, pads[b], emb.shape[2]], emb.dtype, Device));
            parts.Add(emb.narrow(1, 0, 1));                                // BOS
            parts.Add(patches.narrow(0, b, 1));                            // image tokens right after BOS
            parts.Add(emb.narrow(1, 1, emb.shape[1] - 1));                 // the rest of the prompt
            rows.Add(cat(parts, 1));
        }
        var inputs = cat(rows, 0);
        using var cache = lm.NewCache(batch, maxLen + steps, pads);
        var hidden = lm.Step(inputs, cache);
        var tokens = new int[batch][];
        for (int b = 0; b < batch; b++) tokens[b] = new int[steps];
        double[][]? values = Decoding.Mode == DecodingMode.Expected ? Enumerable.Range(0, batch).Select(_ => new double[steps]).ToArray() : null;
        var next = Choose(lm.Logits(hidden.narrow(1, maxLen - 1, 1)), tokens, values, 0);   // [B, 1]
        double prefillMs = Lap(sw);
        for (int s = 1; s < steps; s++)
        {
            using var stepScope = NewDisposeScope();
            var h = lm.Step(lm.Embed(next), cache);
            next = Choose(lm.Logits(h), tokens, values, s).MoveToOuterDisposeScope();
        }
        double decodeMs = Lap(sw);
        return (tokens, values, prefillMs, decodeMs);
    }

    /// <summary>The token each row feeds back for action dimension <paramref name="step"/> (recorded in tokens), and for
    /// expected decoding that dimension's mean normalized value. logits: [B, 1, V'] (V' may include padding ids).</summary>
    Tensor Choose(Tensor logits, int[][] tokens, double[][]? values, int step)
    {
        Tensor next;
        if (Decoding.Mode == DecodingMode.Greedy) next = logits.argmax(-1);
        else
        {
            var action = logits.narrow(-1, ActionTokenizer.FirstActionId, ActionTokenizer.NumBins).squeeze(1).to(ScalarType.Float32);   // [B, bins]
            if (Decoding.Mode == DecodingMode.Expected)
            {
                next = logits.argmax(-1);
                var mean = (softmax(action, -1) * _binCentres).sum(-1).cpu().data<float>().ToArray();
                for (int b = 0; b < values!.Length; b++) values[b][step] = mean[b];
            }
            else if (Decoding.GreedyGripper && step == tokens[0].Length - 1) next = logits.argmax(-1);   // the gripper, last
            else next = Sample(logits.squeeze(1));
        }
        Record(next, tokens, step);
        return next;
    }

    /// <summary>One token per row, as Hugging Face samples (its TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in
    /// that order, then multinomial), over the whole vocabulary. logits: [B, V'] → [B, 1] token ids.</summary>
    Tensor Sample(Tensor logits)
    {
        // Scalars held by using-locals, not converted implicitly inside the calls (see KeptScalars): with implicit ones a
        // DAgger recording worker died once of "INTERNAL ASSERT FAILED at Scalar.h" in about 200 k sampled tokens.
        using var temperature = Decoding.Temperature.ToScalar();
        using var minusInfinity = double.NegativeInfinity.ToScalar();
        using var dropBelow = (1.0 - Decoding.TopP).ToScalar();
        using var keep = false.ToScalar();
        var scores = logits.to(ScalarType.Float32).cpu().div(temperature);
        if (Decoding.TopK > 0 && Decoding.TopK < scores.shape[1])
        {
            var kth = scores.topk(Decoding.TopK, -1).values.narrow(1, Decoding.TopK - 1, 1);   // [B, 1]
            scores = scores.masked_fill(scores.lt(kth), minusInfinity);
        }
        if (Decoding.TopP < 1.0)
        {
            // Sort ascending; drop the tokens whose cumulative probability stays at or below 1 − top_p, always keeping the top one.
            var (sorted, order) = scores.sort(-1, descending: false);
            var cumulative = softmax(sorted, -1).cumsum(-1);
            var drop = cumulative.le(dropBelow);
            drop.narrow(1, drop.shape[1] - 1, 1).fill_(keep);
            scores = scores.masked_fill(drop.scatter(1, order, drop), minusInfinity);
        }
        return multinomial(softmax(scores, -1), 1, generator: _sampler).to(Device);
    }

    static void Record(Tensor next, int[][] tokens, int step)
    {
        var ids = next.cpu().data<long>().ToArray();
        for (int b = 0; b < tokens.Length; b++) tokens[b][step] = (int)ids[b];
    }

    void SyncDevice()
    {
        if (Device.type == DeviceType.CUDA) torch.cuda.synchronize(Device);
    }

    static double Lap(Stopwatch sw)
    {
        double ms = sw.Elapsed.TotalMilliseconds;
        sw.Restart();
        return ms;
    }

    public void Dispose()
    {
        Model.Dispose();
        _binCentres.Dispose();
        _sampler?.Dispose();
    }
}
