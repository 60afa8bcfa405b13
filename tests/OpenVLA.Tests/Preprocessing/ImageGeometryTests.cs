using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;

namespace OpenVLA.Tests.Preprocessing;

public class ImageGeometryTests
{
    /// <summary>An image whose red value is its column and green value its row, so crops reveal their offsets.</summary>
    private static RgbImage Coordinates(int width, int height)
    {
        var px = new byte[width * height * 3];
        for (int y = 0; y < height; y++)
            for (int x = 0; x < width; x++) (px[(y * width + x) * 3], px[(y * width + x) * 3 + 1], px[(y * width + x) * 3 + 2]) = ((byte)x, (byte)y, 200);
        return new RgbImage(width, height, px);
    }

    private static (byte R, byte G, byte B) At(RgbImage image, int x, int y)
    {
        int i = (y * image.Width + x) * 3;
        return (image.Pixels[i], image.Pixels[i + 1], image.Pixels[i + 2]);
    }

    [Fact]
    public void LetterboxPadsTheShortSideSymmetricallyWithTheFill()
    {
        var padded = ImageGeometry.LetterboxPad(Coordinates(6, 2), [127, 127, 127]);
        Assert.Equal((6, 6), (padded.Width, padded.Height));
        Assert.Equal((127, 127, 127), At(padded, 0, 0));
        Assert.Equal((127, 127, 127), At(padded, 5, 1));
        Assert.Equal((0, 0, 200), At(padded, 0, 2)); // the image starts after int((6 − 2)/2) = 2 rows
        Assert.Equal((5, 1, 200), At(padded, 5, 3));
        Assert.Equal((127, 127, 127), At(padded, 3, 4));
    }

    [Fact]
    public void LetterboxOfAnOddDifferenceIsOnePixelShortOfSquareLikeTheReference()
    {
        // int((5 − 2)/2) = 1 on each side: 5x4, which the following shorter-side resize and center crop absorb.
        var padded = ImageGeometry.LetterboxPad(Coordinates(5, 2), [1, 2, 3]);
        Assert.Equal((5, 4), (padded.Width, padded.Height));
        Assert.Equal((1, 2, 3), At(padded, 4, 3));
    }

    [Theory]
    [InlineData(5, 2, 2)] // (5 − 2)/2 = 1.5 -> round half to even -> 2
    [InlineData(6, 1, 2)] // 2.5 -> 2 (Python round, not 3)
    [InlineData(6, 2, 2)] // 2.0
    [InlineData(7, 2, 2)] // 2.5 -> 2
    [InlineData(9, 2, 4)] // 3.5 -> 4
    public void CenterCropOffsetIsPythonRoundOfHalfTheDifference(int size, int crop, int expectedOffset)
    {
        var cropped = ImageGeometry.CenterCrop(Coordinates(size, size), crop, crop);
        Assert.Equal((crop, crop), (cropped.Width, cropped.Height));
        Assert.Equal(((byte)expectedOffset, (byte)expectedOffset, (byte)200), At(cropped, 0, 0));
    }

    [Fact]
    public void CenterCropLargerThanTheImageZeroPadsFirst()
    {
        // torchvision pads (crop − size) // 2 before and the rest after: 3 -> 6 wide gets 1 column left, 2 right.
        var cropped = ImageGeometry.CenterCrop(Coordinates(3, 2), 6, 2);
        Assert.Equal((6, 2), (cropped.Width, cropped.Height));
        Assert.Equal((0, 0, 0), At(cropped, 0, 0));
        Assert.Equal((0, 0, 200), At(cropped, 1, 0));
        Assert.Equal((2, 1, 200), At(cropped, 3, 1));
        Assert.Equal((0, 0, 0), At(cropped, 5, 1));
    }

    [Fact]
    public void AugmentationCropKeepsTheCentralSqrtOfTheAreaAndResizesBilinearly()
    {
        // A horizontal ramp, value = 20·x on a 10x10 image. The box is [(1 − s)/2, (1 + s)/2] with s = sqrt(0.9) = 0.948683;
        // output column i samples x = 9·(1 − s)/2 + i·9s/9 = 0.230925 + 0.948683·i, and bilinear interpolation of a ramp is the
        // ramp itself: value 20·x, converted back to uint8 by TensorFlow as trunc(v/255 · 255.5).
        var px = new byte[10 * 10 * 3];
        for (int i = 0; i < 100; i++) px[i * 3] = px[i * 3 + 1] = px[i * 3 + 2] = (byte)(20 * (i % 10));
        var output = ImageGeometry.CenterCropAndResize(new RgbImage(10, 10, px), 0.9f, 10, 10);

        double s = Math.Sqrt(0.9);
        for (int i = 0; i < 10; i++)
        {
            double x = 9 * (1 - s) / 2 + i * s;
            int expected = (int)(20 * x / 255 * 255.5);
            Assert.InRange(output.Pixels[i * 3] - expected, -1, 1); // float32 vs double sample positions may differ in the last bit
            Assert.Equal(output.Pixels[i * 3], output.Pixels[(9 * 10 + i) * 3]); // rows do not change a horizontal ramp
        }
        Assert.Equal(4, output.Pixels[0]);          // 20·0.2309 = 4.62 -> 4
        Assert.Equal(175, output.Pixels[9 * 3]);   // 20·8.7691 = 175.38 -> 175
    }

    [Fact]
    public void AugmentationCropOfAFlatImageIsTheSameFlatImage()
    {
        var flat = new RgbImage(7, 5, Enumerable.Repeat((byte)93, 7 * 5 * 3).ToArray());
        var output = ImageGeometry.CenterCropAndResize(flat, 0.9f, 7, 5);
        Assert.All(output.Pixels, p => Assert.Equal(93, p));
    }
}
