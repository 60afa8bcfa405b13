using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Preprocessing;

/// <summary>
/// RGB8 frames → OpenVLA <c>pixel_values</c>: per tower [letterbox] → resize (PIL antialiased) → center crop → /255 → normalize,
/// towers stacked on channels (DINOv2 first, then SigLIP), as PrismaticImageProcessor does (reference §2.4).
/// </summary>
public sealed class ImagePreprocessor(PreprocessorConfig config)
{
    /// <summary>Area kept by the evaluation-time center crop of augmented checkpoints (LIBERO / robot scripts, reference §6).</summary>
    public const float AugmentationCropArea = 0.9f;

    public PreprocessorConfig Config { get; } = config;

    /// <summary>The preprocessing a checkpoint states (preprocessor_config.json, else the reference's default for its image
    /// size); its output size must be config.json's image size.</summary>
    public static ImagePreprocessor ForCheckpoint(Checkpoint.VlaCheckpoint checkpoint)
    {
        var preprocessor = new ImagePreprocessor(File.Exists(checkpoint.PreprocessorConfigPath)
            ? PreprocessorConfig.Load(checkpoint.PreprocessorConfigPath)
            : PreprocessorConfig.CreateDefault(checkpoint.Config.ImageSize));
        var (h, w) = preprocessor.Config.OutputSize;
        if (h != checkpoint.Config.ImageSize || w != checkpoint.Config.ImageSize)
            throw new CheckpointException($"{checkpoint.PreprocessorConfigPath}: output size {h}x{w} differs from config.json image_sizes {checkpoint.Config.ImageSize}");
        return preprocessor;
    }

    /// <summary>One image → float tensor [3·towers, H, W] (6 channels for the fused backbone) on <paramref name="device"/>.</summary>
    /// <param name="centerCrop">Apply the area-0.9 center crop used when evaluating checkpoints trained with image augmentation.</param>
    public Tensor Preprocess(RgbImage image, bool centerCrop = false, Device? device = null, ScalarType dtype = ScalarType.Float32)
    {
        var (h, w) = Config.OutputSize;
        return ToDevice(tensor(PixelValues(image, centerCrop), [Config.Channels, h, w]), device, dtype);
    }

    /// <summary>A batch of images (any sizes and aspect ratios) → float tensor [B, 3·towers, H, W].</summary>
    public Tensor PreprocessBatch(IReadOnlyList<RgbImage> images, bool centerCrop = false, Device? device = null, ScalarType dtype = ScalarType.Float32)
    {
        var (h, w) = Config.OutputSize;
        return ToDevice(tensor(PixelArray(images, centerCrop), [images.Count, Config.Channels, h, w]), device, dtype);
    }

    /// <summary>A batch of images → their pixel values in one plain array, [B, 3·towers, H, W] row-major (no tensor
    /// library needed: what any backend feeds its vision input).</summary>
    public float[] PixelArray(IReadOnlyList<RgbImage> images, bool centerCrop = false)
    {
        if (images.Count == 0) throw new PolicyInputException("a batch needs at least one image");
        var (h, w) = Config.OutputSize;
        int per = Config.Channels * h * w;
        var all = new float[(long)per * images.Count];
        Parallel.For(0, images.Count, i => PixelValues(images[i], centerCrop).CopyTo(all, (long)i * per));
        return all;
    }

    /// <summary>The normalized values in CHW order, computed in float32 exactly as torchvision does: (p / 255 − mean) / std.</summary>
    internal float[] PixelValues(RgbImage image, bool centerCrop)
    {
        if (centerCrop) image = CenterCropAugmentation(image);
        var (h, w) = Config.OutputSize;
        int plane = h * w;
        var values = new float[Config.Channels * plane];
        RgbImage? previous = null;
        for (int t = 0; t < Config.Towers.Count; t++)
        {
            TowerPreprocessing tower = Config.Towers[t];
            // The towers of OpenVLA share resize and crop; only normalization differs, so resample once.
            previous = previous is not null && SameGeometry(Config.Towers[t - 1], tower) ? previous : TowerImage(image, t);
            byte[] px = previous.Pixels;
            for (int c = 0; c < 3; c++)
            {
                float mean = tower.NormalizeMean[c], std = tower.NormalizeStd[c];
                int offset = (t * 3 + c) * plane;
                for (int i = 0; i < plane; i++) values[offset + i] = ((float)px[i * 3 + c] / 255f - mean) / std;
            }
        }
        return values;
    }

    /// <summary>The RGB8 image tower <paramref name="tower"/> sees, before <c>to_tensor</c>: [letterbox] → resize → center crop.</summary>
    internal RgbImage TowerImage(RgbImage image, int tower)
    {
        TowerPreprocessing t = Config.Towers[tower];
        if (Config.DoLetterbox) image = ImageGeometry.LetterboxPad(image, Config.LetterboxFill);
        var (width, height) = ResizedSize(image.Width, image.Height, t);
        image = PillowResampler.Resize(image, width, height, PreprocessorConfig.FilterOf(t.InterpolationCode)!.Value);
        return ImageGeometry.CenterCrop(image, t.CropWidth, t.CropHeight);
    }

    /// <summary>
    /// The augmentation crop as the reference applies it: the frame is first at the model's size (the LIBERO/robot scripts resize
    /// it before the policy sees it; here the first tower's own resize + crop does that), then the central sqrt(0.9) of each side
    /// is cropped and resized back with TensorFlow-style bilinear <c>crop_and_resize</c>. The towers' resizes that follow are then
    /// PIL's same-size no-op. (LIBERO resizes with TF lanczos3 rather than PIL bicubic; a client that sends frames already at the
    /// model size gets the reference result exactly.)
    /// </summary>
    internal RgbImage CenterCropAugmentation(RgbImage image)
    {
        RgbImage atModelSize = TowerImage(image, 0);
        return ImageGeometry.CenterCropAndResize(atModelSize, AugmentationCropArea, atModelSize.Width, atModelSize.Height);
    }

    private static bool SameGeometry(TowerPreprocessing a, TowerPreprocessing b) =>
        a.ResizeSize == b.ResizeSize && a.ResizeShorterSide == b.ResizeShorterSide && a.InterpolationCode == b.InterpolationCode
        && a.CropHeight == b.CropHeight && a.CropWidth == b.CropWidth;

    /// <summary>torchvision <c>resize</c> output size: exact (h, w), or the shorter side set and the longer one int(size · long / short).</summary>
    internal static (int Width, int Height) ResizedSize(int width, int height, TowerPreprocessing tower)
    {
        if (tower.ResizeSize is { } hw) return (hw.Width, hw.Height);
        int side = tower.ResizeShorterSide!.Value;
        if (width <= height) return (side, (int)((long)side * height / width));
        return ((int)((long)side * width / height), side);
    }

    private static Tensor ToDevice(Tensor t, Device? device, ScalarType dtype)
    {
        if (device is null && dtype == ScalarType.Float32) return t;
        using (t) return t.to(dtype, device ?? CPU);
    }
}
