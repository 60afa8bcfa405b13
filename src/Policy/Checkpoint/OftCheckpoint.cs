using System.Text.Json.Nodes;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>How actions and proprio map to [−1, 1] (prismatic/vla/constants.py NormalizationType): BOUNDS_Q99 with the
/// 1st/99th percentiles (LIBERO, Bridge), BOUNDS with min/max (ALOHA).</summary>
public enum BoundsNormalization { Q99, MinMax }

/// <summary>What the caller states about an OFT checkpoint (flags): each value overrides config.json's "oft" block.</summary>
public sealed record OftOverrides(int? ActionChunk = null, int? NumImages = null);

/// <summary>
/// An OpenVLA-OFT checkpoint as openvla-oft writes it: the Hugging Face VLA directory plus
/// <c>action_head--&lt;step&gt;_checkpoint.pt</c>, optionally <c>proprio_projector--…</c> and, for FiLM models,
/// <c>vision_backbone--…</c> (docs/oft.md). The weights state the action dimension, the proprio dimension and FiLM; the
/// constants they do not state come, in this order, from the caller's flags, from our config.json extension block
/// <c>"oft": {"action_chunk", "action_dim", "proprio_dim", "num_images", "use_film", "normalization"}</c>, and from the
/// reference's platform constants (LIBERO, ALOHA, Bridge) picked by the statistics' dataset names — the reference picks
/// them by the words on its command line and defaults to LIBERO, which is also our last resort.
/// </summary>
public sealed record OftSpec(
    int ActionChunk, int ActionDim, int ProprioDim, int NumImages, bool UseFilm, BoundsNormalization Normalization,
    string ActionHeadFile, string? ProprioProjectorFile, string? VisionBackboneFile, string ConstantsSource)
{
    /// <summary>The variant without an action head (modeling_prismatic _regression_or_discrete_prediction with
    /// action_head None): the language model's own logits at the chunk's positions, argmax, OpenVLA's bins. Stated by our
    /// config.json block as <c>"action_head": "discrete"</c>; the weights cannot say it.</summary>
    public bool DiscreteTokens { get; init; }

    /// <summary>The reference's platform constants (prismatic/vla/constants.py) and the camera count of its evaluation
    /// configs (experiments/robot/libero: 2, aloha: 3; Bridge runs one camera).</summary>
    public static readonly IReadOnlyDictionary<string, (int Chunk, int ActionDim, int ProprioDim, BoundsNormalization Norm, int Images)> Platforms =
        new Dictionary<string, (int, int, int, BoundsNormalization, int)>
        {
            ["libero"] = (8, 7, 8, BoundsNormalization.Q99, 2),
            ["aloha"] = (25, 14, 14, BoundsNormalization.MinMax, 3),
            ["bridge"] = (5, 7, 7, BoundsNormalization.Q99, 1),
        };

    /// <summary>The file of one component, found as the reference finds it (a name containing the component and
    /// "checkpoint"); null when there is none, an error when several match.</summary>
    public static string? FindComponent(string dir, string component)
    {
        var matches = Directory.EnumerateFiles(dir)
            .Where(f => Path.GetFileName(f) is var n && n.Contains(component, StringComparison.Ordinal) && n.Contains("checkpoint", StringComparison.Ordinal) && n.EndsWith(".pt", StringComparison.Ordinal))
            .OrderBy(f => f, StringComparer.Ordinal).ToList();
        if (matches.Count > 1)
            throw new CheckpointException($"{dir}: {matches.Count} {component} checkpoints ({string.Join(", ", matches.Select(Path.GetFileName))}); keep exactly one");
        return matches.Count == 1 ? matches[0] : null;
    }

    /// <summary>Whether a directory holds an OFT checkpoint (an action head file, or config.json's "oft" block).</summary>
    public static bool IsOft(string dir, VlaConfig config) => config.Raw["oft"] is JsonObject || FindComponent(dir, "action_head") is not null;

    /// <summary>Resolves the spec from the files, the weights' shapes, the flags, config.json and the platform constants.</summary>
    /// <param name="headShapes">shape of the action head's model.fc2.weight ([A, H]) and model.fc1.weight ([H, H·A'])</param>
    /// <param name="proprioInput">input width of the proprio projector's fc1, or null without one</param>
    public static OftSpec Resolve(string dir, VlaConfig config, IEnumerable<string> statisticsKeys, OftOverrides overrides,
        string headFile, long[] fc2Shape, long[] fc1Shape, int? proprioInput, string? proprioFile, string? visionFile, bool visionHasFilm)
    {
        var block = config.Raw["oft"] as JsonObject;
        int llm = config.Text.HiddenSize;
        string head = Path.GetFileName(headFile);
        if (fc2Shape.Length != 2 || fc1Shape.Length != 2 || fc2Shape[1] != llm || fc1Shape[0] != llm || fc1Shape[1] % llm != 0)
            throw new CheckpointException($"{head}: model.fc1/fc2 shapes [{string.Join(", ", fc1Shape)}] / [{string.Join(", ", fc2Shape)}] do not fit a language model of width {llm}");
        int actionDim = (int)fc2Shape[0];
        if (fc1Shape[1] / llm != actionDim)
            throw new CheckpointException($"{head}: the head reads {fc1Shape[1] / llm} hidden states per action but predicts {actionDim} values");

        int? Int(string key)
        {
            if (block?[key] is not JsonNode n) return null;
            try { return n.GetValue<int>(); }
            catch (Exception e) when (e is FormatException or InvalidOperationException) { throw new CheckpointException($"{dir}/config.json: oft.{key} must be an integer"); }
        }
        bool? Bool(string key)
        {
            if (block?[key] is not JsonNode n) return null;
            try { return n.GetValue<bool>(); }
            catch (Exception e) when (e is FormatException or InvalidOperationException) { throw new CheckpointException($"{dir}/config.json: oft.{key} must be true or false"); }
        }
        void Agree(string key, int? stated, int actual, string what)
        {
            if (stated is int s && s != actual) throw new CheckpointException($"{dir}/config.json: oft.{key} is {s} but {what} says {actual}");
        }
        Agree("action_dim", Int("action_dim"), actionDim, head);
        int proprioDim = proprioInput ?? 0;
        if (proprioFile is not null) Agree("proprio_dim", Int("proprio_dim"), proprioDim, Path.GetFileName(proprioFile));
        else if (Int("proprio_dim") is int pd && pd > 0)
            throw new CheckpointException($"{dir}: config.json states oft.proprio_dim {pd} but there is no proprio_projector--*_checkpoint.pt");
        bool useFilm = visionFile is not null && visionHasFilm;
        if (Bool("use_film") is bool film && film != useFilm)
            throw new CheckpointException(film
                ? $"{dir}: config.json states oft.use_film but no vision_backbone--*_checkpoint.pt with FiLM scale/shift weights is present"
                : $"{dir}: config.json states oft.use_film false but {Path.GetFileName(visionFile!)} holds FiLM weights");

        // Platform constants, by the statistics' names (one platform among them, else the reference's default).
        var platforms = statisticsKeys.SelectMany(k => Platforms.Keys.Where(p => k.Contains(p, StringComparison.OrdinalIgnoreCase))).Distinct().ToList();
        string platform = platforms.Count == 1 ? platforms[0] : "libero";
        var constants = Platforms[platform];
        string platformSource = platforms.Count == 1 ? $"{platform.ToUpperInvariant()} constants (dataset name)"
            : platforms.Count == 0 ? "LIBERO constants (the reference's default)" : $"LIBERO constants (the reference's default; dataset names match {string.Join(" and ", platforms)})";

        var sources = new List<string>();
        int Pick(string name, int? flag, string key, int platformValue)
        {
            if (flag is int f) { sources.Add($"{name} {f} (flag)"); return f; }
            if (Int(key) is int c) { sources.Add($"{name} {c} (config.json)"); return c; }
            sources.Add($"{name} {platformValue} ({platformSource})");
            return platformValue;
        }
        int chunk = Pick("chunk", overrides.ActionChunk, "action_chunk", constants.Chunk);
        int images = Pick("cameras", overrides.NumImages, "num_images", constants.Images);
        if (chunk < 1 || chunk > 1024) throw new PolicyInputException($"action chunk must be between 1 and 1024, got {chunk}");
        if (images < 1 || images > 8) throw new PolicyInputException($"number of cameras must be between 1 and 8, got {images}");
        if (images > 1 && !config.UseFusedVisionBackbone)
            throw new CheckpointException($"{dir}: several cameras need the fused (two-tower) vision backbone, as in the reference");

        BoundsNormalization norm;
        var normText = block?["normalization"]?.GetValue<string>();
        if (normText is not null)
        {
            norm = normText switch
            {
                "bounds_q99" => BoundsNormalization.Q99,
                "bounds" => BoundsNormalization.MinMax,
                _ => throw new CheckpointException($"{dir}/config.json: oft.normalization '{normText}' is not one of bounds_q99, bounds"),
            };
            sources.Add($"normalization {normText} (config.json)");
        }
        else
        {
            norm = constants.Norm;
            sources.Add($"normalization {(norm == BoundsNormalization.Q99 ? "bounds_q99" : "bounds")} ({platformSource})");
        }
        return new OftSpec(chunk, actionDim, proprioDim, images, useFilm, norm, headFile, proprioFile, visionFile, string.Join(", ", sources));
    }

    /// <summary>The spec of a directory that has config.json's "oft" block but no component files (its metadata only):
    /// a model of that shape gets random weights, as benchmarks of the 7B architecture do.</summary>
    public static OftSpec FromConfigBlock(string dir, VlaConfig config, IEnumerable<string> statisticsKeys, OftOverrides overrides)
    {
        var block = config.Raw["oft"] as JsonObject ?? throw new CheckpointException($"{dir}: config.json has no \"oft\" block");
        int actionDim = block["action_dim"]?.GetValue<int>() ?? throw new CheckpointException($"{dir}/config.json: oft.action_dim is missing");
        int proprioDim = block["proprio_dim"]?.GetValue<int>() ?? 0;
        bool film = block["use_film"]?.GetValue<bool>() ?? false;
        int llm = config.Text.HiddenSize;
        var spec = Resolve(dir, config, statisticsKeys, overrides, "(random weights)", [actionDim, llm], [llm, (long)llm * actionDim],
            proprioDim > 0 ? proprioDim : null, proprioDim > 0 ? "(random weights)" : null, film ? "(random weights)" : null, film);
        return spec;
    }

    /// <summary>The extension block our tools write into config.json.</summary>
    public JsonObject ToJson()
    {
        var o = new JsonObject
        {
            ["action_chunk"] = ActionChunk, ["action_dim"] = ActionDim, ["proprio_dim"] = ProprioDim, ["num_images"] = NumImages,
            ["use_film"] = UseFilm, ["normalization"] = Normalization == BoundsNormalization.Q99 ? "bounds_q99" : "bounds",
        };
        if (DiscreteTokens) o["action_head"] = "discrete";
        return o;
    }

    /// <summary>Whether config.json's block asks for the discrete-token variant (no head file).</summary>
    public static bool StatesDiscrete(VlaConfig config) => (config.Raw["oft"] as JsonObject)?["action_head"]?.GetValue<string>() == "discrete";
}
