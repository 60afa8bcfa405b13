using OpenVLA.FineTune.Data;
using OpenVLA.FineTune.Training;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.FineTune.Training;

/// <summary>The auxiliary head of full training: its loss by hand, that it learns, that it is saved and resumed, never exported.</summary>
public class AuxHeadTests
{
    /// <summary>The fixture's frames are flat colours: the aux targets are that colour and one constant.</summary>
    static List<TrainingExample> Examples(int count) =>
        TrainingFixtures.Examples(count).Select(e =>
            e with { Aux = [e.Image.Pixels[0] / 255f, e.Image.Pixels[1] / 255f, e.Image.Pixels[2] / 255f, 0.25f] }).ToList();

    static ArrayStatistics Stats(IEnumerable<TrainingExample> examples) =>
        ArrayStatistics.Compute(examples.Select(e => e.Aux!).ToList(), 4);

    [Fact]
    public void LossIsTheMeanSquaredErrorOfTheLinearMapOnStandardizedTargets()
    {
        using var tmp = new TestPaths.TempDir();
        var stats = new ArrayStatistics([1f, -2f], [0.5f, 0f], [0, 0], [0, 0], [0, 0], [0, 0]);
        using var head = new AuxHead(inputSize: 3, stats, seed: 1, torch.CPU);
        // W = [[1, 0, 2], [0, -1, 0]], b = [0.5, 0]: set through the file the trainer saves and resumes from.
        SafetensorsWriter.Write(tmp["head.safetensors"], [
            new("aux_head.weight", tensor(new float[] { 1, 0, 2, 0, -1, 0 }, [2, 3])),
            new("aux_head.bias", tensor(new float[] { 0.5f, 0 }, [2])),
        ]);
        head.Load(tmp["head.safetensors"]);

        // Two examples, one patch of three features each: x1 = (1, 2, 3), x2 = (0, 1, -1).
        using var patches = tensor(new float[] { 1, 2, 3, 0, 1, -1 }, [2, 1, 3]);
        var example = TrainingFixtures.Examples(1)[0];
        TrainingExample[] examples = [example with { Aux = [2f, -2f] }, example with { Aux = [0.5f, -1.998f] }];
        using var loss = head.Loss(patches, examples);
        // Predictions: (7.5, −2), (−1.5, −1). Targets: (2 − 1) / 0.501 and 0 / 0.001, (0.5 − 1) / 0.501 and 0.002 / 0.001.
        double t11 = 1 / 0.501, t21 = -0.5 / 0.501, t22 = 0.002 / 0.001;
        double expected = (Math.Pow(7.5 - t11, 2) + Math.Pow(-2 - 0, 2) + Math.Pow(-1.5 - t21, 2) + Math.Pow(-1 - t22, 2)) / 4;
        Assert.Equal(expected, loss.item<float>(), 3);

        var noTargets = Assert.Throws<InvalidOperationException>(() => head.Loss(patches, [example, example]));
        Assert.Contains("no aux targets", noTargets.Message);
        Assert.Throws<ArgumentException>(() => head.Loss(torch.zeros(2, 2, 3), examples));
    }

    [Fact]
    public void TheHeadLearnsTheFrameColourAndIsNeverPartOfTheExportedModel()
    {
        using var tmp = new TestPaths.TempDir();
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(TrainingFixtures.MakeBase(tmp["base"]));
        using var _ = model;
        var examples = Examples(6);
        var options = TrainingFixtures.SmallRun(full: true) with { MaxSteps = 40, AuxWeight = 1.0 };
        using var trainer = new Trainer(model, checkpoint, tokenizer, options, tmp["run"], TrainingFixtures.Statistics(), Stats(examples));
        var source = new InMemoryExampleSource(examples, seed: 5);
        var before = trainer.Evaluate(examples);
        var steps = Enumerable.Range(0, 40).Select(_ => trainer.TrainStep(source)).ToList();
        var after = trainer.Evaluate(examples);

        // Standardized targets: predicting their mean scores 1 (the constant target scores 0 once the bias learns it).
        Assert.True(after.AuxLoss < 0.2 * before.AuxLoss, $"aux loss {before.AuxLoss:0.###} → {after.AuxLoss:0.###}");
        Assert.True(steps.Skip(35).Average(m => m.AuxLoss) < 0.3 * steps.Take(5).Average(m => m.AuxLoss));
        Assert.True(after.Loss < before.Loss);
        Assert.Equal(after.AuxLoss, after.ToJson()["aux_loss"]!.GetValue<double>());
        Assert.Equal(trainer.TrainableParameters, model.parameters().Sum(p => p.numel()) + 4 * (model.Config.NumPatches * model.Config.Text.HiddenSize + 1));

        var saved = trainer.Save(source, tmp["base"]);
        Assert.True(File.Exists(Path.Combine(saved, "training_state", "aux_head.safetensors")));
        using var exported = SafetensorsFile.Open(Path.Combine(saved, "model", "model.safetensors"));
        Assert.DoesNotContain(exported.Tensors.Keys, k => k.Contains("aux"));
        using var baseFile = SafetensorsFile.Open(Path.Combine(tmp["base"], "model.safetensors"));
        Assert.Equal(baseFile.Tensors.Keys.Order(), exported.Tensors.Keys.Order());   // the same tensors as the base, no more
    }

    [Fact]
    public void ARunWithTheHeadResumesExactlyAndRefusesAnotherWeight()
    {
        using var tmp = new TestPaths.TempDir();
        var baseDir = TrainingFixtures.MakeBase(tmp["base"]);
        var examples = Examples(5);
        var options = TrainingFixtures.SmallRun(full: true) with { AuxWeight = 0.5, Schedule = "cosine", MaxSteps = 6 };

        List<(double Loss, double Aux)> Run(string outDir, TrainerOptions o, int steps, int saveAt = -1)
        {
            var (model, checkpoint, tokenizer) = TrainingFixtures.Load(baseDir);
            using var _ = model;
            using var trainer = new Trainer(model, checkpoint, tokenizer, o, outDir, TrainingFixtures.Statistics(), o.AuxWeight > 0 ? Stats(examples) : null);
            var source = new InMemoryExampleSource(examples, seed: 9);
            if (Trainer.LatestCheckpoint(outDir) is { } latest) trainer.Resume(latest, source);
            var losses = new List<(double, double)>();
            while (trainer.Step < steps)
            {
                var m = trainer.TrainStep(source);
                losses.Add((m.Loss, m.AuxLoss));
                if (trainer.Step == saveAt) trainer.Save(source, baseDir);
            }
            return losses;
        }

        var uninterrupted = Run(tmp["a"], options, 6);
        var first = Run(tmp["b"], options, 3, saveAt: 3);
        var rest = Run(tmp["b"], options, 6);
        Assert.Equal(uninterrupted, [.. first, .. rest]);

        var e = Assert.Throws<OpenVLA.Policy.PolicyInputException>(() => Run(tmp["b"], options with { AuxWeight = 0 }, 7));
        Assert.Contains("aux_weight was 0.5, now 0", e.Message);

        // A run saved before the option existed has no aux_weight in its state: it trained without a head.
        var plain = options with { AuxWeight = 0 };
        Run(tmp["d"], plain, 1, saveAt: 1);
        var statePath = Path.Combine(Trainer.LatestCheckpoint(tmp["d"])!, "training_state", "state.json");
        var state = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(statePath))!;
        Assert.True(state["options"]!.AsObject().Remove("aux_weight"));
        File.WriteAllText(statePath, state.ToJsonString());
        e = Assert.Throws<OpenVLA.Policy.PolicyInputException>(() => Run(tmp["d"], options, 2));
        Assert.Contains("aux_weight was 0, now 0.5", e.Message);
        Assert.Single(Run(tmp["d"], plain, 2));
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(baseDir);
        using var _ = model;
        var none = Assert.Throws<ArgumentException>(() => new Trainer(model, checkpoint, tokenizer, options, tmp["c"], TrainingFixtures.Statistics()));
        Assert.Contains("aux_keys", none.Message);
    }
}
