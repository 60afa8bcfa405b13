using OpenVLA.Policy;

namespace OpenVLA.FineTune.Data;

/// <summary>
/// OpenVLA's training-time image augmentation (finetune.py <c>image_aug</c>, applied through dlimp's augment_image):
/// random resized crop to 90% of the area at aspect ratio 1, resized back to the input size (bilinear, like
/// tf.image.crop_and_resize), then random brightness ±0.2, contrast ×[0.8, 1.2], saturation ×[0.8, 1.2] and hue ±0.05,
/// in that order, on a float image in [0, 1] clipped after every op. Our own seeded generator replaces TensorFlow's
/// stateless RNG, so the distribution matches but not the individual draws.
/// </summary>
public sealed record ImageAugmentation : IImageAugmentation
{
    public double CropScale { get; init; } = 0.9;
    public double CropRatio { get; init; } = 1.0;
    public double BrightnessDelta { get; init; } = 0.2;
    public double ContrastLow { get; init; } = 0.8;
    public double ContrastHigh { get; init; } = 1.2;
    public double SaturationLow { get; init; } = 0.8;
    public double SaturationHigh { get; init; } = 1.2;
    public double HueDelta { get; init; } = 0.05;

    /// <summary>The reference settings.</summary>
    public static ImageAugmentation OpenVla { get; } = new();

    public RgbImage Apply(RgbImage image, Rng rng)
    {
        int w = image.Width, h = image.Height, n = w * h;
        var px = new float[n * 3];
        for (int i = 0; i < px.Length; i++) px[i] = image.Pixels[i] / 255f;

        // Random resized crop: side fractions sqrt(scale/ratio) x sqrt(scale·ratio), offsets uniform in what is left.
        // dlimp draws scale and log-ratio from ranges; the reference ranges are single points, drawn anyway to keep the order.
        double scale = rng.Uniform(CropScale, CropScale), ratio = Math.Exp(rng.Uniform(Math.Log(CropRatio), Math.Log(CropRatio)));
        double ch = Math.Clamp(Math.Sqrt(scale / ratio), 0, 1), cw = Math.Clamp(Math.Sqrt(scale * ratio), 0, 1);
        double y0 = rng.Uniform(0, 1 - ch), x0 = rng.Uniform(0, 1 - cw);
        px = CropAndResize(px, w, h, y0, x0, y0 + ch, x0 + cw);

        float brightness = (float)rng.Uniform(-BrightnessDelta, BrightnessDelta);
        for (int i = 0; i < px.Length; i++) px[i] = Math.Clamp(px[i] + brightness, 0f, 1f);

        float contrast = (float)rng.Uniform(ContrastLow, ContrastHigh);
        for (int c = 0; c < 3; c++)
        {
            double sum = 0;
            for (int p = 0; p < n; p++) sum += px[p * 3 + c];
            float mean = (float)(sum / n);
            for (int p = 0; p < n; p++) px[p * 3 + c] = Math.Clamp((px[p * 3 + c] - mean) * contrast + mean, 0f, 1f);
        }

        // Saturation then hue, each an RGB→HSV→RGB round trip in the reference; one round trip applying both is the same
        // (the intermediate RGB is already in [0, 1], and converting it back gives the same H, S', V up to float rounding).
        float saturation = (float)rng.Uniform(SaturationLow, SaturationHigh);
        float hue = (float)rng.Uniform(-HueDelta, HueDelta);
        AdjustHsv(px, n, hueShift: hue, saturationFactor: saturation);

        // float -> uint8 as tf.image.convert_image_dtype(saturate=True): truncate x·255.5.
        var output = new byte[px.Length];
        for (int i = 0; i < px.Length; i++) output[i] = (byte)Math.Clamp((int)(px[i] * 255.5f), 0, 255);
        return new RgbImage(w, h, output);
    }

    /// <summary>
    /// tf.image.crop_and_resize with one normalized box [y0, x0, y1, x1], bilinear, output size = input size: output row i
    /// samples input row y0·(H−1) + i·(y1−y0)·(H−1)/(H−1) = y0·(H−1) + i·(y1−y0).
    /// </summary>
    private static float[] CropAndResize(float[] src, int w, int h, double y0, double x0, double y1, double x1)
    {
        var (top, bottom, fy) = Taps(h, y0, y1);
        var (left, right, fx) = Taps(w, x0, x1);
        var dst = new float[src.Length];
        for (int oy = 0; oy < h; oy++)
        {
            int rowT = top[oy] * w, rowB = bottom[oy] * w;
            float wy = fy[oy];
            for (int ox = 0; ox < w; ox++)
            {
                int tl = (rowT + left[ox]) * 3, tr = (rowT + right[ox]) * 3, bl = (rowB + left[ox]) * 3, br = (rowB + right[ox]) * 3;
                float wx = fx[ox];
                int o = (oy * w + ox) * 3;
                for (int c = 0; c < 3; c++)
                {
                    float t = src[tl + c] + (src[tr + c] - src[tl + c]) * wx;
                    float b = src[bl + c] + (src[br + c] - src[bl + c]) * wx;
                    dst[o + c] = t + (b - t) * wy;
                }
            }
        }
        return dst;
    }

    /// <summary>For each output index along one axis: the two input indices to blend and the weight of the second.</summary>
    private static (int[] Low, int[] High, float[] Weight) Taps(int size, double from, double to)
    {
        var low = new int[size]; var high = new int[size]; var weight = new float[size];
        for (int i = 0; i < size; i++)
        {
            double s = size > 1 ? from * (size - 1) + i * (to - from) : 0.5 * (from + to) * (size - 1);
            low[i] = Math.Clamp((int)Math.Floor(s), 0, size - 1);
            high[i] = Math.Min(low[i] + 1, size - 1);
            weight[i] = (float)(s - low[i]);
        }
        return (low, high, weight);
    }

    /// <summary>RGB → HSV (hue in [0, 1)), shift hue, scale saturation (clipped to [0, 1]), HSV → RGB.</summary>
    private static void AdjustHsv(float[] px, int n, float hueShift, float saturationFactor)
    {
        for (int p = 0; p < n; p++)
        {
            float r = px[p * 3], g = px[p * 3 + 1], b = px[p * 3 + 2];
            float max = Math.Max(r, Math.Max(g, b)), min = Math.Min(r, Math.Min(g, b)), range = max - min;
            float hue = 0f;
            if (range > 0)
            {
                if (max == r) hue = (g - b) / range;
                else if (max == g) hue = 2f + (b - r) / range;
                else hue = 4f + (r - g) / range;
                hue /= 6f;
            }
            float s = max > 0 ? range / max : 0f, v = max;
            hue += hueShift;
            hue -= MathF.Floor(hue);
            s = Math.Clamp(s * saturationFactor, 0f, 1f);

            float h6 = hue * 6f;
            int sector = (int)MathF.Floor(h6) % 6;
            float f = h6 - MathF.Floor(h6);
            float pv = v * (1 - s), qv = v * (1 - s * f), tv = v * (1 - s * (1 - f));
            (r, g, b) = sector switch
            {
                0 => (v, tv, pv),
                1 => (qv, v, pv),
                2 => (pv, v, tv),
                3 => (pv, qv, v),
                4 => (tv, pv, v),
                _ => (v, pv, qv),
            };
            px[p * 3] = Math.Clamp(r, 0f, 1f);
            px[p * 3 + 1] = Math.Clamp(g, 0f, 1f);
            px[p * 3 + 2] = Math.Clamp(b, 0f, 1f);
        }
    }
}
