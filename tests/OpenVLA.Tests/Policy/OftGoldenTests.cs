using System.Text.Json;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;

namespace OpenVLA.Tests.Policy;

/// <summary>
/// OpenVLA-OFT against tests/fixtures/oft-golden: checkpoints in the layout openvla-oft writes (the HF directory plus
/// action_head--100_checkpoint.pt in bf16, proprio_projector--100_checkpoint.pt with DDP's "module." prefix, and for
/// FiLM a PEFT-LoRA vision_backbone--100_checkpoint.pt), two cameras, a 5-D proprio, chunks of 4, and the chunks an
/// independent float64 numpy implementation (tools/oftref/oft_reference.py) computes. float32 must agree to 1e-4.
/// </summary>
public class OftGoldenTests
{
    public sealed record Case(string[] Images, string Instruction, string UnnormKey, int[] InputIds, int NumPromptTokens, float[] Proprio,
        double[] NormalizedProprio, Dictionary<string, (double[][] Normalized, double[][] Actions)> Expected);

    public static IReadOnlyList<Case> Cases()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(TestPaths.Fixture("oft-golden", "expected.json")));
        double[] Vec(JsonElement e) => e.EnumerateArray().Select(x => x.GetDouble()).ToArray();
        double[][] Mat(JsonElement e) => e.EnumerateArray().Select(Vec).ToArray();
        return doc.RootElement.GetProperty("cases").EnumerateArray().Select(c => new Case(
            c.GetProperty("images").EnumerateArray().Select(x => x.GetString()!).ToArray(),
            c.GetProperty("instruction").GetString()!, c.GetProperty("unnorm_key").GetString()!,
            c.GetProperty("layout").GetProperty("input_ids").EnumerateArray().Select(x => x.GetInt32()).ToArray(),
            c.GetProperty("layout").GetProperty("num_prompt_tokens").GetInt32(),
            c.GetProperty("proprio").EnumerateArray().Select(x => (float)x.GetDouble()).ToArray(),
            Vec(c.GetProperty("normalized_proprio")),
            new[] { "checkpoint", "checkpoint-film" }.ToDictionary(k => k, k => (Mat(c.GetProperty(k).GetProperty("normalized_actions")), Mat(c.GetProperty(k).GetProperty("actions")))))).ToList();
    }

    static readonly Dictionary<string, Lazy<VlaPolicy>> Policies = new[] { "checkpoint", "checkpoint-film" }
        .ToDictionary(k => k, k => new Lazy<VlaPolicy>(() => VlaPolicy.Load(TestPaths.Fixture("oft-golden", k))));

    static VlaObservation Observation(Case c) => new(
        c.Images.Select(i => GoldenModelTests.ReadPng(TestPaths.Fixture("oft-golden", i))).ToArray(), c.Instruction, c.UnnormKey, c.Proprio);

    [Theory]
    [InlineData("checkpoint")]
    [InlineData("checkpoint-film")]
    public void EachCaseReproducesTheReferenceChunk(string dir)
    {
        var policy = Policies[dir].Value;
        Assert.Equal(4, policy.Description.ChunkLength);
        Assert.Equal(5, policy.Description.ProprioDim);
        Assert.Equal(2, policy.Description.ImagesPerObservation);
        Assert.Equal(dir == "checkpoint-film", policy.Model.Oft!.UseFilm);
        foreach (var c in Cases())
        {
            var p = policy.Predict(Observation(c));
            // The prompt as the reference feeds it: BOS … "Out:" and the lone "▁" (appended when the tokenizer's ids lack it).
            Assert.Equal(c.InputIds[..(c.NumPromptTokens + 1)], p.PromptTokenIds);
            Assert.Empty(p.ActionTokenIds);
            var (normalized, actions) = c.Expected[dir];
            Assert.Equal(4, p.ChunkLength);
            for (int k = 0; k < 4; k++)
                for (int d = 0; d < 7; d++)
                {
                    Assert.Equal(normalized[k][d], p.NormalizedActions[k][d], 1e-4);
                    Assert.Equal(actions[k][d], p.Actions[k][d], 1e-4);
                }
            Assert.Equal(p.Actions[0], p.Action);
        }
    }

    [Fact]
    public void ProprioIsNormalizedAsTheReferenceDoes()
    {
        var policy = Policies["checkpoint"].Value;
        foreach (var c in Cases())
        {
            var n = ActionNormalizer.Normalize(c.Proprio, policy.Checkpoint.ProprioStats[c.UnnormKey], BoundsNormalization.Q99, clipUnmasked: true);
            for (int i = 0; i < n.Length; i++) Assert.Equal(c.NormalizedProprio[i], n[i], 1e-6);
        }
    }

    [Fact]
    public void ABatchOfThreeEqualsThreeSinglePredictions()
    {
        var policy = Policies["checkpoint-film"].Value;
        var cases = Cases();
        // Prompts of different lengths: the batch right-pads, and padded keys must not change any row.
        Assert.Equal(3, cases.Select(c => c.NumPromptTokens).Distinct().Count());
        var batch = policy.PredictBatch(cases.Select(Observation).ToList());
        for (int i = 0; i < cases.Count; i++)
        {
            var single = policy.Predict(Observation(cases[i]));
            for (int k = 0; k < 4; k++)
                for (int d = 0; d < 7; d++) Assert.Equal(single.NormalizedActions[k][d], batch[i].NormalizedActions[k][d], 1e-5);
        }
    }

    [Fact]
    public void TheProprioAndTheCamerasAreChecked()
    {
        var policy = Policies["checkpoint"].Value;
        var c = Cases()[0];
        var ok = Observation(c);
        string Error(VlaObservation o) => Assert.Throws<PolicyInputException>(() => policy.Predict(o)).Message;
        Assert.Equal("the model takes the robot's proprioceptive state (5 values); none was given", Error(ok with { Proprio = null }));
        Assert.Equal("the model takes a proprio of 5 values, got 4", Error(ok with { Proprio = c.Proprio[..4] }));
        Assert.Equal("proprio value 2 is NaN; every value must be finite", Error(ok with { Proprio = [1, 2, float.NaN, 4, 5] }));
        Assert.Equal("the model takes 2 images per observation (primary, wrist), got 1", Error(ok with { Images = [ok.Images[0]] }));
    }

    [Fact]
    public void ConstantsComeFromFlagsThenConfigThenPlatform()
    {
        var policy = VlaPolicy.Load(TestPaths.Fixture("oft-golden", "checkpoint"), new PolicyOptions { ActionChunk = 2 });
        Assert.Equal(2, policy.Description.ChunkLength);
        Assert.Contains("chunk 2 (flag)", policy.Model.Oft!.ConstantsSource);
        Assert.Contains("cameras 2 (config.json)", policy.Model.Oft!.ConstantsSource);
        // A chunk the head was not trained for still runs (the head reads one action at a time): two actions come back.
        var p = policy.Predict(Observation(Cases()[0]));
        Assert.Equal(2, p.ChunkLength);
        Assert.All(p.Actions.SelectMany(a => a), v => Assert.True(float.IsFinite(v)));
        policy.Dispose();
    }

    [Fact]
    public void TheDiscreteTokenVariantReadsTheLanguageModelsOwnLogits()
    {
        // The same checkpoint without its L1 head, config.json saying so: modeling_prismatic's action_head=None path.
        using var tmp = new TestPaths.TempDir();
        var source = TestPaths.Fixture("oft-golden", "checkpoint");
        foreach (var f in Directory.GetFiles(source).Where(f => !Path.GetFileName(f).StartsWith("action_head--"))) File.Copy(f, tmp[Path.GetFileName(f)]);
        var config = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(tmp["config.json"]))!;
        config["oft"]!["action_head"] = "discrete";
        File.WriteAllText(tmp["config.json"], config.ToJsonString());
        using var policy = VlaPolicy.Load(tmp.Path);
        Assert.Equal("parallel-tokens", policy.Description.ActionHead);

        using var doc = JsonDocument.Parse(File.ReadAllText(TestPaths.Fixture("oft-golden", "expected.json")));
        var expected = doc.RootElement.GetProperty("cases").EnumerateArray().ToList();
        var cases = Cases();
        for (int i = 0; i < cases.Count; i++)
        {
            var e = expected[i].GetProperty("checkpoint").GetProperty("parallel_discrete");
            // Every argmax here wins by at least 2.5e-3 in float64, far above float32's error.
            Assert.True(e.GetProperty("margins").EnumerateArray().All(m => m.GetDouble() > 1e-3));
            var p = policy.Predict(Observation(cases[i]));
            Assert.Equal(e.GetProperty("token_ids").EnumerateArray().Select(t => t.GetInt32()), p.ActionTokenIds);
            var actions = e.GetProperty("actions").EnumerateArray().Select(r => r.EnumerateArray().Select(v => v.GetDouble()).ToArray()).ToArray();
            for (int k = 0; k < 4; k++)
                for (int d = 0; d < 7; d++) Assert.Equal(actions[k][d], p.Actions[k][d], 1e-5);
        }
    }
}
