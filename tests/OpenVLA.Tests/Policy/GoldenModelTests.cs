using System.Text.Json;
using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;

namespace OpenVLA.Tests.Policy;

/// <summary>
/// The golden fixture: a small checkpoint in the real Hugging Face layout and what an independent float64 implementation
/// of the reference inference computes for three images (tests/fixtures/openvla-golden/README.md). In float32 every token
/// id must match and every action must agree to about 1e-5.
/// </summary>
public class GoldenModelTests
{
    public sealed record Case(string Image, string Instruction, string UnnormKey, int[] PromptTokenIds, int[] ActionTokenIds,
        double[] NormalizedAction, double[] Action);

    public static IReadOnlyList<Case> Cases()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(TestPaths.Fixture("openvla-golden", "expected.json")));
        return doc.RootElement.GetProperty("cases").EnumerateArray().Select(c => new Case(
            c.GetProperty("image").GetString()!, c.GetProperty("instruction").GetString()!, c.GetProperty("unnorm_key").GetString()!,
            c.GetProperty("prompt_token_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
            c.GetProperty("action_token_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
            c.GetProperty("normalized_action").EnumerateArray().Select(e => e.GetDouble()).ToArray(),
            c.GetProperty("action").EnumerateArray().Select(e => e.GetDouble()).ToArray())).ToList();
    }

    public static RgbImage ReadPng(string path) => ImageDecoder.Load(path);

    static readonly Lazy<VlaPolicy> Policy = new(() => VlaPolicy.Load(TestPaths.Fixture("openvla-golden", "checkpoint")));

    [Fact]
    public void EachCaseReproducesTheReferenceTokensAndActions()
    {
        foreach (var c in Cases())
        {
            var image = ReadPng(TestPaths.Fixture("openvla-golden", c.Image));
            var p = Policy.Value.Predict(new VlaObservation([image], c.Instruction, c.UnnormKey));
            Assert.Equal(c.PromptTokenIds, p.PromptTokenIds);
            Assert.Equal(c.ActionTokenIds, p.ActionTokenIds);
            for (int i = 0; i < 7; i++)
            {
                Assert.Equal(c.NormalizedAction[i], p.NormalizedAction[i], 1e-6);
                Assert.Equal(c.Action[i], p.Action[i], 1e-5);
            }
        }
    }

    [Fact]
    public void ABatchOfThreeEqualsThreeSinglePredictions()
    {
        var cases = Cases();
        var observations = cases.Select(c => new VlaObservation([ReadPng(TestPaths.Fixture("openvla-golden", c.Image))], c.Instruction, c.UnnormKey)).ToList();
        // The three prompts have different lengths, so the batch exercises left padding.
        Assert.Equal(3, cases.Select(c => c.PromptTokenIds.Length).Distinct().Count());
        var batch = Policy.Value.PredictBatch(observations);
        for (int i = 0; i < cases.Count; i++)
        {
            var single = Policy.Value.Predict(observations[i]);
            Assert.Equal(single.ActionTokenIds, batch[i].ActionTokenIds);
            Assert.Equal(single.Action, batch[i].Action);
            Assert.Equal(cases[i].ActionTokenIds, batch[i].ActionTokenIds);
        }
    }
}
