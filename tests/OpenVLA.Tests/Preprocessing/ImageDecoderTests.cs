using System.Buffers.Binary;
using OpenCvSharp;
using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;

namespace OpenVLA.Tests.Preprocessing;

public class ImageDecoderTests
{
    /// <summary>Encodes a 5x3 frame whose pixel (x, y) is R = 40x, G = 60y, B = 7 (OpenCV takes BGR).</summary>
    private static byte[] Encode(string extension)
    {
        using var bgr = new Mat(3, 5, MatType.CV_8UC3);
        for (int y = 0; y < 3; y++)
            for (int x = 0; x < 5; x++) bgr.Set(y, x, new Vec3b(7, (byte)(60 * y), (byte)(40 * x)));
        Cv2.ImEncode(extension, bgr, out byte[] bytes);
        return bytes;
    }

    [Fact]
    public void PngDecodesToRgbInRowMajorOrder()
    {
        var image = ImageDecoder.Decode(Encode(".png"));
        Assert.Equal((5, 3), (image.Width, image.Height));
        Assert.Equal([0, 0, 7], image.Pixels[..3]);
        int i = (2 * 5 + 4) * 3; // x = 4, y = 2
        Assert.Equal([160, 120, 7], image.Pixels[i..(i + 3)]);
    }

    [Fact]
    public void JpegDecodesToApproximatelyTheSamePixels()
    {
        var image = ImageDecoder.Decode(Encode(".jpg"));
        Assert.Equal((5, 3), (image.Width, image.Height));
        int i = (2 * 5 + 4) * 3;
        Assert.InRange(image.Pixels[i], 130, 190); // lossy, but red must stay red (not swapped with blue = 7)
        Assert.InRange(image.Pixels[i + 2], 0, 50);
    }

    [Fact]
    public void RawFramesAreValidated()
    {
        var image = ImageDecoder.FromRaw(new byte[2 * 3 * 3], 2, 3);
        Assert.Equal((2, 3), (image.Width, image.Height));
        Assert.Contains("needs 18 bytes, got 17", Assert.Throws<PolicyInputException>(() => ImageDecoder.FromRaw(new byte[17], 2, 3)).Message);
        Assert.Contains("must be positive, got 0x3", Assert.Throws<PolicyInputException>(() => ImageDecoder.FromRaw([], 0, 3)).Message);
        Assert.Contains("largest accepted side is 8192", Assert.Throws<PolicyInputException>(() => ImageDecoder.FromRaw([], 9000, 1)).Message);
    }

    [Fact]
    public void EmptyUnknownCorruptAndTruncatedBytesAreRejected()
    {
        Assert.Equal("image bytes are empty", Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode([])).Message);
        Assert.StartsWith("unknown image encoding (expected JPEG or PNG; first bytes 474946383961",
            Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode("GIF89a\x01\x00"u8.ToArray())).Message);

        byte[] png = Encode(".png");
        Assert.Contains("truncated or corrupt PNG image: chunk IDAT", Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(png[..(png.Length - 20)])).Message);
        Assert.Contains("corrupt PNG image: no valid header", Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(png[..12])).Message);
        byte[] garbled = (byte[])png.Clone();
        for (int i = 45; i < garbled.Length - 12; i++) garbled[i] ^= 0x5A; // inside the compressed data
        Assert.Contains("PNG", Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(garbled)).Message);

        byte[] jpeg = Encode(".jpg");
        Assert.Contains("truncated JPEG", Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(jpeg[..(jpeg.Length - 10)])).Message);
        Assert.Contains("JPEG", Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode([0xFF, 0xD8, 0xFF])).Message);
    }

    [Fact]
    public void HugeDeclaredSizesAreRejectedBeforeDecoding()
    {
        byte[] png = Encode(".png");
        BinaryPrimitives.WriteUInt32BigEndian(png.AsSpan(16), 100_000); // IHDR width
        var e = Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(png));
        Assert.Contains("fails its CRC", e.Message);   // the header was edited without its CRC
        FixCrc(png, 8);
        Assert.Equal("PNG image is 100000x3 pixels; the largest accepted side is 8192", Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(png)).Message);
    }

    /// <summary>Rewrites the CRC of the PNG chunk at <paramref name="offset"/> after an edit (an independent CRC-32).</summary>
    internal static void FixCrc(byte[] png, int offset)
    {
        int length = (int)BinaryPrimitives.ReadUInt32BigEndian(png.AsSpan(offset));
        uint c = 0xFFFFFFFF;
        foreach (byte b in png.AsSpan(offset + 4, 4 + length))
        {
            c ^= b;
            for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (uint)-(int)(c & 1));
        }
        BinaryPrimitives.WriteUInt32BigEndian(png.AsSpan(offset + 8 + length), ~c);
    }

    [Fact]
    public void FilesAreLoadedAndErrorsNameThePath()
    {
        string dir = Directory.CreateTempSubdirectory("openvla-decode-").FullName;
        try
        {
            string good = Path.Combine(dir, "frame.png");
            File.WriteAllBytes(good, Encode(".png"));
            Assert.Equal((5, 3), (ImageDecoder.Load(good).Width, ImageDecoder.Load(good).Height));

            string missing = Path.Combine(dir, "nope.jpg");
            Assert.Equal($"image file not found: {missing}", Assert.Throws<PolicyInputException>(() => ImageDecoder.Load(missing)).Message);

            string text = Path.Combine(dir, "notes.png");
            File.WriteAllText(text, "not an image");
            Assert.StartsWith($"image file {text}: unknown image encoding", Assert.Throws<PolicyInputException>(() => ImageDecoder.Load(text)).Message);

            Assert.Contains(dir, Assert.Throws<PolicyInputException>(() => ImageDecoder.Load(dir)).Message);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
    [Fact]
    public void ExifOrientationIsIgnoredLikePil()
    {
        // An APP1 segment right after SOI: "Exif\0\0", big-endian TIFF header, one IFD entry Orientation (0x0112) = 6 (rotate 90°).
        byte[] jpeg = Encode(".jpg");
        byte[] app1 =
        [
            0xFF, 0xE1, 0x00, 0x22, (byte)'E', (byte)'x', (byte)'i', (byte)'f', 0, 0,
            (byte)'M', (byte)'M', 0x00, 0x2A, 0x00, 0x00, 0x00, 0x08,
            0x00, 0x01, 0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00,
        ];
        byte[] rotated = [.. jpeg[..2], .. app1, .. jpeg[2..]];
        var image = ImageDecoder.Decode(rotated);
        Assert.Equal((5, 3), (image.Width, image.Height));
    }
}
