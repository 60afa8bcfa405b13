using Google.Protobuf;
using OpenVLA.Contract.V1;

namespace OpenVLA.RobotClients;

/// <summary>Builds <see cref="Observation"/> messages from the frames a robot has.</summary>
public static class Observations
{
    /// <summary>An observation with one encoded camera frame (JPEG or PNG bytes, as read from a file or a camera).</summary>
    public static Observation FromEncoded(byte[] imageBytes, string instruction, ImageEncoding encoding = ImageEncoding.Jpeg,
        string? unnormKey = null, string camera = "primary") =>
        Create(new Image { Camera = camera, Encoding = encoding, Data = ByteString.CopyFrom(imageBytes) }, instruction, unnormKey);

    /// <summary>An observation with one raw RGB8 frame (rows top to bottom, R,G,B interleaved).</summary>
    public static Observation FromRawRgb(int width, int height, byte[] rgb, string instruction, string? unnormKey = null,
        string camera = "primary")
    {
        if ((long)width * height * 3 != rgb.LongLength)
            throw new ArgumentException($"raw RGB8 {width}x{height} needs {(long)width * height * 3} bytes, got {rgb.LongLength}", nameof(rgb));
        return Create(new Image
        {
            Camera = camera, Encoding = ImageEncoding.RawRgb8, Width = (uint)width, Height = (uint)height,
            Data = ByteString.CopyFrom(rgb),
        }, instruction, unnormKey);
    }

    /// <summary>An observation with one encoded frame per camera, in the model's camera order (PolicyInfo.camera_names),
    /// and the robot's proprioceptive state for models that take it (PolicyInfo.proprio_dim).</summary>
    public static Observation FromEncoded(IReadOnlyList<(byte[] Bytes, ImageEncoding Encoding, string Camera)> frames, string instruction,
        string? unnormKey = null, IEnumerable<float>? proprio = null)
    {
        var observation = new Observation { Instruction = instruction, UnnormKey = unnormKey ?? "" };
        foreach (var (bytes, encoding, camera) in frames)
            observation.Images.Add(new Image { Camera = camera, Encoding = encoding, Data = ByteString.CopyFrom(bytes) });
        if (proprio is not null) observation.Proprio.AddRange(proprio);
        return observation;
    }

    /// <summary>The chunk of a reply: every step's un-normalized values, or the single action of a server that predates
    /// chunks.</summary>
    public static float[][] Chunk(Contract.V1.Action action) =>
        action.Chunk.Count > 0 ? [.. action.Chunk.Select(s => s.Values.ToArray())] : [[.. action.Values]];

    /// <summary>JPEG or PNG, told by the file's first bytes; null when it is neither.</summary>
    public static ImageEncoding? SniffEncoding(ReadOnlySpan<byte> bytes)
    {
        if (bytes.Length >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) return ImageEncoding.Jpeg;
        if (bytes.StartsWith(PngSignature)) return ImageEncoding.Png;
        return null;
    }

    static ReadOnlySpan<byte> PngSignature => [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A];

    static Observation Create(Image image, string instruction, string? unnormKey)
    {
        var observation = new Observation { Instruction = instruction, UnnormKey = unnormKey ?? "" };
        observation.Images.Add(image);
        return observation;
    }
}
