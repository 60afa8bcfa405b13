using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.Preprocessing;

public class ImagePreprocessorTests
{
    private static RgbImage Solid(int width, int height, byte r, byte g, byte b) =>
        new(width, height, Enumerable.Range(0, width * height).SelectMany(_ => new[] { r, g, b }).ToArray());

    private static RgbImage Noise(int width, int height, int seed)
    {
        var px = new byte[width * height * 3];
        new Random(seed).NextBytes(px);
        return new RgbImage(width, height, px);
    }

    [Fact]
    public void KnownPixelsNormalizeWithTheBf16RoundedConstants()
    {
        var pre = new ImagePreprocessor(PreprocessorConfig.CreateDefault(4));
        using var t = pre.Preprocess(Solid(4, 4, 255, 0, 128));

        Assert.Equal([6L, 4, 4], t.shape);
        Assert.Equal(ScalarType.Float32, t.dtype);
        // DINOv2 tower (channels 0-2): (p/255 − mean)/std with mean/std rounded to bf16.
        Assert.Equal((1f - 0.484375f) / 0.228515625f, t[0, 0, 0].item<float>());          // 2.2564101
        Assert.Equal((0f - 0.455078125f) / 0.2236328125f, t[1, 3, 3].item<float>());      // −2.0349345
        Assert.Equal((128f / 255f - 0.40625f) / 0.224609375f, t[2, 1, 2].item<float>()); // 0.4261608
        Assert.Equal(2.2564101f, t[0, 0, 0].item<float>(), 6);
        // SigLIP tower (channels 3-5): (p/255 − 0.5)/0.5.
        Assert.Equal(1f, t[3, 2, 2].item<float>());
        Assert.Equal(-1f, t[4, 0, 1].item<float>());
        Assert.Equal(0.003921628f, t[5, 3, 0].item<float>(), 7); // 128/255·2 − 1
    }

    [Fact]
    public void GoldenFixtureImagesBecomeSixChannelTensorsOfTheirPixels()
    {
        // image0.png is 56x56, the model size: PIL returns it unchanged, so the tensor holds its own pixels. The expected pixels were
        // read with an independent PNG decoder (zlib inflate + PNG row filters): (0,0) = (9,165,60), (1,0) = (169,86,7),
        // (55,55) = (13,53,105).
        var config = PreprocessorConfig.Load(GoldenFixture.File("checkpoint/preprocessor_config.json"));
        var image = ImageDecoder.Load(GoldenFixture.File("image0.png"));
        Assert.Equal((56, 56), (image.Width, image.Height));

        using var t = new ImagePreprocessor(config).Preprocess(image);
        Assert.Equal([6L, 56, 56], t.shape);
        float Dino(int p, int c) => (p / 255f - config.Towers[0].NormalizeMean[c]) / config.Towers[0].NormalizeStd[c];
        float SigLip(int p) => (p / 255f - 0.5f) / 0.5f;
        Assert.Equal(Dino(9, 0), t[0, 0, 0].item<float>());
        Assert.Equal(Dino(165, 1), t[1, 0, 0].item<float>());
        Assert.Equal(Dino(60, 2), t[2, 0, 0].item<float>());
        Assert.Equal(SigLip(9), t[3, 0, 0].item<float>());
        Assert.Equal(SigLip(165), t[4, 0, 0].item<float>());
        Assert.Equal(SigLip(60), t[5, 0, 0].item<float>());
        Assert.Equal(Dino(169, 0), t[0, 0, 1].item<float>());
        Assert.Equal(SigLip(7), t[5, 0, 1].item<float>());
        Assert.Equal(Dino(13, 0), t[0, 55, 55].item<float>());
        Assert.Equal(SigLip(105), t[5, 55, 55].item<float>());
        Assert.Equal(-1.96521, t[0, 0, 0].item<float>(), 5); // (9/255 − 0.484375)/0.228515625

        foreach (var name in new[] { "image1.png", "image2.png" })
        {
            using var u = new ImagePreprocessor(config).Preprocess(ImageDecoder.Load(GoldenFixture.File(name)));
            Assert.Equal([6L, 56, 56], u.shape);
        }
    }

    [Fact]
    public void AnySizeAndAspectRatioIsResizedToTheModelSize()
    {
        var pre = new ImagePreprocessor(PreprocessorConfig.CreateDefault(8));
        var wide = Noise(37, 5, 1);
        using var t = pre.Preprocess(wide);
        Assert.Equal([6L, 8, 8], t.shape);

        // resize-naive: both towers see exactly the PIL bicubic resize of the whole frame (aspect ratio not preserved).
        var resized = PillowResampler.Resize(wide, 8, 8);
        Assert.Equal(resized.Pixels, pre.TowerImage(wide, 0).Pixels);
        Assert.Equal((resized.Pixels[0] / 255f - 0.5f) / 0.5f, t[3, 0, 0].item<float>());
    }

    [Fact]
    public void BatchStacksSingleImagesAndHonoursDtype()
    {
        var pre = new ImagePreprocessor(PreprocessorConfig.CreateDefault(6));
        RgbImage[] images = [Noise(6, 6, 2), Noise(13, 7, 3), Noise(3, 9, 4)];
        using var batch = pre.PreprocessBatch(images);
        Assert.Equal([3L, 6, 6, 6], batch.shape);
        for (int i = 0; i < images.Length; i++)
        {
            using var single = pre.Preprocess(images[i]);
            Assert.True(batch[i].allclose(single, rtol: 0, atol: 0));
        }

        using var bf16 = pre.PreprocessBatch(images, device: CPU, dtype: ScalarType.BFloat16);
        Assert.Equal(ScalarType.BFloat16, bf16.dtype);
        Assert.Equal(DeviceType.CPU, bf16.device_type);
        using var explicitCpu = pre.PreprocessBatch(images, device: CPU, dtype: ScalarType.Float32);
        Assert.True(explicitCpu.allclose(batch, rtol: 0, atol: 0));
        Assert.Throws<PolicyInputException>(() => pre.PreprocessBatch([]));
    }

    [Fact]
    public void SingleTowerConfigGivesThreeChannels()
    {
        var pre = new ImagePreprocessor(PreprocessorConfig.CreateDefault(5, fused: false));
        using var t = pre.Preprocess(Solid(10, 10, 0, 255, 0));
        Assert.Equal([3L, 5, 5], t.shape);
        Assert.Equal(1f, t[1, 4, 4].item<float>());
    }

    [Fact]
    public void LetterboxPadsWithTheFillThenResizesTheShorterSideAndCrops()
    {
        // A 4x2 red frame, model size 4: pad 1 row above and below with (127,127,127) -> 4x4, resize is a no-op, crop is a no-op.
        const string json = """
            {"image_resize_strategy": "letterbox", "use_fused_vision_backbone": false, "input_sizes": [[3, 4, 4]],
             "interpolations": ["bicubic"], "means": [[0.5, 0.5, 0.5]], "stds": [[0.5, 0.5, 0.5]]}
            """;
        var pre = new ImagePreprocessor(PreprocessorConfig.Parse(json));
        var tower = pre.TowerImage(Solid(4, 2, 255, 0, 0), 0);
        Assert.Equal((4, 4), (tower.Width, tower.Height));
        Assert.Equal([127, 127, 127], tower.Pixels[..3]);
        Assert.Equal([255, 0, 0], tower.Pixels[12..15]);
        Assert.Equal([255, 0, 0], tower.Pixels[33..36]);
        Assert.Equal([127, 127, 127], tower.Pixels[^3..]);

        // 9x4: pad int(5/2) = 2 rows each side -> 9x8; shorter side 8 -> 4, longer int(4·9/8) = 4 -> 4x4.
        Assert.Equal((4, 4), (pre.TowerImage(Noise(9, 4, 5), 0).Width, pre.TowerImage(Noise(9, 4, 5), 0).Height));
    }

    [Fact]
    public void ResizeCropKeepsAspectRatioThenCentreCrops()
    {
        var tower = new TowerPreprocessing([3, 4, 4], "bicubic", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], null, 4, 3, 4, 4, [0.5f, 0.5f, 0.5f], [0.5f, 0.5f, 0.5f]);
        Assert.Equal((6, 4), ImagePreprocessor.ResizedSize(12, 8, tower)); // int(4·12/8) = 6
        Assert.Equal((4, 7), ImagePreprocessor.ResizedSize(9, 16, tower)); // int(4·16/9) = int(7.11) = 7
        var config = new PreprocessorConfig("resize-crop", false, [tower], false, [127, 127, 127]);
        var image = Noise(12, 8, 6);
        var expected = ImageGeometry.CenterCrop(PillowResampler.Resize(image, 6, 4), 4, 4);
        Assert.Equal(expected.Pixels, new ImagePreprocessor(config).TowerImage(image, 0).Pixels);
    }

    [Fact]
    public void AugmentationCropIsAppliedAtTheModelSize()
    {
        var pre = new ImagePreprocessor(PreprocessorConfig.CreateDefault(10));
        var image = Noise(10, 10, 7);
        var cropped = ImageGeometry.CenterCropAndResize(image, 0.9f, 10, 10);
        using var t = pre.Preprocess(image, centerCrop: true);
        using var expected = pre.Preprocess(cropped);
        Assert.True(t.allclose(expected, rtol: 0, atol: 0));
        using var plain = pre.Preprocess(image);
        Assert.False(t.allclose(plain, rtol: 0, atol: 0));
    }
    [Fact]
    public void TowersWithDifferentInterpolationsAreResampledSeparately()
    {
        const string json = """
            {"image_resize_strategy": "resize-naive", "use_fused_vision_backbone": true, "input_sizes": [[3, 4, 4], [3, 4, 4]],
             "interpolations": ["bicubic", "bilinear"], "means": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], "stds": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}
            """;
        var pre = new ImagePreprocessor(PreprocessorConfig.Parse(json));
        var image = Noise(11, 9, 8);
        using var t = pre.Preprocess(image);
        var bicubic = PillowResampler.Resize(image, 4, 4, ResampleFilter.Bicubic);
        var bilinear = PillowResampler.Resize(image, 4, 4, ResampleFilter.Bilinear);
        Assert.NotEqual(bicubic.Pixels, bilinear.Pixels);
        Assert.Equal((bicubic.Pixels[5 * 3] / 255f - 0.5f) / 0.5f, t[0, 1, 1].item<float>());
        Assert.Equal((bilinear.Pixels[5 * 3] / 255f - 0.5f) / 0.5f, t[3, 1, 1].item<float>());
    }
}
