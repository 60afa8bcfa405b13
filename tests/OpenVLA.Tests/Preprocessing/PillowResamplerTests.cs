using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;

namespace OpenVLA.Tests.Preprocessing;

/// <summary>
/// Resize results computed by hand from Pillow's bicubic kernel (Keys, a = −0.5):
///   K(x) = 1.5|x|³ − 2.5|x|² + 1 for |x| &lt; 1,   −0.5|x|³ + 2.5|x|² − 4|x| + 2 for 1 ≤ |x| &lt; 2,   0 beyond.
/// Output pixel i has centre c = (i + 0.5)·in/out; tap j gets K((j + 0.5 − c) / max(in/out, 1)); weights are divided by their sum;
/// each pass rounds to 8 bits and clips to [0, 255].
/// </summary>
public class PillowResamplerTests
{
    private static RgbImage Gray(int width, int height, params byte[] values) =>
        new(width, height, values.SelectMany(v => new[] { v, v, v }).ToArray());

    private static byte[] Channel(RgbImage image, int c) => Enumerable.Range(0, image.Width * image.Height).Select(i => image.Pixels[i * 3 + c]).ToArray();

    [Fact]
    public void BicubicKernelHasTheKeysValues()
    {
        Assert.Equal(1.0, PillowResampler.Evaluate(ResampleFilter.Bicubic, 0.0));
        Assert.Equal(0.8671875, PillowResampler.Evaluate(ResampleFilter.Bicubic, 0.25));
        Assert.Equal(0.2265625, PillowResampler.Evaluate(ResampleFilter.Bicubic, -0.75));
        Assert.Equal(-0.0703125, PillowResampler.Evaluate(ResampleFilter.Bicubic, 1.25));
        Assert.Equal(0.0, PillowResampler.Evaluate(ResampleFilter.Bicubic, 1.0));
        Assert.Equal(0.0, PillowResampler.Evaluate(ResampleFilter.Bicubic, 2.0));
    }

    [Fact]
    public void DownscaleByTwoStretchesTheKernelAndNormalizesTheWeights()
    {
        // 4 -> 2: scale 2, support 2·2 = 4. Output 0 has centre 1.0 and taps at (j + 0.5 − 1)/2 = −0.25, 0.25, 0.75, 1.25:
        // K = 0.8671875, 0.8671875, 0.2265625, −0.0703125, sum 1.890625. Output 1 (centre 3) uses the mirror image.
        var c = PillowResampler.Coefficients.Compute(4, 2, ResampleFilter.Bicubic);
        double[] expected = [0.8671875 / 1.890625, 0.8671875 / 1.890625, 0.2265625 / 1.890625, -0.0703125 / 1.890625];
        Assert.Equal([0, 0], c.Start);
        Assert.Equal([4, 4], c.Count);
        for (int j = 0; j < 4; j++)
        {
            Assert.Equal(expected[j], c.FloatWeights[j], 12);
            Assert.Equal(expected[3 - j], c.FloatWeights[c.Stride + j], 12);
        }
        // 22-bit fixed point, rounded half away from zero: 0.458677…·2^22 = 1923834, −0.037190…·2^22 = −155987; they sum to 2^22.
        Assert.Equal([1923834, 1923834, 502623, -155987], c.Weights.Take(4));
    }

    [Fact]
    public void FourByFourToTwoByTwoRoundsAfterEachPass()
    {
        // Red rows:   10  50 200 255 |   0 0 0 0 | 255 255 255 255 | 30 60 90 120
        // Horizontal: (10·.8671875 + 50·.8671875 + 200·.2265625 − 255·.0703125)/1.890625 = 42.004 -> 42;
        //             (−10·.0703125 + 50·.2265625 + 200·.8671875 + 255·.8671875)/1.890625 = 214.318 -> 214
        //             row 2 -> 0, 0; row 3 -> 255, 255; row 4 -> 47.60 -> 48, 101.9 -> 102
        // Vertical on the rounded columns (42, 0, 255, 48) and (214, 0, 255, 102):
        //   (42·.8671875 + 0·.8671875 + 255·.2265625 − 48·.0703125)/1.890625 = 48.04 -> 48
        //   (214·.8671875 + 255·.2265625 − 102·.0703125)/1.890625 = 124.92 -> 125
        //   (−42·.0703125 + 255·.8671875 + 48·.8671875)/1.890625 = 137.42 -> 137
        //   (−214·.0703125 + 255·.8671875 + 102·.8671875)/1.890625 = 155.79 -> 156
        byte[] red = [10, 50, 200, 255, 0, 0, 0, 0, 255, 255, 255, 255, 30, 60, 90, 120];
        var pixels = new byte[48];
        for (int i = 0; i < 16; i++) (pixels[i * 3], pixels[i * 3 + 1], pixels[i * 3 + 2]) = (red[i], 77, (byte)(i < 8 ? 0 : 255));
        var output = PillowResampler.Resize(new RgbImage(4, 4, pixels), 2, 2);

        Assert.Equal((2, 2), (output.Width, output.Height));
        Assert.Equal([48, 125, 137, 156], Channel(output, 0));
        Assert.Equal([77, 77, 77, 77], Channel(output, 1)); // the fixed-point weights sum to exactly 2^22: a flat image stays flat
        // Blue: top half 0, bottom half 255. Vertical: (0 + 0 + 255·.2265625 + 255·(−.0703125))/1.890625 = 21.08 -> 21,
        // and (0·(−.0703125) + 0·.2265625 + 255·.8671875 + 255·.8671875)/1.890625 = 233.92 -> 234.
        Assert.Equal([21, 21, 234, 234], Channel(output, 2));
    }

    [Fact]
    public void ThreeToFiveUpscalesWithTheUnstretchedKernelAndClips()
    {
        // 3 -> 5: scale 0.6, support 2. Centres 0.3, 0.9, 1.5, 2.1, 2.7; windows clipped to the image:
        //   out 0: taps 0,1 at +0.2, +1.2:          K = 0.912, −0.064           (sum 0.848)
        //   out 1: taps 0,1,2 at −0.4, 0.6, 1.6:    K = 0.696, 0.424, −0.048    (sum 1.072)
        //   out 2: taps at −1, 0, 1:                K = 0, 1, 0
        //   out 3, out 4: mirror images of out 1, out 0.
        // Red 40 100 220:  (40·.912 − 100·.064)/.848 = 35.47 -> 35;  (40·.696 + 100·.424 − 220·.048)/1.072 = 55.67 -> 56;  100;
        //                  (−40·.048 + 100·.424 + 220·.696)/1.072 = 180.60 -> 181;  (−100·.064 + 220·.912)/.848 = 229.06 -> 229
        // Green 255 0 255: 255·.912/.848 = 274.2 -> clipped 255;  (255·.696 − 255·.048)/1.072 = 154.14 -> 154;  0; 154; 255
        // Blue 0 255 0:    −255·.064/.848 = −19.2 -> clipped 0;  255·.424/1.072 = 100.86 -> 101;  255; 101; 0
        var input = new RgbImage(3, 1, [40, 255, 0, 100, 0, 255, 220, 255, 0]);
        var output = PillowResampler.Resize(input, 5, 1);

        Assert.Equal([35, 56, 100, 181, 229], Channel(output, 0));
        Assert.Equal([255, 154, 0, 154, 255], Channel(output, 1));
        Assert.Equal([0, 101, 255, 101, 0], Channel(output, 2));
    }

    [Fact]
    public void SameSizeIsACopyWithoutResampling()
    {
        // Pillow's Image.resize returns a copy when the size matches; a resampling pass would blur this checkerboard.
        var input = Gray(3, 2, 0, 255, 0, 255, 0, 255);
        var output = PillowResampler.Resize(input, 3, 2);
        Assert.Equal(input.Pixels, output.Pixels);
        Assert.NotSame(input.Pixels, output.Pixels);
    }

    [Fact]
    public void OnlyTheDimensionThatChangesIsResampled()
    {
        // 3x2 -> 3x1 is a pure vertical pass: each column is the mean of its two rows
        // (scale 2: the two taps sit at −0.25 and +0.25, equal weights of 1/2).
        var input = Gray(3, 2, 0, 100, 200, 100, 200, 255);
        var output = PillowResampler.Resize(input, 3, 1);
        Assert.Equal([50, 150, 228], Channel(output, 0)); // 227.5 rounds half up in fixed point
    }

    [Fact]
    public void BilinearDownscaleAveragesWithATriangleOfTwiceTheWidth()
    {
        // 4 -> 2 bilinear: support 2, taps at ±0.25, 0.75 (and 1.25 outside): weights 0.75, 0.75, 0.25 / 1.75 for output 0.
        // (0·.75 + 70·.75 + 140·.25)/1.75 = 50;  output 1: (70·.25 + 140·.75 + 210·.75)/1.75 = 160
        var output = PillowResampler.Resize(Gray(4, 1, 0, 70, 140, 210), 2, 1, ResampleFilter.Bilinear);
        Assert.Equal([50, 160], Channel(output, 0));
    }
    /// <summary>
    /// Pillow's own accuracy results (its resample test suite) for a pattern of two bright (0xe1) and two dark (0x1e) squares, top
    /// left and bottom right bright. Given: the top-left quarter of the output, row by row; the rest follows by symmetry (mirrored
    /// quarters equal, the other two are 255 minus it). An independent check that our arithmetic is Pillow's, not just plausible.
    /// </summary>
    [Theory]
    [InlineData(8, 4, 2, "e1 c9 c9 b7")]
    [InlineData(8, 4, 5, "e1 da da d3")]
    [InlineData(8, 4, 4, "e1 e1 e1 e1")]
    [InlineData(12, 6, 3, "e1 e3 d4 e3 e5 d6 d4 d6 c9")]
    [InlineData(16, 8, 1, "e1 e0 e4 d7 e0 df e3 d6 e4 e3 e7 da d7 d6 d9 ce")]
    [InlineData(2, 4, 2, "e1 b0 b0 98")]
    [InlineData(2, 4, 5, "e1 d2 d2 c5")]
    [InlineData(4, 8, 3, "e1 e5 ee b9 e5 e9 f3 bc ee f3 fd c1 b9 bc c1 a2")]
    [InlineData(6, 12, 1,
        "e1 e0 db ed f5 b8 e0 df da ec f3 b7 db db d6 e7 ee b5 ed ec e6 fb ff bf f5 f4 ee ff ff c4 b8 b7 b4 bf c4 a0")]
    public void MatchesPillowsPublishedResultsForTheTwoSquarePattern(int size, int outSize, int pilFilter, string quarter)
    {
        ResampleFilter filter = PreprocessorConfig.FilterOf(pilFilter)!.Value; // 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming
        var values = new byte[size * size];
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++) values[y * size + x] = (x < size / 2) == (y < size / 2) ? (byte)0xe1 : (byte)0x1e;
        var output = PillowResampler.Resize(Gray(size, size, values), outSize, outSize, filter);

        byte[] q = quarter.Split(' ').Select(h => Convert.ToByte(h, 16)).ToArray();
        int half = outSize / 2;
        var expected = new byte[outSize * outSize];
        for (int y = 0; y < half; y++)
            for (int x = 0; x < half; x++)
            {
                byte v = q[y * half + x];
                expected[y * outSize + x] = v;
                expected[(outSize - 1 - y) * outSize + outSize - 1 - x] = v;
                expected[(outSize - 1 - y) * outSize + x] = (byte)(255 - v);
                expected[y * outSize + outSize - 1 - x] = (byte)(255 - v);
            }
        for (int c = 0; c < 3; c++) Assert.Equal(expected, Channel(output, c));
    }

    [Fact]
    public void HugeReductionKeepsExactCoefficients()
    {
        // Half 254, half 0, 400000 wide -> 5: the middle output straddles the edge symmetrically and must be exactly 254 // 2.
        var values = new byte[400_000];
        Array.Fill(values, (byte)254, 0, 200_000);
        var output = PillowResampler.Resize(Gray(400_000, 1, values), 5, 1);
        Assert.Equal(127, output.Pixels[2 * 3]);
    }
}
