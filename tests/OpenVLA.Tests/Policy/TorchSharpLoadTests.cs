using TorchSharp;

namespace OpenVLA.Tests.Policy;

public class TorchSharpLoadTests
{
    [Fact]
    public void NativeLibraryLoadsAndComputes()
    {
        // Fails with TypeInitializationException when build/PatchTorchSharpNative.cs did not run on a Debian 12 libstdc++.
        using var a = torch.tensor(new float[] { 1, 2, 3 });
        Assert.Equal(14f, (a * a).sum().item<float>());
    }
}
