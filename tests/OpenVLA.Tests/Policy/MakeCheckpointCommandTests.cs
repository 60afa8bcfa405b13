using System.Text.Json;
using OpenVLA.Policy.Checkpoint;

namespace OpenVLA.Tests.Policy;

public class MakeCheckpointCommandTests
{
    static readonly string Image = TestPaths.Fixture("openvla-golden", "image0.png");

    [Fact]
    public void PatchSizeGivesBothTowersAFinerGridThatLoadsAndPredicts()
    {
        using var dir = new TestPaths.TempDir();
        var r = CliRunner.Run("make-checkpoint", "--preset", "tiny", "--patch-size", "7", "--out", dir.Path);
        Assert.True(r.ExitCode == 0, r.Stderr);

        var ckpt = VlaCheckpoint.Open(dir.Path);
        Assert.All(ckpt.Config.VisionTowers, t => Assert.Equal(7, t.PatchSize));
        Assert.Equal(64, ckpt.Config.NumPatches);   // 56 px / 7 = 8 per side, against the preset's 4 x 4
        // The stored tensors have the finer grid's shapes: a 7 px patch kernel and 64 position embeddings per tower.
        using (var file = SafetensorsFile.Open(Path.Combine(dir.Path, "model.safetensors")))
        {
            // tiny's towers are 32 and 64 wide.
            Assert.Equal([32L, 3, 7, 7], file.Tensors["vision_backbone.featurizer.patch_embed.proj.weight"].Shape);
            Assert.Equal([64L, 3, 7, 7], file.Tensors["vision_backbone.fused_featurizer.patch_embed.proj.weight"].Shape);
            Assert.Equal([1L, 64, 32], file.Tensors["vision_backbone.featurizer.pos_embed"].Shape);
            Assert.Equal([1L, 64, 64], file.Tensors["vision_backbone.fused_featurizer.pos_embed"].Shape);
        }

        var p = CliRunner.Run("predict", "--checkpoint", dir.Path, "--image", Image, "--instruction", "pick up the red cube",
            "--unnorm-key", "sim_tabletop", "--json");
        Assert.True(p.ExitCode == 0, p.Stderr);
        using var doc = JsonDocument.Parse(p.Stdout);
        Assert.Equal(7, doc.RootElement.GetProperty("action").GetArrayLength());
    }

    [Theory]
    [InlineData("tiny", "5", "does not divide")]
    [InlineData("tiny", "0", "does not divide")]
    [InlineData("openvla-7b", "14", "published towers")]
    public void BadPatchSizeExitsWithCode2AndWritesNothing(string preset, string patch, string expected)
    {
        using var dir = new TestPaths.TempDir();
        string outDir = Path.Combine(dir.Path, "ckpt");
        var r = CliRunner.Run("make-checkpoint", "--preset", preset, "--patch-size", patch, "--out", outDir);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains(expected, r.Stderr);
        Assert.Single(r.Stderr.Trim().Split('\n'));
        Assert.False(Directory.Exists(outDir));
    }
}
