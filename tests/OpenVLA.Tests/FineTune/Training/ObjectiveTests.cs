using OpenVLA.FineTune.Training;
using OpenVLA.Tests.Policy;
using OpenVLA.Policy;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.FineTune.Training;

public class ObjectiveTests
{
    // 12-token vocabulary whose last 4 ids are action bins: edges −1, −1/3, 1/3, 1 → centres −2/3, 0, 2/3.
    static readonly ActionTokenizer Bins = new(vocabSize: 12, numBins: 4);

    [Fact]
    public void LossAndMetricsOnAHandCheckedCase()
    {
        // Sequence of 4 positions; labels: −100, −100, action id 9, EOS 2. Position 1 predicts 9, position 2 predicts 2.
        var labels = tensor(new long[] { -100, -100, 9, 2 }, [1, 4]);
        var logits = zeros(1, 4, 12);
        logits[0, 1, 9] = tensor(MathF.Log(11));   // p(9) = 11 / (11 + 11·1) = 0.5
        var r = ActionObjective.ScoreFullLogits(logits, labels, Bins);
        // (−ln 0.5 − ln(1/12)) / 2: the EOS row is uniform over 12 ids.
        Assert.Equal((Math.Log(2) + Math.Log(12)) / 2, r.LossValue, 5);
        Assert.Equal(2, r.TargetTokens);
        Assert.Equal(1, r.ActionTokens);      // EOS is a target but not an action token
        Assert.Equal(1.0, r.ActionAccuracy);
        Assert.Equal(0.0, r.L1);

        // Predicting id 10 instead: wrong bin, decoded 0 vs 2/3.
        logits[0, 1, 10] = tensor(5f);
        var wrong = ActionObjective.ScoreFullLogits(logits, labels, Bins);
        Assert.Equal(0.0, wrong.ActionAccuracy);
        Assert.Equal(2.0 / 3, wrong.L1, 6);
    }

    [Fact]
    public void MaskedPositionsNeverContribute()
    {
        var labels = tensor(new long[] { -100, -100, 9, 2 }, [1, 4]);
        var logits = randn([1, 4, 12], generator: new Generator(3));
        var before = ActionObjective.ScoreFullLogits(logits, labels, Bins);
        // Position 0 predicts a masked label, position 3 predicts nothing (last): change them arbitrarily.
        logits[0, 0] = full(12, 100f);
        logits[0, 3, 5] = tensor(-1000f);
        var after = ActionObjective.ScoreFullLogits(logits, labels, Bins);
        Assert.Equal(before.LossValue, after.LossValue);
        // And their gradient is exactly zero.
        var l = logits.clone().requires_grad_(true);
        ActionObjective.ScoreFullLogits(l, labels, Bins).Loss.backward();
        Assert.Equal(0f, l.grad!.select(1, 0).abs().sum().item<float>());
        Assert.Equal(0f, l.grad!.select(1, 3).abs().sum().item<float>());
        Assert.NotEqual(0f, l.grad!.select(1, 1).abs().sum().item<float>());
    }

    [Fact]
    public void BatchFollowsTheReferenceLayout()
    {
        using var tmp = new TestPaths.TempDir();
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(TrainingFixtures.MakeBase(tmp.Path));
        using var _ = model;
        using var trainer = new Trainer(model, checkpoint, tokenizer, TrainingFixtures.SmallRun(), tmp["run"], TrainingFixtures.Statistics());
        var objective = trainer.Objective;
        var examples = TrainingFixtures.Examples(2);
        examples[1] = examples[1] with { Instruction = "open the drawer and then close it again slowly" };
        using var batch = objective.Build(examples, CPU, ScalarType.Float32);

        int pad = checkpoint.Config.Text.PadTokenId;
        var prompt0 = tokenizer.PromptIds(examples[0].Instruction);
        var ids = batch.InputIds;
        var labels = batch.Labels;
        Assert.Equal(prompt0.Length + 8, batch.Lengths[0]);
        Assert.True(batch.Lengths[1] > batch.Lengths[0]);
        Assert.Equal(batch.Lengths[1], (int)ids.shape[1]);
        // Row 0: BOS + prompt + "▁", 7 action ids, EOS, then padding with the pad id and label −100.
        for (int i = 0; i < prompt0.Length; i++)
        {
            Assert.Equal(prompt0[i], ids[0, i].item<long>());
            Assert.Equal(-100, labels[0, i].item<long>());
        }
        for (int d = 0; d < 7; d++)
        {
            long expected = objective.ActionTokenizer.Encode(examples[0].NormalizedAction[d]);
            Assert.Equal(expected, ids[0, prompt0.Length + d].item<long>());
            Assert.Equal(expected, labels[0, prompt0.Length + d].item<long>());
        }
        Assert.Equal(tokenizer.EosId, labels[0, prompt0.Length + 7].item<long>());
        for (int i = batch.Lengths[0]; i < ids.shape[1]; i++)
        {
            Assert.Equal(pad, ids[0, i].item<long>());
            Assert.Equal(-100, labels[0, i].item<long>());
            Assert.False(batch.Valid[0, i].item<bool>());
        }
        Assert.Equal(16, labels.ne(-100).sum().item<long>());
        Assert.Equal(prompt0[^1], tokenizer.SpaceId);

        // Multimodal labels: −100 at BOS and at every image position; 8 shifted targets per row.
        using var noGrad = torch.no_grad();
        var (hidden, mmLabels) = ActionObjective.Forward(model, batch);
        int patches = checkpoint.Config.NumPatches;
        Assert.Equal(ids.shape[1] + patches, mmLabels.shape[1]);
        Assert.Equal(0, mmLabels.narrow(1, 0, 1 + patches).ne(-100).sum().item<long>());
        var (_, targets) = ActionObjective.ShiftedTargets(mmLabels);
        Assert.Equal(16, targets.shape[0]);

        // Scoring only the target positions equals scoring the full logits the reference computes.
        var partial = objective.Score(hidden, mmLabels, model.language_model.Logits);
        var fullLogits = ActionObjective.ScoreFullLogits(model.language_model.Logits(hidden), mmLabels, objective.ActionTokenizer);
        Assert.Equal(fullLogits.LossValue, partial.LossValue, 5);
        Assert.Equal(fullLogits.ActionAccuracy, partial.ActionAccuracy);
        Assert.Equal(fullLogits.L1, partial.L1, 9);
    }

    [Fact]
    public void RightPaddingDoesNotChangeARowsLoss()
    {
        using var tmp = new TestPaths.TempDir();
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(TrainingFixtures.MakeBase(tmp.Path));
        using var _ = model;
        using var trainer = new Trainer(model, checkpoint, tokenizer, TrainingFixtures.SmallRun(full: true), tmp["run"], TrainingFixtures.Statistics());
        var examples = TrainingFixtures.Examples(2);
        examples[1] = examples[1] with { Instruction = "open the drawer and then close it again slowly" };
        using var noGrad = torch.no_grad();
        model.eval();
        using var alone = trainer.Objective.Build([examples[0]], CPU, ScalarType.Float32);
        using var padded = trainer.Objective.Build(examples, CPU, ScalarType.Float32);
        var (h1, l1) = ActionObjective.Forward(model, alone);
        var (h2, l2) = ActionObjective.Forward(model, padded);
        long len = h1.shape[1];
        Assert.True(h1[0].allclose(h2[0].narrow(0, 0, len), rtol: 1e-5, atol: 1e-5));
    }
}
