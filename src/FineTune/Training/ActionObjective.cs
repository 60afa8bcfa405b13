using OpenVLA.Policy;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Preprocessing;
using OpenVLA.Policy.Tokenization;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace OpenVLA.FineTune.Training;

/// <summary>
/// A batch in the reference's training layout (openvla-model.md §2.5, §1.5): per row, input ids = BOS + prompt + the
/// lone "▁" + 7 action token ids + EOS, right-padded with the pad id; labels = −100 everywhere except the last 8 real
/// tokens (the action tokens and EOS, predict_stop_token); pixel values of the row's frame.
/// </summary>
public sealed class TrainingBatch(Tensor pixelValues, Tensor inputIds, Tensor labels, Tensor valid, int[] lengths) : IDisposable
{
    /// <summary>[B, 6, H, W] in the model's dtype.</summary>
    public Tensor PixelValues { get; } = pixelValues;
    /// <summary>[B, T] int64, right-padded with the pad id.</summary>
    public Tensor InputIds { get; } = inputIds;
    /// <summary>[B, T] int64, <see cref="ActionObjective.IgnoreIndex"/> except the 8 target tokens of each row.</summary>
    public Tensor Labels { get; } = labels;
    /// <summary>[B, T] bool, true on real tokens (the reference's attention_mask = input_ids ≠ pad).</summary>
    public Tensor Valid { get; } = valid;
    public int[] Lengths { get; } = lengths;
    public int Size => Lengths.Length;

    public void Dispose() { PixelValues.Dispose(); InputIds.Dispose(); Labels.Dispose(); Valid.Dispose(); }
}

/// <summary>Loss and the reference's two other metrics (finetune.py: train_loss, action_accuracy, l1_loss).</summary>
/// <param name="Loss">Mean next-token cross-entropy over the target tokens (a scalar that carries the graph).</param>
/// <param name="ActionAccuracy">Share of action-token targets whose argmax prediction is exact (EOS excluded).</param>
/// <param name="L1">Mean |decoded prediction − decoded target| over action tokens, in normalized units.</param>
public sealed record ObjectiveResult(Tensor Loss, double LossValue, double ActionAccuracy, double L1, int ActionTokens, int ActionCorrect, int TargetTokens);

/// <summary>
/// The OpenVLA objective: builds reference batches, runs the multimodal training forward (BOS, image tokens, the rest of
/// the prompt; labels −100 at the image positions) and scores the shifted next-token predictions. Only the positions
/// whose next label is a target go through lm_head: the same loss as the full logits tensor, without its memory.
/// </summary>
public sealed class ActionObjective
{
    public const long IgnoreIndex = -100;

    readonly VlaTokenizer _tokenizer;
    readonly ImagePreprocessor _preprocessor;
    readonly int _padId;

    public ActionTokenizer ActionTokenizer { get; }

    public ActionObjective(VlaTokenizer tokenizer, ActionTokenizer actionTokenizer, ImagePreprocessor preprocessor, int padId)
    {
        _tokenizer = tokenizer;
        ActionTokenizer = actionTokenizer;
        _preprocessor = preprocessor;
        _padId = padId;
    }

    /// <summary>The objective for a checkpoint: its tokenizer, action bins, image preprocessing and pad id.</summary>
    public static ActionObjective ForCheckpoint(OpenVLA.Policy.Checkpoint.VlaCheckpoint checkpoint, VlaTokenizer tokenizer)
    {
        return new ActionObjective(tokenizer, new ActionTokenizer(checkpoint.Config.TokenizerVocabSize, checkpoint.Config.NActionBins),
            ImagePreprocessor.ForCheckpoint(checkpoint), checkpoint.Config.Text.PadTokenId);
    }

    /// <summary>The token ids of one training sequence and how many of its last tokens are targets (always 8 for 7-D).</summary>
    public long[] SequenceIds(TrainingExample e)
    {
        var prompt = _tokenizer.PromptIds(e.Instruction);
        var ids = new long[prompt.Length + e.NormalizedAction.Length + 1];
        for (int i = 0; i < prompt.Length; i++) ids[i] = prompt[i];
        if (e.ActionTokenIds is { } tokens && tokens.Length != e.NormalizedAction.Length)
            throw new ArgumentException($"an example has {tokens.Length} action token ids for a {e.NormalizedAction.Length}-D action");
        for (int i = 0; i < e.NormalizedAction.Length; i++) ids[prompt.Length + i] = e.ActionTokenIds?[i] ?? ActionTokenizer.Encode(e.NormalizedAction[i]);
        ids[^1] = _tokenizer.EosId;
        return ids;
    }

    public TrainingBatch Build(IReadOnlyList<TrainingExample> examples, Device device, ScalarType dtype)
    {
        if (examples.Count == 0) throw new ArgumentException("empty batch", nameof(examples));
        var rows = examples.Select(SequenceIds).ToArray();
        int t = rows.Max(r => r.Length), b = rows.Length;
        var ids = new long[b * t];
        var labels = new long[b * t];
        var valid = new bool[b * t];
        Array.Fill(ids, _padId);
        Array.Fill(labels, IgnoreIndex);
        for (int r = 0; r < b; r++)
        {
            int targets = examples[r].NormalizedAction.Length + 1;
            for (int i = 0; i < rows[r].Length; i++)
            {
                ids[r * t + i] = rows[r][i];
                valid[r * t + i] = true;
                if (i >= rows[r].Length - targets) labels[r * t + i] = rows[r][i];
            }
        }
        var pixels = VisionFeatureCache.Gather(examples, device, dtype)
                     ?? _preprocessor.PreprocessBatch(examples.Select(e => e.Image).ToList(), centerCrop: false, device, dtype);
        return new TrainingBatch(pixels, tensor(ids, [b, t], device: device), tensor(labels, [b, t], device: device),
            tensor(valid, [b, t], device: device), rows.Select(r => r.Length).ToArray());
    }

    /// <summary>
    /// The multimodal forward of PrismaticForConditionalGeneration: embeddings [BOS, image tokens, rest of the ids], the
    /// validity mask with the image positions real, labels with −100 at the image positions. Returns the final (normed)
    /// hidden states [B, 1+P+T−1, H] and the multimodal labels [B, same]; <paramref name="onPatches"/> sees the projected
    /// image tokens [B, P, H] (with their graph).
    /// </summary>
    public static (Tensor Hidden, Tensor Labels) Forward(OpenVlaModel model, TrainingBatch batch,
        Func<LlamaDecoderLayer, Tensor, Func<Tensor, Tensor>, Tensor>? layerRunner = null, Action<Tensor>? onPatches = null)
    {
        var lm = model.language_model;
        var patches = model.EncodeImages(batch.PixelValues);                    // [B, P, H]
        onPatches?.Invoke(patches);                                              // e.g. the auxiliary head
        long b = patches.shape[0], p = patches.shape[1], t = batch.InputIds.shape[1];
        var emb = lm.Embed(batch.InputIds);                                      // [B, T, H]
        var labels = cat([batch.Labels.narrow(1, 0, 1), full([b, p], IgnoreIndex, ScalarType.Int64, emb.device), batch.Labels.narrow(1, 1, t - 1)], 1);
        return (lm.Forward(OpenVlaModel.Splice(emb, patches), OpenVlaModel.SpliceValid(batch.Valid, p), layerRunner), labels);
    }

    /// <summary>Shifted targets: hidden position (b, i) predicts label (b, i+1); only positions with a real label count.
    /// Returns the flat indices b·L + i into [B·L] and the target ids.</summary>
    public static (Tensor FlatPositions, Tensor Targets) ShiftedTargets(Tensor labels)
    {
        long b = labels.shape[0], l = labels.shape[1];
        var next = labels.narrow(1, 1, l - 1);                                   // label of position i+1, for i in 0..L−2
        var where = next.ne(IgnoreIndex).nonzero();                              // [N, 2] (row, i), row-major order
        var rows = where.select(1, 0);
        var cols = where.select(1, 1);
        var flat = rows * l + cols;
        var targets = next.reshape(-1).index_select(0, rows * (l - 1) + cols);
        return (flat, targets);
    }

    /// <summary>Loss and metrics from final hidden states: lm_head runs on the target positions only.</summary>
    public ObjectiveResult Score(Tensor hidden, Tensor labels, Func<Tensor, Tensor> head)
    {
        var (flat, targets) = ShiftedTargets(labels);
        var selected = hidden.reshape(-1, hidden.shape[^1]).index_select(0, flat);
        return ScoreLogits(head(selected), targets, ActionTokenizer);
    }

    /// <summary>Loss and metrics from full logits [B, L, V] (as the reference computes them) and labels [B, L].</summary>
    public static ObjectiveResult ScoreFullLogits(Tensor logits, Tensor labels, ActionTokenizer actionTokenizer)
    {
        var (flat, targets) = ShiftedTargets(labels);
        return ScoreLogits(logits.reshape(-1, logits.shape[^1]).index_select(0, flat), targets, actionTokenizer);
    }

    /// <summary>Cross-entropy (in float32) over target rows; accuracy and L1 over the rows whose target is an action token.</summary>
    public static ObjectiveResult ScoreLogits(Tensor logits, Tensor targets, ActionTokenizer actionTokenizer)
    {
        var loss = F.cross_entropy(logits.to(ScalarType.Float32), targets);
        long[] predicted, expected;
        using (torch.no_grad())
        using (var scope = NewDisposeScope())
        {
            predicted = logits.argmax(-1).cpu().data<long>().ToArray();
            expected = targets.cpu().data<long>().ToArray();
        }
        int actions = 0, correct = 0;
        double l1 = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            if (expected[i] < actionTokenizer.FirstActionId || expected[i] >= actionTokenizer.VocabSize) continue;
            actions++;
            if (predicted[i] == expected[i]) correct++;
            l1 += Math.Abs(actionTokenizer.Decode((int)predicted[i]) - actionTokenizer.Decode((int)expected[i]));
        }
        return new ObjectiveResult(loss, loss.item<float>(), actions == 0 ? double.NaN : (double)correct / actions,
            actions == 0 ? double.NaN : l1 / actions, actions, correct, expected.Length);
    }
}
