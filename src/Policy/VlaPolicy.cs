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

    /// <summary>OpenVLA-OFT: actions per chunk, overriding config.json and the platform constants (null: not stated).</summary>
    public int? ActionChunk { get; init; }
    /// <summary>OpenVLA-OFT: cameras per observation, overriding config.json and the platform constants.</summary>
    public int? NumImages { get; init; }

    public OftOverrides Oft => new(ActionChunk, NumImages);

    /// <summary>The parsed <see cref="Decoding"/> (null when the checkpoint decides).</summary>
    public ActionDecoding? ActionDecoding => Decoding is null ? null : OpenVLA.Policy.ActionDecoding.Parse(Decoding);

    public Quantization.QuantizationOptions Quantization => OpenVLA.Policy.Quantization.QuantizationOptions.Parse(Quantize, GroupSize, QuantizeVision, Int4RangeSearch);

    // Quantized with f32 activations runs the kernels' exact scalar path: a reference, 10–20× slower than bf16.
    public ScalarType ScalarType => DType is null ? (Quantize == "none" ? ScalarType.Float32 : ScalarType.BFloat16) : ParseDType(DType);

    /// <summary>A TorchSharp device string ("cpu", "cuda", "cuda:1") → the device; anything else is the user's error.</summary>
    public static Device ParseDevice(string name)
    {
        try { return torch.device(name); }
        catch (Exception e) { throw new PolicyInputException($"unknown device '{name}' ({e.Message.ReplaceLineEndings(" ")})"); }
    }

    /// <summary>"f32"/"float32" or "bf16"/"bfloat16" → the TorchSharp type; anything else is the user's error.</summary>
    public static ScalarType ParseDType(string name) => name switch
    {
        "f32" or "float32" => ScalarType.Float32,
        "bf16" or "bfloat16" => ScalarType.BFloat16,
        _ => throw new PolicyInputException($"unknown dtype '{name}' (valid: f32, bf16)"),
    };

}

/// <summary>
/// An OpenVLA or OpenVLA-OFT policy loaded from a checkpoint directory: frame(s) (+ proprio) + instruction → a chunk of
/// actions. The action head is a strategy chosen by the checkpoint's files:
/// <list type="bullet">
/// <item>autoregressive tokens (OpenVLA, openvla-model.md §3.2): prompt with the lone "▁" appended, image tokens right
/// after BOS, greedy decoding (or another <see cref="ActionDecoding"/>) of action_dim tokens with a KV cache, bin-centre
/// de-tokenization, q01/q99 un-normalization — a chunk of one. Rows of a batch are left-padded to decode in lock-step.</item>
/// <item>parallel L1 regression (OpenVLA-OFT, docs/oft.md): one bidirectional pass over the prompt, placeholders for the
/// whole chunk and the stop token; an MLP-ResNet reads the chunk from the final hidden states; OFT un-normalization.
/// Rows are right-padded.</item>
/// <item>parallel discrete tokens (OpenVLA-OFT without a head file, config.json's oft.action_head "discrete"): the same
/// pass, lm_head's argmax at the same positions, OpenVLA's bins, OFT un-normalization.</item>
/// </list>
/// </summary>
public sealed class VlaPolicy : IActionPolicy, IDisposable
{
    readonly object _gate = new();
    readonly Generator? _sampler;
    readonly Tensor _binCentres;   // [NumBins] f32: the normalized value of action token FirstActionId + j
    readonly OftSpec? _oft;

    public VlaCheckpoint Checkpoint { get; }
    public OpenVlaModel Model { get; }
    public VlaTokenizer Tokenizer { get; }
    public ActionTokenizer ActionTokenizer => Core.ActionTokenizer;
    /// <summary>Everything before and after the network, in plain arrays (shared with any other backend).</summary>
    public PolicyCore Core { get; }
    public PolicyOptions Options { get; }
    public LoadReport LoadReport { get; }
    public PolicyDescription Description { get; }
    public Device Device { get; }
    /// <summary>The decoding rule in force: the options' --decode, else the checkpoint's generation_config.json.</summary>
    public ActionDecoding Decoding { get; }

    VlaPolicy(VlaCheckpoint checkpoint, OpenVlaModel model, VlaTokenizer tokenizer, PolicyOptions options, LoadReport report, Device device)
    {
        Checkpoint = checkpoint; Model = model; Tokenizer = tokenizer; Options = options; LoadReport = report; Device = device;
        _oft = model.Oft;
        Core = new PolicyCore(checkpoint, tokenizer, ImagePreprocessor.ForCheckpoint(checkpoint), _oft);
        Decoding = options.ActionDecoding ?? ActionDecoding.FromGenerationConfig(Path.Combine(checkpoint.Directory, "generation_config.json"));
        _binCentres = tensor(Enumerable.Range(0, ActionTokenizer.NumBins).Select(j => (float)ActionTokenizer.Decode(ActionTokenizer.FirstActionId + j)).ToArray(), device: device);
        if (Decoding.Mode == DecodingMode.Sample) _sampler = new Generator((ulong)Decoding.Seed, torch.CPU);   // probabilities are sampled on the CPU
        Description = new PolicyDescription(
            ModelId: Path.GetFileName(Path.GetFullPath(checkpoint.Directory).TrimEnd('/')),
            Architecture: _oft is null ? "OpenVLAForActionPrediction" : "OpenVLAForActionPrediction+OFT",
            ActionDim: _oft?.ActionDim ?? checkpoint.NormStats.Values.FirstOrDefault()?.Q01.Length ?? 7,
            ImageSize: checkpoint.Config.ImageSize,
            ImagesPerObservation: _oft?.NumImages ?? 1,
            ResizeStrategy: checkpoint.Config.ImageResizeStrategy,
            Precision: model.Precision.DType == ScalarType.Float32 ? "f32" : "bf16",
            Quantization: checkpoint.Config.StoredQuantization?.Name ?? options.Quantization.Name,
            UnnormStats: checkpoint.NormStats)
        {
            ChunkLength = _oft?.ActionChunk ?? 1,
            ProprioDim = _oft?.ProprioDim ?? 0,
            CameraNames = CameraNames(_oft?.NumImages ?? 1),
            ActionHead = _oft is null ? "autoregressive-tokens" : _oft.DiscreteTokens ? "parallel-tokens" : "parallel-l1",
        };
        if (_oft is { ProprioDim: > 0 })
            foreach (var key in checkpoint.NormStats.Keys)
                if (!checkpoint.ProprioStats.TryGetValue(key, out var ps) || ps.Q01.Length != _oft.ProprioDim)
                    throw new CheckpointException($"{checkpoint.Directory}: the model takes a {_oft.ProprioDim}-D proprio but the statistics of '{key}' have {(ps is null ? "no proprio entry" : $"{ps.Q01.Length} proprio dims")}");
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
        var device = PolicyOptions.ParseDevice(options.Device);
        var dtype = checkpoint.Config.StoredQuantization is null ? options.ScalarType : ScalarType.BFloat16;
        OftWeights? oftWeights = null;
        OftSpec? oft;
        if (randomSeed is null)
        {
            oftWeights = OftWeights.Read(checkpointDir, checkpoint.Config, checkpoint.NormStats.Keys, options.Oft);
            oft = oftWeights?.Spec;
        }
        else oft = checkpoint.Config.Raw["oft"] is not null ? OftSpec.FromConfigBlock(checkpointDir, checkpoint.Config, checkpoint.NormStats.Keys, options.Oft) : null;
        if (oft is { UseFilm: true } && checkpoint.Config.StoredQuantization is not null)
            throw new CheckpointException($"{checkpointDir}: a pre-quantized checkpoint cannot take a FiLM vision backbone file; quantize at load (--quantize) instead");
        var model = new OpenVlaModel(checkpoint.Config, new ModelPrecision(dtype, device), oft);
        try
        {
            LoadReport report;
            if (randomSeed is int seed)
            {
                RandomInit.Fill(model, seed, options.Quantization);
                report = new LoadReport([], [], 0);
            }
            else (report, checkpoint) = LoadWeights(model, checkpoint, oftWeights, options);
            model.eval();
            return new VlaPolicy(checkpoint, model, tokenizer, options, report, device);
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>The safetensors (quantized as each weight is read where that is final), then openvla-oft's component
    /// files, then a LoRA adapter merged in (W + (alpha/r)·B·A, rounded once to the model precision), then quantization
    /// of what could not be quantized at read: the same model `merge` followed by a quantized load gives.</summary>
    static (LoadReport, VlaCheckpoint) LoadWeights(OpenVlaModel model, VlaCheckpoint checkpoint, OftWeights? oft, PolicyOptions options)
    {
        var quantization = options.Quantization;
        if (options.Adapter is not null && checkpoint.Config.StoredQuantization is not null)
            throw new PolicyInputException($"{checkpoint.Directory} is pre-quantized; an adapter needs the float base (quantize with --quantize after merging)");
        // A layer a later file changes is read in float and quantized at the end.
        var atRead = options.Adapter is not null ? QuantizationOptions.None
            : oft?.VisionBackbone is not null ? quantization with { IncludeVision = false } : quantization;
        var report = WeightLoader.Load(model, checkpoint, atRead, oft is null ? null : OpenVlaModel.IsOftComponent);
        if (oft is not null)
        {
            var unused = new List<string>(report.Unused);
            oft.Fill(model, unused);
            report = report with { Unused = unused };
        }
        if (options.Adapter is string adapterDir)
        {
            PeftAdapter.Load(adapterDir, model);
            PeftAdapter.MergeAll(model);
            var statsPath = Path.Combine(adapterDir, "dataset_statistics.json");
            if (File.Exists(statsPath)) checkpoint = checkpoint.WithStatistics(statsPath);
        }
        var final = checkpoint.Config.StoredQuantization ?? quantization;
        if (final.Mode != QuantMode.None)
            foreach (var (name, module) in model.named_modules())
                if (module is Linear { Quantized: null } lin && final.Covers(name + ".")) lin.Quantize(final);
        return (report, checkpoint);
    }

    static IReadOnlyList<string> CameraNames(int cameras) => cameras switch
    {
        1 => ["primary"],
        2 => ["primary", "wrist"],
        3 => ["primary", "left_wrist", "right_wrist"],
        _ => ["primary", .. Enumerable.Range(2, cameras - 1).Select(i => $"camera{i}")],
    };

    /// <summary>Resident bytes of weights per component (vision_backbone, projector, language_model).</summary>
    public IReadOnlyDictionary<string, long> WeightBytesByComponent() => WeightMemory.ByComponent(Model);

    public ActionPrediction Predict(VlaObservation observation) => PredictBatch([observation])[0];

    public IReadOnlyList<ActionPrediction> PredictBatch(IReadOnlyList<VlaObservation> observations, CancellationToken cancellationToken = default)
    {
        if (observations.Count == 0) return [];
        var total = Stopwatch.StartNew();
        var batch = Core.Prepare(observations, Options.CenterCrop, Description.CameraNames);   // validates before any compute
        double preprocessMs = total.Elapsed.TotalMilliseconds;
        lock (_gate)
        {
            using var inference = torch.inference_mode();
            using var scope = NewDisposeScope();
            var sw = Stopwatch.StartNew();
            var pixels = tensor(batch.Pixels, [batch.Size, 6L * batch.Cameras, batch.Height, batch.Width]).to(Model.Precision.DType, Device);
            preprocessMs += Lap(sw);
            var results = new ActionPrediction[batch.Size];
            if (_oft is null)
            {
                var patches = Model.EncodeImages(pixels);
                SyncDevice();
                double visionMs = Lap(sw);
                cancellationToken.ThrowIfCancellationRequested();
                var (tokens, values, logProbs, prefillMs, decodeMs) = Generate(patches, batch.Prompts, Core.ActionDim(batch.Keys[0]));
                var timings = new StageTimings(preprocessMs, visionMs, prefillMs, decodeMs, total.Elapsed.TotalMilliseconds);
                for (int b = 0; b < results.Length; b++)
                    results[b] = Core.FromTokens(tokens[b], values?[b], batch.Prompts[b], batch.Keys[b], timings) with { TokenLogProbs = logProbs?[b] };
                return results;
            }
            cancellationToken.ThrowIfCancellationRequested();
            var (chunks, chunkTokens, timing) = PredictChunks(pixels, batch);
            var oftTimings = new StageTimings(preprocessMs, timing.VisionMs, timing.LanguageMs, timing.HeadMs, total.Elapsed.TotalMilliseconds);
            for (int b = 0; b < results.Length; b++)
                results[b] = chunkTokens is null ? Core.FromChunk(chunks![b], batch.Prompts[b], batch.Keys[b], oftTimings)
                    : Core.FromChunkTokens(chunkTokens[b], batch.Prompts[b], batch.Keys[b], oftTimings);
            return results;
        }
    }

    /// <summary>OpenVLA-OFT: the batch's parallel ids (<see cref="PolicyCore.ParallelLayout"/>) through
    /// <see cref="OpenVlaModel.PredictChunk"/>. Returns the normalized chunks [B][chunk][A], or for the discrete variant
    /// each row's chunk·A token ids (the argmax of lm_head at the chunk's positions).</summary>
    (float[][][]? Chunks, int[][]? Tokens, (double VisionMs, double LanguageMs, double HeadMs) Timing) PredictChunks(Tensor pixels, PreparedBatch batch)
    {
        var oft = _oft!;
        var layout = Core.ParallelLayout(batch.Prompts);
        var sw = Stopwatch.StartNew();
        double visionMs = 0, languageMs = 0;
        void StageDone(string stage)
        {
            SyncDevice();
            if (stage == "vision") visionMs = Lap(sw);
            else languageMs = Lap(sw);
        }
        using var proprio = batch.Proprio is null ? null : tensor(batch.Proprio.SelectMany(p => p).ToArray(), [batch.Size, batch.Proprio[0].Length], device: Device);
        long[] shape = [batch.Size, layout.Length];
        var hidden = Model.ChunkHiddenStates(pixels, tensor(layout.Ids, shape, device: Device), tensor(layout.Placeholder, shape, device: Device),
            tensor(layout.Valid, shape, device: Device), batch.Prompts.Select(p => p.Length).ToArray(), proprio, stageDone: StageDone);
        if (oft.DiscreteTokens)
        {
            var ids = Model.language_model.Logits(hidden).argmax(-1).cpu().data<long>().ToArray();
            double tokenMs = Lap(sw);
            int per = oft.ActionChunk * oft.ActionDim;
            var tokens = Enumerable.Range(0, batch.Size).Select(b => ids.AsSpan(b * per, per).ToArray().Select(t => (int)t).ToArray()).ToArray();
            return (null, tokens, (visionMs, languageMs, tokenMs));
        }
        var values = Model.action_head!.forward(hidden).to(ScalarType.Float32).cpu().data<float>().ToArray();
        double headMs = Lap(sw);
        var result = new float[batch.Size][][];
        for (int b = 0; b < batch.Size; b++)
        {
            result[b] = new float[oft.ActionChunk][];
            for (int k = 0; k < oft.ActionChunk; k++)
                result[b][k] = values.AsSpan((b * oft.ActionChunk + k) * oft.ActionDim, oft.ActionDim).ToArray();
        }
        return (result, null, (visionMs, languageMs, headMs));
    }

    /// <summary>Prefill [BOS, image tokens, prompt…] for every row (left-padded to a common length), then decoding of one
    /// token per action dimension by the policy's <see cref="ActionDecoding"/>. Values is null for greedy (the caller
    /// takes bin centres of the tokens); for expected decoding it holds each dimension's mean over the bin centres.</summary>
    (int[][] Tokens, double[][]? Values, float[][]? LogProbs, double PrefillMs, double DecodeMs) Generate(Tensor patches, int[][] prompts, int steps)
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
            var row = OpenVlaModel.Splice(emb, patches.narrow(0, b, 1));  // BOS, image tokens, the rest of the prompt
            rows.Add(pads[b] > 0 ? cat([zeros([1, pads[b], emb.shape[2]], emb.dtype, Device), row], 1) : row);
        }
        var inputs = cat(rows, 0);
        using var cache = lm.NewCache(batch, maxLen + steps, pads);
        var hidden = lm.Step(inputs, cache);
        var tokens = new int[batch][];
        for (int b = 0; b < batch; b++) tokens[b] = new int[steps];
        double[][]? values = Decoding.Mode == DecodingMode.Expected ? Enumerable.Range(0, batch).Select(_ => new double[steps]).ToArray() : null;
        float[][]? logProbs = Decoding.Mode == DecodingMode.Sample ? Enumerable.Range(0, batch).Select(_ => new float[steps]).ToArray() : null;
        var next = Choose(lm.Logits(hidden.narrow(1, maxLen - 1, 1)), tokens, values, logProbs, 0);   // [B, 1]
        double prefillMs = Lap(sw);
        for (int s = 1; s < steps; s++)
        {
            using var stepScope = NewDisposeScope();
            var h = lm.Step(lm.Embed(next), cache);
            next = Choose(lm.Logits(h), tokens, values, logProbs, s).MoveToOuterDisposeScope();
        }
        double decodeMs = Lap(sw);
        return (tokens, values, logProbs, prefillMs, decodeMs);
    }

    /// <summary>The token each row feeds back for action dimension <paramref name="step"/> (recorded in tokens), and for
    /// expected decoding that dimension's mean normalized value, for sampling the drawn token's log-probability (NaN where
    /// the token was taken by argmax: the greedy gripper). logits: [B, 1, V'] (V' may include padding ids).</summary>
    Tensor Choose(Tensor logits, int[][] tokens, double[][]? values, float[][]? logProbs, int step)
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
            else if (Decoding.GreedyGripper && step == tokens[0].Length - 1)
            {
                next = logits.argmax(-1);   // the gripper, last
                foreach (var row in logProbs!) row[step] = float.NaN;
            }
            else next = Sample(logits.squeeze(1), logProbs!, step);
        }
        Record(next, tokens, step);
        return next;
    }

    /// <summary>One token per row, as Hugging Face samples (<see cref="ActionDecoding.Warp"/>, then multinomial), over the
    /// whole vocabulary; each drawn token's log-probability under the warped distribution is kept for
    /// <see cref="ActionPrediction.TokenLogProbs"/>. logits: [B, V'] → [B, 1] token ids.</summary>
    Tensor Sample(Tensor logits, float[][] logProbs, int step)
    {
        var scores = Decoding.Warp(logits.to(ScalarType.Float32).cpu());
        var drawn = multinomial(softmax(scores, -1), 1, generator: _sampler);
        var chosen = nn.functional.log_softmax(scores, -1).gather(1, drawn).data<float>().ToArray();
        for (int b = 0; b < chosen.Length; b++) logProbs[b][step] = chosen[b];
        return drawn.to(Device);
    }

    /// <summary>Restarts the sampling generator at <paramref name="seed"/>: what a rollout does to make its draws a function
    /// of its own seed, whatever this policy sampled before (post-training's rollouts). No effect on greedy or expected
    /// decoding.</summary>
    public void ReseedSampling(long seed)
    {
        lock (_gate) _sampler?.manual_seed(seed);
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
