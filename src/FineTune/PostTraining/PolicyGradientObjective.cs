using OpenVLA.FineTune.Training;
using OpenVLA.Policy;
using OpenVLA.Policy.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.FineTune.PostTraining;

/// <summary>One step of a sampled rollout as a training sample: the frame, instruction and drawn tokens (in
/// <see cref="TrainingExample.ActionTokenIds"/>), their log-probabilities when drawn, and the episode's advantage.</summary>
public sealed record PolicySample(TrainingExample Example, float[] OldLogProbs, double Advantage);

/// <summary>What one micro-batch of the clipped objective measured (besides the loss tensor).</summary>
/// <param name="ClipFraction">Share of tokens whose ratio left [1 − ε, 1 + ε].</param>
/// <param name="ApproxKl">Mean of (r − 1) − log r over the tokens (k3, an estimate of KL(old ‖ new) ≥ 0).</param>
public sealed record PolicyGradientStats(Tensor Loss, double LossValue, double ClipFraction, double ApproxKl, int Tokens);

/// <summary>
/// PPO's clipped surrogate on the action tokens a policy sampled (RIPT-VLA's update, arXiv 2505.17016): for every token,
/// r = π_θ(token) / π_old(token), and the loss is −min(r·A, clip(r, 1 − ε, 1 + ε)·A), averaged over tokens, with A the
/// episode's advantage. π is the distribution the token was drawn from — the logits after the policy's own
/// <see cref="ActionDecoding.Warp"/> (temperature, top-k, top-p) — so π_old is exactly the recorded
/// <see cref="ActionPrediction.TokenLogProbs"/> and the ratio is 1 for unchanged weights. A token whose recorded
/// log-probability is NaN (taken by argmax) carries no ratio and is left out. The forward is the trainer's
/// (<see cref="ActionObjective.Forward"/>), the same model code as inference.
/// </summary>
public sealed class PolicyGradientObjective(ActionObjective objective, ActionDecoding sampling, double clipEpsilon)
{
    public ActionDecoding Sampling { get; } = sampling.Mode == DecodingMode.Sample ? sampling
        : throw new ArgumentException($"post-training needs the sampling distribution the tokens were drawn from; the policy decodes {sampling}");
    public ActionObjective Objective { get; } = objective;
    public double ClipEpsilon { get; } = clipEpsilon is > 0 and < 1 ? clipEpsilon : throw new ArgumentException($"clip epsilon must be in (0, 1), got {clipEpsilon}");

    /// <summary>log π_θ of each example's action tokens [B, A] (float32, differentiable unless under no_grad).</summary>
    public Tensor LogProbs(OpenVlaModel model, IReadOnlyList<TrainingExample> examples,
        Func<LlamaDecoderLayer, Tensor, Func<Tensor, Tensor>, Tensor>? layerRunner = null)
    {
        if (examples.Any(e => e.ActionTokenIds is null)) throw new ArgumentException("every example needs its sampled action token ids");
        int b = examples.Count, a = examples[0].ActionTokenIds!.Length;
        if (examples.Any(e => e.ActionTokenIds!.Length != a)) throw new ArgumentException("examples of one batch need the same action dimension");
        using var batch = Objective.Build(examples, model.Precision.Device, model.Precision.DType);
        var (hidden, labels) = ActionObjective.Forward(model, batch, layerRunner);
        var (flat, _) = ActionObjective.ShiftedTargets(labels);                 // per row: the A action positions, then EOS
        long h = hidden.shape[^1];
        var positions = hidden.reshape(-1, h).index_select(0, flat).view(b, a + 1, h).narrow(1, 0, a);
        var logits = model.language_model.Logits(positions.reshape(b * a, h)).to(ScalarType.Float32);   // [B·A, V']
        var scores = Sampling.Warp(logits);
        var tokens = tensor(examples.SelectMany(e => e.ActionTokenIds!.Select(t => (long)t)).ToArray(), [b * a, 1], device: logits.device);
        return nn.functional.log_softmax(scores, -1).gather(1, tokens).view(b, a);
    }

    /// <summary>The clipped surrogate of one micro-batch (mean over its tokens).</summary>
    public PolicyGradientStats Loss(OpenVlaModel model, IReadOnlyList<PolicySample> samples,
        Func<LlamaDecoderLayer, Tensor, Func<Tensor, Tensor>, Tensor>? layerRunner = null)
    {
        var current = LogProbs(model, samples.Select(s => s.Example).ToList(), layerRunner);   // [B, A]
        long b = current.shape[0], a = current.shape[1];
        var recorded = samples.SelectMany(s => s.OldLogProbs).ToArray();
        var dev = current.device;
        var old = tensor(recorded.Select(v => float.IsFinite(v) ? v : 0f).ToArray(), [b, a], device: dev);
        var mask = tensor(recorded.Select(v => float.IsFinite(v) ? 1f : 0f).ToArray(), [b, a], device: dev);
        var advantage = tensor(samples.Select(s => (float)s.Advantage).ToArray(), [b, 1], device: dev);
        // Every number given to a tensor operation is a Scalar held here: a temporary one can be finalized mid-call (KeptScalars).
        using var one = 1.ToScalar();
        using var low = (1 - ClipEpsilon).ToScalar();
        using var high = (1 + ClipEpsilon).ToScalar();
        using var epsilon = ClipEpsilon.ToScalar();
        var logRatio = current.sub(old);
        var ratio = logRatio.exp();
        var surrogate = torch.minimum(ratio.mul(advantage), ratio.clamp(low, high).mul(advantage));
        int tokens = (int)mask.sum().item<float>();
        using var count = Math.Max(tokens, 1).ToScalar();
        var loss = surrogate.mul(mask).sum().div(count).neg();
        double clipped, kl;
        using (torch.no_grad())
        {
            clipped = ratio.sub(one).abs().gt(epsilon).to(ScalarType.Float32).mul(mask).sum().item<float>() / Math.Max(tokens, 1);
            // A token that fell out of the top-k set has r = 0 and an infinite k3 term: counted as clipped, left out of the KL.
            var finite = logRatio.isfinite().to(ScalarType.Float32).mul(mask);
            var k3 = torch.where(finite.to(ScalarType.Bool), ratio.sub(one).sub(logRatio), zeros_like(ratio));
            kl = k3.sum().item<float>() / Math.Max(finite.sum().item<float>(), 1);
        }
        return new PolicyGradientStats(loss, loss.item<float>(), clipped, kl, tokens);
    }
}

/// <summary>How a rollout's success is turned into the advantage of every token it drew.</summary>
public enum AdvantageKind
{
    /// <summary>RIPT's leave-one-out (LOOP): A_k = R_k − mean of the other K − 1 rewards of the same context.</summary>
    Loop,
    /// <summary>GRPO: (R_k − mean) / (std + 1e-4), the unbiased std of the context's K rewards (as TRL's GRPOTrainer).</summary>
    Grpo,
    /// <summary>Positive only (filtered behaviour cloning): A = 1 for a success, 0 for a failure; failures teach nothing.</summary>
    Positive,
}

public static class Advantages
{
    public static AdvantageKind Parse(string text) => text.Trim().ToLowerInvariant() switch
    {
        "loop" => AdvantageKind.Loop,
        "grpo" => AdvantageKind.Grpo,
        "positive" => AdvantageKind.Positive,
        _ => throw new ArgumentException($"unknown advantage '{text}' (valid: loop, grpo, positive)"),
    };

    /// <summary>The advantages of one context's K ≥ 2 rewards.</summary>
    public static double[] Compute(IReadOnlyList<double> rewards, AdvantageKind kind)
    {
        int k = rewards.Count;
        if (k < 2) throw new ArgumentException("advantages need at least two rollouts per context");
        double sum = rewards.Sum(), mean = sum / k;
        switch (kind)
        {
            case AdvantageKind.Loop:
                return rewards.Select(r => r - (sum - r) / (k - 1)).ToArray();
            case AdvantageKind.Grpo:
                double std = Math.Sqrt(rewards.Sum(r => (r - mean) * (r - mean)) / (k - 1));
                return rewards.Select(r => (r - mean) / (std + 1e-4)).ToArray();
            default:
                return rewards.Select(r => r > 0 ? 1.0 : 0.0).ToArray();
        }
    }

    /// <summary>Dynamic sampling (RIPT): a context whose K outcomes are all equal gives every rollout a zero advantage
    /// under LOOP and GRPO, so it teaches nothing and is dropped. Positive-only keeps every context with a success.</summary>
    public static bool Informative(IReadOnlyList<double> rewards, AdvantageKind kind) =>
        kind == AdvantageKind.Positive ? rewards.Any(r => r > 0) : rewards.Distinct().Count() > 1;
}
