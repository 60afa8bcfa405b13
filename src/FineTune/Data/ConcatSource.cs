namespace OpenVLA.FineTune.Data;

/// <summary>
/// Several datasets of one layout read as one: their episodes numbered one after another, in the order given. The union
/// a DAgger iteration trains on (the demonstrations plus the states the policy reached, labelled by the expert), or data
/// from two recording sessions. Each part keeps its own files and instruction table; the config applies to all, and
/// <see cref="VlaDataset.Open(IReadOnlyList{string}, DatasetConfig?, string?, Action{string}?, DatasetLocator?)"/> checks they share a layout.
/// </summary>
internal sealed class ConcatSource : IEpisodeSource
{
    private readonly IEpisodeSource[] _parts;
    private readonly int[] _firstEpisode, _firstGroup;

    public ConcatSource(IReadOnlyList<IEpisodeSource> parts)
    {
        if (parts.Count == 0) throw new ArgumentException("no datasets to combine", nameof(parts));
        _parts = parts.ToArray();
        _firstEpisode = new int[_parts.Length + 1];
        _firstGroup = new int[_parts.Length + 1];
        for (int i = 0; i < _parts.Length; i++)
        {
            var p = _parts[i];
            _firstEpisode[i + 1] = _firstEpisode[i] + p.EpisodeCount;
            int groups = p.EpisodeCount == 0 ? 0 : Enumerable.Range(0, p.EpisodeCount).Max(p.GroupOf) + 1;
            _firstGroup[i + 1] = _firstGroup[i] + groups;
        }
    }

    public string Format => _parts[0].Format;
    public string DefaultName => _parts[0].DefaultName;
    public int EpisodeCount => _firstEpisode[^1];
    public bool RandomAccess => _parts.All(p => p.RandomAccess);
    public int EpisodeLength(int episode) { var (p, e) = Locate(episode); return _parts[p].EpisodeLength(e); }
    public int GroupOf(int episode) { var (p, e) = Locate(episode); return _firstGroup[p] + _parts[p].GroupOf(e); }
    public RawEpisode Read(int episode, bool withFrames) { var (p, e) = Locate(episode); return _parts[p].Read(e, withFrames); }
    public int PartCount => _parts.Length;
    public int PartOf(int episode) => Locate(episode).Part;

    /// <summary>Which part holds a combined episode number, and its number there.</summary>
    private (int Part, int Episode) Locate(int episode)
    {
        if (episode < 0 || episode >= EpisodeCount) throw new ArgumentOutOfRangeException(nameof(episode), episode, $"the datasets have {EpisodeCount} episodes");
        int part = Array.BinarySearch(_firstEpisode, episode);
        // An exact hit is the first episode of that part, unless earlier parts are empty (equal starts): take the last.
        if (part >= 0) { while (part + 1 < _parts.Length && _firstEpisode[part + 1] == episode) part++; }
        else part = ~part - 1;
        return (part, episode - _firstEpisode[part]);
    }

    public void Dispose() { foreach (var p in _parts) p.Dispose(); }
}
