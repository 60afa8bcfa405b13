using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace OpenVLA.Policy;

/// <summary>One control step of a sampled rollout: the frame the policy saw (RGB, row-major, ImageSize² · 3 bytes), the
/// action tokens it drew and each token's log-probability under the distribution it was drawn from
/// (<see cref="ActionPrediction.TokenLogProbs"/>).</summary>
public sealed record SampledStep(byte[] Frame, int[] Tokens, float[] LogProbs);

/// <summary>
/// What a sampling policy did in one episode: where it started (task, episode seed), how it sampled (the sampler's
/// seed), every step it took and whether the episode succeeded. Post-training's rollout workers write these and its
/// trainer reads them back; the file is a small header in JSON and the steps in fixed-size binary records, so a worker
/// never holds more than one episode and a reader checks every length before it allocates.
/// </summary>
public sealed record SampledEpisode(string TaskId, string Instruction, int EpisodeSeed, long SampleSeed, int Context, int Sample, bool Success,
    int ImageSize, IReadOnlyList<SampledStep> Steps)
{
    static readonly byte[] Magic = "OVLA-SE1"u8.ToArray();
    const int MaxHeaderBytes = 1 << 16, MaxSteps = 100_000, MaxImageSize = 1024, MaxActionDim = 64;

    public int ActionDim => Steps.Count == 0 ? 0 : Steps[0].Tokens.Length;

    public void Write(string path)
    {
        int dim = ActionDim, frameBytes = ImageSize * ImageSize * 3;
        foreach (var s in Steps)
            if (s.Frame.Length != frameBytes || s.Tokens.Length != dim || s.LogProbs.Length != dim)
                throw new ArgumentException($"episode {TaskId}/{EpisodeSeed}: every step needs a {ImageSize}x{ImageSize} RGB frame and {dim} tokens and log-probabilities");
        var header = new JsonObject
        {
            ["task"] = TaskId, ["instruction"] = Instruction, ["episode_seed"] = EpisodeSeed, ["sample_seed"] = SampleSeed,
            ["context"] = Context, ["sample"] = Sample, ["success"] = Success, ["image_size"] = ImageSize,
            ["action_dim"] = dim, ["steps"] = Steps.Count,
        };
        byte[] json = Encoding.UTF8.GetBytes(header.ToJsonString());
        string tmp = path + ".tmp";
        using (var stream = new FileStream(tmp, FileMode.Create, FileAccess.Write))
        using (var w = new BinaryWriter(stream))
        {
            w.Write(Magic);
            w.Write(json.Length);
            w.Write(json);
            foreach (var s in Steps)
            {
                w.Write(s.Frame);
                foreach (int t in s.Tokens) w.Write(t);
                foreach (float p in s.LogProbs) w.Write(p);
            }
        }
        File.Move(tmp, path, overwrite: true);
    }

    public static SampledEpisode Read(string path)
    {
        byte[] bytes = File.ReadAllBytes(path);
        string Where() => $"{path}: not a sampled episode file";
        if (bytes.Length < Magic.Length + 4 || !bytes.AsSpan(0, Magic.Length).SequenceEqual(Magic)) throw new InvalidDataException(Where());
        int headerLength = BinaryPrimitives.ReadInt32LittleEndian(bytes.AsSpan(Magic.Length));
        int offset = Magic.Length + 4;
        if (headerLength is <= 0 or > MaxHeaderBytes || offset + headerLength > bytes.Length) throw new InvalidDataException($"{Where()} (header length {headerLength})");
        JsonObject h;
        try { h = JsonNode.Parse(bytes.AsSpan(offset, headerLength))!.AsObject(); }
        catch (Exception e) when (e is JsonException or InvalidOperationException or NullReferenceException) { throw new InvalidDataException($"{Where()} (header: {e.Message})"); }
        offset += headerLength;
        int size = h["image_size"]!.GetValue<int>(), dim = h["action_dim"]!.GetValue<int>(), count = h["steps"]!.GetValue<int>();
        if (size is < 1 or > MaxImageSize || dim is < 0 or > MaxActionDim || count is < 0 or > MaxSteps) throw new InvalidDataException($"{Where()} (image size {size}, action dim {dim}, steps {count})");
        int frameBytes = size * size * 3, record = frameBytes + 8 * dim;
        if ((long)record * count != bytes.Length - offset) throw new InvalidDataException($"{path}: {bytes.Length - offset} bytes of steps, expected {(long)record * count}");
        var steps = new SampledStep[count];
        for (int i = 0; i < count; i++, offset += record)
        {
            var frame = bytes.AsSpan(offset, frameBytes).ToArray();
            var tokens = new int[dim];
            var logProbs = new float[dim];
            for (int d = 0; d < dim; d++)
            {
                tokens[d] = BinaryPrimitives.ReadInt32LittleEndian(bytes.AsSpan(offset + frameBytes + 4 * d));
                logProbs[d] = BinaryPrimitives.ReadSingleLittleEndian(bytes.AsSpan(offset + frameBytes + 4 * dim + 4 * d));
            }
            steps[i] = new SampledStep(frame, tokens, logProbs);
        }
        return new SampledEpisode(h["task"]!.GetValue<string>(), h["instruction"]!.GetValue<string>(), h["episode_seed"]!.GetValue<int>(),
            h["sample_seed"]!.GetValue<long>(), h["context"]!.GetValue<int>(), h["sample"]!.GetValue<int>(), h["success"]!.GetValue<bool>(), size, steps);
    }
}
