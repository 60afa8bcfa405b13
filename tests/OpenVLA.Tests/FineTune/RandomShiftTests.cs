using OpenVLA.FineTune.Data;
using OpenVLA.Policy;

namespace OpenVLA.Tests.FineTune;

public class RandomShiftTests
{
    // Pixel (x, y) holds (x, y, 7): where each output pixel came from can be read back from its value.
    private static RgbImage Coordinates(int w = 9, int h = 6)
    {
        var px = new byte[w * h * 3];
        for (int y = 0; y < h; y++) for (int x = 0; x < w; x++) { int i = (y * w + x) * 3; px[i] = (byte)x; px[i + 1] = (byte)y; px[i + 2] = 7; }
        return new RgbImage(w, h, px);
    }

    [Fact]
    public void Every_pixel_comes_from_one_shifted_source_and_the_border_repeats()
    {
        var image = Coordinates();
        for (ulong seed = 0; seed < 20; seed++)
        {
            var shifted = new RandomShift(2).Apply(image, new Rng(seed));
            Assert.Equal((9, 6), (shifted.Width, shifted.Height));
            // The offset is the one at the centre (never clamped for |shift| ≤ 2 on a 9×6 image).
            int dx = shifted.Pixels[(3 * 9 + 4) * 3] - 4, dy = shifted.Pixels[(3 * 9 + 4) * 3 + 1] - 3;
            Assert.InRange(dx, -2, 2);
            Assert.InRange(dy, -2, 2);
            for (int y = 0; y < 6; y++)
                for (int x = 0; x < 9; x++)
                {
                    int i = (y * 9 + x) * 3;
                    Assert.Equal(Math.Clamp(x + dx, 0, 8), shifted.Pixels[i]);
                    Assert.Equal(Math.Clamp(y + dy, 0, 5), shifted.Pixels[i + 1]);
                    Assert.Equal(7, shifted.Pixels[i + 2]);
                }
        }
    }

    [Fact]
    public void Offsets_are_uniform_over_the_whole_range_and_seeded()
    {
        var image = Coordinates();
        var counts = new int[5, 5];
        for (ulong seed = 0; seed < 2500; seed++)
        {
            var p = new RandomShift(2).Apply(image, Rng.For(7, 16, seed)).Pixels;
            counts[p[(3 * 9 + 4) * 3 + 1] - 3 + 2, p[(3 * 9 + 4) * 3] - 4 + 2]++;
        }
        foreach (var c in counts) Assert.InRange(c, 60, 140);       // 100 expected per offset
        Assert.Equal(new RandomShift(2).Apply(image, new Rng(3)).Pixels, new RandomShift(2).Apply(image, new Rng(3)).Pixels);
        Assert.Equal(image.Pixels, new RandomShift(0).Apply(image, new Rng(3)).Pixels);
    }
}
