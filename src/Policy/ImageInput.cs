using OpenVLA.Policy.Checkpoint;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy;

/// <summary>Turns frames into the model's pixel_values [B, 6, H, W] per the checkpoint's preprocessor config.</summary>
internal sealed class ImageInput(VlaCheckpoint checkpoint, PolicyOptions options, Device device)
{
    // TRANSITIONAL: only to_tensor + normalize for frames already at the model size; the full PIL-compatible pipeline
    // (resize, letterbox, center crop) replaces this when the preprocessing work lands.
    static readonly double[][] Means = [[0.484375, 0.455078125, 0.40625], [0.5, 0.5, 0.5]];
    static readonly double[][] Stds = [[0.228515625, 0.2236328125, 0.224609375], [0.5, 0.5, 0.5]];

    public Tensor PixelValues(IReadOnlyList<RgbImage> images)
    {
        int size = checkpoint.Config.ImageSize;
        var data = new float[images.Count * 6 * size * size];
        for (int b = 0; b < images.Count; b++)
        {
            var img = images[b];
            if (img.Width != size || img.Height != size)
                throw new PolicyInputException($"image must be {size}x{size} for now, got {img.Width}x{img.Height}");
            for (int t = 0; t < 2; t++)
                for (int c = 0; c < 3; c++)
                    for (int i = 0; i < size * size; i++)
                        data[(((b * 6) + t * 3 + c) * size * size) + i] = (float)((img.Pixels[i * 3 + c] / 255.0 - Means[t][c]) / Stds[t][c]);
        }
        _ = options;
        return tensor(data, [images.Count, 6, size, size]).to(options.ScalarType, device);
    }
}
