using System.Text.Json.Nodes;
using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.Policy;

/// <summary>
/// The decoding rules (greedy, expected, Hugging Face sampling) on the golden checkpoint. The step logits the checks use
/// come from one uncached pass over the whole sequence (BOS, image tokens, prompt, the chain's earlier tokens), not from the
/// policy's cached decoding loop.
/// </summary>
public class ActionDecodingTests
{
    static readonly string Golden = TestPaths.Fixture("openvla-golden", "checkpoint");

    static (VlaObservation Observation, GoldenModelTests.Case Case) First()
    {
        var c = GoldenModelTests.Cases()[0];
        return (new VlaObservation([GoldenModelTests.ReadPng(TestPaths.Fixture("openvla-golden", c.Image))], c.Instruction, c.UnnormKey), c);
    }

    /// <summary>Logits [steps, V'] (float64) of each decoding step when the tokens fed back are <paramref name="chain"/>.</summary>
    static double[][] StepLogits(VlaPolicy policy, VlaObservation o, int[] chain)
    {
        using var noGrad = torch.no_grad();
        using var scope = NewDisposeScope();
        var pixels = new ImagePreprocessor(PreprocessorConfig.Load(policy.Checkpoint.PreprocessorConfigPath)).PreprocessBatch(o.Images, false, CPU, ScalarType.Float32);
        var patches = policy.Model.EncodeImages(pixels);
        var lm = policy.Model.language_model;
        var prompt = policy.Tokenizer.PromptIds(o.Instruction).Concat(chain[..^1]).Select(i => (long)i).ToArray();
        var emb = lm.Embed(tensor(prompt).view(1, -1));
        var inputs = cat([emb.narrow(1, 0, 1), patches, emb.narrow(1, 1, emb.shape[1] - 1)], 1);
        long length = inputs.shape[1];
        using var cache = lm.NewCache(1, (int)length, [0]);
        var logits = lm.Logits(lm.Step(inputs, cache)).to(ScalarType.Float64);   // [1, T, V']
        int first = (int)length - chain.Length;
        return Enumerable.Range(0, chain.Length).Select(s => logits[0, first + s].data<double>().ToArray()).ToArray();
    }

    static double[] Softmax(IEnumerable<double> logits)
    {
        var x = logits.ToArray();
        double max = x.Max();
        var e = x.Select(v => Math.Exp(v - max)).ToArray();
        double sum = e.Sum();
        return e.Select(v => v / sum).ToArray();
    }

    [Fact]
    public void Expected_decoding_keeps_the_greedy_chain_and_returns_each_dimensions_mean_bin_centre()
    {
        var (o, c) = First();
        using var policy = VlaPolicy.Load(Golden, new PolicyOptions { Decoding = "expected" });
        var p = policy.Predict(o);
        Assert.Equal(c.ActionTokenIds, p.ActionTokenIds);

        var logits = StepLogits(policy, o, c.ActionTokenIds);
        var tok = policy.ActionTokenizer;
        for (int s = 0; s < 7; s++)
        {
            var probs = Softmax(logits[s].Skip(tok.FirstActionId).Take(tok.NumBins));
            double mean = probs.Select((q, j) => q * tok.Decode(tok.FirstActionId + j)).Sum();
            Assert.Equal(mean, p.NormalizedAction[s], 1e-5);
        }
        var stats = policy.Checkpoint.NormStats[c.UnnormKey];
        Assert.Equal(ActionNormalizer.Unnormalize(p.NormalizedAction.Select(v => (double)v).ToArray(), stats), p.Action);
        // A random model spreads its mass, so the mean is strictly inside the bins' range and not a bin centre.
        Assert.Contains(Enumerable.Range(0, 7), s => Math.Abs(p.NormalizedAction[s] - c.NormalizedAction[s]) > 1e-3);
    }

    [Theory]
    [InlineData("sample:5,top_k=1")]
    [InlineData("sample:0.5,top_p=1e-9")]
    public void Sampling_that_keeps_only_the_top_token_is_greedy(string decoding)
    {
        var (o, c) = First();
        using var policy = VlaPolicy.Load(Golden, new PolicyOptions { Decoding = decoding });
        for (int i = 0; i < 3; i++) Assert.Equal(c.ActionTokenIds, policy.Predict(o).ActionTokenIds);
    }

    [Fact]
    public void Sampled_first_tokens_follow_the_tempered_top_k_distribution()
    {
        var (o, _) = First();
        const int k = 4, draws = 1200;
        const double temperature = 2.0;
        using var policy = VlaPolicy.Load(Golden, new PolicyOptions { Decoding = $"sample:{temperature},top_k={k},seed=3" });
        var counts = new Dictionary<int, int>();
        var batch = Enumerable.Repeat(o, 200).ToList();
        for (int n = 0; n < draws / batch.Count; n++)
            foreach (var p in policy.PredictBatch(batch))
                counts[p.ActionTokenIds[0]] = counts.GetValueOrDefault(p.ActionTokenIds[0]) + 1;

        var logits = StepLogits(policy, o, [0])[0];
        var top = logits.Select((v, id) => (v, id)).OrderByDescending(t => t.v).Take(k).ToArray();
        var probs = Softmax(top.Select(t => t.v / temperature));
        Assert.All(counts.Keys, id => Assert.Contains(id, top.Select(t => t.id)));   // nothing outside the top k
        for (int j = 0; j < k; j++)
        {
            double freq = counts.GetValueOrDefault(top[j].id) / (double)draws;
            double sigma = Math.Sqrt(probs[j] * (1 - probs[j]) / draws);
            Assert.True(Math.Abs(freq - probs[j]) < 4 * sigma + 1e-9, $"token {top[j].id}: frequency {freq:F4}, probability {probs[j]:F4}");
        }
    }

    [Fact]
    public void Sampling_is_reproducible_per_seed_and_each_sampled_token_conditions_the_next()
    {
        var (o, _) = First();
        int[][] Run(long seed)
        {
            using var policy = VlaPolicy.Load(Golden, new PolicyOptions { Decoding = $"sample:1,seed={seed}" });
            return Enumerable.Range(0, 6).Select(_ => policy.Predict(o).ActionTokenIds).ToArray();
        }
        var a = Run(1);
        Assert.Equal(a, Run(1));
        Assert.NotEqual(a, Run(2));
        Assert.True(a.Distinct(new SequenceComparer()).Count() > 1, "six samples of one observation should not all agree");

        // Every sampled token has positive probability under the logits its own earlier tokens produce (top 50 of them).
        using var check = VlaPolicy.Load(Golden);
        foreach (var chain in a)
        {
            var logits = StepLogits(check, o, chain);
            for (int s = 0; s < chain.Length; s++)
            {
                double fiftieth = logits[s].OrderByDescending(v => v).ElementAt(49);
                Assert.True(logits[s][chain[s]] >= fiftieth, $"step {s}: token {chain[s]} is outside the top 50");
            }
        }
    }

    [Fact]
    public void A_greedy_gripper_takes_the_argmax_of_the_last_dimension_after_sampled_arm_tokens()
    {
        var (o, _) = First();
        using var policy = VlaPolicy.Load(Golden, new PolicyOptions { Decoding = "sample:1.5,top_k=0,seed=4,gripper=greedy" });
        var chains = Enumerable.Range(0, 8).Select(_ => policy.Predict(o).ActionTokenIds).ToArray();
        // The arm's six tokens are still drawn: eight draws of a random model at T 1.5 over the whole vocabulary differ.
        Assert.True(chains.Select(c => string.Join(",", c[..6])).Distinct().Count() > 1, "the arm's tokens should be sampled");

        using var check = VlaPolicy.Load(Golden);
        foreach (var chain in chains)
        {
            // The gripper token is the argmax of the logits that the chain's own sampled tokens produce.
            var last = StepLogits(check, o, chain)[6];
            Assert.Equal(Array.IndexOf(last, last.Max()), chain[6]);
        }
    }

    [Fact]
    public void The_greedy_gripper_round_trips_through_the_text_form_and_generation_config()
    {
        var d = ActionDecoding.Parse("sample:0.8,gripper=greedy");
        Assert.Equal(new ActionDecoding(DecodingMode.Sample, 0.8, GreedyGripper: true), d);
        Assert.Equal(d, ActionDecoding.Parse(d.ToString()));
        Assert.False(ActionDecoding.Parse("sample:0.8,gripper=sample").GreedyGripper);

        using var tmp = new TestPaths.TempDir();
        var config = Path.Combine(tmp.Path, "generation_config.json");
        d.WriteGenerationConfig(config);
        Assert.Equal("greedy", (string)JsonNode.Parse(File.ReadAllText(config))![ActionDecoding.GripperKey]!);
        Assert.Equal(d, ActionDecoding.FromGenerationConfig(config));
        // Written again without it, the key goes: a sampled gripper is Hugging Face's behaviour and needs no key.
        (d with { GreedyGripper = false }).WriteGenerationConfig(config);
        Assert.False(JsonNode.Parse(File.ReadAllText(config))!.AsObject().ContainsKey(ActionDecoding.GripperKey));

        File.WriteAllText(config, "{\"do_sample\": true, \"" + ActionDecoding.GripperKey + "\": \"argmax\"}");
        Assert.Contains("gripper must be greedy or sample", Assert.Throws<CheckpointException>(() => ActionDecoding.FromGenerationConfig(config)).Message);
        File.WriteAllText(config, "{\"do_sample\": true, \"" + ActionDecoding.GripperKey + "\": 1}");
        Assert.Contains(ActionDecoding.GripperKey, Assert.Throws<CheckpointException>(() => ActionDecoding.FromGenerationConfig(config)).Message);
    }

    sealed class SequenceComparer : IEqualityComparer<int[]>
    {
        public bool Equals(int[]? x, int[]? y) => x!.SequenceEqual(y!);
        public int GetHashCode(int[] x) => x.Aggregate(17, (h, v) => h * 31 + v);
    }

    [Theory]
    [InlineData("greedy", DecodingMode.Greedy, 1.0, 50, 1.0, 0L)]
    [InlineData(" Expected ", DecodingMode.Expected, 1.0, 50, 1.0, 0L)]
    [InlineData("sample", DecodingMode.Sample, 1.0, 50, 1.0, 0L)]
    [InlineData("sample:0.8", DecodingMode.Sample, 0.8, 50, 1.0, 0L)]
    [InlineData("sample:top_p=0.9,temperature=1.5,top_k=0,seed=42", DecodingMode.Sample, 1.5, 0, 0.9, 42L)]
    public void Parses_the_decoding_syntax(string text, DecodingMode mode, double t, int topK, double topP, long seed) =>
        Assert.Equal(new ActionDecoding(mode, t, topK, topP, seed), ActionDecoding.Parse(text));

    [Theory]
    [InlineData("beam", "unknown decoding 'beam'")]
    [InlineData("greedy:1", "greedy takes no parameters")]
    [InlineData("sample:0", "temperature must be a positive number")]
    [InlineData("sample:hot", "temperature must be a number")]
    [InlineData("sample:top_k=-1", "top_k must be 0 (off) or positive")]
    [InlineData("sample:top_p=1.5", "top_p must be in (0, 1]")]
    [InlineData("sample:top_k=2.5", "top_k must be an integer")]
    [InlineData("sample:beams=4", "unknown parameter 'beams'")]
    [InlineData("sample:gripper=argmax", "gripper must be greedy or sample")]
    public void Refuses_a_bad_decoding_with_one_line(string text, string message)
    {
        var e = Assert.Throws<PolicyInputException>(() => ActionDecoding.Parse(text));
        Assert.Contains(message, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void The_checkpoints_generation_config_decides_unless_the_options_do()
    {
        using var tmp = new TestPaths.TempDir();
        foreach (var f in Directory.GetFiles(Golden)) File.Copy(f, Path.Combine(tmp.Path, Path.GetFileName(f)));
        var config = Path.Combine(tmp.Path, "generation_config.json");

        // openvla-7b's generation_config.json states no sampling flags: greedy, the reference.
        File.WriteAllText(config, """{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 576, "transformers_version": "4.40.1"}""");
        using (var p = VlaPolicy.Load(tmp.Path)) Assert.Equal(ActionDecoding.Greedy, p.Decoding);

        new ActionDecoding(DecodingMode.Sample, 0.7, 20, 0.95, Seed: 9).WriteGenerationConfig(config);
        var written = JsonNode.Parse(File.ReadAllText(config))!.AsObject();
        Assert.Equal(576, (int)written["pad_token_id"]!);   // the other keys stay
        Assert.True((bool)written["do_sample"]!);
        Assert.False(written.ContainsKey("seed"));          // a run's property, not the checkpoint's
        using (var p = VlaPolicy.Load(tmp.Path)) Assert.Equal(new ActionDecoding(DecodingMode.Sample, 0.7, 20, 0.95), p.Decoding);
        using (var p = VlaPolicy.Load(tmp.Path, new PolicyOptions { Decoding = "greedy" })) Assert.Equal(ActionDecoding.Greedy, p.Decoding);

        ActionDecoding.Greedy.WriteGenerationConfig(config);
        Assert.False(JsonNode.Parse(File.ReadAllText(config))!.AsObject().ContainsKey("do_sample"));
        Assert.Throws<PolicyInputException>(() => new ActionDecoding(DecodingMode.Expected).WriteGenerationConfig(config));

        File.WriteAllText(config, """{"do_sample": true, "temperature": "warm"}""");
        Assert.Contains("must be numbers", Assert.Throws<CheckpointException>(() => VlaPolicy.Load(tmp.Path)).Message);
        File.WriteAllText(config, """{"do_sample": true, "top_p": 0}""");
        Assert.Contains("top_p must be in (0, 1]", Assert.Throws<CheckpointException>(() => VlaPolicy.Load(tmp.Path)).Message);
    }
}
