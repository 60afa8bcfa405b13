namespace OpenVLA.Policy;

/// <summary>An RGB8 frame, rows top to bottom, pixels interleaved R,G,B (HWC).</summary>
public sealed record RgbImage(int Width, int Height, byte[] Pixels)
{
    public static RgbImage Create(int width, int height, byte[] pixels)
    {
        if (width <= 0 || height <= 0) throw new PolicyInputException($"image size must be positive, got {width}x{height}");
        if ((long)width * height * 3 != pixels.LongLength)
            throw new PolicyInputException($"raw RGB8 image of {width}x{height} needs {(long)width * height * 3} bytes, got {pixels.LongLength}");
        return new RgbImage(width, height, pixels);
    }
}

/// <summary>What the robot sees and is told: one image per camera the model takes (OpenVLA: one; OpenVLA-OFT: as many as
/// it was trained with, third-person first), the instruction and, for models that take it, the robot's proprioceptive
/// state in the dataset's raw units (the policy normalizes it with the checkpoint's statistics).</summary>
public sealed record VlaObservation(IReadOnlyList<RgbImage> Images, string Instruction, string? UnnormKey = null, IReadOnlyList<float>? Proprio = null);

/// <summary>Wall-clock milliseconds of each stage of one forward pass (shared by every observation of a batch).</summary>
public sealed record StageTimings(double PreprocessMs, double VisionMs, double PrefillMs, double DecodeMs, double TotalMs);

/// <summary>
/// One prediction: a chunk of actions [chunk][action_dim], un-normalized and normalized (plain OpenVLA predicts a chunk
/// of one, OpenVLA-OFT several in one forward pass), the action token ids when the head decodes tokens (empty for a
/// continuous head), the prompt ids, and the stage timings.
/// </summary>
public sealed record ActionPrediction(
    float[][] Actions,
    float[][] NormalizedActions,
    int[] ActionTokenIds,
    int[] PromptTokenIds,
    string UnnormKey,
    StageTimings Timings)
{
    /// <summary>The first action of the chunk: the one to execute now.</summary>
    public float[] Action => Actions[0];
    public float[] NormalizedAction => NormalizedActions[0];
    public int ChunkLength => Actions.Length;

    /// <summary>Sampled decoding: for each of <see cref="ActionTokenIds"/>, the log-probability of drawing it from the
    /// distribution it was drawn from (the logits after <see cref="ActionDecoding.Warp"/>: temperature, top-k, top-p);
    /// NaN for a token taken by argmax (the greedy gripper). Null for greedy, expected and continuous decoding.
    /// Post-training's importance ratios start from these.</summary>
    public float[]? TokenLogProbs { get; init; }

    /// <summary>A chunk of one action (plain OpenVLA).</summary>
    public static ActionPrediction Single(float[] action, float[] normalized, int[] tokenIds, int[] promptIds, string unnormKey, StageTimings timings) =>
        new([action], [normalized], tokenIds, promptIds, unnormKey, timings);
}

/// <summary>Dataset statistics used to un-normalize actions (the OpenVLA `norm_stats` entry of one dataset).</summary>
public sealed record ActionStats(double[] Q01, double[] Q99, bool[] Mask, double[]? Mean = null, double[]? Std = null, double[]? Min = null, double[]? Max = null);

/// <summary>What a client needs to know about a loaded policy.</summary>
public sealed record PolicyDescription(
    string ModelId,
    string Architecture,
    int ActionDim,
    int ImageSize,
    int ImagesPerObservation,
    string ResizeStrategy,
    string Precision,
    string Quantization,
    IReadOnlyDictionary<string, ActionStats> UnnormStats)
{
    /// <summary>Actions per prediction (1 for plain OpenVLA).</summary>
    public int ChunkLength { get; init; } = 1;
    /// <summary>Length of the proprioceptive state the policy takes; 0 when it takes none.</summary>
    public int ProprioDim { get; init; }
    /// <summary>One name per camera, in the order observations give the images.</summary>
    public IReadOnlyList<string> CameraNames { get; init; } = ["primary"];
    /// <summary>How actions are produced: "autoregressive-tokens" (OpenVLA) or "parallel-l1" (OpenVLA-OFT).</summary>
    public string ActionHead { get; init; } = "autoregressive-tokens";
}

/// <summary>A policy that maps a batch of observations to one action each. <see cref="VlaPolicy"/> is the real one.</summary>
public interface IActionPolicy
{
    PolicyDescription Description { get; }
    IReadOnlyList<ActionPrediction> PredictBatch(IReadOnlyList<VlaObservation> observations, CancellationToken cancellationToken = default);
}

/// <summary>The caller's input is invalid (unknown unnorm key, bad image, ...). The message is one line meant for the user.</summary>
public sealed class PolicyInputException(string message) : Exception(message), IUserError;

/// <summary>A checkpoint directory is missing files or holds tensors of the wrong name, shape or type.</summary>
public sealed class CheckpointException(string message, Exception? inner = null) : Exception(message, inner), IUserError;

/// <summary>Marks an exception caused by what the user gave (arguments, files, checkpoint or dataset contents, a
/// request), whose message is one line meant for them.</summary>
public interface IUserError;

/// <summary>
/// The one rule for what counts as the user's error, wherever an error is reported: the CLI exits 2 with the message
/// as one line, the server logs it as one line without a stack trace, an evaluation worker passes the verdict to its
/// parent. Everything else is ours: exit 1, logged with its trace.
/// </summary>
public static class UserErrors
{
    public static bool Is(Exception e) =>
        e is IUserError or FileNotFoundException or DirectoryNotFoundException or UnauthorizedAccessException;
}
