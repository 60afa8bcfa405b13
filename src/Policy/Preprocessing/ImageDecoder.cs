using System.Runtime.InteropServices;
using OpenCvSharp;

namespace OpenVLA.Policy.Preprocessing;

/// <summary>
/// Camera frames into <see cref="RgbImage"/>: JPEG or PNG bytes (OpenCV), raw RGB8 buffers, or image files. Every failure is a
/// <see cref="PolicyInputException"/> with one line that says what was wrong.
/// </summary>
public static class ImageDecoder
{
    /// <summary>
    /// Decodes JPEG or PNG bytes into the stored pixels, as PIL's <c>Image.open(...).convert("RGB")</c> gives them: grayscale is
    /// replicated, alpha dropped, and the EXIF orientation tag ignored. The container is checked whole and within
    /// <paramref name="limits"/> (<see cref="ImageContainer.Validate"/>) before the decoder allocates anything.
    /// </summary>
    public static RgbImage Decode(ReadOnlySpan<byte> encoded, ImageLimits? limits = null)
    {
        var header = ImageContainer.Validate(encoded, limits ?? ImageLimits.Default);
        using var bgr = DecodeWithOpenCv(encoded, header.Name);
        if (bgr.Width != header.Width || bgr.Height != header.Height)
            throw new PolicyInputException($"corrupt {header.Name} image: header says {header.Width}x{header.Height}, decoded {bgr.Width}x{bgr.Height}");
        return FromBgr(bgr);
    }

    /// <summary>An 8-bit, 3-channel OpenCV image (BGR, as OpenCV decodes) as RGB pixels, rows top to bottom.</summary>
    public static RgbImage FromBgr(Mat bgr)
    {
        using var rgb = new Mat();
        Cv2.CvtColor(bgr, rgb, ColorConversionCodes.BGR2RGB);
        int width = rgb.Width, height = rgb.Height;
        var pixels = new byte[checked(width * height * 3)];
        if (rgb.IsContinuous()) Marshal.Copy(rgb.Data, pixels, 0, pixels.Length);
        else
            for (int y = 0; y < height; y++) Marshal.Copy(rgb.Ptr(y), pixels, y * width * 3, width * 3);
        return new RgbImage(width, height, pixels);
    }

    /// <summary>A raw frame: rows top to bottom, pixels R, G, B interleaved, no padding.</summary>
    public static RgbImage FromRaw(byte[] rgb, int width, int height, ImageLimits? limits = null)
    {
        ArgumentNullException.ThrowIfNull(rgb);
        (limits ?? ImageLimits.Default).Check(width, height, "raw RGB8");
        return RgbImage.Create(width, height, rgb);
    }

    /// <summary>Reads and decodes a JPEG or PNG file; errors name the path.</summary>
    public static RgbImage Load(string path)
    {
        byte[] bytes;
        try
        {
            bytes = File.ReadAllBytes(path);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new PolicyInputException($"image file not found: {path}");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or NotSupportedException or ArgumentException)
        {
            throw new PolicyInputException($"cannot read image file {path}: {e.Message}");
        }
        try
        {
            return Decode(bytes);
        }
        catch (PolicyInputException e)
        {
            throw new PolicyInputException($"image file {path}: {e.Message}");
        }
    }

    private static Mat DecodeWithOpenCv(ReadOnlySpan<byte> encoded, string format)
    {
        Mat mat;
        try
        {
            // PIL (the reference) does not apply the EXIF orientation tag; OpenCV does unless told not to.
            mat = Cv2.ImDecode(encoded, ImreadModes.Color | ImreadModes.IgnoreOrientation);
        }
        catch (OpenCVException e)
        {
            throw new PolicyInputException($"corrupt {format} image: {e.ErrMsg}");
        }
        if (mat.Empty() || mat.Type() != MatType.CV_8UC3)
        {
            mat.Dispose();
            throw new PolicyInputException($"corrupt or truncated {format} image: it could not be decoded");
        }
        return mat;
    }
}
