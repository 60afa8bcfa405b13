using System.Buffers.Binary;
using System.IO.Compression;
using OpenCvSharp;
using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;

namespace OpenVLA.Tests.Preprocessing;

/// <summary>
/// The one decode path refuses what libjpeg and libpng would quietly turn into invented pixels or huge allocations, and
/// accepts every well-formed image those libraries write.
/// </summary>
public class ImageContainerTests
{
    /// <summary>A 37x23 frame (odd sizes: partial JPEG blocks) with gradients and noise, so the entropy-coded data is not trivial.</summary>
    static Mat Scene(int width = 37, int height = 23)
    {
        var bgr = new Mat(height, width, MatType.CV_8UC3);
        var noise = new Random(5);
        for (int y = 0; y < height; y++)
            for (int x = 0; x < width; x++)
                bgr.Set(y, x, new Vec3b((byte)(x * 6), (byte)(y * 10), (byte)noise.Next(256)));
        return bgr;
    }

    static byte[] Encode(Mat image, string extension, params ImageEncodingParam[] parameters)
    {
        Cv2.ImEncode(extension, image, out byte[] bytes, parameters);
        return bytes;
    }

    static byte[] Jpeg(params ImageEncodingParam[] parameters)
    {
        using var scene = Scene();
        return Encode(scene, ".jpg", parameters);
    }

    public static TheoryData<string> ValidKinds() => ["baseline", "grayscale", "restart-1", "restart-3", "progressive", "quality-100", "png-rgb", "png-gray", "png-gray16", "png-rgba", "png-level-9"];

    [Theory]
    [MemberData(nameof(ValidKinds))]
    public void Every_well_formed_kind_passes_and_decodes_to_the_pixels_OpenCV_gives(string kind)
    {
        using var scene = Scene();
        using var gray = scene.CvtColor(ColorConversionCodes.BGR2GRAY);
        using var gray16 = new Mat();
        gray.ConvertTo(gray16, MatType.CV_16UC1, 257);
        using var rgba = scene.CvtColor(ColorConversionCodes.BGR2BGRA);
        byte[] bytes = kind switch
        {
            "baseline" => Encode(scene, ".jpg"),
            "grayscale" => Encode(gray, ".jpg"),
            "restart-1" => Encode(scene, ".jpg", new ImageEncodingParam(ImwriteFlags.JpegRstInterval, 1)),
            "restart-3" => Encode(scene, ".jpg", new ImageEncodingParam(ImwriteFlags.JpegRstInterval, 3)),
            "progressive" => Encode(scene, ".jpg", new ImageEncodingParam(ImwriteFlags.JpegProgressive, 1)),
            "quality-100" => Encode(scene, ".jpg", new ImageEncodingParam(ImwriteFlags.JpegQuality, 100)),
            "png-rgb" => Encode(scene, ".png"),
            "png-gray" => Encode(gray, ".png"),
            "png-gray16" => Encode(gray16, ".png"),
            "png-rgba" => Encode(rgba, ".png"),
            _ => Encode(scene, ".png", new ImageEncodingParam(ImwriteFlags.PngCompression, 9)),
        };

        var header = ImageContainer.Validate(bytes, ImageLimits.Default);
        var image = ImageDecoder.Decode(bytes);

        Assert.Equal((37, 23), (header.Width, header.Height));
        using var reference = Cv2.ImDecode(bytes, ImreadModes.Color | ImreadModes.IgnoreOrientation);
        using var rgb = reference.CvtColor(ColorConversionCodes.BGR2RGB);
        rgb.GetArray(out Vec3b[] expected);
        Assert.Equal(expected.SelectMany(v => new[] { v.Item0, v.Item1, v.Item2 }), image.Pixels);
    }

    /// <summary>An interlaced palette PNG written here (Adam7 pass by pass, pixel by pixel) decodes to its palette colours.</summary>
    [Fact]
    public void An_interlaced_palette_png_is_accepted_whole_and_refused_one_byte_short()
    {
        const int width = 11, height = 7;
        byte[] palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 99, 199];
        int Index(int x, int y) => (x * 3 + y * 5) % 4;
        var raw = new MemoryStream();
        (int X0, int Y0, int Dx, int Dy)[] passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)];
        foreach (var (x0, y0, dx, dy) in passes)
            for (int y = y0; y < height; y += dy)
            {
                var row = new List<byte>();
                for (int x = x0; x < width; x += dx) row.Add((byte)Index(x, y));
                if (row.Count == 0) break;          // an empty pass has no rows, and no filter bytes
                raw.WriteByte(0);
                raw.Write(row.ToArray());
            }
        byte[] Png(byte[] scanlines)
        {
            var idat = new MemoryStream();
            using (var z = new ZLibStream(idat, CompressionLevel.Optimal, leaveOpen: true)) z.Write(scanlines);
            var ihdr = new byte[13];
            BinaryPrimitives.WriteUInt32BigEndian(ihdr, width);
            BinaryPrimitives.WriteUInt32BigEndian(ihdr.AsSpan(4), height);
            ihdr[8] = 8; ihdr[9] = 3; ihdr[12] = 1;   // 8-bit palette indices, Adam7
            return PngWriter.File(("IHDR", ihdr), ("PLTE", palette), ("IDAT", idat.ToArray()), ("IEND", []));
        }
        byte[] scanlines = raw.ToArray();

        var image = ImageDecoder.Decode(Png(scanlines));

        for (int y = 0; y < height; y++)
            for (int x = 0; x < width; x++)
                Assert.Equal(palette.AsSpan(3 * Index(x, y), 3).ToArray(), image.Pixels.AsSpan(3 * (y * width + x), 3).ToArray());
        var e = Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(Png(scanlines[..^1])));
        Assert.Equal($"truncated PNG image: its image data holds {scanlines.Length - 1} of the {scanlines.Length} bytes the header needs", e.Message);
    }

    [Fact]
    public void A_jpeg_whose_scan_is_missing_or_cut_short_is_refused_though_libjpeg_would_invent_the_rest()
    {
        byte[] jpeg = Jpeg();
        int sos = IndexOfMarker(jpeg, 0xDA);
        int scanData = sos + 2 + BinaryPrimitives.ReadUInt16BigEndian(jpeg.AsSpan(sos + 2));
        int eoi = jpeg.Length - 2;
        byte[] headersOnly = [.. jpeg[..scanData], 0xFF, 0xD9];
        int cut = scanData + (eoi - scanData) / 3;
        while (jpeg[cut - 1] == 0xFF) cut--;
        byte[] cutShort = [.. jpeg[..cut], 0xFF, 0xD9];

        using (var invented = Cv2.ImDecode(cutShort, ImreadModes.Color)) Assert.False(invented.Empty());   // why this check exists
        Assert.Equal("JPEG image has a scan with no image data", Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(headersOnly)).Message);
        // libjpeg's default 4:2:0 sampling: MCUs of 16x16 pixels, 3 x 2 of them for 37x23.
        Assert.Matches(@"^truncated or corrupt JPEG image: its scan ends after [0-5] of the 6 block groups the frame needs$",
            Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(cutShort)).Message);
        Assert.Equal("truncated JPEG image: the data ends inside a scan (no end-of-image marker)",
            Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(jpeg[..cut])).Message);
        byte[] noFrame = [.. jpeg[..2], .. jpeg[sos..]];
        Assert.Equal("corrupt JPEG image: a scan before the frame header", Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(noFrame)).Message);
    }

    [Fact]
    public void A_chunk_that_declares_more_bytes_than_the_file_holds_is_refused_before_anything_is_allocated()
    {
        using var scene = Scene();
        byte[] png = Encode(scene, ".png");
        // An ancillary chunk after IHDR that declares 4 GB (the hostile client's 12 KB request).
        byte[] chunk = [0xFF, 0xFF, 0xFF, 0xF0, (byte)'z', (byte)'T', (byte)'X', (byte)'t', .. new byte[12_000]];
        byte[] hostile = [.. png[..33], .. chunk, .. png[33..]];

        long before = GC.GetAllocatedBytesForCurrentThread();
        var e = Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(hostile));
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;

        Assert.Equal($"truncated or corrupt PNG image: chunk zTXt at byte 33 declares 4294967280 bytes, {hostile.Length - 45} remain", e.Message);
        Assert.True(allocated < 64 * 1024, $"{allocated} bytes allocated to refuse it");
    }

    [Fact]
    public void The_pixel_cap_is_checked_on_the_header_before_decoding()
    {
        using var scene = Scene();
        var limits = new ImageLimits(MaxSide: 4096, MaxPixels: 800);

        Assert.Equal("PNG image is 37x23 = 851 pixels; the largest accepted is 800",
            Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(Encode(scene, ".png"), limits)).Message);
        Assert.Equal("JPEG image is 37x23 = 851 pixels; the largest accepted is 800",
            Assert.Throws<PolicyInputException>(() => ImageDecoder.Decode(Encode(scene, ".jpg"), limits)).Message);
        Assert.Equal((37, 23), (ImageDecoder.Decode(Encode(scene, ".png"), limits with { MaxPixels = 851 }).Width, 23));
    }

    /// <summary>
    /// Thousands of seeded mutations (bit flips, byte runs, truncations, inserted and deleted bytes) of valid frames: each
    /// decodes to an image within the limits or is refused with a one-line <see cref="PolicyInputException"/>, never
    /// another exception, and no decode allocates more than its input warrants. `openvla fuzz-decode` runs the long version.
    /// </summary>
    [Fact]
    public void Mutated_frames_decode_or_are_refused_cleanly_with_bounded_memory()
    {
        using var scene = Scene(64, 48);
        var seeds = new[] { Encode(scene, ".jpg"), Encode(scene, ".png"), Encode(scene, ".jpg", new ImageEncodingParam(ImwriteFlags.JpegProgressive, 1)) };
        var limits = new ImageLimits(MaxSide: 1024, MaxPixels: 1024 * 1024);

        var result = ImageFuzz.Run(seeds, mutations: 6000, seed: 11, limits);

        Assert.Equal(6000, result.Decoded + result.Refused);
        Assert.True(result.Refused > 3000, $"only {result.Refused} of 6000 mutations refused");
        Assert.True(result.Decoded > 100, $"only {result.Decoded} of 6000 mutations decoded (entropy-data flips should)");
        // Bounded by the input, not by what it declares: the frames are under 20 KB, a decode of 64x48 needs 9 KB of pixels,
        // the zlib check a 64 KB buffer. (The process's resident memory is checked by `openvla fuzz-decode`, in a process of its own.)
        Assert.True(result.MaxManagedBytes < 512 * 1024, $"one decode allocated {result.MaxManagedBytes} bytes");
    }

    static int IndexOfMarker(byte[] jpeg, byte marker)
    {
        for (int i = 0; i + 1 < jpeg.Length; i++)
            if (jpeg[i] == 0xFF && jpeg[i + 1] == marker) return i;
        throw new InvalidOperationException($"no marker FF{marker:X2}");
    }
}

/// <summary>PNG files from chunks, with an independent CRC-32 (bitwise, no table).</summary>
internal static class PngWriter
{
    public static byte[] File(params (string Type, byte[] Data)[] chunks)
    {
        var file = new MemoryStream();
        file.Write([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]);
        foreach (var (type, data) in chunks)
        {
            var buffer = new byte[12 + data.Length];
            BinaryPrimitives.WriteUInt32BigEndian(buffer, (uint)data.Length);
            System.Text.Encoding.ASCII.GetBytes(type).CopyTo(buffer, 4);
            data.CopyTo(buffer, 8);
            uint c = 0xFFFFFFFF;
            foreach (byte b in buffer.AsSpan(4, 4 + data.Length))
            {
                c ^= b;
                for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (uint)-(int)(c & 1));
            }
            BinaryPrimitives.WriteUInt32BigEndian(buffer.AsSpan(8 + data.Length), ~c);
            file.Write(buffer);
        }
        return file.ToArray();
    }
}
