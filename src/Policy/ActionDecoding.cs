using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy;

/// <summary>How the action tokens' distributions become an action.</summary>
public enum DecodingMode
{
    /// <summary>The reference (openvla-model.md §3.2): argmax over the whole vocabulary at each step, bin centre of the token.</summary>
    Greedy,
    /// <summary>The greedy token chain, but each dimension's value is the probability-weighted mean of the bin centres
    /// (softmax over the action tokens only). Continuous instead of quantized to a bin; deterministic.</summary>
    Expected,
    /// <summary>Hugging Face <c>do_sample=True</c>: logits / temperature, then top-k, then top-p (nucleus) filtering over the
    /// whole vocabulary, then one token drawn from the softmax with a seeded generator; the drawn token conditions the
    /// next dimension.</summary>
    Sample,
}

/// <summary>
/// The decoding rule of <see cref="VlaPolicy"/>. Text form (the CLI's <c>--decode</c>): <c>greedy</c>, <c>expected</c>, or
/// <c>sample[:ITEM,ITEM…]</c> where an item is a bare temperature or one of <c>temperature=</c>, <c>top_k=</c> (0 = off),
/// <c>top_p=</c>, <c>seed=</c>, <c>gripper=greedy|sample</c>; the defaults are Hugging Face's (temperature 1, top_k 50,
/// top_p 1), seed 0 and a sampled gripper.
/// A checkpoint states its own rule the Hugging Face way, in generation_config.json (<see cref="FromGenerationConfig"/>).
/// Sampling is reproducible per loaded policy: the same sequence of batches gives the same actions.
/// </summary>
/// <param name="GreedyGripper">
/// Sampling only: take the argmax for the last action dimension, the gripper (OpenVLA's convention), and sample the others.
/// The gripper is a two-way decision held over many steps, so a sampled token that flips it for one step opens a grasp
/// or closes on nothing; the arm's dimensions are where sampling breaks a one-frame policy's stalls (docs/benchmarks.md).
/// Not a Hugging Face option: generation_config.json carries it as our key <c>openvla_gripper_decoding</c>.
/// </param>
public sealed record ActionDecoding(DecodingMode Mode, double Temperature = 1.0, int TopK = 50, double TopP = 1.0, long Seed = 0,
    bool GreedyGripper = false)
{
    public static ActionDecoding Greedy { get; } = new(DecodingMode.Greedy);

    public const string Syntax = "greedy | expected | sample[:T][,top_k=K][,top_p=P][,seed=S][,gripper=greedy]";

    /// <summary>generation_config.json's key for <see cref="GreedyGripper"/> ("greedy" or "sample"); Hugging Face ignores it.</summary>
    public const string GripperKey = "openvla_gripper_decoding";

    public static ActionDecoding Parse(string text)
    {
        var trimmed = text.Trim().ToLowerInvariant();
        int colon = trimmed.IndexOf(':');
        string head = colon < 0 ? trimmed : trimmed[..colon];
        if (head is "greedy" or "expected")
        {
            if (colon >= 0) throw new PolicyInputException($"decoding '{text}': {head} takes no parameters");
            return head == "greedy" ? Greedy : new ActionDecoding(DecodingMode.Expected);
        }
        if (head != "sample") throw new PolicyInputException($"unknown decoding '{text}' (valid: {Syntax})");
        var d = new ActionDecoding(DecodingMode.Sample);
        if (colon < 0) return d;
        foreach (var item in trimmed[(colon + 1)..].Split(','))
        {
            int eq = item.IndexOf('=');
            string key = eq < 0 ? "temperature" : item[..eq].Trim(), value = (eq < 0 ? item : item[(eq + 1)..]).Trim();
            d = key switch
            {
                "temperature" => d with { Temperature = Number(text, key, value) },
                "top_k" => d with { TopK = (int)Integer(text, key, value) },
                "top_p" => d with { TopP = Number(text, key, value) },
                "seed" => d with { Seed = Integer(text, key, value) },
                "gripper" => d with { GreedyGripper = Gripper(text, value) },
                _ => throw new PolicyInputException($"decoding '{text}': unknown parameter '{key}' (temperature, top_k, top_p, seed, gripper)"),
            };
        }
        return d.Validated(text);
    }

    /// <summary>
    /// The rule a Hugging Face generation_config.json states: <c>do_sample</c> true gives sampling with its
    /// <c>temperature</c>, <c>top_k</c> and <c>top_p</c> (Hugging Face defaults where absent); anything else, including a
    /// missing file (openvla-7b's states no sampling flags), gives greedy.
    /// </summary>
    public static ActionDecoding FromGenerationConfig(string path)
    {
        if (!File.Exists(path)) return Greedy;
        JsonElement root;
        try { root = JsonDocument.Parse(File.ReadAllText(path)).RootElement; }
        catch (JsonException e) { throw new CheckpointException($"{path}: not valid JSON ({e.Message})"); }
        if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("do_sample", out var doSample) || doSample.ValueKind != JsonValueKind.True)
            return Greedy;
        var d = new ActionDecoding(DecodingMode.Sample);
        try
        {
            if (root.TryGetProperty("temperature", out var t) && t.ValueKind != JsonValueKind.Null) d = d with { Temperature = t.GetDouble() };
            if (root.TryGetProperty("top_k", out var k) && k.ValueKind != JsonValueKind.Null) d = d with { TopK = k.GetInt32() };
            if (root.TryGetProperty("top_p", out var p) && p.ValueKind != JsonValueKind.Null) d = d with { TopP = p.GetDouble() };
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException)
        {
            throw new CheckpointException($"{path}: temperature, top_k and top_p must be numbers");
        }
        if (root.TryGetProperty(GripperKey, out var g) && g.ValueKind != JsonValueKind.Null)
        {
            if (g.ValueKind != JsonValueKind.String) throw new CheckpointException($"{path}: {GripperKey} must be \"greedy\" or \"sample\"");
            try { d = d with { GreedyGripper = Gripper(path, g.GetString()!) }; }
            catch (PolicyInputException e) { throw new CheckpointException(e.Message); }
        }
        try { return d.Validated(path); }
        catch (PolicyInputException e) { throw new CheckpointException(e.Message); }
    }

    /// <summary>Records this rule in a Hugging Face generation_config.json (created if absent; its other keys kept):
    /// do_sample with temperature, top_k and top_p for sampling, no sampling keys for greedy. Expected decoding has no
    /// Hugging Face form and is refused; the seed is a property of a run, not of the checkpoint, and is not written.</summary>
    public void WriteGenerationConfig(string path)
    {
        if (Mode == DecodingMode.Expected)
            throw new PolicyInputException("expected decoding has no generation_config.json form (do_sample covers greedy and sampling only)");
        var root = File.Exists(path) ? JsonNode.Parse(File.ReadAllText(path)) as JsonObject
            ?? throw new CheckpointException($"{path}: not a JSON object") : new JsonObject();
        foreach (var key in new[] { "do_sample", "temperature", "top_k", "top_p", GripperKey }) root.Remove(key);
        if (Mode == DecodingMode.Sample)
        {
            root["do_sample"] = true;
            root["temperature"] = Temperature;
            root["top_k"] = TopK;
            root["top_p"] = TopP;
            if (GreedyGripper) root[GripperKey] = "greedy";
        }
        File.WriteAllText(path, root.ToJsonString());
    }

    /// <summary>
    /// The distribution <see cref="DecodingMode.Sample"/> draws from, as Hugging Face builds it (its TemperatureLogitsWarper,
    /// TopKLogitsWarper and TopPLogitsWarper, in that order): logits / temperature, then every score below the k-th
    /// largest set to −∞ (ties kept), then the lowest-probability scores whose cumulative probability stays at or below
    /// 1 − top_p set to −∞ (the top one always kept). logits: [B, V] float32 → [B, V] float32 scores;
    /// softmax(scores) is the sampling distribution. The one definition the sampler and post-training's log-probabilities
    /// share, so a recorded log-probability and its recomputation agree for unchanged weights. Differentiable.
    /// </summary>
    public Tensor Warp(Tensor logits)
    {
        // Scalars held by using-locals, not converted implicitly inside the calls (see KeptScalars): with implicit ones a
        // DAgger recording worker died once of "INTERNAL ASSERT FAILED at Scalar.h" in about 200 k sampled tokens.
        using var temperature = Temperature.ToScalar();
        using var minusInfinity = double.NegativeInfinity.ToScalar();
        using var dropBelow = (1.0 - TopP).ToScalar();
        using var keep = false.ToScalar();
        var scores = logits.div(temperature);
        if (TopK > 0 && TopK < scores.shape[^1])
        {
            var kth = scores.topk(TopK, -1).values.narrow(-1, TopK - 1, 1);   // [B, 1]
            scores = scores.masked_fill(scores.lt(kth), minusInfinity);
        }
        if (TopP < 1.0)
        {
            // Sort ascending; drop the tokens whose cumulative probability stays at or below 1 − top_p, always keeping the top one.
            var (sorted, order) = scores.sort(-1, descending: false);
            var cumulative = TorchSharp.torch.nn.functional.softmax(sorted, -1).cumsum(-1);
            var drop = cumulative.le(dropBelow);
            drop.narrow(-1, drop.shape[^1] - 1, 1).fill_(keep);
            scores = scores.masked_fill(drop.scatter(-1, order, drop), minusInfinity);
        }
        return scores;
    }

    ActionDecoding Validated(string source)
    {
        if (!(Temperature > 0) || !double.IsFinite(Temperature))
            throw new PolicyInputException($"decoding '{source}': temperature must be a positive number, got {Temperature}");
        if (TopK < 0) throw new PolicyInputException($"decoding '{source}': top_k must be 0 (off) or positive, got {TopK}");
        if (!(TopP > 0 && TopP <= 1)) throw new PolicyInputException($"decoding '{source}': top_p must be in (0, 1], got {TopP}");
        return this;
    }

    static bool Gripper(string source, string value) => value.Trim().ToLowerInvariant() switch
    {
        "greedy" => true,
        "sample" => false,
        _ => throw new PolicyInputException($"decoding '{source}': gripper must be greedy or sample, got '{value}'"),
    };

    static double Number(string text, string key, string value) =>
        double.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out var v)
            ? v : throw new PolicyInputException($"decoding '{text}': {key} must be a number, got '{value}'");

    static long Integer(string text, string key, string value) =>
        long.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out var v) && (key == "seed" || v is >= int.MinValue and <= int.MaxValue)
            ? v : throw new PolicyInputException($"decoding '{text}': {key} must be an integer, got '{value}'");

    public override string ToString() => Mode switch
    {
        DecodingMode.Greedy => "greedy",
        DecodingMode.Expected => "expected",
        _ => string.Create(CultureInfo.InvariantCulture, $"sample:temperature={Temperature:0.####},top_k={TopK},top_p={TopP:0.####},seed={Seed}")
            + (GreedyGripper ? ",gripper=greedy" : ""),
    };
}
