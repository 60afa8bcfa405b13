using OpenVLA.FineTune.Training;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Quantization;
using OpenVLA.Tests.Policy;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.FineTune.Training;

/// <summary>LoRA on a frozen int8 base (QLoRA-style): gradients flow through the dequantized weight, nothing else trains.</summary>
public class QuantizedBaseTests
{
    [Fact]
    public void InputGradientIsTheGradientThroughTheDequantizedWeight()
    {
        var lin = new Linear(32, 8, true, ModelPrecision.Cpu(ScalarType.BFloat16));
        using (torch.no_grad())
        {
            lin.weight.copy_(randn(8, 32, generator: new Generator(1)));
            lin.bias!.copy_(randn(8, generator: new Generator(2)));
        }
        lin.Quantize(QuantizationOptions.Parse("int8"));
        var w = lin.Quantized!.Dequantize(ScalarType.Float32);
        var x = randn([5, 32], generator: new Generator(3)).to(ScalarType.BFloat16).requires_grad_(true);
        var dy = randn([5, 8], generator: new Generator(4)).to(ScalarType.BFloat16);
        var y = lin.forward(x);
        y.backward([dy]);
        // dx = dy · W, with W the int8 weight times its scales.
        var expected = dy.to(ScalarType.Float32).matmul(w);
        Assert.True(x.grad!.to(ScalarType.Float32).allclose(expected, rtol: 2e-2, atol: 2e-2), $"max diff {(x.grad!.to(ScalarType.Float32) - expected).abs().max().item<float>()}");
        // Same forward as the inference path.
        using (torch.no_grad()) Assert.True(Tensors.Identical(y.detach(), lin.forward(x.detach())));
    }

    [Fact]
    public void AdaptersLearnOnAnInt8Base()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["base"], "tiny", 3, ScalarType.BFloat16);
        var checkpoint = VlaCheckpoint.Open(tmp["base"]);
        using var model = new OpenVlaModel(checkpoint.Config, ModelPrecision.Cpu(ScalarType.BFloat16));
        WeightLoader.Load(model, checkpoint, QuantizationOptions.Parse("int8"));
        var tokenizer = OpenVLA.Policy.Tokenization.VlaTokenizer.Load(checkpoint.TokenizerPath);
        Assert.Throws<ArgumentException>(() => new Trainer(model, checkpoint, tokenizer, TrainingFixtures.SmallRun() with { Merge = true }, tmp["x"], TrainingFixtures.Statistics()));

        using var trainer = new Trainer(model, checkpoint, tokenizer, TrainingFixtures.SmallRun() with { GradientCheckpointing = true }, tmp["run"], TrainingFixtures.Statistics());
        Assert.All(model.named_parameters(), p => Assert.Equal(p.name.Contains(".lora_"), p.parameter.requires_grad));
        var source = new InMemoryExampleSource(TrainingFixtures.Examples(6), seed: 5);
        var losses = Enumerable.Range(0, 20).Select(_ => trainer.TrainStep(source).Loss).ToList();
        Assert.True(losses.Skip(15).Average() < 0.6 * losses.Take(3).Average(), $"loss {losses[0]:0.###} → {losses[^1]:0.###}");
        // Every adapter got a gradient, including those inside the quantized LLM, projector and towers.
        Assert.All(model.named_parameters().Where(p => p.name.EndsWith("lora_A.weight")), p => Assert.True(p.parameter.abs().sum().item<float>() > 0));
        trainer.Save(source, tmp["base"]);
        Assert.True(File.Exists(Path.Combine(Trainer.LatestCheckpoint(tmp["run"])!, "adapter", "adapter_model.safetensors")));
    }
}
