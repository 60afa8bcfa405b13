namespace OpenVLA.Policy.Preprocessing;

/// <summary>Padding and cropping of RGB8 images with the exact semantics of the reference's torchvision / TensorFlow calls.</summary>
internal static class ImageGeometry
{
    /// <summary>
    /// Prismatic's <c>letterbox_pad_transform</c>: pad both sides of the shorter dimension by int((max − side) / 2) with a constant
    /// fill. When the difference is odd the result is one pixel short of square, as in the reference; the resize to the shorter
    /// side and the center crop that follow absorb it.
    /// </summary>
    public static RgbImage LetterboxPad(RgbImage image, ReadOnlySpan<byte> fill)
    {
        int side = Math.Max(image.Width, image.Height);
        int padX = (side - image.Width) / 2, padY = (side - image.Height) / 2;
        return Pad(image, padX, padY, padX, padY, fill);
    }

    /// <summary>Constant padding (torchvision <c>pad(..., padding_mode="constant")</c> on a PIL image).</summary>
    public static RgbImage Pad(RgbImage image, int left, int top, int right, int bottom, ReadOnlySpan<byte> fill)
    {
        if (left == 0 && top == 0 && right == 0 && bottom == 0) return image;
        int w = image.Width + left + right, h = image.Height + top + bottom;
        var dst = new byte[w * h * 3];
        for (int i = 0; i < w * h; i++)
        {
            dst[i * 3] = fill[0];
            dst[i * 3 + 1] = fill[1];
            dst[i * 3 + 2] = fill[2];
        }
        int srcRow = image.Width * 3;
        for (int y = 0; y < image.Height; y++)
            Buffer.BlockCopy(image.Pixels, y * srcRow, dst, ((y + top) * w + left) * 3, srcRow);
        return new RgbImage(w, h, dst);
    }

    /// <summary>
    /// torchvision <c>center_crop</c>: an image smaller than the crop is first zero-padded ((crop − size) // 2 before, the rest
    /// after); the crop origin is int(round((size − crop) / 2.0)) with Python's round-half-to-even.
    /// </summary>
    public static RgbImage CenterCrop(RgbImage image, int cropWidth, int cropHeight)
    {
        if (cropWidth > image.Width || cropHeight > image.Height)
        {
            int padW = Math.Max(cropWidth - image.Width, 0), padH = Math.Max(cropHeight - image.Height, 0);
            image = Pad(image, padW / 2, padH / 2, (padW + 1) / 2, (padH + 1) / 2, [0, 0, 0]);
        }
        if (cropWidth == image.Width && cropHeight == image.Height) return image;
        int top = (int)Math.Round((image.Height - cropHeight) / 2.0, MidpointRounding.ToEven);
        int left = (int)Math.Round((image.Width - cropWidth) / 2.0, MidpointRounding.ToEven);
        return Crop(image, left, top, cropWidth, cropHeight);
    }

    public static RgbImage Crop(RgbImage image, int left, int top, int width, int height)
    {
        var dst = new byte[width * height * 3];
        for (int y = 0; y < height; y++)
            Buffer.BlockCopy(image.Pixels, ((top + y) * image.Width + left) * 3, dst, y * width * 3, width * 3);
        return new RgbImage(width, height, dst);
    }

    /// <summary>
    /// The evaluation-time augmentation crop of OpenVLA's LIBERO / robot scripts (<c>crop_and_resize</c>, reference §6): keep the
    /// central square-root(area) fraction of each side and resize it back to (width, height).
    /// </summary>
    /// <remarks>
    /// The reference runs <c>tf.image.crop_and_resize</c> on the image converted to float32 in [0, 1], clips to [0, 1] and converts
    /// back with TensorFlow's <c>convert_image_dtype</c> (multiply by 255.5, truncate). We reproduce that kernel in float32: the box
    /// is (y1, x1, y2, x2) = ((1 − s)/2, (1 − s)/2, (1 + s)/2, (1 + s)/2) with s = sqrt(area) in float32; output row y samples the
    /// source at y1·(H − 1) + y·(y2 − y1)·(H − 1)/(outH − 1) with plain bilinear interpolation between the two neighbouring pixels
    /// (no antialiasing, as TensorFlow does). Matches TensorFlow up to float rounding of the sample positions (expected to be
    /// identical, since the same float32 operations are used, but not verified against TensorFlow here).
    /// </remarks>
    public static RgbImage CenterCropAndResize(RgbImage image, float area, int outWidth, int outHeight)
    {
        if (!(area > 0f && area <= 1f)) throw new ArgumentOutOfRangeException(nameof(area), $"crop area must be in (0, 1], got {area}");
        float side = Math.Clamp(MathF.Sqrt(area), 0f, 1f);
        float lo = (1f - side) / 2f, hi = lo + side;
        var ys = SamplePositions(lo, hi, image.Height, outHeight);
        var xs = SamplePositions(lo, hi, image.Width, outWidth);
        var dst = new byte[outWidth * outHeight * 3];
        byte[] src = image.Pixels;
        int row = image.Width * 3;
        for (int oy = 0; oy < outHeight; oy++)
        {
            float inY = ys[oy];
            int y0 = (int)MathF.Floor(inY), y1 = (int)MathF.Ceiling(inY);
            float yLerp = inY - y0;
            for (int ox = 0; ox < outWidth; ox++)
            {
                float inX = xs[ox];
                int x0 = (int)MathF.Floor(inX), x1 = (int)MathF.Ceiling(inX);
                float xLerp = inX - x0;
                for (int c = 0; c < 3; c++)
                {
                    float tl = src[y0 * row + x0 * 3 + c] * InverseOf255, tr = src[y0 * row + x1 * 3 + c] * InverseOf255;
                    float bl = src[y1 * row + x0 * 3 + c] * InverseOf255, br = src[y1 * row + x1 * 3 + c] * InverseOf255;
                    float top = tl + (tr - tl) * xLerp;
                    float bottom = bl + (br - bl) * xLerp;
                    float v = Math.Clamp(top + (bottom - top) * yLerp, 0f, 1f);
                    dst[(oy * outWidth + ox) * 3 + c] = (byte)(int)(v * 255.5f);
                }
            }
        }
        return new RgbImage(outWidth, outHeight, dst);
    }

    // convert_image_dtype(uint8 -> float32) multiplies by 1/255 rather than dividing by 255.
    private const float InverseOf255 = (float)(1.0 / 255.0);

    private static float[] SamplePositions(float lo, float hi, int inSize, int outSize)
    {
        var pos = new float[outSize];
        float last = inSize - 1;
        if (outSize == 1)
        {
            pos[0] = 0.5f * (lo + hi) * last;
            return pos;
        }
        float step = (hi - lo) * last / (outSize - 1);
        for (int i = 0; i < outSize; i++) pos[i] = Math.Clamp(lo * last + i * step, 0f, last);
        return pos;
    }
}
