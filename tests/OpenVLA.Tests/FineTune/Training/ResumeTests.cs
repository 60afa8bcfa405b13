using OpenVLA.FineTune.Training;
using OpenVLA.Tests.Policy;
using TorchSharp;

namespace OpenVLA.Tests.FineTune.Training;

public class ResumeTests
{
    static List<double> Run(string baseDir, string outDir, TrainerOptions options, int steps, int saveAt = -1)
    {
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(baseDir);
        using var _ = model;
        using var trainer = new Trainer(model, checkpoint, tokenizer, options, outDir, TrainingFixtures.Statistics());
        var source = new InMemoryExampleSource(TrainingFixtures.Examples(5), seed: 9);
        if (Trainer.LatestCheckpoint(outDir) is { } latest) trainer.Resume(latest, source);
        var losses = new List<double>();
        while (trainer.Step < steps)
        {
            var m = trainer.TrainStep(source);
            trainer.Metrics.Append(m);
            losses.Add(m.Loss);
            if (trainer.Step == saveAt) trainer.Save(source, baseDir);
        }
        return losses;
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void ResumedRunContinuesTheSameLossSequence(bool full)
    {
        using var tmp = new TestPaths.TempDir();
        var baseDir = TrainingFixtures.MakeBase(tmp["base"]);
        // Dropout and accumulation exercise the generator and the micro-batch loop; the cosine schedule the step counter.
        var options = TrainingFixtures.SmallRun(full) with
        {
            GradAccumulation = 2, Schedule = "cosine", WarmupSteps = 2, MaxSteps = 7,
            Lora = new(4, 8, 0.1, ["all-linear"]),
        };
        var uninterrupted = Run(baseDir, tmp["a"], options, 7);

        // Stop after the save at step 4 (plus one step whose log line the resume must drop), then continue.
        var first = Run(baseDir, tmp["b"], options, 5, saveAt: 4);
        var rest = Run(baseDir, tmp["b"], options, 7);
        Assert.Equal(uninterrupted.Take(5), first);
        Assert.Equal(uninterrupted.Skip(4), rest);
        var logged = new MetricsLog(Path.Combine(tmp["b"], MetricsLog.FileName)).Read();
        Assert.Equal([1L, 2, 3, 4, 5, 6, 7], logged.Select(e => e["step"]!.GetValue<long>()));
    }

    [Fact]
    public void ResumeRefusesChangedHyperParameters()
    {
        using var tmp = new TestPaths.TempDir();
        var baseDir = TrainingFixtures.MakeBase(tmp["base"]);
        Run(baseDir, tmp["out"], TrainingFixtures.SmallRun(), 2, saveAt: 2);
        var e = Assert.Throws<OpenVLA.Policy.PolicyInputException>(() => Run(baseDir, tmp["out"], TrainingFixtures.SmallRun() with { BatchSize = 2 }, 3));
        Assert.Contains("batch_size", e.Message);
    }

    [Fact]
    public void SavesAreCompleteDirectoriesAndOldOnesArePruned()
    {
        using var tmp = new TestPaths.TempDir();
        var baseDir = TrainingFixtures.MakeBase(tmp["base"]);
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(baseDir);
        using var _ = model;
        using var trainer = new Trainer(model, checkpoint, tokenizer, TrainingFixtures.SmallRun() with { KeepCheckpoints = 2 }, tmp["out"], TrainingFixtures.Statistics());
        var source = new InMemoryExampleSource(TrainingFixtures.Examples(4), seed: 1);
        for (int i = 0; i < 3; i++) { trainer.TrainStep(source); trainer.Save(source, baseDir); }
        Directory.CreateDirectory(Path.Combine(tmp["out"], "step-0000009.tmp"));   // an interrupted save
        Assert.Equal(["step-0000002", "step-0000003"], Trainer.Checkpoints(tmp["out"]).Select(Path.GetFileName));
        var latest = Trainer.LatestCheckpoint(tmp["out"])!;
        Assert.True(File.Exists(Path.Combine(latest, "adapter", "adapter_config.json")));
        Assert.True(File.Exists(Path.Combine(latest, "adapter", "adapter_model.safetensors")));
        Assert.True(File.Exists(Path.Combine(latest, "dataset_statistics.json")));
        Assert.True(File.Exists(Path.Combine(latest, "training_state", "optimizer.safetensors")));
        Assert.False(Directory.Exists(Path.Combine(latest, "model")));   // no --merge
    }
}
