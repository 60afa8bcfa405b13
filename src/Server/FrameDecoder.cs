using System.Buffers.Binary;
using OpenVLA.Contract.V1;
using OpenVLA.Policy;

namespace OpenVLA.Server;

/// <summary>
/// Turns the image of a request into an <see cref="RgbImage"/>, or says in one line why it cannot. The header checks here
/// enforce the server's own limits (--max-image-side) and the declared encoding before anything is allocated; the
/// pixels then come from the policy core's decoder, so a frame sent over the network gives exactly the pixels (and so
/// the action) that offline `openvla predict` gives for the same file.
/// </summary>
internal static class FrameDecoder
{
    static ReadOnlySpan<byte> PngSignature => [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A];
    static ReadOnlySpan<byte> PngIend => [0, 0, 0, 0, 0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82];

    public static RgbImage Decode(Image image, int maxSide)
    {
        var data = image.Data.Span;
        switch (image.Encoding)
        {
            case ImageEncoding.RawRgb8:
            {
                CheckSize(image.Width, image.Height, maxSide);
                long expected = (long)image.Width * image.Height * 3;
                if (data.Length != expected)
                    throw Invalid($"raw RGB8 image of {image.Width}x{image.Height} needs {expected} bytes, got {data.Length}");
                return Policy.Preprocessing.ImageDecoder.FromRaw(data.ToArray(), (int)image.Width, (int)image.Height);
            }
            case ImageEncoding.Jpeg:
            case ImageEncoding.Png:
            {
                if (data.IsEmpty) throw Invalid($"{Name(image.Encoding)} image has no bytes");
                var (width, height) = image.Encoding == ImageEncoding.Jpeg ? JpegSize(data) : PngSize(data);
                CheckSize((uint)width, (uint)height, maxSide);
                if ((image.Width != 0 && image.Width != width) || (image.Height != 0 && image.Height != height))
                    throw Invalid($"image says {image.Width}x{image.Height} but its {Name(image.Encoding)} header says {width}x{height}");
                return DecodeWithPolicyDecoder(data, image.Encoding, width, height);
            }
            case ImageEncoding.Unspecified:
                throw Invalid("image encoding is not set (RAW_RGB8, JPEG or PNG)");
            default:
                throw Invalid($"unknown image encoding {(int)image.Encoding} (accepted: RAW_RGB8, JPEG, PNG)");
        }
    }

    static RgbImage DecodeWithPolicyDecoder(ReadOnlySpan<byte> data, ImageEncoding encoding, int width, int height)
    {
        var image = Policy.Preprocessing.ImageDecoder.Decode(data.ToArray()); // PolicyInputException: one line, INVALID_ARGUMENT
        if (image.Width != width || image.Height != height)
            throw Invalid($"{Name(encoding)} image decoded to {image.Width}x{image.Height}, its header says {width}x{height}");
        return image;
    }

    /// <summary>Width and height from the first start-of-frame segment; requires SOI at the start and EOI at the end.</summary>
    internal static (int Width, int Height) JpegSize(ReadOnlySpan<byte> data)
    {
        if (data.Length < 4 || data[0] != 0xFF || data[1] != 0xD8) throw Invalid("JPEG image does not start with a JPEG marker (corrupt or not a JPEG)");
        var end = data.Length;
        while (end > 2 && data[end - 1] == 0) end--; // some cameras pad with zero bytes
        if (data[end - 2] != 0xFF || data[end - 1] != 0xD9) throw Invalid("JPEG image is truncated (no end-of-image marker)");
        int i = 2;
        while (i + 4 <= data.Length)
        {
            if (data[i] != 0xFF) throw Invalid($"JPEG image is corrupt (expected a marker at byte {i})");
            byte marker = data[i + 1];
            if (marker == 0xFF) { i++; continue; } // fill byte
            if (marker is 0x01 or (>= 0xD0 and <= 0xD7)) { i += 2; continue; }
            if (marker is 0xD9 or 0xDA) break; // end of image or start of scan before any frame header
            int length = BinaryPrimitives.ReadUInt16BigEndian(data[(i + 2)..]);
            if (length < 2 || i + 2 + length > data.Length) throw Invalid("JPEG image is truncated or corrupt (segment runs past the end)");
            bool startOfFrame = marker is >= 0xC0 and <= 0xCF and not 0xC4 and not 0xC8 and not 0xCC;
            if (startOfFrame)
            {
                if (length < 8) throw Invalid("JPEG image is corrupt (short frame header)");
                int height = BinaryPrimitives.ReadUInt16BigEndian(data[(i + 5)..]);
                int width = BinaryPrimitives.ReadUInt16BigEndian(data[(i + 7)..]);
                int components = data[i + 9];
                if (components is not (1 or 3)) throw Invalid($"JPEG image has {components} colour components (expected 1 or 3)");
                return (width, height);
            }
            i += 2 + length;
        }
        throw Invalid("JPEG image is corrupt (no frame header)");
    }

    /// <summary>Width and height from IHDR; requires the PNG signature at the start and the IEND chunk at the end.</summary>
    internal static (int Width, int Height) PngSize(ReadOnlySpan<byte> data)
    {
        if (data.Length < 8 + 25 || !data.StartsWith(PngSignature)) throw Invalid("PNG image does not start with the PNG signature (corrupt or not a PNG)");
        if (!data.EndsWith(PngIend)) throw Invalid("PNG image is truncated (no IEND chunk at the end)");
        if (BinaryPrimitives.ReadUInt32BigEndian(data[8..]) != 13 || !data[12..16].SequenceEqual("IHDR"u8))
            throw Invalid("PNG image is corrupt (first chunk is not IHDR)");
        uint width = BinaryPrimitives.ReadUInt32BigEndian(data[16..]);
        uint height = BinaryPrimitives.ReadUInt32BigEndian(data[20..]);
        if (width > int.MaxValue || height > int.MaxValue) throw Invalid($"PNG image size {width}x{height} is too large");
        return ((int)width, (int)height);
    }

    static void CheckSize(uint width, uint height, int maxSide)
    {
        if (width == 0 || height == 0) throw Invalid($"image size must be positive, got {width}x{height}");
        if (width > maxSide || height > maxSide) throw Invalid($"image of {width}x{height} exceeds the server's limit of {maxSide} pixels per side");
    }

    static string Name(ImageEncoding encoding) => encoding == ImageEncoding.Jpeg ? "JPEG" : "PNG";

    static InvalidObservationException Invalid(string message) => new(message);
}

/// <summary>The observation of a request cannot be used; the message is one line for the client (INVALID_ARGUMENT).</summary>
internal sealed class InvalidObservationException(string message) : Exception(message);
