using Google.Protobuf;
using Grpc.Core;
using OpenVLA.Contract.V1;
using OpenVLA.RobotClients;
using OpenVLA.Tests.Preprocessing;

namespace OpenVLA.Tests.Server;

/// <summary>Every malformed observation gets INVALID_ARGUMENT (or the fitting code) with one line, and the server keeps serving.</summary>
public sealed class BadInputTests : IAsyncLifetime
{
    OpenVLA.Server.PolicyServer server = null!;
    PolicyClient client = null!;

    public async Task InitializeAsync()
    {
        server = await TestServer.StartAsync(new DeterministicPolicy(), o => o with { MaxImageSide = 1024, MaxImagePixels = 1 << 19, MaxMessageBytes = 1 << 20 });
        client = TestServer.Client(server);
    }

    public async Task DisposeAsync()
    {
        client.Dispose();
        await server.DisposeAsync();
    }

    static readonly byte[] Jpeg = TestServer.Encode(TestServer.Frame(90, 64, 48), ".jpg");
    static readonly byte[] Png = TestServer.Encode(TestServer.Frame(90, 64, 48), ".png");

    public static TheoryData<string, Func<Observation>, string> Cases() => new()
    {
        { "random bytes as JPEG", () => TestServer.WithImage(TestServer.EncodedImage(RandomBytes(5000), ImageEncoding.Jpeg)), "declared JPEG but its bytes are neither JPEG nor PNG" },
        { "truncated JPEG", () => TestServer.WithImage(TestServer.EncodedImage(Jpeg[..(Jpeg.Length / 2)], ImageEncoding.Jpeg)), "truncated or corrupt JPEG image" },
        { "PNG bytes labelled JPEG", () => TestServer.WithImage(TestServer.EncodedImage(Png, ImageEncoding.Jpeg)), "declared JPEG but its bytes are PNG" },
        { "truncated PNG", () => TestServer.WithImage(TestServer.EncodedImage(Png[..(Png.Length - 20)], ImageEncoding.Png)), "truncated or corrupt PNG image: chunk IDAT" },
        { "corrupt PNG data", () => TestServer.WithImage(TestServer.EncodedImage(CorruptMiddle(Png), ImageEncoding.Png)), "fails its CRC" },
        { "empty JPEG", () => TestServer.WithImage(TestServer.EncodedImage([], ImageEncoding.Jpeg)), "JPEG image has no bytes" },
        { "JPEG header claiming 60000x60000", () => TestServer.WithImage(TestServer.EncodedImage(HugeJpegHeader(), ImageEncoding.Jpeg)), "the largest accepted side is 1024" },
        { "raw size not width*height*3", () => TestServer.WithImage(Raw(32, 24, 32 * 24 * 3 - 1)), "needs 2304 bytes, got 2303" },
        { "raw zero width", () => TestServer.WithImage(Raw(0, 24, 0)), "image size must be positive, got 0x24" },
        { "raw huge dimensions", () => TestServer.WithImage(Raw(100_000, 100_000, 12)), "the largest accepted side is 1024" },
        { "unknown encoding", () => TestServer.WithImage(new Image { Encoding = (ImageEncoding)9, Data = ByteString.CopyFrom(Jpeg) }), "unknown image encoding 9" },
        { "encoding not set", () => TestServer.WithImage(new Image { Data = ByteString.CopyFrom(Jpeg) }), "image encoding is not set" },
        { "empty instruction", () => TestServer.WithImage(TestServer.EncodedImage(Jpeg, ImageEncoding.Jpeg), instruction: "  "), "instruction is empty" },
        { "unknown unnorm_key", () => WithKey("nonexistent_dataset"), "unknown unnorm_key 'nonexistent_dataset' (known: bridge_orig, fractal20220817_data)" },
        { "no unnorm_key with two datasets", () => WithKey(""), "unnorm_key is required" },
        { "NaN proprio", () => WithProprio(0.5f, float.NaN), "proprio[1] is NaN" },
        { "infinite proprio", () => WithProprio(float.PositiveInfinity), "proprio[0] is" },
        { "no image", () => new Observation { Instruction = "pick", UnnormKey = "bridge_orig" }, "expected 1 image(s) per observation, got 0" },
        { "two images for a one-camera model", () => TwoImages(), "expected 1 image(s) per observation, got 2" },

        // PNG containers: every length, CRC and header field is checked before a decoder allocates.
        { "PNG chunk declaring 4 GB (12 KB request)", () => PngImage(HugeChunkPng()), "declares 4294967280 bytes" },
        { "PNG with no IDAT", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3)), ("IEND", []))), "no image data (no IDAT chunk)" },
        { "PNG zlib data cut short, CRCs valid", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3)), ("IDAT", HalfOfNoisyZlib()), ("IEND", []))), "truncated PNG image: its image data holds" },
        { "PNG zlib data that is not zlib", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3)), ("IDAT", [1, 2, 3, 4, 5, 6]), ("IEND", []))), "compressed image data is invalid" },
        { "PNG RGB with bit depth 4", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3, depth: 4)), ("IDAT", Zlib(Scanlines(4, 3))), ("IEND", []))), "colour type 2 with bit depth 4" },
        { "PNG colour type 5", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3, color: 5)), ("IDAT", Zlib(Scanlines(4, 3))), ("IEND", []))), "colour type 5" },
        { "PNG interlace method 2", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3, interlace: 2)), ("IDAT", Zlib(Scanlines(4, 3))), ("IEND", []))), "interlace method 2" },
        { "PNG with two IHDR", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3)), ("IHDR", Ihdr(4, 3)), ("IDAT", Zlib(Scanlines(4, 3))), ("IEND", []))), "a second IHDR chunk" },
        { "PNG IHDR of 12 bytes", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3)[..12]), ("IDAT", Zlib(Scanlines(4, 3))), ("IEND", []))), "IHDR holds 12 bytes, not 13" },
        { "PNG palette image without PLTE", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3, color: 3)), ("IDAT", Zlib(new byte[3 * 5])), ("IEND", []))), "without a PLTE chunk" },
        { "PNG with an unknown critical chunk", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3)), ("ABCD", [1]), ("IDAT", Zlib(Scanlines(4, 3))), ("IEND", []))), "unknown critical chunk ABCD" },
        { "PNG with IDATs split by another chunk", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3)), ("IDAT", Zlib(Scanlines(4, 3))[..10]), ("tEXt", [65, 0, 66]), ("IDAT", Zlib(Scanlines(4, 3))[10..]), ("IEND", []))), "not consecutive" },
        { "PNG of width 0", () => PngImage(PngWriter.File(("IHDR", Ihdr(0, 3)), ("IDAT", Zlib([0])), ("IEND", []))), "image size must be positive, got 0x3" },
        { "PNG over the pixel cap", () => PngImage(PngWriter.File(("IHDR", Ihdr(800, 800)), ("IDAT", Zlib([0])), ("IEND", []))), "800x800 = 640000 pixels; the largest accepted is 524288" },
        { "PNG over the side limit", () => PngImage(PngWriter.File(("IHDR", Ihdr(60000, 1)), ("IDAT", Zlib([0])), ("IEND", []))), "60000x1 pixels; the largest accepted side is 1024" },
        { "PNG with the first chunk not IHDR", () => PngImage(PngWriter.File(("tEXt", [65, 0, 66]), ("IHDR", Ihdr(4, 3)), ("IDAT", Zlib(Scanlines(4, 3))), ("IEND", []))), "first chunk is not IHDR" },
        { "PNG without IEND", () => PngImage(PngWriter.File(("IHDR", Ihdr(4, 3)), ("IDAT", Zlib(Scanlines(4, 3))))), "without an IEND chunk" },
        { "PNG signature only", () => PngImage(Png[..8]), "no valid header with the image size" },
        { "PNG labelled JPEG's twin: JPEG labelled PNG", () => PngImage(Jpeg), "declared PNG but its bytes are JPEG" },
        { "GIF labelled PNG", () => PngImage("GIF89a\u0001\u0000\u0001\u0000"u8.ToArray()), "neither JPEG nor PNG" },
        { "empty PNG", () => PngImage([]), "PNG image has no bytes" },
        { "PNG declared 32x24 in the message but 64x48 in IHDR", () => TestServer.WithImage(new Image { Encoding = ImageEncoding.Png, Width = 32, Height = 24, Data = ByteString.CopyFrom(Png) }), "image says 32x24 but its PNG header says 64x48" },

        // JPEG containers: segments, frame and scan headers, Huffman tables, and a scan that holds every block.
        { "JPEG with headers but no scan data", () => JpegImage(HeadersOnlyJpeg()), "has a scan with no image data" },
        { "JPEG scan cut short and closed with EOI", () => JpegImage(CutJpeg(closed: true)), "its scan ends after" },
        { "JPEG scan cut short, no EOI", () => JpegImage(CutJpeg(closed: false)), "ends inside a scan" },
        { "JPEG with 4 colour components", () => JpegImage(EditJpeg(0xC0, 9, 4)), "has 4 colour components" },
        { "JPEG with 12-bit samples", () => JpegImage(EditJpeg(0xC0, 4, 12)), "12-bit samples" },
        { "lossless JPEG", () => JpegImage(EditJpeg(0xC0, 1, 0xC3)), "lossless JPEG is not supported" },
        { "JPEG of width 0", () => JpegImage(EditJpeg(0xC0, 7, 0, 0)), "must be positive" },
        { "JPEG sampling factors 0x0", () => JpegImage(EditJpeg(0xC0, 11, 0x00)), "sampling factors 0x0" },
        { "JPEG scan naming undefined Huffman tables", () => JpegImage(EditJpeg(0xDA, 6, 0x33)), "which is not defined" },
        { "JPEG scan naming a missing component", () => JpegImage(EditJpeg(0xDA, 5, 77)), "a scan names component 77" },
        { "JPEG segment running past the end", () => JpegImage(Jpeg[..(IndexOf(Jpeg, 0xC0) + 6)]), "declares 17 bytes" },
        { "JPEG with a second SOI", () => JpegImage([0xFF, 0xD8, .. Jpeg]), "a second start-of-image marker" },
        { "JPEG scan before the frame header", () => JpegImage([0xFF, 0xD8, .. Jpeg[IndexOf(Jpeg, 0xDA)..]]), "a scan before the frame header" },
        { "JPEG Huffman table with too many codes", () => JpegImage(EditJpeg(0xC4, 5, 0xFF)), "corrupt JPEG image" },
        { "JPEG over the pixel cap", () => JpegImage(EditJpeg(0xC0, 5, 0x03, 0x20, 0x03, 0x20)), "800x800 = 640000 pixels" },
        { "JPEG SOI only", () => JpegImage([0xFF, 0xD8, 0xFF]), "JPEG image" },
        { "JPEG declared 64x64 in the message but 64x48 in SOF", () => TestServer.WithImage(new Image { Encoding = ImageEncoding.Jpeg, Width = 64, Height = 64, Data = ByteString.CopyFrom(Jpeg) }), "image says 64x64 but its JPEG header says 64x48" },

        // Raw frames, encodings, instructions, keys, proprio, image counts.
        { "raw with one byte too many", () => TestServer.WithImage(Raw(1, 1, 4)), "needs 3 bytes, got 4" },
        { "raw over the pixel cap", () => TestServer.WithImage(Raw(1000, 600, 12)), "1000x600 = 600000 pixels" },
        { "negative encoding number", () => TestServer.WithImage(new Image { Encoding = (ImageEncoding)(-1), Data = ByteString.CopyFrom(Jpeg) }), "unknown image encoding -1" },
        { "instruction of 1025 ASCII bytes", () => TestServer.WithImage(TestServer.EncodedImage(Jpeg, ImageEncoding.Jpeg), instruction: new string('a', 1025)), "instruction is longer than 1024 bytes" },
        { "instruction of 400 euro signs (1200 bytes)", () => TestServer.WithImage(TestServer.EncodedImage(Jpeg, ImageEncoding.Jpeg), instruction: new string('\u20AC', 400)), "instruction is longer than 1024 bytes" },
        { "instruction of tabs and newlines", () => TestServer.WithImage(TestServer.EncodedImage(Jpeg, ImageEncoding.Jpeg), instruction: "\t\n\r\n"), "instruction is empty" },
        { "unnorm_key with a newline and 200 characters", () => WithKey("evil\n" + new string('k', 200)), "unknown unnorm_key" },
        { "65 proprio values (limit 64)", () => WithProprio(new float[65]), "the server accepts at most 64" },
        { "negative infinity proprio", () => WithProprio(float.NegativeInfinity), "proprio[0] is" },
        { "three images for a one-camera model", () => ThreeImages(), "expected 1 image(s) per observation, got 3" },
    };

    static Observation PngImage(byte[] bytes) => TestServer.WithImage(TestServer.EncodedImage(bytes, ImageEncoding.Png));
    static Observation JpegImage(byte[] bytes) => TestServer.WithImage(TestServer.EncodedImage(bytes, ImageEncoding.Jpeg));

    static byte[] Ihdr(uint width, uint height, byte depth = 8, byte color = 2, byte interlace = 0)
    {
        var ihdr = new byte[13];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(ihdr, width);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(ihdr.AsSpan(4), height);
        ihdr[8] = depth; ihdr[9] = color; ihdr[12] = interlace;
        return ihdr;
    }

    static byte[] Scanlines(int width, int height) => new byte[height * (1 + 3 * width)];

    /// <summary>The first half of the zlib stream of 4x3 noisy RGB scanlines (filter 0): the data stops mid-image.</summary>
    static byte[] HalfOfNoisyZlib()
    {
        var raw = Scanlines(4, 3);
        new Random(8).NextBytes(raw);
        for (int row = 0; row < 3; row++) raw[row * 13] = 0;
        var z = Zlib(raw);
        return z[..(z.Length / 2)];
    }

    static byte[] Zlib(byte[] raw)
    {
        var stream = new MemoryStream();
        using (var z = new System.IO.Compression.ZLibStream(stream, System.IO.Compression.CompressionLevel.Optimal, leaveOpen: true)) z.Write(raw);
        return stream.ToArray();
    }

    /// <summary>A valid PNG with a zTXt chunk after IHDR whose length field says 4,294,967,280 bytes, and 12 KB behind it.</summary>
    static byte[] HugeChunkPng() => [.. Png[..33], 0xFF, 0xFF, 0xFF, 0xF0, (byte)'z', (byte)'T', (byte)'X', (byte)'t', .. new byte[12_000], .. Png[33..]];

    static int IndexOf(byte[] jpeg, byte marker)
    {
        for (int i = 0; i + 1 < jpeg.Length; i++)
            if (jpeg[i] == 0xFF && jpeg[i + 1] == marker) return i;
        throw new InvalidOperationException($"no marker FF{marker:X2}");
    }

    static int ScanData(byte[] jpeg)
    {
        int sos = IndexOf(jpeg, 0xDA);
        return sos + 2 + (jpeg[sos + 2] << 8 | jpeg[sos + 3]);
    }

    static byte[] HeadersOnlyJpeg() => [.. Jpeg[..ScanData(Jpeg)], 0xFF, 0xD9];

    static byte[] CutJpeg(bool closed)
    {
        int start = ScanData(Jpeg), cut = start + (Jpeg.Length - 2 - start) / 3;
        while (Jpeg[cut - 1] == 0xFF) cut--;
        return closed ? [.. Jpeg[..cut], 0xFF, 0xD9] : Jpeg[..cut];
    }

    /// <summary>The JPEG with bytes overwritten at <paramref name="offset"/> from the first <paramref name="marker"/>'s FF.</summary>
    static byte[] EditJpeg(byte marker, int offset, params byte[] values)
    {
        var copy = (byte[])Jpeg.Clone();
        values.CopyTo(copy, IndexOf(copy, marker) + offset);
        return copy;
    }

    static Observation ThreeImages()
    {
        var observation = TestServer.Raw(TestServer.Frame(5));
        observation.Images.Add(observation.Images[0]);
        observation.Images.Add(observation.Images[0]);
        return observation;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task Predict_refuses_with_INVALID_ARGUMENT_and_one_line(string what, Func<Observation> observation, string reason)
    {
        var error = await Assert.ThrowsAsync<RpcException>(() => client.PredictAsync(observation()));

        Assert.True(error.StatusCode == StatusCode.InvalidArgument, $"{what}: {error.StatusCode} {error.Status.Detail}");
        Assert.Contains(reason, error.Status.Detail);
        Assert.DoesNotContain('\n', error.Status.Detail);
        Assert.DoesNotContain("   at ", error.Status.Detail);
        Assert.Equal(7, (await client.PredictAsync(TestServer.Raw(TestServer.Frame(5)))).Action.Values.Count); // still serving
    }

    [Fact]
    public async Task An_oversize_message_is_refused_with_RESOURCE_EXHAUSTED_and_the_server_keeps_serving()
    {
        var big = TestServer.WithImage(Raw(1000, 1000, 1000 * 1000 * 3)); // 3 MB against a 1 MiB limit

        var error = await Assert.ThrowsAsync<RpcException>(() => client.PredictAsync(big));

        Assert.Equal(StatusCode.ResourceExhausted, error.StatusCode);
        Assert.Equal(7, (await client.PredictAsync(TestServer.Raw(TestServer.Frame(5)))).Action.Values.Count);
    }

    [Fact]
    public async Task A_bad_frame_in_a_stream_gets_an_error_reply_and_the_stream_goes_on()
    {
        using var call = client.Raw.StreamActions(deadline: DateTime.UtcNow.AddSeconds(10));
        var bad = TestServer.WithImage(TestServer.EncodedImage(Jpeg[..100], ImageEncoding.Jpeg));
        bad.Seq = 1;
        var good = TestServer.Raw(TestServer.Frame(7));
        good.Seq = 2;

        await call.RequestStream.WriteAsync(new StreamActionsRequest { Observation = bad });
        Assert.True(await call.ResponseStream.MoveNext());
        var error = call.ResponseStream.Current;
        await call.RequestStream.WriteAsync(new StreamActionsRequest { Observation = good });
        Assert.True(await call.ResponseStream.MoveNext());
        var action = call.ResponseStream.Current;
        await call.RequestStream.CompleteAsync();

        Assert.Equal(1ul, error.Seq);
        Assert.Equal((int)StatusCode.InvalidArgument, error.Error.Code);
        Assert.Contains("truncated", error.Error.Message);
        Assert.Equal(2ul, action.Seq);
        Assert.Equal(7, action.Action.Values.Count);
    }

    static byte[] RandomBytes(int n)
    {
        var bytes = new byte[n];
        new Random(4).NextBytes(bytes);
        return bytes;
    }

    /// <summary>Flips bytes in the middle of the compressed data; the CRC no longer matches.</summary>
    static byte[] CorruptMiddle(byte[] png)
    {
        var copy = (byte[])png.Clone();
        for (int i = png.Length / 2; i < png.Length / 2 + 8; i++) copy[i] ^= 0x5A;
        return copy;
    }

    /// <summary>SOI, a baseline frame header for 60000x60000 with 3 components, EOI: decoding it would allocate 10 GB.</summary>
    static byte[] HugeJpegHeader() =>
        [0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0xEA, 0x60, 0xEA, 0x60, 0x03, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xD9];

    static Image Raw(uint width, uint height, int bytes) =>
        new() { Encoding = ImageEncoding.RawRgb8, Width = width, Height = height, Data = ByteString.CopyFrom(new byte[bytes]) };

    static Observation WithKey(string key)
    {
        var observation = TestServer.Raw(TestServer.Frame(5));
        observation.UnnormKey = key;
        return observation;
    }

    static Observation WithProprio(params float[] values)
    {
        var observation = TestServer.Raw(TestServer.Frame(5));
        observation.Proprio.AddRange(values);
        return observation;
    }

    static Observation TwoImages()
    {
        var observation = TestServer.Raw(TestServer.Frame(5));
        observation.Images.Add(observation.Images[0]);
        return observation;
    }
}
