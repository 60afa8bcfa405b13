using OpenVLA.Policy.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.Policy;

public class LinearLoraTests
{
    static Linear MakeLinear(ScalarType dtype)
    {
        var lin = new Linear(16, 8, true, ModelPrecision.Cpu(dtype));
        using var g = torch.no_grad();
        lin.weight.copy_(randn(8, 16, generator: new Generator(1)));
        lin.bias!.copy_(randn(8, generator: new Generator(2)));
        return lin;
    }

    [Fact]
    public void AdapterStartsAsIdentityAndFreezesTheBase()
    {
        var lin = MakeLinear(ScalarType.Float32);
        var x = randn(3, 16, generator: new Generator(3));
        var before = lin.forward(x);
        lin.AttachLora(rank: 4, alpha: 2, dropout: 0, new Generator(4));
        Assert.True(Tensors.Identical(before, lin.forward(x)));       // B = 0
        Assert.False(lin.weight.requires_grad);
        Assert.True(lin.lora_A!.weight.requires_grad);
        Assert.Equal([4L, 16L], lin.lora_A.weight.shape);
        Assert.Equal([8L, 4L], lin.lora_B!.weight.shape);
        Assert.Equal(0.5, lin.LoraScaling);
        // PEFT key names inside the module's state dict.
        Assert.Contains("lora_A.weight", lin.state_dict().Keys);
        Assert.Contains("lora_B.weight", lin.state_dict().Keys);
        // A ~ N(0, 1/r): std close to 0.25 over 64 draws.
        Assert.InRange(lin.lora_A.weight.std().item<float>(), 0.15, 0.35);
    }

    [Fact]
    public void MergedWeightGivesTheAdapterOutput()
    {
        var lin = MakeLinear(ScalarType.Float32);
        lin.AttachLora(rank: 4, alpha: 8, dropout: 0, new Generator(5));
        using (torch.no_grad()) lin.lora_B!.weight.copy_(randn(8, 4, generator: new Generator(6)));
        var x = randn(5, 16, generator: new Generator(7));
        var withAdapter = lin.forward(x);
        // By hand: x·Wᵀ + b + (x·Aᵀ·Bᵀ)·(alpha/r) with alpha/r = 2.
        var manual = x.matmul(lin.weight.t()) + lin.bias! + x.matmul(lin.lora_A!.weight.t()).matmul(lin.lora_B!.weight.t()) * 2;
        Assert.True(withAdapter.allclose(manual, rtol: 1e-5, atol: 1e-5));
        lin.MergeLora();
        Assert.False(lin.HasLora);
        Assert.DoesNotContain("lora_A.weight", lin.state_dict().Keys);
        Assert.True(lin.forward(x).allclose(withAdapter, rtol: 1e-5, atol: 1e-5));
    }
}
