using System.Runtime.CompilerServices;
using Google.Protobuf;
using Grpc.Core;
using OpenVLA.Contract.V1;

namespace OpenVLA.Server;

/// <summary>
/// The request side of the wire, parsed so that a malformed message is answered instead of swallowed. gRPC's generated
/// marshallers throw from inside the transport when a body is not a valid message (garbage, truncation, a string that
/// is not UTF-8): a unary call then ends as UNKNOWN and a stream as CANCELLED, losing the replies behind it. Here a body
/// that does not parse becomes an empty message marked with what was wrong, and each message is marked with its size,
/// so the handler answers INVALID_ARGUMENT (unary) or a <see cref="FrameError"/> (stream, which goes on), and an
/// oversized frame a RESOURCE_EXHAUSTED <see cref="FrameError"/>. The service binds its methods with these marshallers
/// (<see cref="Bind"/>); responses are serialized as the generated code does.
/// </summary>
internal static class WireMessages
{
    /// <summary>What the transport saw of a request: its size in bytes, and why it did not parse (null when it did).</summary>
    public readonly record struct Wire(long Bytes, string? Problem);

    static readonly ConditionalWeakTable<IMessage, StrongBox<Wire>> Seen = new();

    public static Wire Of(IMessage message) => Seen.TryGetValue(message, out var box) ? box.Value : new Wire(0, null);

    /// <summary>
    /// How much the transport reads before refusing a message outright, for a server whose own limit is
    /// <paramref name="maxMessageBytes"/>: frames up to twice the limit are read and refused one by one (the stream goes
    /// on); beyond that the transport ends the call with RESOURCE_EXHAUSTED without reading the body.
    /// </summary>
    public static int TransportLimit(int maxMessageBytes) => (int)Math.Min(int.MaxValue, 2L * maxMessageBytes);

    public static Marshaller<T> Request<T>(MessageParser<T> parser) where T : class, IMessage<T>, new() =>
        Marshallers.Create<T>(Serialize, context =>
        {
            long bytes = context.PayloadLength;
            T message;
            string? problem = null;
            try
            {
                message = parser.ParseFrom(context.PayloadAsReadOnlySequence());
            }
            catch (Exception e) when (e is InvalidProtocolBufferException or System.Text.DecoderFallbackException or ArgumentException or InvalidOperationException)
            {
                message = new T();
                problem = $"the request is not a valid {message.Descriptor.FullName} message ({OneLine(e.Message)})";
            }
            Seen.AddOrUpdate(message, new StrongBox<Wire>(new Wire(bytes, problem)));
            return message;
        });

    public static Marshaller<T> Response<T>(MessageParser<T> parser) where T : class, IMessage<T> =>
        Marshallers.Create<T>(Serialize, context => parser.ParseFrom(context.PayloadAsReadOnlySequence()));

    static void Serialize<T>(T message, SerializationContext context) where T : IMessage
    {
        context.SetPayloadLength(message.CalculateSize());
        message.WriteTo(context.GetBufferWriter());
        context.Complete();
    }

    static string OneLine(string text)
    {
        text = text.ReplaceLineEndings(" ");
        return text.Length > 160 ? text[..160] + "..." : text;
    }

    const string Service = "openvla.v1.PolicyService";

    /// <summary>
    /// Binds the service's methods with the marshallers above (found by Grpc.AspNetCore through the
    /// <see cref="BindServiceMethodAttribute"/> on <see cref="PolicyGrpcService"/>, which takes precedence over the
    /// generated base class's). The handlers are the service's own overrides, matched by name.
    /// </summary>
    public static void Bind(ServiceBinderBase binder, PolicyService.PolicyServiceBase? service)
    {
        binder.AddMethod(new Method<GetPolicyInfoRequest, PolicyInfo>(MethodType.Unary, Service, "GetPolicyInfo",
            Request(GetPolicyInfoRequest.Parser), Response(PolicyInfo.Parser)), service is null ? null : new UnaryServerMethod<GetPolicyInfoRequest, PolicyInfo>(service.GetPolicyInfo));
        binder.AddMethod(new Method<PredictRequest, PredictResponse>(MethodType.Unary, Service, "Predict",
            Request(PredictRequest.Parser), Response(PredictResponse.Parser)), service is null ? null : new UnaryServerMethod<PredictRequest, PredictResponse>(service.Predict));
        binder.AddMethod(new Method<StreamActionsRequest, StreamActionsResponse>(MethodType.DuplexStreaming, Service, "StreamActions",
            Request(StreamActionsRequest.Parser), Response(StreamActionsResponse.Parser)),
            service is null ? null : new DuplexStreamingServerMethod<StreamActionsRequest, StreamActionsResponse>(service.StreamActions));
    }
}
