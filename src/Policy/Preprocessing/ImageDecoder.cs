using System.Buffers.Binary;
using System.Runtime.InteropServices;
using OpenCvSharp;

namespace OpenVLA.Policy.Preprocessing;

/// <summary>
/// Camera frames into <see cref="RgbImage"/>: JPEG or PNG bytes (OpenCV), raw RGB8 buffers, or image files. Every failure is a
/// <see cref="PolicyInputException"/> with one line that says what was wrong.
/// </summary>
public static class ImageDecoder
{
    /// <summary>Largest accepted width or height; beyond it a frame is almost surely a mistake (or a decompression bomb).</summary>
    public const int MaxSide = 8192;

    private static ReadOnlySpan<byte> PngSignature => [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A];

    /// <summary>
    /// Decodes JPEG or PNG bytes into the stored pixels, as PIL's <c>Image.open(...).convert("RGB")</c> gives them: grayscale is
    /// replicated, alpha dropped, and the EXIF orientation tag ignored.
    /// </summary>
    public static RgbImage Decode(byte[] encoded)
    {
        ArgumentNullException.ThrowIfNull(encoded);
        if (encoded.Length == 0) throw new PolicyInputException("image bytes are empty");
        string format;
        (int Width, int Height)? declared;
        if (encoded.AsSpan().StartsWith(PngSignature)) (format, declared) = ("PNG", PngSize(encoded));
        else if (encoded.Length >= 3 && encoded[0] == 0xFF && encoded[1] == 0xD8 && encoded[2] == 0xFF) (format, declared) = ("JPEG", JpegSize(encoded));
        else throw new PolicyInputException($"unknown image encoding (expected JPEG or PNG; first bytes {Convert.ToHexString(encoded.AsSpan(0, Math.Min(8, encoded.Length)))})");

        if (declared is not { } size) throw new PolicyInputException($"corrupt {format} image: no valid header with the image size");
        CheckSize(size.Width, size.Height, format);
        if (format == "JPEG" && !JpegHasEndAfterLastScan(encoded))
            throw new PolicyInputException("corrupt or truncated JPEG image: the data ends before the end-of-image marker");

        using var bgr = DecodeWithOpenCv(encoded, format);
        if (bgr.Width != size.Width || bgr.Height != size.Height)
            throw new PolicyInputException($"corrupt {format} image: header says {size.Width}x{size.Height}, decoded {bgr.Width}x{bgr.Height}");
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
    public static RgbImage FromRaw(byte[] rgb, int width, int height)
    {
        ArgumentNullException.ThrowIfNull(rgb);
        CheckSize(width, height, "raw RGB8");
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

    private static void CheckSize(int width, int height, string what)
    {
        if (width <= 0 || height <= 0) throw new PolicyInputException($"{what} image size must be positive, got {width}x{height}");
        if (width > MaxSide || height > MaxSide)
            throw new PolicyInputException($"{what} image is {width}x{height} pixels; the largest accepted is {MaxSide}x{MaxSide}");
    }

    private static Mat DecodeWithOpenCv(byte[] encoded, string format)
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

    /// <summary>Width and height from the IHDR chunk, which PNG requires first.</summary>
    private static (int, int)? PngSize(byte[] data)
    {
        if (data.Length < 24 || !data.AsSpan(12, 4).SequenceEqual("IHDR"u8)) return null;
        uint w = BinaryPrimitives.ReadUInt32BigEndian(data.AsSpan(16)), h = BinaryPrimitives.ReadUInt32BigEndian(data.AsSpan(20));
        return ((int)Math.Min(w, int.MaxValue), (int)Math.Min(h, int.MaxValue));
    }

    /// <summary>Width and height from the first start-of-frame marker (SOF0..SOF15 except DHT, JPG and DAC).</summary>
    private static (int, int)? JpegSize(byte[] data)
    {
        int p = 2;
        while (p + 4 <= data.Length)
        {
            if (data[p] != 0xFF) return null;
            byte marker = data[p + 1];
            if (marker == 0xFF) { p++; continue; } // fill byte
            if (marker is 0xD8 or (>= 0xD0 and <= 0xD7) or 0x01) { p += 2; continue; } // markers without a length
            int length = BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(p + 2));
            if (length < 2) return null;
            bool startOfFrame = marker is >= 0xC0 and <= 0xCF and not 0xC4 and not 0xC8 and not 0xCC;
            if (startOfFrame)
            {
                if (p + 9 > data.Length) return null;
                int h = BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(p + 5)), w = BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(p + 7));
                return (w, h);
            }
            if (marker == 0xDA) return null; // a scan before any frame header
            p += 2 + length;
        }
        return null;
    }

    /// <summary>
    /// A truncated JPEG decodes "successfully" in libjpeg (grey rows with a warning), so check that an end-of-image marker follows
    /// the last start-of-scan. Inside entropy-coded data 0xFF is always stuffed (FF 00) or a restart marker, so FF D9 there is EOI.
    /// </summary>
    private static bool JpegHasEndAfterLastScan(byte[] data)
    {
        int lastScan = -1;
        for (int i = data.Length - 2; i >= 0; i--)
            if (data[i] == 0xFF && data[i + 1] == 0xDA) { lastScan = i; break; }
        if (lastScan < 0) return false;
        for (int i = lastScan + 2; i + 1 < data.Length; i++)
            if (data[i] == 0xFF && data[i + 1] == 0xD9) return true;
        return false;
    }
}
