using OpenVLA.Contract.V1;
using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;

namespace OpenVLA.Server;

/// <summary>
/// Turns the image of a request into an <see cref="RgbImage"/>, or says in one line why it cannot. Only what the contract
/// adds lives here (the declared encoding and size must agree with the bytes); the container checks, the limits and the
/// pixels are the policy core's one decoder, so a frame sent over the network gives exactly the pixels (and so the action)
/// that offline `openvla predict` gives for the same file, and is refused for exactly the same reasons.
/// </summary>
internal static class FrameDecoder
{
    public static RgbImage Decode(Image image, ImageLimits limits)
    {
        var data = image.Data.Span;
        switch (image.Encoding)
        {
            case ImageEncoding.RawRgb8:
            {
                limits.Check(image.Width, image.Height, "raw RGB8");   // on the unsigned sizes, before they become ints
                return ImageDecoder.FromRaw(data.ToArray(), (int)image.Width, (int)image.Height, limits);   // checks the byte count
            }
            case ImageEncoding.Jpeg:
            case ImageEncoding.Png:
            {
                string name = image.Encoding == ImageEncoding.Jpeg ? "JPEG" : "PNG";
                if (data.IsEmpty) throw Invalid($"{name} image has no bytes");
                var sniffed = ImageContainer.Sniff(data);
                if (sniffed is null) throw Invalid($"the image is declared {name} but its bytes are neither JPEG nor PNG");
                if ((sniffed == ImageFormat.Jpeg) != (image.Encoding == ImageEncoding.Jpeg))
                    throw Invalid($"the image is declared {name} but its bytes are {(sniffed == ImageFormat.Jpeg ? "JPEG" : "PNG")}");
                var decoded = ImageDecoder.Decode(data, limits);
                if ((image.Width != 0 && image.Width != decoded.Width) || (image.Height != 0 && image.Height != decoded.Height))
                    throw Invalid($"image says {image.Width}x{image.Height} but its {name} header says {decoded.Width}x{decoded.Height}");
                return decoded;
            }
            case ImageEncoding.Unspecified:
                throw Invalid("image encoding is not set (RAW_RGB8, JPEG or PNG)");
            default:
                throw Invalid($"unknown image encoding {(int)image.Encoding} (accepted: RAW_RGB8, JPEG, PNG)");
        }
    }

    static PolicyInputException Invalid(string message) => new(message);
}
