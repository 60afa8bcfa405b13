using OpenVLA.FineTune.Data;
using OpenVLA.Policy;

namespace OpenVLA.Cli;

/// <summary>Calibration observations for GPTQ: frames (first camera) with their step's instruction, drawn uniformly
/// over every step of the datasets.</summary>
internal static class CalibrationFrames
{
    public static List<VlaObservation> Draw(IReadOnlyList<string> datasets, int samples, int seed, string? unnormKey)
    {
        using var data = VlaDataset.Open(datasets);
        var episodes = data.UsableEpisodes;
        var starts = new long[episodes.Count + 1];
        for (int i = 0; i < episodes.Count; i++) starts[i + 1] = starts[i] + data.EpisodeLength(episodes[i]);
        long total = starts[^1];
        if (total == 0) throw new DatasetException($"{data.Path}: no steps to calibrate on");
        var rng = new Random(seed);
        var picked = new SortedSet<long>();
        while (picked.Count < Math.Min(samples, total)) picked.Add(rng.NextInt64(total));
        var observations = new List<VlaObservation>();
        foreach (var byEpisode in picked.GroupBy(step => Array.BinarySearch(starts, step) is var i && i >= 0 ? i : ~i - 1))
        {
            var episode = data.ReadEpisode(episodes[byEpisode.Key], withImages: true);
            if (episode.Frames is not { Length: > 0 }) throw new DatasetException($"{data.Path}: episode {episode.Index} has no camera frames");
            foreach (long step in byEpisode)
            {
                int t = (int)(step - starts[byEpisode.Key]);
                var frame = episode.Frames[0][t] ?? throw new DatasetException($"{data.Path}: episode {episode.Index} step {t} has no frame");
                observations.Add(new VlaObservation([frame.Decode()], episode.Instructions[t], unnormKey));
            }
        }
        return observations;
    }
}
