using OpenVLA.Policy;

namespace OpenVLA.FineTune.Data;

/// <summary>A training-time change to a frame, drawn from the generator it is given (one per sample and camera).</summary>
public interface IImageAugmentation
{
    RgbImage Apply(RgbImage image, Rng rng);
}

/// <summary>
/// Random translation (DrQ's random shift): pad every side by <see cref="Pad"/> pixels, repeating the border pixels, then
/// crop the original size at an offset drawn uniformly from 0…2·Pad in each direction. Whole pixels only, no resampling, so
/// inference needs no matching transform (unlike <see cref="ImageAugmentation"/>'s crop, which wants --center-crop).
/// tools/gputrain's `--random-shift` draws from the same distribution.
/// </summary>
public sealed record RandomShift(int Pad) : IImageAugmentation
{
    public RgbImage Apply(RgbImage image, Rng rng)
    {
        if (Pad < 0) throw new ArgumentOutOfRangeException(nameof(Pad), Pad, "the shift must be 0 or more pixels");
        int w = image.Width, h = image.Height;
        int dy = rng.NextInt(2 * Pad + 1) - Pad, dx = rng.NextInt(2 * Pad + 1) - Pad;
        var src = image.Pixels;
        var dst = new byte[src.Length];
        for (int y = 0; y < h; y++)
        {
            int sy = Math.Clamp(y + dy, 0, h - 1);
            for (int x = 0; x < w; x++)
            {
                int sx = Math.Clamp(x + dx, 0, w - 1);
                int s = (sy * w + sx) * 3, d = (y * w + x) * 3;
                dst[d] = src[s]; dst[d + 1] = src[s + 1]; dst[d + 2] = src[s + 2];
            }
        }
        return new RgbImage(w, h, dst);
    }
}
