using OpenVLA.Policy.Preprocessing;
using OpenCvSharp;
using OpenVLA.Policy;

namespace OpenVLA.FineTune.Data;

/// <summary>
/// One camera frame as the dataset stores it: encoded PNG/JPEG bytes (parquet images, RLDS) kept encoded until a sample is
/// emitted, or pixels already decoded from a video.
/// </summary>
public sealed class Frame
{
    private readonly byte[]? _encoded;
    private readonly RgbImage? _decoded;

    private Frame(byte[]? encoded, RgbImage? decoded) { _encoded = encoded; _decoded = decoded; }

    public static Frame FromEncoded(byte[] bytes) => new(bytes, null);
    public static Frame FromPixels(RgbImage image) => new(null, image);

    public RgbImage Decode() => _decoded ?? ImageCodec.Decode(_encoded!);
}

/// <summary>An episode mapped to OpenVLA's convention by a <see cref="DatasetConfig"/>.</summary>
/// <param name="Actions">[step][ActionDim] in the EEF convention, not normalized.</param>
/// <param name="Proprio">[step][P], empty rows when the dataset has no proprio.</param>
/// <param name="Instructions">Per step (RLDS stores one per step; LeRobot one per frame through task_index).</param>
/// <param name="Frames">[camera][step] in the order of the config's image keys; null when read without images.</param>
/// <param name="Aux">[step][A]: the config's aux_keys concatenated; null when none are configured.</param>
public sealed record Episode(int Index, float[][] Actions, float[][] Proprio, string[] Instructions, Frame?[][]? Frames, float[][]? Aux = null)
{
    public int Length => Actions.Length;
}

/// <summary>Image decoding and resizing with OpenCV, always handing out RGB8 (OpenCV itself works in BGR).</summary>
public static class ImageCodec
{
    /// <summary>The policy core's one decode path, so training sees exactly the pixels (and refuses exactly the frames) that serving does.</summary>
    public static RgbImage Decode(byte[] encoded)
    {
        try { return ImageDecoder.Decode(encoded); }
        catch (PolicyInputException e) { throw new DatasetException($"a frame of {encoded.Length} bytes cannot be used: {e.Message}"); }
    }


    /// <summary>PNG bytes of an RGB image (lossless; used by writers and tests).</summary>
    public static byte[] EncodePng(RgbImage image) => Encode(image, ".png");

    public static byte[] EncodeJpeg(RgbImage image, int quality = 95) =>
        Encode(image, ".jpg", new ImageEncodingParam(ImwriteFlags.JpegQuality, quality));

    private static byte[] Encode(RgbImage image, string ext, params ImageEncodingParam[] prms)
    {
        using var bgr = ToBgr(image);
        Cv2.ImEncode(ext, bgr, out var bytes, prms);
        return bytes;
    }

    private static Mat ToBgr(RgbImage image)
    {
        using var rgb = Mat.FromPixelData(image.Height, image.Width, MatType.CV_8UC3, image.Pixels);
        var bgr = new Mat();
        Cv2.CvtColor(rgb, bgr, ColorConversionCodes.RGB2BGR);
        return bgr;
    }

    /// <summary>Resizes with area averaging when shrinking (anti-aliased) and bicubic when enlarging.</summary>
    public static RgbImage Resize(RgbImage image, int width, int height)
    {
        if (image.Width == width && image.Height == height) return image;
        using var src = Mat.FromPixelData(image.Height, image.Width, MatType.CV_8UC3, image.Pixels);
        using var dst = new Mat();
        var interpolation = width < image.Width && height < image.Height ? InterpolationFlags.Area : InterpolationFlags.Cubic;
        Cv2.Resize(src, dst, new Size(width, height), 0, 0, interpolation);
        var pixels = new byte[width * height * 3];
        System.Runtime.InteropServices.Marshal.Copy(dst.Data, pixels, 0, pixels.Length);
        return new RgbImage(width, height, pixels);
    }
}
