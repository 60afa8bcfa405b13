using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Preprocessing;
using OpenVLA.Policy.Tokenization;

namespace OpenVLA.Policy;

/// <summary>A batch of observations ready for a network, in plain arrays: what every backend consumes.</summary>
/// <param name="Keys">the resolved unnorm key of each row</param>
/// <param name="Prompts">each row's prompt ids (BOS … "Out:", the lone "▁")</param>
/// <param name="Pixels">[B, 6·cameras, H, W] row-major: each row's cameras one after the other, each 6 channels</param>
/// <param name="Proprio">each row's normalized proprio, or null for a model that takes none</param>
public sealed record PreparedBatch(string[] Keys, int[][] Prompts, float[] Pixels, int Cameras, int Height, int Width, float[][]? Proprio)
{
    public int Size => Keys.Length;
}

/// <summary>OpenVLA-OFT's parallel-decoding input ids for a batch, right-padded: prompt, chunk·A placeholders, the stop
/// token (docs/oft.md §2–3).</summary>
public sealed record ParallelIds(long[] Ids, bool[] Placeholder, bool[] Valid, int Length);

/// <summary>
/// The backend-free core of a policy: validation, prompt ids, pixel values of every camera, proprio normalization
/// before the network; OFT's parallel id layout; action de-tokenization and un-normalization after it — all in plain
/// arrays, so the TorchSharp model (<see cref="VlaPolicy"/>) and any other backend share one implementation.
/// </summary>
public sealed class PolicyCore(VlaCheckpoint checkpoint, VlaTokenizer tokenizer, ImagePreprocessor preprocessor, OftSpec? oft)
{
    /// <summary>The id openvla-oft writes at placeholder positions (torch.ones); their embeddings are zeroed, so it
    /// only has to be a valid id.</summary>
    public const long PlaceholderId = 1;

    public ActionTokenizer ActionTokenizer { get; } = new(checkpoint.Config.TokenizerVocabSize, checkpoint.Config.NActionBins);
    public int Cameras => oft?.NumImages ?? 1;
    public int ActionDim(string key) => oft?.ActionDim ?? checkpoint.NormStats[key].Q01.Length;

    /// <summary>Validates every observation before any compute (one bad observation fails with its own one-line
    /// message) and turns the batch into arrays.</summary>
    public PreparedBatch Prepare(IReadOnlyList<VlaObservation> observations, bool centerCrop, IReadOnlyList<string> cameraNames)
    {
        var keys = observations.Select(o => checkpoint.ResolveUnnormKey(o.UnnormKey)).ToArray();
        var prompts = observations.Select(o => tokenizer.PromptIds(o.Instruction)).ToArray();
        int actionDim = ActionDim(keys[0]);
        foreach (var k in keys)
            if (checkpoint.NormStats[k].Q01.Length != actionDim)
                throw new PolicyInputException(oft is null
                    ? "observations of one batch must use statistics with the same action dimension"
                    : $"the model predicts {actionDim}-D actions but the statistics of '{k}' have {checkpoint.NormStats[k].Q01.Length} dims");
        foreach (var o in observations)
            if (o.Images.Count != Cameras)
                throw new PolicyInputException(Cameras == 1 ? $"the model takes 1 image per observation, got {o.Images.Count}"
                    : $"the model takes {Cameras} images per observation ({string.Join(", ", cameraNames)}), got {o.Images.Count}");
        var proprio = NormalizedProprio(observations, keys);
        var (h, w) = preprocessor.Config.OutputSize;
        var pixels = preprocessor.PixelArray(observations.SelectMany(o => o.Images).ToList(), centerCrop);   // observation, then camera
        return new PreparedBatch(keys, prompts, pixels, Cameras, h, w, proprio);
    }

    /// <summary>Each row's proprio, checked and normalized as openvla-oft normalize_proprio does (every dimension clipped
    /// to [−1, 1]); null for a model that takes none (which ignores a proprio it is given).</summary>
    float[][]? NormalizedProprio(IReadOnlyList<VlaObservation> observations, string[] keys)
    {
        if (oft is not { ProprioDim: > 0 }) return null;
        var result = new float[observations.Count][];
        for (int b = 0; b < result.Length; b++)
        {
            var p = observations[b].Proprio ?? throw new PolicyInputException($"the model takes the robot's proprioceptive state ({oft.ProprioDim} values); none was given");
            if (p.Count != oft.ProprioDim) throw new PolicyInputException($"the model takes a proprio of {oft.ProprioDim} values, got {p.Count}");
            for (int i = 0; i < p.Count; i++)
                if (!float.IsFinite(p[i])) throw new PolicyInputException($"proprio value {i} is {p[i]}; every value must be finite");
            result[b] = ActionNormalizer.Normalize(p, checkpoint.ProprioStats[keys[b]], oft.Normalization, clipUnmasked: true).Select(v => (float)v).ToArray();
        }
        return result;
    }

    /// <summary>OpenVLA-OFT: every row's prompt, chunk·A placeholders and the stop token, right-padded with the pad id.</summary>
    public ParallelIds ParallelLayout(int[][] prompts)
    {
        var spec = oft ?? throw new InvalidOperationException("parallel decoding needs an OpenVLA-OFT model");
        int batch = prompts.Length, placeholders = spec.ActionChunk * spec.ActionDim;
        int t = prompts.Max(p => p.Length) + placeholders + 1;
        var ids = new long[batch * t];
        var placeholder = new bool[batch * t];
        var valid = new bool[batch * t];
        Array.Fill(ids, (long)checkpoint.Config.Text.PadTokenId);
        for (int b = 0; b < batch; b++)
        {
            int row = b * t, n = prompts[b].Length;
            for (int i = 0; i < n; i++) { ids[row + i] = prompts[b][i]; valid[row + i] = true; }
            for (int i = 0; i < placeholders; i++) { ids[row + n + i] = PlaceholderId; placeholder[row + n + i] = true; valid[row + n + i] = true; }
            ids[row + n + placeholders] = tokenizer.EosId;                 // the stop token
            valid[row + n + placeholders] = true;
        }
        return new ParallelIds(ids, placeholder, valid, t);
    }

    /// <summary>Plain OpenVLA: token ids (or, for expected decoding, the values themselves) → a chunk of one, un-normalized
    /// with q01/q99 and no epsilon.</summary>
    public ActionPrediction FromTokens(int[] tokens, double[]? values, int[] prompt, string key, StageTimings timings)
    {
        var normalized = values ?? tokens.Select(id => ActionTokenizer.Decode(id)).ToArray();
        var action = ActionNormalizer.Unnormalize(normalized, checkpoint.NormStats[key]);
        return ActionPrediction.Single(action, normalized.Select(v => (float)v).ToArray(), tokens, prompt, key, timings);
    }

    /// <summary>OpenVLA-OFT: a normalized chunk [chunk][A] → the prediction, un-normalized as _unnormalize_actions does
    /// (q01/q99 or min/max, +1e-8, the mask).</summary>
    public ActionPrediction FromChunk(float[][] normalized, int[] prompt, string key, StageTimings timings)
    {
        var spec = oft ?? throw new InvalidOperationException("a continuous chunk needs an OpenVLA-OFT model");
        var actions = normalized.Select(n => ActionNormalizer.Unnormalize(n.Select(v => (double)v).ToArray(), checkpoint.NormStats[key], spec.Normalization, 1e-8)).ToArray();
        return new ActionPrediction(actions, normalized, [], prompt, key, timings);
    }

    /// <summary>OpenVLA-OFT's discrete variant: chunk·A token ids → bin centres (vocab − id, clipped, as
    /// _regression_or_discrete_prediction does) → the prediction, un-normalized as <see cref="FromChunk"/>.</summary>
    public ActionPrediction FromChunkTokens(int[] tokens, int[] prompt, string key, StageTimings timings)
    {
        var spec = oft ?? throw new InvalidOperationException("a token chunk needs an OpenVLA-OFT model");
        var normalized = Enumerable.Range(0, spec.ActionChunk)
            .Select(k => Enumerable.Range(0, spec.ActionDim).Select(d => (float)ActionTokenizer.Decode(tokens[k * spec.ActionDim + d])).ToArray()).ToArray();
        return FromChunk(normalized, prompt, key, timings) with { ActionTokenIds = tokens };
    }
}
