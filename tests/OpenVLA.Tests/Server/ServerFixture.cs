using Google.Protobuf;
using OpenCvSharp;
using OpenVLA.Contract.V1;
using OpenVLA.Policy;
using OpenVLA.RobotClients;
using OpenVLA.Server;

namespace OpenVLA.Tests.Server;

/// <summary>Starts a real server on free loopback ports with a test policy, and builds frames for requests.</summary>
internal static class TestServer
{
    public static ServeOptions Options(Func<ServeOptions, ServeOptions>? tweak = null)
    {
        var options = new ServeOptions { Checkpoint = "(test double)", Port = 0, MetricsPort = 0, ShutdownTimeout = TimeSpan.FromSeconds(5) };
        return tweak is null ? options : tweak(options);
    }

    public static async Task<PolicyServer> StartAsync(IActionPolicy policy, Func<ServeOptions, ServeOptions>? tweak = null, bool waitReady = true)
    {
        var server = await PolicyServer.StartAsync(Options(tweak), (_, _) => policy, logging => { });
        if (waitReady) await server.Ready.WaitAsync(TimeSpan.FromSeconds(10));
        return server;
    }

    public static PolicyClient Client(PolicyServer server, Func<PolicyClientOptions, PolicyClientOptions>? tweak = null)
    {
        var options = new PolicyClientOptions { Address = server.GrpcAddress, DefaultDeadline = TimeSpan.FromSeconds(10), MaxAttempts = 2 };
        return new PolicyClient(tweak is null ? options : tweak(options));
    }

    /// <summary>A raw RGB frame whose every pixel is (red, 40, 200).</summary>
    public static RgbImage Frame(byte red, int width = 32, int height = 24)
    {
        var pixels = new byte[width * height * 3];
        for (int p = 0; p < pixels.Length; p += 3) { pixels[p] = red; pixels[p + 1] = 40; pixels[p + 2] = 200; }
        return new RgbImage(width, height, pixels);
    }

    public static Observation Raw(RgbImage frame, string instruction = "pick up the red block", string unnormKey = "bridge_orig") =>
        Observations.FromRawRgb(frame.Width, frame.Height, frame.Pixels, instruction, unnormKey);

    /// <summary>The frame encoded as JPEG (".jpg") or PNG (".png") bytes.</summary>
    public static byte[] Encode(RgbImage frame, string extension)
    {
        using var rgb = new Mat(frame.Height, frame.Width, MatType.CV_8UC3);
        System.Runtime.InteropServices.Marshal.Copy(frame.Pixels, 0, rgb.Data, frame.Pixels.Length);
        using var bgr = new Mat();
        Cv2.CvtColor(rgb, bgr, ColorConversionCodes.RGB2BGR);
        Cv2.ImEncode(extension, bgr, out var bytes);
        return bytes;
    }

    public static Observation WithImage(Image image, string instruction = "pick up the red block")
    {
        var observation = new Observation { Instruction = instruction, UnnormKey = "bridge_orig" };
        observation.Images.Add(image);
        return observation;
    }

    public static Image EncodedImage(byte[] bytes, ImageEncoding encoding) => new() { Encoding = encoding, Data = ByteString.CopyFrom(bytes) };
}
