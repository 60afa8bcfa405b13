using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.FineTune.Data;

namespace OpenVLA.FineTune.Training;

/// <summary>
/// The trainer's view of a dataset stream (<see cref="TrainingStream"/>: bounded shuffle buffer, augmentation, resumable
/// cursor): each sample's primary camera frame, instruction and normalized action. Samples are drawn synchronously, so the
/// stream's cursor after the last draw is exactly where a resumed run must continue.
/// </summary>
public sealed class StreamExampleSource : IExampleSource
{
    readonly Func<StreamCursor?, TrainingStream> _open;
    TrainingStream _stream;

    /// <param name="open">Opens the stream, fresh (null) or at a saved cursor.</param>
    public StreamExampleSource(Func<StreamCursor?, TrainingStream> open)
    {
        _open = open;
        _stream = open(null);
    }

    public TrainingExample Next() => ToExample(_stream.Next());

    public JsonNode Cursor => JsonSerializer.SerializeToNode(_stream.Cursor)!;

    public void Restore(JsonNode cursor) =>
        _stream = _open(cursor.Deserialize<StreamCursor>() ?? throw new DatasetException("the saved data cursor is empty"));

    public static TrainingExample ToExample(TrainingSample s) =>
        new(s.Images[0], s.Instruction, s.NormalizedAction, s.DatasetName, s.Aux)
        {
            ExtraImages = s.Images.Skip(1).ToArray(), NormalizedChunk = s.NormalizedChunk, NormalizedProprio = s.NormalizedProprio,
        };

    /// <summary>
    /// Up to <paramref name="count"/> held-out examples, fixed for the run: one pass through the held-out episodes with a
    /// seeded shuffle buffer of 4·count steps (so the set spans several episodes, not the first one), no augmentation.
    /// </summary>
    public static List<TrainingExample> HeldOut(VlaDataset data, IReadOnlyList<int> episodes, DatasetStatistics statistics, int imageSize, int count, ulong seed,
        int actionChunk = 1)
    {
        if (episodes.Count == 0 || count == 0) return [];
        var stream = new TrainingStream(data, episodes, statistics, new StreamOptions
        {
            Shuffle = true, Repeat = false, ShuffleBufferSize = Math.Max(1, 4 * count), Seed = seed ^ 0xE7A1, ImageSize = imageSize, ActionChunk = actionChunk,
        });
        return stream.Take(count).Select(ToExample).ToList();
    }
}
