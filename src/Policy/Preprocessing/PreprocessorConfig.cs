using System.Text.Json;
using System.Text.Json.Nodes;

namespace OpenVLA.Policy.Preprocessing;

/// <summary>
/// What one vision tower expects: the torchvision-functional parameters PrismaticImageProcessor applies (reference §2.4).
/// </summary>
/// <param name="ResizeSize">
/// <c>tvf_resize_params.size</c>: (height, width) for an exact resize ("resize-naive"), or null when <see cref="ResizeShorterSide"/>
/// is used instead (torchvision's int size: the shorter side becomes that length, aspect ratio kept; "letterbox", "resize-crop").
/// </param>
/// <param name="InterpolationCode">torchvision <c>InterpolationMode</c> as PIL code: 3 bicubic, 2 bilinear, 1 lanczos, 4 box, 5 hamming.</param>
/// <param name="NormalizeMean">The mean actually applied (<c>tvf_normalize_params</c>; bf16-rounded for DINOv2 in openvla-7b).</param>
public sealed record TowerPreprocessing(
    int[] InputSize,
    string Interpolation,
    double[] Mean,
    double[] Std,
    (int Height, int Width)? ResizeSize,
    int? ResizeShorterSide,
    int InterpolationCode,
    int CropHeight,
    int CropWidth,
    float[] NormalizeMean,
    float[] NormalizeStd);

/// <summary>
/// A checkpoint's <c>preprocessor_config.json</c> (PrismaticImageProcessor): resize strategy and the per-tower transforms.
/// JSON keys and layout follow the Hugging Face files so that they load in the reference code unchanged.
/// </summary>
public sealed record PreprocessorConfig(
    string ImageResizeStrategy,
    bool UseFusedVisionBackbone,
    IReadOnlyList<TowerPreprocessing> Towers,
    bool DoLetterbox,
    byte[] LetterboxFill)
{
    public const string FileName = "preprocessor_config.json";

    private static readonly string[] Strategies = ["resize-naive", "letterbox", "resize-crop"];
    private static readonly double[] DinoV2Mean = [0.485, 0.456, 0.406], DinoV2Std = [0.229, 0.224, 0.225];
    private static readonly double[] SigLipMean = [0.5, 0.5, 0.5], SigLipStd = [0.5, 0.5, 0.5];

    /// <summary>Height and width of the image tensor every tower produces (the center-crop size).</summary>
    public (int Height, int Width) OutputSize => (Towers[0].CropHeight, Towers[0].CropWidth);

    /// <summary>Channels of the stacked pixel tensor: 3 per tower (6 for the fused DINOv2 + SigLIP backbone).</summary>
    public int Channels => 3 * Towers.Count;

    public static PreprocessorConfig Load(string path)
    {
        string json;
        try { json = File.ReadAllText(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointException($"cannot read {path}: {e.Message}", e);
        }
        return Parse(json, path);
    }

    /// <summary>
    /// Parses the JSON as PrismaticImageProcessor would construct itself from it: the constructor derives the tvf_* parameters
    /// from <c>input_sizes</c>/<c>means</c>/<c>stds</c>/<c>image_resize_strategy</c>, then the saved <c>tvf_*</c> keys override them
    /// (which is how the bf16-rounded DINOv2 mean/std of openvla-7b take effect).
    /// </summary>
    public static PreprocessorConfig Parse(string json, string source = FileName)
    {
        JsonObject root;
        try
        {
            root = JsonNode.Parse(json) as JsonObject ?? throw new CheckpointException($"{source}: expected a JSON object");
        }
        catch (JsonException e)
        {
            throw new CheckpointException($"{source}: invalid JSON ({e.Message})", e);
        }
        var reader = new FieldReader(source);

        string strategy = root["image_resize_strategy"] is JsonNode s ? reader.String(s, "image_resize_strategy") : "letterbox";
        if (!Strategies.Contains(strategy))
            throw new CheckpointException($"{source}: image_resize_strategy must be one of {string.Join(", ", Strategies)}, got \"{strategy}\"");
        bool fused = root["use_fused_vision_backbone"] is JsonNode f && reader.Bool(f, "use_fused_vision_backbone");

        var inputSizes = root["input_sizes"] is JsonNode inNode ? reader.List(inNode, "input_sizes", (n, p) => reader.Ints(n, p, 3)) : [[3, 224, 224]];
        int towers = inputSizes.Count;
        if (towers == 0) throw new CheckpointException($"{source}: input_sizes is empty");
        if (fused != (towers == 2))
            throw new CheckpointException($"{source}: use_fused_vision_backbone={(fused ? "true" : "false")} needs {(fused ? 2 : 1)} entries in input_sizes, got {towers}");
        var interpolations = root["interpolations"] is JsonNode ipNode
            ? reader.List(ipNode, "interpolations", (n, p) => reader.String(n, p))
            : Enumerable.Repeat("bicubic", towers).ToList();
        var means = root["means"] is JsonNode mNode ? reader.List(mNode, "means", (n, p) => reader.Doubles(n, p, 3)) : Enumerable.Repeat(SigLipMean, towers).ToList();
        var stds = root["stds"] is JsonNode sNode ? reader.List(sNode, "stds", (n, p) => reader.Doubles(n, p, 3)) : Enumerable.Repeat(SigLipStd, towers).ToList();
        reader.SameCount("interpolations", interpolations.Count, towers);
        reader.SameCount("means", means.Count, towers);
        reader.SameCount("stds", stds.Count, towers);

        JsonArray? resizeParams = reader.OptionalArray(root, "tvf_resize_params", towers);
        JsonArray? cropParams = reader.OptionalArray(root, "tvf_crop_params", towers);
        JsonArray? normalizeParams = reader.OptionalArray(root, "tvf_normalize_params", towers);

        var result = new List<TowerPreprocessing>();
        for (int i = 0; i < towers; i++)
        {
            int[] size = inputSizes[i];
            if (size[0] != 3 || size[1] <= 0 || size[2] <= 0)
                throw new CheckpointException($"{source}: input_sizes[{i}] must be [3, height, width] with positive sizes, got [{string.Join(", ", size)}]");
            int code = InterpolationCodeOf(interpolations[i], source, $"interpolations[{i}]");

            // What the constructor derives (timm's eval transform with crop_pct 1.0: Resize(input_size[-1]) + CenterCrop).
            (int, int)? resizeSize = strategy == "resize-naive" ? (size[2], size[2]) : null;
            int? shorterSide = strategy == "resize-naive" ? null : size[2];
            int cropH = size[1], cropW = size[2];
            float[] normMean = means[i].Select(v => (float)v).ToArray(), normStd = stds[i].Select(v => (float)v).ToArray();

            if (resizeParams?[i] is JsonObject rp)
            {
                string p = $"tvf_resize_params[{i}]";
                if (rp["size"] is JsonArray hw)
                {
                    int[] v = reader.Ints(hw, p + ".size", 2);
                    (resizeSize, shorterSide) = ((v[0], v[1]), null);
                }
                else if (rp["size"] is JsonNode one) (resizeSize, shorterSide) = (null, reader.Int(one, p + ".size"));
                if (rp["interpolation"] is JsonNode ip) code = reader.Int(ip, p + ".interpolation");
                if (rp["max_size"] is JsonNode ms && ms.GetValueKind() != JsonValueKind.Null)
                    throw new CheckpointException($"{source}: {p}.max_size is not supported (expected null)");
                if (rp["antialias"] is JsonNode aa && !reader.Bool(aa, p + ".antialias"))
                    throw new CheckpointException($"{source}: {p}.antialias=false is not supported (PIL images are always antialiased)");
            }
            if (cropParams?[i] is JsonObject cp && cp["output_size"] is JsonNode os)
            {
                string p = $"tvf_crop_params[{i}].output_size";
                if (os is JsonArray)
                {
                    int[] hw = reader.Ints(os, p, 2);
                    (cropH, cropW) = (hw[0], hw[1]);
                }
                else cropH = cropW = reader.Int(os, p); // torchvision: an int crops a square
            }
            if (normalizeParams?[i] is JsonObject np)
            {
                if (np["mean"] is JsonNode mn) normMean = reader.Doubles(mn, $"tvf_normalize_params[{i}].mean", 3).Select(v => (float)v).ToArray();
                if (np["std"] is JsonNode sd) normStd = reader.Doubles(sd, $"tvf_normalize_params[{i}].std", 3).Select(v => (float)v).ToArray();
            }
            if (FilterOf(code) is null)
                throw new CheckpointException($"{source}: interpolation code {code} of tower {i} is not supported (use 1 lanczos, 2 bilinear, 3 bicubic, 4 box or 5 hamming)");
            if (normStd.Any(v => !(v > 0)))
                throw new CheckpointException($"{source}: normalization std of tower {i} must be positive, got [{string.Join(", ", normStd)}]");
            if (resizeSize is { } rs && (rs.Item1 <= 0 || rs.Item2 <= 0) || shorterSide is <= 0 || cropH <= 0 || cropW <= 0)
                throw new CheckpointException($"{source}: resize and crop sizes of tower {i} must be positive");
            result.Add(new TowerPreprocessing(size, interpolations[i], means[i], stds[i], resizeSize, shorterSide, code, cropH, cropW, normMean, normStd));
        }
        if (result.Any(t => t.CropHeight != result[0].CropHeight || t.CropWidth != result[0].CropWidth))
            throw new CheckpointException($"{source}: all towers must produce the same image size to be stacked on channels");

        // The reference constructor sets the letterbox flag and fill inside its per-tower loop, so the last tower's means win.
        bool letterbox = root["tvf_do_letterbox"] is JsonNode dl ? reader.Bool(dl, "tvf_do_letterbox") : strategy == "letterbox";
        byte[] fill = root["tvf_letterbox_fill"] is JsonArray lf
            ? reader.Ints(lf, "tvf_letterbox_fill", 3).Select(v => (byte)Math.Clamp(v, 0, 255)).ToArray()
            : means[^1].Select(m => (byte)Math.Clamp((int)(m * 255), 0, 255)).ToArray();
        return new PreprocessorConfig(strategy, fused, result, letterbox, fill);
    }

    /// <summary>
    /// The configuration OpenVLA checkpoints carry, for a square image of the given side: "resize-naive", bicubic, and for the
    /// fused backbone a DINOv2 tower (ImageNet stats, rounded to bf16 in <c>tvf_normalize_params</c> as in openvla-7b) followed by
    /// a SigLIP tower (0.5 / 0.5). A non-fused configuration has the SigLIP tower only.
    /// </summary>
    public static PreprocessorConfig CreateDefault(int imageSize, bool fused = true)
    {
        if (imageSize <= 0) throw new ArgumentOutOfRangeException(nameof(imageSize), $"image size must be positive, got {imageSize}");
        TowerPreprocessing Tower(double[] mean, double[] std) => new(
            [3, imageSize, imageSize], "bicubic", mean, std, (imageSize, imageSize), null, 3, imageSize, imageSize,
            mean.Select(v => RoundToBFloat16((float)v)).ToArray(), std.Select(v => RoundToBFloat16((float)v)).ToArray());
        var towers = fused ? new[] { Tower(DinoV2Mean, DinoV2Std), Tower(SigLipMean, SigLipStd) } : [Tower(SigLipMean, SigLipStd)];
        return new PreprocessorConfig("resize-naive", fused, towers, false, [127, 127, 127]);
    }

    /// <summary>Serializes in the Hugging Face layout (same keys, order and 2-space indentation as saved openvla-7b checkpoints).</summary>
    public string ToJson()
    {
        var root = new JsonObject
        {
            ["image_processor_type"] = "PrismaticImageProcessor",
            ["image_resize_strategy"] = ImageResizeStrategy,
            ["input_sizes"] = new JsonArray(Towers.Select(t => (JsonNode)IntArray(t.InputSize)).ToArray()),
            ["interpolations"] = new JsonArray(Towers.Select(t => (JsonNode)JsonValue.Create(t.Interpolation)).ToArray()),
            ["means"] = new JsonArray(Towers.Select(t => (JsonNode)DoubleArray(t.Mean)).ToArray()),
            ["stds"] = new JsonArray(Towers.Select(t => (JsonNode)DoubleArray(t.Std)).ToArray()),
            ["tvf_crop_params"] = new JsonArray(Towers.Select(t => (JsonNode)new JsonObject
            {
                ["output_size"] = IntArray([t.CropHeight, t.CropWidth]),
            }).ToArray()),
            ["tvf_normalize_params"] = new JsonArray(Towers.Select(t => (JsonNode)new JsonObject
            {
                ["mean"] = DoubleArray(t.NormalizeMean.Select(v => (double)v)),
                ["std"] = DoubleArray(t.NormalizeStd.Select(v => (double)v)),
                ["inplace"] = false,
            }).ToArray()),
            ["tvf_resize_params"] = new JsonArray(Towers.Select(t => (JsonNode)new JsonObject
            {
                ["antialias"] = true,
                ["interpolation"] = t.InterpolationCode,
                ["max_size"] = null,
                ["size"] = t.ResizeSize is { } hw ? IntArray([hw.Height, hw.Width]) : JsonValue.Create(t.ResizeShorterSide!.Value),
            }).ToArray()),
            ["tvf_do_letterbox"] = DoLetterbox,
        };
        if (DoLetterbox) root["tvf_letterbox_fill"] = IntArray(LetterboxFill.Select(b => (int)b));
        root["use_fused_vision_backbone"] = UseFusedVisionBackbone;
        return root.ToJsonString(new JsonSerializerOptions { WriteIndented = true, IndentSize = 2 });
    }

    public void Save(string path) => File.WriteAllText(path, ToJson());

    /// <summary>float32 → bfloat16 → float32 with round-to-nearest-even, as torch's <c>.to(torch.bfloat16)</c> does.</summary>
    internal static float RoundToBFloat16(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        bits += 0x7FFFu + ((bits >> 16) & 1u);
        return BitConverter.UInt32BitsToSingle(bits & 0xFFFF0000u);
    }

    /// <summary>The resampling filter of a torchvision/PIL interpolation code, or null for codes we do not implement (0 nearest).</summary>
    internal static ResampleFilter? FilterOf(int code) => code switch
    {
        1 => ResampleFilter.Lanczos,
        2 => ResampleFilter.Bilinear,
        3 => ResampleFilter.Bicubic,
        4 => ResampleFilter.Box,
        5 => ResampleFilter.Hamming,
        _ => null,
    };

    private static int InterpolationCodeOf(string name, string source, string field) => name switch
    {
        "bicubic" => 3,
        "bilinear" => 2,
        "lanczos" => 1,
        "box" => 4,
        "hamming" => 5,
        _ => throw new CheckpointException($"{source}: {field} must be one of bicubic, bilinear, lanczos, box, hamming; got \"{name}\""),
    };

    private static JsonArray IntArray(IEnumerable<int> values) => new(values.Select(v => (JsonNode)JsonValue.Create(v)).ToArray());
    private static JsonArray DoubleArray(IEnumerable<double> values) => new(values.Select(v => (JsonNode)JsonValue.Create(v)).ToArray());

    /// <summary>Typed reads from the JSON tree with errors that name the file, the field and the expected value.</summary>
    private sealed class FieldReader(string source)
    {
        public string String(JsonNode node, string path) =>
            node.GetValueKind() == JsonValueKind.String ? node.GetValue<string>() : throw Bad(path, "a string", node);

        public bool Bool(JsonNode node, string path) => node.GetValueKind() switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw Bad(path, "true or false", node),
        };

        public int Int(JsonNode node, string path) =>
            node.GetValueKind() == JsonValueKind.Number && node.AsValue().TryGetValue(out int v) ? v : throw Bad(path, "an integer", node);

        public double Double(JsonNode node, string path) =>
            node.GetValueKind() == JsonValueKind.Number ? node.GetValue<double>() : throw Bad(path, "a number", node);

        public int[] Ints(JsonNode node, string path, int count) => Fixed(node, path, count, "integers", Int);
        public double[] Doubles(JsonNode node, string path, int count) => Fixed(node, path, count, "numbers", Double);

        public List<T> List<T>(JsonNode node, string path, Func<JsonNode, string, T> item)
        {
            if (node is not JsonArray array) throw Bad(path, "a list", node);
            return array.Select((n, i) => item(n ?? throw Bad($"{path}[{i}]", "a value", null), $"{path}[{i}]")).ToList();
        }

        public JsonArray? OptionalArray(JsonObject root, string key, int towers)
        {
            if (root[key] is not JsonNode node) return null;
            if (node is not JsonArray array || array.Count != towers) throw Bad(key, $"a list of {towers} objects (one per tower)", node);
            return array;
        }

        public void SameCount(string key, int count, int towers)
        {
            if (count != towers) throw new CheckpointException($"{source}: {key} has {count} entries, expected {towers} (one per entry of input_sizes)");
        }

        private T[] Fixed<T>(JsonNode node, string path, int count, string what, Func<JsonNode, string, T> item)
        {
            if (node is not JsonArray array || array.Count != count) throw Bad(path, $"a list of {count} {what}", node);
            return array.Select((n, i) => item(n ?? throw Bad($"{path}[{i}]", what, null), $"{path}[{i}]")).ToArray();
        }

        private CheckpointException Bad(string path, string expected, JsonNode? found) =>
            new($"{source}: {path} must be {expected}, got {found?.ToJsonString() ?? "null"}");
    }
}
