using System.IO.Compression;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;

namespace OpenVLA.Tests.Policy;

/// <summary>The .pt reader against files written by the real torch.save (tests/fixtures/torch-pt, made by
/// tools/oftref/make_pt_cases.py with Debian's python3-torch 1.13); the expected values are the formulas that script used.</summary>
public class TorchStateDictTests
{
    static string Pt(string name) => TestPaths.Fixture("torch-pt", name);

    [Fact]
    public void ReadsAModuleStateDictAndStripsTheDdpPrefix()
    {
        var raw = TorchStateDict.Load(Pt("ddp_f32.pt"));
        Assert.Equal(["module.bias", "module.weight"], raw.Keys.Order(StringComparer.Ordinal));
        var sd = TorchStateDict.StripPrefix(raw, "module.");
        Assert.Equal([2L, 3L], sd["weight"].Shape);
        Assert.Equal("Float", sd["weight"].DType);
        Assert.Equal([-1f, -0.5f, 0f, 0.5f, 1f, 1.5f], sd["weight"].Data);
        Assert.Equal([0.25f, -0.75f], sd["bias"].Data);
        // A file without the prefix keeps its keys.
        Assert.Equal(sd.Keys.Order(), TorchStateDict.StripPrefix(sd, "module.").Keys.Order());
    }

    [Fact]
    public void MaterialisesViewsOfSharedBfloat16Storage()
    {
        var sd = TorchStateDict.Load(Pt("bf16_views.pt"));
        float Base(int i) => i / 8f - 1.5f;
        var t = sd["t"];   // m.t(): a transposed, non-contiguous view
        Assert.Equal("BFloat16", t.DType);
        Assert.Equal([6L, 4L], t.Shape);
        for (int i = 0; i < 6; i++)
            for (int j = 0; j < 4; j++) Assert.Equal(Base(j * 6 + i), t.Data[i * 4 + j]);
        Assert.Equal(Enumerable.Range(5, 6).Select(Base), sd["slice"].Data);            // storage offset 5
        Assert.Equal(Enumerable.Range(0, 24).Select(Base), sd["shared_a"].Data);
        Assert.Equal([2L, 3L], sd["shared_b"].Shape);
        Assert.Equal(new[] { 8, 9, 10, 14, 15, 16 }.Select(Base), sd["shared_b"].Data);
        Assert.Empty(sd["scalar"].Shape);
        Assert.Equal([Base(7)], sd["scalar"].Data);
    }

    [Fact]
    public void ReadsHalfDoubleAndIntegerStorages()
    {
        var sd = TorchStateDict.Load(Pt("mixed_types.pt"));
        Assert.Equal([1.5f, -2.25f, 65504f], sd["h"].Data);
        Assert.Equal("Half", sd["h"].DType);
        Assert.Equal([1, 2], sd["d"].Shape.Select(x => (int)x));
        Assert.Equal([(float)1e-3, 2f], sd["d"].Data);
        Assert.Equal([3f, -4f], sd["i"].Data);
    }

    [Fact]
    public void RefusesAPickleThatCallsANonWhitelistedGlobal()
    {
        File.Delete("/tmp/openvla-pickle-pwned");
        var e = Assert.Throws<CheckpointException>(() => TorchStateDict.Load(Pt("hostile_global.pt")));
        Assert.Contains("refusing the pickle global 'posix.system'", e.Message);
        Assert.DoesNotContain('\n', e.Message);
        Assert.False(File.Exists("/tmp/openvla-pickle-pwned"));
    }

    [Fact]
    public void RefusesTheLegacyFormatAndMissingFiles()
    {
        Assert.Contains("not a PyTorch zip checkpoint", Assert.Throws<CheckpointException>(() => TorchStateDict.Load(Pt("not_a_zip.pt"))).Message);
        Assert.Contains("file not found", Assert.Throws<CheckpointException>(() => TorchStateDict.Load(Pt("absent.pt"))).Message);
    }

    [Fact]
    public void RefusesUnknownOpcodesTruncationAndStoragesShorterThanTheirHeader()
    {
        using var tmp = new TestPaths.TempDir();
        string Variant(string name, Func<byte[], byte[]>? pickle = null, Func<byte[], byte[]>? storage = null)
        {
            var path = tmp[name];
            File.Copy(Pt("ddp_f32.pt"), path);
            using var zip = ZipFile.Open(path, ZipArchiveMode.Update);
            foreach (var entry in zip.Entries.ToList())
            {
                var f = entry.FullName.EndsWith("data.pkl") ? pickle : entry.FullName.Contains("/data/") ? storage : null;
                if (f is null) continue;
                byte[] bytes;
                using (var s = entry.Open()) using (var ms = new MemoryStream()) { s.CopyTo(ms); bytes = ms.ToArray(); }
                var name2 = entry.FullName;
                entry.Delete();
                using var w = zip.CreateEntry(name2).Open();
                w.Write(f(bytes));
            }
            return path;
        }
        // An opcode a state dict never uses (INST 'i', which calls a class by name) in place of the first GLOBAL.
        var inst = Variant("inst.pt", pickle: b => { var c = (byte[])b.Clone(); c[Array.IndexOf(c, (byte)'c')] = (byte)'i'; return c; });
        Assert.Contains("is not one a state dict uses", Assert.Throws<CheckpointException>(() => TorchStateDict.Load(inst)).Message);
        var cut = Variant("cut.pt", pickle: b => b[..(b.Length / 2)]);
        Assert.Throws<CheckpointException>(() => TorchStateDict.Load(cut));
        var shortStorage = Variant("short.pt", storage: b => b[..^4]);
        Assert.Contains("its header says", Assert.Throws<CheckpointException>(() => TorchStateDict.Load(shortStorage)).Message);
    }

    [Fact]
    public void StrippingAPrefixThatCollidesIsAnError()
    {
        var t = new TorchTensor("Float", [1], [0f]);
        var sd = new Dictionary<string, TorchTensor> { ["module.w"] = t, ["w"] = t };
        Assert.Throws<CheckpointException>(() => TorchStateDict.StripPrefix(sd, "module."));
    }
}

/// <summary>Our writer (make-checkpoint's OFT components): what it writes reads back exactly, bf16 rounded to nearest even.</summary>
public class TorchStateDictWriterTests
{
    [Fact]
    public void WrittenStateDictsRoundTrip()
    {
        using var tmp = new TestPaths.TempDir();
        float[] values = [1f, -2.5f, 1.00390625f, 1.01171875f, 3.3e-3f, float.MaxValue / 4, -0f, 123456.789f];
        TorchStateDict.Save(tmp["f32.pt"], [("a.weight", [2, 4], values), ("b", [], [7f])], "Float");
        var f32 = TorchStateDict.Load(tmp["f32.pt"]);
        Assert.Equal(values, f32["a.weight"].Data);
        Assert.Equal([2L, 4L], f32["a.weight"].Shape);
        Assert.Empty(f32["b"].Shape);

        TorchStateDict.Save(tmp["bf16.pt"], [("a.weight", [8], values)], "BFloat16");
        var bf16 = TorchStateDict.Load(tmp["bf16.pt"])["a.weight"];
        Assert.Equal("BFloat16", bf16.DType);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: nearest even keeps 1; 1 + 3·2^-8 rounds up to 1 + 2^-6.
        Assert.Equal(1f, bf16.Data[2]);
        Assert.Equal(1.015625f, bf16.Data[3]);
        for (int i = 0; i < values.Length; i++) Assert.True(Math.Abs(bf16.Data[i] - values[i]) <= Math.Abs(values[i]) / 256, $"{values[i]} → {bf16.Data[i]}");
        Assert.Throws<ArgumentException>(() => TorchStateDict.Save(tmp["bad.pt"], [("x", [3], [1f, 2f])], "Float"));
    }

    [Fact]
    public void MakeCheckpointWritesALoadableOftCheckpoint()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp.Path, "oft-tiny", seed: 4, TorchSharp.torch.ScalarType.BFloat16);
        Assert.True(File.Exists(tmp["action_head--0_checkpoint.pt"]));
        Assert.True(File.Exists(tmp["proprio_projector--0_checkpoint.pt"]));
        using var policy = VlaPolicy.Load(tmp.Path);
        Assert.Equal((8, 8, 2, "parallel-l1"), (policy.Description.ChunkLength, policy.Description.ProprioDim, policy.Description.ImagesPerObservation, policy.Description.ActionHead));
        var frame = GoldenModelTests.ReadPng(TestPaths.Fixture("oft-golden", "image0.png"));
        var p = policy.Predict(new VlaObservation([frame, frame], "pick up the red cube", "sim_tabletop", [0.1f, 0.2f, 0.3f, 0, 0, 0, 0.02f, 0.02f]));
        Assert.Equal(8, p.ChunkLength);
        Assert.All(p.Actions, a => Assert.Equal(7, a.Length));
        Assert.All(p.Actions.SelectMany(a => a), v => Assert.True(float.IsFinite(v)));
    }
}
