using OpenVLA.Policy.Preprocessing;
using System.Security.Cryptography;
using System.Text;
using OpenVLA.Contract.V1;
using OpenVLA.Policy;

namespace OpenVLA.Server;

/// <summary>
/// Translation between openvla.v1 messages and policy calls: validates an <see cref="Observation"/> at the boundary
/// (every problem becomes one line for INVALID_ARGUMENT), and describes the loaded policy as <see cref="PolicyInfo"/>.
/// </summary>
internal sealed class ContractMapping
{
    public const string ApiVersion = "openvla.v1";
    readonly PolicyDescription description;
    readonly ServeOptions options;
    readonly ImageLimits imageLimits;

    public int MaxMessageBytes => options.MaxMessageBytes;
    readonly string[] knownKeys;

    public ContractMapping(PolicyDescription description, ServeOptions options)
    {
        this.description = description;
        this.options = options;
        imageLimits = new ImageLimits(options.MaxImageSide, options.MaxImagePixels);
        knownKeys = description.UnnormStats.Keys.Order(StringComparer.Ordinal).ToArray();
        ModelVersion = ComputeModelVersion(description);
    }

    public string ModelVersion { get; }

    /// <summary>Validated policy input, and the milliseconds spent decoding its images.</summary>
    public (VlaObservation Observation, double DecodeMs) ToPolicyInput(Observation? observation)
    {
        if (observation is null) throw Invalid("observation is missing");
        if (string.IsNullOrWhiteSpace(observation.Instruction)) throw Invalid("instruction is empty");
        if (Encoding.UTF8.GetByteCount(observation.Instruction) > options.MaxInstructionBytes)
            throw Invalid($"instruction is longer than {options.MaxInstructionBytes} bytes");
        var unnormKey = ResolveUnnormKey(observation.UnnormKey);
        if (observation.Proprio.Count > options.MaxProprio)
            throw Invalid($"proprio has {observation.Proprio.Count} values, the server accepts at most {options.MaxProprio}");
        for (int i = 0; i < observation.Proprio.Count; i++)
            if (!float.IsFinite(observation.Proprio[i])) throw Invalid($"proprio[{i}] is {observation.Proprio[i]} (must be finite)");
        if (description.ProprioDim > 0 && observation.Proprio.Count != description.ProprioDim)
            throw Invalid(observation.Proprio.Count == 0 ? $"proprio is missing: the model takes {description.ProprioDim} values"
                : $"proprio has {observation.Proprio.Count} values, the model takes {description.ProprioDim}");
        int expected = Math.Max(1, description.ImagesPerObservation);
        if (observation.Images.Count != expected)
            throw Invalid(expected == 1 ? $"expected 1 image(s) per observation, got {observation.Images.Count}"
                : $"expected {expected} images per observation ({string.Join(", ", description.CameraNames)}), got {observation.Images.Count}");

        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        var images = new RgbImage[observation.Images.Count];
        for (int i = 0; i < images.Length; i++)
        {
            try { images[i] = FrameDecoder.Decode(observation.Images[i], imageLimits); }
            catch (PolicyInputException e) when (images.Length > 1) { throw Invalid($"image {i}: {e.Message}"); }
        }
        var decodeMs = System.Diagnostics.Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        var proprio = description.ProprioDim > 0 ? observation.Proprio.ToArray() : null;
        return (new VlaObservation(images, observation.Instruction, unnormKey, proprio), decodeMs);
    }

    string? ResolveUnnormKey(string requested)
    {
        if (requested.Length == 0)
        {
            if (knownKeys.Length <= 1) return knownKeys.FirstOrDefault();
            throw Invalid($"unnorm_key is required: this model has {knownKeys.Length} ({Listed()})");
        }
        if (!description.UnnormStats.ContainsKey(requested)) throw Invalid($"unknown unnorm_key '{OneLine(requested)}' (known: {Listed()})");
        return requested;
    }

    string Listed() => knownKeys.Length <= 8 ? string.Join(", ", knownKeys) : string.Join(", ", knownKeys.Take(8)) + $", ... {knownKeys.Length - 8} more";

    public static Contract.V1.Action ToAction(ActionPrediction prediction)
    {
        var action = new Contract.V1.Action { UnnormKey = prediction.UnnormKey };
        action.Values.AddRange(prediction.Action);
        action.Normalized.AddRange(prediction.NormalizedAction);
        action.TokenIds.AddRange(prediction.ActionTokenIds);
        for (int k = 0; k < prediction.ChunkLength; k++)
            action.Chunk.Add(new ActionStep { Values = { prediction.Actions[k] }, Normalized = { prediction.NormalizedActions[k] } });
        return action;
    }

    public static Contract.V1.StageTimings ToTimings(ActionPrediction? prediction, double queueMs, double decodeMs, double serverMs, int batchSize) => new()
    {
        QueueMs = queueMs,
        ImageDecodeMs = decodeMs,
        PreprocessMs = prediction?.Timings.PreprocessMs ?? 0,
        VisionMs = prediction?.Timings.VisionMs ?? 0,
        PrefillMs = prediction?.Timings.PrefillMs ?? 0,
        DecodeTokensMs = prediction?.Timings.DecodeMs ?? 0,
        ModelTotalMs = prediction?.Timings.TotalMs ?? 0,
        ServerTotalMs = serverMs,
        BatchSize = (uint)batchSize,
    };

    public PolicyInfo Describe()
    {
        var info = new PolicyInfo
        {
            ApiVersion = ApiVersion,
            ModelId = description.ModelId,
            ModelVersion = ModelVersion,
            Architecture = description.Architecture,
            ActionDim = (uint)description.ActionDim,
            ChunkLength = (uint)description.ChunkLength,
            ImageSize = (uint)description.ImageSize,
            ResizeStrategy = description.ResizeStrategy,
            ImagesPerObservation = (uint)Math.Max(1, description.ImagesPerObservation),
            AcceptedEncodings = { ImageEncoding.RawRgb8, ImageEncoding.Jpeg, ImageEncoding.Png },
            Precision = description.Precision,
            Quantization = description.Quantization,
            ProprioDim = (uint)description.ProprioDim,
            CameraNames = { description.CameraNames },
            ActionHead = description.ActionHead,
            Limits = new ServerLimits
            {
                MaxMessageBytes = (ulong)options.MaxMessageBytes,
                MaxImageSide = (uint)options.MaxImageSide,
                MaxImagePixels = (ulong)options.MaxImagePixels,
                MaxBatch = (uint)options.MaxBatch,
                MaxQueueDelayMs = options.MaxQueueDelayMs,
                MaxQueue = (uint)options.MaxQueue,
                MaxInstructionBytes = (uint)options.MaxInstructionBytes,
                MaxProprio = (uint)options.MaxProprio,
            },
        };
        foreach (var key in knownKeys)
        {
            var stats = description.UnnormStats[key];
            info.UnnormKeys.Add(new UnnormKey { Name = key, StatsSha256 = StatsHash(stats), Q01 = { stats.Q01 }, Q99 = { stats.Q99 }, Mask = { stats.Mask } });
        }
        return info;
    }

    /// <summary>SHA-256 of q01, q99 (little-endian float64) and mask (one byte each), as documented in policy.proto.</summary>
    internal static string StatsHash(ActionStats stats)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        Span<byte> eight = stackalloc byte[8];
        foreach (var values in new[] { stats.Q01, stats.Q99 })
            foreach (var v in values)
            {
                System.Buffers.Binary.BinaryPrimitives.WriteDoubleLittleEndian(eight, v);
                hash.AppendData(eight);
            }
        foreach (var m in stats.Mask) hash.AppendData([(byte)(m ? 1 : 0)]);
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    static string ComputeModelVersion(PolicyDescription d)
    {
        var text = new StringBuilder()
            .Append(d.ModelId).Append('\n').Append(d.Architecture).Append('\n').Append(d.Precision).Append('\n').Append(d.Quantization)
            .Append('\n').Append(d.ActionDim).Append('\n').Append(d.ImageSize);
        // Plain models keep the version they had before chunks existed.
        if (d.ChunkLength != 1 || d.ProprioDim != 0 || d.ImagesPerObservation > 1)
            text.Append('\n').Append(d.ChunkLength).Append('\n').Append(d.ProprioDim).Append('\n').Append(d.ImagesPerObservation);
        foreach (var key in d.UnnormStats.Keys.Order(StringComparer.Ordinal)) text.Append('\n').Append(key).Append('=').Append(StatsHash(d.UnnormStats[key]));
        return Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text.ToString())))[..12];
    }

    static string OneLine(string s) => s.Length > 64 ? s[..64].ReplaceLineEndings(" ") + "..." : s.ReplaceLineEndings(" ");

    static PolicyInputException Invalid(string message) => new(message);
}
