using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;
using OpenVLA.Contract.V1;

namespace OpenVLA.Tests.Server;

/// <summary>
/// Bodies that are not valid messages, sent as raw bytes under the service's method names: they are answered with
/// INVALID_ARGUMENT (unary) or a FrameError (stream, which goes on), never UNKNOWN or CANCELLED, and no computed reply
/// is lost.
/// </summary>
public sealed class WireProtocolTests : IAsyncLifetime
{
    OpenVLA.Server.PolicyServer server = null!;
    GrpcChannel channel = null!;

    static readonly Marshaller<byte[]> Bytes = Marshallers.Create(b => b, b => b);
    static readonly Method<byte[], byte[]> Predict = new(MethodType.Unary, "openvla.v1.PolicyService", "Predict", Bytes, Bytes);
    static readonly Method<byte[], byte[]> Stream = new(MethodType.DuplexStreaming, "openvla.v1.PolicyService", "StreamActions", Bytes, Bytes);

    public async Task InitializeAsync()
    {
        server = await TestServer.StartAsync(new DeterministicPolicy(), o => o with { MaxMessageBytes = 1 << 20 });
        channel = GrpcChannel.ForAddress(server.GrpcAddress, new GrpcChannelOptions { MaxSendMessageSize = null });
    }

    public async Task DisposeAsync()
    {
        channel.Dispose();
        await server.DisposeAsync();
    }

    static byte[] Good(ulong seq = 0)
    {
        var observation = TestServer.Raw(TestServer.Frame(9));
        observation.Seq = seq;
        return new PredictRequest { Observation = observation }.ToByteArray();
    }

    /// <summary>The request with its instruction's bytes replaced by a sequence that is not UTF-8 (same length, so the framing holds).</summary>
    static byte[] NotUtf8()
    {
        var observation = TestServer.Raw(TestServer.Frame(9), instruction: "QQ-marker");
        var bytes = new PredictRequest { Observation = observation }.ToByteArray();
        int at = bytes.AsSpan().IndexOf("QQ-marker"u8);
        bytes[at] = 0xC3; bytes[at + 1] = 0x28;   // a lead byte followed by a non-continuation byte
        return bytes;
    }

    public static TheoryData<string, byte[], string> Malformed() => new()
    {
        { "garbage", [0xFF, 0xFF, 0xFF, 0xFF, 0x0F, 0x12, 0x34], "not a valid openvla.v1.PredictRequest message" },
        { "truncated message", Good()[..(Good().Length / 2)], "not a valid openvla.v1.PredictRequest message" },
        { "instruction not UTF-8", NotUtf8(), "not a valid openvla.v1.PredictRequest message" },
        { "observation sent as a number (skipped as unknown)", [0x08, 0x96, 0x01], "observation is missing" },
    };

    [Theory]
    [MemberData(nameof(Malformed))]
    public async Task A_malformed_unary_body_is_INVALID_ARGUMENT_with_one_line(string what, byte[] body, string reason)
    {
        var error = await Assert.ThrowsAsync<RpcException>(() => channel.CreateCallInvoker()
            .AsyncUnaryCall(Predict, null, new CallOptions(deadline: DateTime.UtcNow.AddSeconds(10)), body).ResponseAsync);

        Assert.True(error.StatusCode == StatusCode.InvalidArgument, $"{what}: {error.StatusCode} {error.Status.Detail}");
        Assert.Contains(reason, error.Status.Detail);
        Assert.DoesNotContain('\n', error.Status.Detail);
        var ok = PredictResponse.Parser.ParseFrom(await channel.CreateCallInvoker().AsyncUnaryCall(Predict, null, new CallOptions(), Good()).ResponseAsync);
        Assert.Equal(7, ok.Action.Values.Count);
    }

    [Fact]
    public async Task In_a_stream_a_malformed_or_oversized_frame_gets_a_FrameError_and_every_good_frame_its_action()
    {
        using var call = channel.CreateCallInvoker().AsyncDuplexStreamingCall(Stream, null, new CallOptions(deadline: DateTime.UtcNow.AddSeconds(20)));
        StreamActionsRequest Frame(ulong seq) => new() { Observation = PredictRequest.Parser.ParseFrom(Good(seq)).Observation };
        var oversized = Frame(4);
        oversized.Observation.Images[0] = new Image { Encoding = ImageEncoding.RawRgb8, Width = 700, Height = 700, Data = ByteString.CopyFrom(new byte[700 * 700 * 3]) };  // 1.47 MB > 1 MiB
        byte[][] sent = [Frame(1).ToByteArray(), [0xFF, 0x00, 0x13], Frame(3).ToByteArray(), oversized.ToByteArray(), NotUtf8StreamFrame(), Frame(6).ToByteArray()];

        var replies = new List<StreamActionsResponse>();
        foreach (var frame in sent)
        {
            await call.RequestStream.WriteAsync(frame);
            Assert.True(await call.ResponseStream.MoveNext(), $"the stream ended after {replies.Count} replies");
            replies.Add(StreamActionsResponse.Parser.ParseFrom(call.ResponseStream.Current));
        }
        await call.RequestStream.CompleteAsync();
        Assert.False(await call.ResponseStream.MoveNext());

        Assert.Equal(StatusCode.OK, call.GetStatus().StatusCode);
        Assert.Equal([1ul, 3ul, 6ul], replies.Where(r => r.Action is not null).Select(r => r.Seq));
        var errors = replies.Where(r => r.Error is not null).Select(r => (r.Error.Code, r.Error.Message)).ToList();
        Assert.Equal(3, errors.Count);
        Assert.Equal((int)StatusCode.InvalidArgument, errors[0].Code);
        Assert.Contains("not a valid openvla.v1.StreamActionsRequest message", errors[0].Message);
        Assert.Equal((int)StatusCode.ResourceExhausted, errors[1].Code);
        Assert.Matches(@"^the message is \d+ bytes; the server accepts at most 1048576 \(--max-message-bytes\)$", errors[1].Message);
        Assert.Equal((int)StatusCode.InvalidArgument, errors[2].Code);
    }

    static byte[] NotUtf8StreamFrame()
    {
        // StreamActionsRequest and PredictRequest both carry the observation as field 1, so the bytes are the same message.
        return NotUtf8();
    }
}
