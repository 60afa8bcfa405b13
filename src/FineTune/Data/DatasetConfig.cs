using System.Text.Json;
using System.Text.Json.Serialization;

namespace OpenVLA.FineTune.Data;

/// <summary>
/// How one dataset maps onto OpenVLA's training sample: which camera, where the instruction comes from, and how the stored
/// action becomes the 7-D EEF action <c>[dx, dy, dz, droll, dpitch, dyaw, gripper]</c> with gripper 1 = open, 0 = closed
/// (reference: prismatic/vla/datasets/rlds/oxe/configs.py and transforms.py). Written by users as a JSON file with these
/// snake_case fields; every field has a default, see <see cref="ForFormat"/>.
/// </summary>
/// <remarks>
/// Key names: LeRobot keys are parquet column / feature names (<c>observation.images.image</c>). RLDS keys are the flattened
/// Example features without the <c>steps/</c> prefix (<c>observation/image</c>, <c>action</c>, <c>language_instruction</c>);
/// a bare name is looked up as <c>steps/NAME</c> and then <c>steps/observation/NAME</c>.
/// </remarks>
public sealed record DatasetConfig
{
    /// <summary>The key of this dataset in dataset_statistics.json; default: the dataset's own name (TFDS name or directory name).</summary>
    public string? Name { get; init; }

    /// <summary>Camera keys, the first is OpenVLA's "primary" image. OpenVLA fine-tuning uses one; more are read when listed.</summary>
    public IReadOnlyList<string>? ImageKeys { get; init; }

    /// <summary>LeRobot: "task" (meta/tasks.jsonl through task_index) or a string column; RLDS: a string feature.</summary>
    public string? Instruction { get; init; }

    /// <summary>Action keys, concatenated in this order into the stored action vector.</summary>
    public IReadOnlyList<string>? ActionKeys { get; init; }

    /// <summary>Dims of the concatenated action to keep, in output order (null: all).</summary>
    public IReadOnlyList<int>? ActionDims { get; init; }

    /// <summary>Dims of the action after selection; OpenVLA's EEF actions have 7.</summary>
    public int ActionDim { get; init; } = 7;

    /// <summary>How the stored gripper value becomes 1 = open, 0 = closed.</summary>
    public GripperConvention Gripper { get; init; } = new();

    /// <summary>Which action dims are normalized with q01/q99 (the statistics' "mask"); default: all but the gripper.</summary>
    public IReadOnlyList<bool>? NormalizationMask { get; init; }

    /// <summary>Proprioceptive state key; null: none (statistics then hold zeros, as the reference does).</summary>
    public string? ProprioKey { get; init; }

    /// <summary>
    /// Auxiliary regression targets (LeRobot only): vector keys concatenated in this order per frame, e.g.
    /// <c>["observation.state", "observation.environment_state"]</c>. Used only by training with an auxiliary weight
    /// (<c>finetune --aux-weight</c>): the projected image tokens learn to predict them. Null: none.
    /// </summary>
    public IReadOnlyList<string>? AuxKeys { get; init; }

    /// <summary>Drop episodes whose instruction is empty (reference: skip_unlabeled) instead of failing.</summary>
    public bool SkipUnlabeled { get; init; }

    internal bool[] MaskOrDefault() => NormalizationMask is { } m ? m.ToArray() : Enumerable.Range(0, ActionDim).Select(i => i != Gripper.Index).ToArray();

    /// <summary>The defaults for a layout: our simulation's LeRobot datasets, or an RLDS dataset with OXE's usual names.</summary>
    public static DatasetConfig ForFormat(string format) => format switch
    {
        DatasetFormats.LeRobot => new DatasetConfig
        {
            ImageKeys = ["observation.images.image"],
            Instruction = "task",
            ActionKeys = ["action"],
            ProprioKey = "observation.state",
        },
        DatasetFormats.Rlds => new DatasetConfig
        {
            ImageKeys = ["image"],
            Instruction = "language_instruction",
            ActionKeys = ["action"],
        },
        _ => throw new DatasetException($"unknown dataset format '{format}' (expected {DatasetFormats.LeRobot} or {DatasetFormats.Rlds})"),
    };

    /// <summary>Fills the fields a user's file left out with the defaults of <paramref name="format"/>.</summary>
    public DatasetConfig WithDefaultsFor(string format)
    {
        var d = ForFormat(format);
        return this with
        {
            ImageKeys = ImageKeys is { Count: > 0 } ? ImageKeys : d.ImageKeys,
            Instruction = Instruction ?? d.Instruction,
            ActionKeys = ActionKeys is { Count: > 0 } ? ActionKeys : d.ActionKeys,
            ProprioKey = ProprioKey ?? (ProprioKeyExplicitlyNone ? null : d.ProprioKey),
            ProprioOptional = ProprioKey is null,
        };
    }

    /// <summary>Set when the JSON file says <c>"proprio_key": null</c>, so the default is not applied.</summary>
    [JsonIgnore] internal bool ProprioKeyExplicitlyNone { get; init; }

    /// <summary>The proprio key is a default, so a dataset without it simply has no proprio (rather than an error).</summary>
    [JsonIgnore] internal bool ProprioOptional { get; init; }

    internal static readonly JsonSerializerOptions Json = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
        ReadCommentHandling = JsonCommentHandling.Skip,
        AllowTrailingCommas = true,
        WriteIndented = true,
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    };

    public static DatasetConfig Load(string path)
    {
        if (!File.Exists(path)) throw new DatasetException($"dataset config not found: {path}");
        return Parse(File.ReadAllText(path), path);
    }

    public static DatasetConfig Parse(string json, string source = "dataset config")
    {
        DatasetConfig config;
        bool proprioNull;
        try
        {
            config = JsonSerializer.Deserialize<DatasetConfig>(json, Json) ?? throw new DatasetException($"{source}: expected a JSON object");
            using var doc = JsonDocument.Parse(json, new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
            proprioNull = doc.RootElement.TryGetProperty("proprio_key", out var p) && p.ValueKind == JsonValueKind.Null;
        }
        catch (JsonException e) { throw new DatasetException($"{source}: {e.Message}", e); }
        config = config with { ProprioKeyExplicitlyNone = proprioNull };
        config.Validate(source);
        return config;
    }

    public string ToJson() => JsonSerializer.Serialize(this, Json);

    internal void Validate(string source)
    {
        if (ActionDim <= 0) throw new DatasetException($"{source}: action_dim must be positive, got {ActionDim}");
        if (ActionDims is { } dims && dims.Count != ActionDim)
            throw new DatasetException($"{source}: action_dims selects {dims.Count} dims but action_dim is {ActionDim}");
        if (ActionDims is { } d2 && d2.Any(i => i < 0)) throw new DatasetException($"{source}: action_dims must be non-negative");
        if (NormalizationMask is { } m && m.Count != ActionDim)
            throw new DatasetException($"{source}: normalization_mask has {m.Count} entries but action_dim is {ActionDim}");
        if (Gripper.Index is { } g && (g < 0 || g >= ActionDim))
            throw new DatasetException($"{source}: gripper.index {g} is outside the {ActionDim} action dims");
        if (AuxKeys is { } aux && (aux.Count == 0 || aux.Any(string.IsNullOrWhiteSpace) || aux.Distinct().Count() != aux.Count))
            throw new DatasetException($"{source}: aux_keys must list one or more distinct keys");
        if (Gripper.FromRange is { } r && (r.Count != 2 || r[0] == r[1]))
            throw new DatasetException($"{source}: gripper.from_range must be two different numbers [low, high]");
    }
}

/// <summary>
/// Turns the stored gripper value into OpenVLA's 1 = open, 0 = closed. Applied in this order: <c>from_range</c> (rescale
/// [low, high] linearly onto [0, 1]), <c>clip</c> to [0, 1], <c>invert</c> (1 − x), <c>binarize</c> (x &gt; threshold → 1, else 0).
/// LIBERO (−1 = open, +1 = close): clip + invert; Bridge: binarize at 0.5.
/// </summary>
public sealed record GripperConvention
{
    /// <summary>Index of the gripper in the selected action; null: no gripper handling.</summary>
    public int? Index { get; init; } = 6;
    public IReadOnlyList<double>? FromRange { get; init; }
    public bool Clip { get; init; }
    public bool Invert { get; init; }
    public double? BinarizeThreshold { get; init; }

    public float Apply(float x)
    {
        double v = x;
        if (FromRange is { } r) v = (v - r[0]) / (r[1] - r[0]);
        if (Clip) v = Math.Clamp(v, 0, 1);
        if (Invert) v = 1 - v;
        if (BinarizeThreshold is { } t) v = v > t ? 1 : 0;
        return (float)v;
    }
}

/// <summary>The layouts the data side reads.</summary>
public static class DatasetFormats
{
    public const string LeRobot = "lerobot";
    public const string Rlds = "rlds";

    /// <summary>"lerobot" when DIR/meta/info.json exists, "rlds" when DIR holds *.tfrecord* shards; otherwise a clear error.</summary>
    public static string Detect(string path)
    {
        if (!Directory.Exists(path)) throw new DatasetException($"dataset directory not found: {path}");
        if (File.Exists(System.IO.Path.Combine(path, "meta", "info.json"))) return LeRobot;
        if (RldsSource.FindShards(path).Count > 0) return Rlds;
        throw new DatasetException($"unknown dataset layout in {path}: expected meta/info.json (LeRobot v2.1) or *.tfrecord* shards (RLDS/TFDS)");
    }
}
