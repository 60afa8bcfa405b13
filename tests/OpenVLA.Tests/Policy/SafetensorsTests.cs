using System.Text;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;

namespace OpenVLA.Tests.Policy;

public class SafetensorsTests
{
    static void WriteRaw(string path, string header, int dataBytes, ulong? claimedLength = null)
    {
        var h = Encoding.UTF8.GetBytes(header);
        using var fs = File.Create(path);
        fs.Write(BitConverter.GetBytes(claimedLength ?? (ulong)h.Length));
        fs.Write(h);
        fs.Write(new byte[dataBytes]);
    }

    [Fact]
    public void ValuesRoundTripExactlyForEveryStoredDtype()
    {
        using var tmp = new TestPaths.TempDir();
        var f32 = torch.tensor(new float[] { 1.5f, -2.25f, 3e-8f, 65504f, 0, 7 }).view(2, 3);
        var bf16 = torch.tensor(new float[] { 0.1f, -1, 3.140625f, 1e20f }).to(torch.ScalarType.BFloat16);
        var i8 = torch.tensor(new sbyte[] { -128, -1, 0, 127 });
        SafetensorsWriter.Write(tmp["t.safetensors"], new Dictionary<string, torch.Tensor> { ["a"] = f32, ["b"] = bf16, ["c"] = i8 },
            new Dictionary<string, string> { ["format"] = "pt" });

        // The header is space-padded so the data section starts on an 8-byte boundary.
        var bytes = File.ReadAllBytes(tmp["t.safetensors"]);
        Assert.Equal(0UL, BitConverter.ToUInt64(bytes, 0) % 8);

        using var st = SafetensorsFile.Open(tmp["t.safetensors"]);
        Assert.Equal("pt", st.Metadata["format"]);
        Assert.Equal(["F32", "BF16", "I8"], new[] { "a", "b", "c" }.Select(n => st.Tensors[n].DType));
        Assert.True(Tensors.Identical(f32, st.Load("a")));
        Assert.True(Tensors.Identical(bf16, st.Load("b")));
        Assert.True(Tensors.Identical(i8, st.Load("c")));
        Assert.Equal([2L, 3L], st.Load("a").shape);
    }

    [Theory]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, 1_000_000UL, "header length 1000000 runs past the end of the file")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],", 8, null, "header is not valid JSON")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, null, "tensors 'a' and 'b' overlap")]
    [InlineData("{\"a\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, null, "tensor 'a' has unknown dtype 'Q4'")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, null, "tensor 'a' ends at byte 8 past the data section (4 bytes)")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, null, "needs 12 bytes, its offsets span 8")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, null, "negative dimension")]
    [InlineData("[1,2]", 0, null, "header is not a JSON object")]
    public void CorruptHeadersGiveAClearErrorNamingTheFile(string header, int dataBytes, ulong? claimed, string expected)
    {
        using var tmp = new TestPaths.TempDir();
        var path = tmp["bad.safetensors"];
        WriteRaw(path, header, dataBytes, claimed);
        var e = Assert.Throws<CheckpointException>(() => SafetensorsFile.Open(path));
        Assert.StartsWith(path + ": ", e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void FileShorterThanTheLengthFieldIsRejected()
    {
        using var tmp = new TestPaths.TempDir();
        File.WriteAllBytes(tmp["short.safetensors"], [1, 2, 3]);
        var e = Assert.Throws<CheckpointException>(() => SafetensorsFile.Open(tmp["short.safetensors"]));
        Assert.Contains("not a safetensors file (3 bytes", e.Message);
    }
}
