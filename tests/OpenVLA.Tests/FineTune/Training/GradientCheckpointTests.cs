using OpenVLA.FineTune.Training;
using OpenVLA.Tests.Policy;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.FineTune.Training;

public class GradientCheckpointTests
{
    /// <summary>Gradients of every trainable parameter after one forward/backward, by name.</summary>
    static Dictionary<string, Tensor> Gradients(bool checkpointing, bool full)
    {
        using var tmp = new TestPaths.TempDir();
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(TrainingFixtures.MakeBase(tmp["base"]));
        var options = TrainingFixtures.SmallRun(full) with { GradientCheckpointing = checkpointing };
        using var trainer = new Trainer(model, checkpoint, tokenizer, options, tmp["run"], TrainingFixtures.Statistics());
        if (!full)
        {
            // Non-zero B everywhere, so gradients reach A and every path through the adapters.
            using var noGrad = torch.no_grad();
            foreach (var (name, p) in model.named_parameters().Where(p => p.name.EndsWith("lora_B.weight")))
                p.copy_(randn(p.shape, generator: new Generator((ulong)name.Length)) * 0.1);
        }
        using var batch = trainer.Objective.Build(TrainingFixtures.Examples(3), CPU, ScalarType.Float32);
        var (hidden, labels) = ActionObjective.Forward(model, batch, checkpointing ? GradientCheckpointing.DecoderLayers(null) : null);
        trainer.Objective.Score(hidden, labels, model.language_model.Logits).Loss.backward();
        var grads = model.named_parameters().Where(p => p.parameter.requires_grad)
            .ToDictionary(p => p.name, p => p.parameter.grad?.clone() ?? throw new Xunit.Sdk.XunitException($"{p.name} got no gradient"));
        model.Dispose();
        return grads;
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void CheckpointedBlocksGiveBitIdenticalGradients(bool full)
    {
        var plain = Gradients(checkpointing: false, full);
        var recomputed = Gradients(checkpointing: true, full);
        Assert.Equal(plain.Keys.Order(), recomputed.Keys.Order());
        Assert.Contains(plain.Keys, k => k.Contains("vision_backbone.featurizer.blocks.0"));
        var differing = plain.Where(kv => !Tensors.Identical(kv.Value, recomputed[kv.Key]))
            .Select(kv => $"{kv.Key}: max diff {(kv.Value - recomputed[kv.Key]).abs().max().item<float>()}").ToList();
        Assert.True(differing.Count == 0, string.Join("; ", differing));
        Assert.Contains(plain.Values, g => g.abs().sum().item<float>() > 0);
    }
}
