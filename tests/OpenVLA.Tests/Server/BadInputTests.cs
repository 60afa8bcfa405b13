using Google.Protobuf;
using Grpc.Core;
using OpenVLA.Contract.V1;
using OpenVLA.RobotClients;

namespace OpenVLA.Tests.Server;

/// <summary>Every malformed observation gets INVALID_ARGUMENT (or the fitting code) with one line, and the server keeps serving.</summary>
public sealed class BadInputTests : IAsyncLifetime
{
    OpenVLA.Server.PolicyServer server = null!;
    PolicyClient client = null!;

    public async Task InitializeAsync()
    {
        server = await TestServer.StartAsync(new DeterministicPolicy(), o => o with { MaxImageSide = 1024, MaxMessageBytes = 1 << 20 });
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
    };

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
