using OpenVLA.FineTune.Data;
using OpenVLA.Policy;

namespace OpenVLA.Tests.FineTune;

public class ImageAugmentationTests
{
    private static RgbImage Gradient(int w = 40, int h = 30)
    {
        var px = new byte[w * h * 3];
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
            {
                int i = (y * w + x) * 3;
                px[i] = (byte)(x * 6); px[i + 1] = (byte)(y * 8); px[i + 2] = (byte)(90 + (x + y) % 50);
            }
        return new RgbImage(w, h, px);
    }

    [Fact]
    public void Same_seed_same_image_and_the_size_is_kept()
    {
        var image = Gradient();
        var a = ImageAugmentation.OpenVla.Apply(image, new Rng(42));
        var b = ImageAugmentation.OpenVla.Apply(image, new Rng(42));
        var c = ImageAugmentation.OpenVla.Apply(image, new Rng(43));
        Assert.Equal((40, 30), (a.Width, a.Height));
        Assert.Equal(a.Pixels, b.Pixels);
        Assert.NotEqual(a.Pixels, c.Pixels);
        Assert.NotEqual(image.Pixels, a.Pixels);
    }

    [Fact]
    public void With_every_range_at_its_identity_the_image_is_unchanged()
    {
        var identity = new ImageAugmentation
        {
            CropScale = 1, BrightnessDelta = 0, ContrastLow = 1, ContrastHigh = 1, SaturationLow = 1, SaturationHigh = 1, HueDelta = 0,
        };
        var image = Gradient();
        // uint8 → /255 → ×255.5 truncated gives back every value; HSV round trips within float rounding.
        var result = identity.Apply(image, new Rng(1));
        Assert.True(image.Pixels.Zip(result.Pixels).All(p => Math.Abs(p.First - p.Second) <= 1));
    }

    [Fact]
    public void The_crop_keeps_ninety_percent_of_the_area_then_resizes_back()
    {
        var crop = new ImageAugmentation { BrightnessDelta = 0, ContrastLow = 1, ContrastHigh = 1, SaturationLow = 1, SaturationHigh = 1, HueDelta = 0 };
        // A horizontal ramp 0..255 over 256 columns: after cropping sqrt(0.9) ≈ 0.949 of the width, the output spans
        // 0.949·255 ≈ 242 grey levels, starting at the random offset.
        var px = new byte[256 * 8 * 3];
        for (int y = 0; y < 8; y++) for (int x = 0; x < 256; x++) px[(y * 256 + x) * 3] = (byte)x;
        var result = crop.Apply(new RgbImage(256, 8, px), new Rng(5));
        int left = result.Pixels[0], right = result.Pixels[255 * 3];
        Assert.InRange(right - left, 240, 243);
        Assert.InRange(left, 0, 14);   // offset ≤ (1 − 0.949)·255 ≈ 13
    }

    [Fact]
    public void Hue_and_saturation_changes_stay_within_the_reference_ranges()
    {
        // A flat mid-saturated colour: contrast leaves it alone (it equals its mean), so only brightness, saturation
        // and hue move it, each bounded.
        var px = new byte[16 * 16 * 3];
        for (int i = 0; i < px.Length; i += 3) { px[i] = 200; px[i + 1] = 100; px[i + 2] = 50; }
        var flat = new RgbImage(16, 16, px);
        for (ulong seed = 0; seed < 20; seed++)
        {
            var r = ImageAugmentation.OpenVla.Apply(flat, new Rng(seed)).Pixels;
            Assert.True(r.Chunk(3).All(p => p.SequenceEqual(r[..3])), "a flat image stays flat");
            Assert.InRange(r[0] - 200, -52, 52);   // brightness ±0.2·255 = ±51 on the brightest channel
        }
    }
}
