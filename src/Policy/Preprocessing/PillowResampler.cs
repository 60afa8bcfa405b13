namespace OpenVLA.Policy.Preprocessing;

/// <summary>The reconstruction filters of Pillow's convolution resampler (PIL.Image.Resampling values in brackets).</summary>
internal enum ResampleFilter
{
    Lanczos,  // [1] windowed sinc, support 3
    Bilinear, // [2] triangle, support 1
    Bicubic,  // [3] Keys cubic with a = -0.5, support 2
    Box,      // [4] support 0.5
    Hamming,  // [5] Hamming-windowed sinc, support 1
}

/// <summary>
/// Antialiased resize of RGB8 images that reproduces Pillow's <c>Image.resize(size, filter)</c> bit for bit, which is what
/// torchvision's <c>resize(..., antialias=True)</c> calls on a PIL image (PrismaticImageProcessor, reference §2.4).
/// </summary>
/// <remarks>
/// The facts this follows (Pillow <c>src/libImaging/Resample.c</c>, <c>ImagingResample</c>; written here from its description):
/// <list type="bullet">
/// <item>Same size: <c>Image.resize</c> returns a copy, no resampling at all.</item>
/// <item>Two separable passes, horizontal first, then vertical; a pass whose dimension does not change is skipped.
///   Each pass stores 8-bit pixels, so rounding and clipping happen after each pass.</item>
/// <item>Per output pixel: the scale is in/out; the filter is stretched by max(scale, 1) (antialias when shrinking);
///   the centre is (i + 0.5)·scale; the source window is [trunc(centre − support + 0.5), trunc(centre + support + 0.5)) clamped
///   to the image; tap weights are filter((j − centre + 0.5) / max(scale, 1)) divided by their sum.</item>
/// <item>Weights become fixed point with 22 fractional bits (32 − 8 − 2), rounded half away from zero; the accumulator starts at
///   one half (2^21), the result is the accumulator shifted right by 22 (arithmetic shift, i.e. floor) clipped to [0, 255].</item>
/// </list>
/// </remarks>
internal static class PillowResampler
{
    private const int PrecisionBits = 32 - 8 - 2;

    public static RgbImage Resize(RgbImage image, int width, int height, ResampleFilter filter = ResampleFilter.Bicubic)
    {
        if (width <= 0 || height <= 0) throw new ArgumentOutOfRangeException(nameof(width), $"target size must be positive, got {width}x{height}");
        if (width == image.Width && height == image.Height) return image with { Pixels = (byte[])image.Pixels.Clone() };

        RgbImage current = image;
        if (width != image.Width)
            current = HorizontalPass(current, width, Coefficients.Compute(image.Width, width, filter));
        if (height != image.Height)
            current = VerticalPass(current, height, Coefficients.Compute(image.Height, height, filter));
        return current;
    }

    /// <summary>The fixed-point taps of one 1-D resampling: for output i, source indices [Start[i], Start[i] + Count[i]).</summary>
    internal sealed class Coefficients
    {
        public required int[] Start { get; init; }
        public required int[] Count { get; init; }
        public required int Stride { get; init; }
        public required int[] Weights { get; init; } // fixed point, row i at i * Stride
        public required double[] FloatWeights { get; init; } // normalized weights before quantization (for tests)

        public static Coefficients Compute(int inSize, int outSize, ResampleFilter filter)
        {
            double support0 = Support(filter);
            double scale = (double)inSize / outSize;
            double filterScale = Math.Max(scale, 1.0);
            double support = support0 * filterScale;
            int stride = (int)Math.Ceiling(support) * 2 + 1;
            var start = new int[outSize];
            var count = new int[outSize];
            var weights = new double[outSize * stride];
            var fixedPoint = new int[outSize * stride];
            double inverseFilterScale = 1.0 / filterScale;
            for (int i = 0; i < outSize; i++)
            {
                double centre = (i + 0.5) * scale;
                int lo = Math.Max((int)(centre - support + 0.5), 0);   // C cast: truncation toward zero
                int hi = Math.Min((int)(centre + support + 0.5), inSize);
                int n = hi - lo;
                double sum = 0;
                for (int j = 0; j < n; j++)
                {
                    double w = Evaluate(filter, (j + lo - centre + 0.5) * inverseFilterScale);
                    weights[i * stride + j] = w;
                    sum += w;
                }
                for (int j = 0; j < n; j++)
                {
                    if (sum != 0.0) weights[i * stride + j] /= sum;
                    double v = weights[i * stride + j] * (1 << PrecisionBits);
                    fixedPoint[i * stride + j] = (int)(v < 0 ? v - 0.5 : v + 0.5);
                }
                start[i] = lo;
                count[i] = n;
            }
            return new Coefficients { Start = start, Count = count, Stride = stride, Weights = fixedPoint, FloatWeights = weights };
        }
    }

    private static RgbImage HorizontalPass(RgbImage src, int outWidth, Coefficients c)
    {
        var dst = new byte[outWidth * src.Height * 3];
        byte[] s = src.Pixels;
        int srcRow = src.Width * 3;
        Parallel.For(0, src.Height, y =>
        {
            int rowIn = y * srcRow, rowOut = y * outWidth * 3;
            for (int x = 0; x < outWidth; x++)
            {
                int r = 1 << (PrecisionBits - 1), g = r, b = r;
                int k0 = x * c.Stride, p = rowIn + c.Start[x] * 3;
                for (int j = 0; j < c.Count[x]; j++, p += 3)
                {
                    int w = c.Weights[k0 + j];
                    r += s[p] * w;
                    g += s[p + 1] * w;
                    b += s[p + 2] * w;
                }
                dst[rowOut + x * 3] = Clip8(r);
                dst[rowOut + x * 3 + 1] = Clip8(g);
                dst[rowOut + x * 3 + 2] = Clip8(b);
            }
        });
        return new RgbImage(outWidth, src.Height, dst);
    }

    private static RgbImage VerticalPass(RgbImage src, int outHeight, Coefficients c)
    {
        int row = src.Width * 3;
        var dst = new byte[row * outHeight];
        byte[] s = src.Pixels;
        Parallel.For(0, outHeight, () => new int[row], (y, _, acc) =>
        {
            // Row by row for cache locality; integer sums do not depend on the order of the taps.
            Array.Fill(acc, 1 << (PrecisionBits - 1));
            int k0 = y * c.Stride;
            for (int j = 0; j < c.Count[y]; j++)
            {
                int w = c.Weights[k0 + j], srcRow = (c.Start[y] + j) * row;
                for (int i = 0; i < row; i++) acc[i] += s[srcRow + i] * w;
            }
            for (int i = 0; i < row; i++) dst[y * row + i] = Clip8(acc[i]);
            return acc;
        }, _ => { });
        return new RgbImage(src.Width, outHeight, dst);
    }

    private static byte Clip8(int accumulator)
    {
        int v = accumulator >> PrecisionBits;
        return v < 0 ? (byte)0 : v > 255 ? (byte)255 : (byte)v;
    }

    private static double Support(ResampleFilter filter) => filter switch
    {
        ResampleFilter.Box => 0.5,
        ResampleFilter.Bilinear => 1.0,
        ResampleFilter.Hamming => 1.0,
        ResampleFilter.Bicubic => 2.0,
        ResampleFilter.Lanczos => 3.0,
        _ => throw new ArgumentOutOfRangeException(nameof(filter)),
    };

    internal static double Evaluate(ResampleFilter filter, double x) => filter switch
    {
        ResampleFilter.Box => x > -0.5 && x <= 0.5 ? 1.0 : 0.0,
        ResampleFilter.Bilinear => Math.Max(1.0 - Math.Abs(x), 0.0),
        ResampleFilter.Hamming => HammingWindowedSinc(Math.Abs(x)),
        ResampleFilter.Bicubic => KeysCubic(Math.Abs(x)),
        ResampleFilter.Lanczos => x >= -3.0 && x < 3.0 ? Sinc(x) * Sinc(x / 3) : 0.0,
        _ => throw new ArgumentOutOfRangeException(nameof(filter)),
    };

    /// <summary>Keys' cubic convolution kernel with a = −0.5 (Pillow's BICUBIC), evaluated in the same Horner form.</summary>
    private static double KeysCubic(double x)
    {
        const double a = -0.5;
        if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
        if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
        return 0.0;
    }

    private static double HammingWindowedSinc(double x)
    {
        if (x == 0.0) return 1.0;
        if (x >= 1.0) return 0.0;
        x *= Math.PI;
        return Math.Sin(x) / x * (0.54f + 0.46f * Math.Cos(x)); // Pillow uses float literals for the window constants
    }

    private static double Sinc(double x)
    {
        if (x == 0.0) return 1.0;
        x *= Math.PI;
        return Math.Sin(x) / x;
    }
}
