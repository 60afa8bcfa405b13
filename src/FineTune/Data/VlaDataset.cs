namespace OpenVLA.FineTune.Data;

/// <summary>
/// A dataset on disk (LeRobot v2.1 or RLDS) seen through a <see cref="DatasetConfig"/>: episodes of 7-D EEF actions,
/// instructions and camera frames. The entry point of the data side:
/// <code>
/// using var data = VlaDataset.Open("datasets/my_sim");                 // layout detected, sim defaults
/// var stats = data.ComputeStatistics();                              // dataset_statistics.json entry
/// var split = data.SplitEpisodes(heldOutFraction: 0.05, seed: 7);
/// var train = new TrainingStream(data, split.Train, stats, new StreamOptions { Seed = 7 });
/// </code>
/// </summary>
public sealed class VlaDataset : IDisposable
{
    private readonly IEpisodeSource _source;
    private readonly ActionMapper _mapper;
    private readonly int[] _usable;

    public string Path { get; }
    public string Format => _source.Format;
    /// <summary>The dataset_statistics.json key: the config's name, else the dataset's own.</summary>
    public string Name { get; }
    public DatasetConfig Config { get; }
    /// <summary>Episodes stored, including any dropped by skip_unlabeled.</summary>
    public int EpisodeCount => _source.EpisodeCount;
    /// <summary>Episode numbers used for training and statistics (all, unless skip_unlabeled dropped some).</summary>
    public IReadOnlyList<int> UsableEpisodes => _usable;
    public int EpisodeLength(int episode) => _source.EpisodeLength(episode);
    public long StepCount => _usable.Sum(e => (long)_source.EpisodeLength(e));
    internal bool RandomAccess => _source.RandomAccess;
    /// <summary>How many datasets this one combines (1 unless several paths were opened as a union).</summary>
    public int PartCount => _source is ConcatSource c ? c.PartCount : 1;
    /// <summary>Which of the combined datasets (0-based, in the order opened) holds an episode.</summary>
    public int PartOf(int episode) => _source is ConcatSource c ? c.PartOf(episode) : 0;
    internal int GroupOf(int episode) => _source.GroupOf(episode);

    private VlaDataset(string path, IEpisodeSource source, DatasetConfig config)
    {
        Path = path;
        _source = source;
        Config = config;
        Name = config.Name ?? source.DefaultName;
        _mapper = new ActionMapper(config, Name);
        _usable = Enumerable.Range(0, source.EpisodeCount).ToArray();
        // Unlabeled = every step has an empty instruction (reference: skip_unlabeled). Found at open rather than hours into
        // training: RLDS keeps instructions from its index scan, so checking is free; LeRobot reads its small columns only
        // when some task is empty or skipping was asked for.
        if (config.SkipUnlabeled || source.Format == DatasetFormats.Rlds || source is LeRobotSource { HasEmptyTask: true })
        {
            var unlabeled = _usable.Where(e => _source.Read(e, withFrames: false).Instructions.All(string.IsNullOrWhiteSpace)).ToArray();
            if (unlabeled.Length == _usable.Length) throw new DatasetException($"dataset {path} has no language: every episode has an empty instruction");
            if (unlabeled.Length > 0 && !config.SkipUnlabeled)
                throw new DatasetException($"dataset {path}: {unlabeled.Length} of {_usable.Length} episodes have no language (an empty instruction; first: episode {unlabeled[0]}); set skip_unlabeled to drop them");
            _usable = _usable.Except(unlabeled).ToArray();
        }
    }

    /// <param name="config">null: the defaults of the detected layout. Fields the config leaves out take those defaults.</param>
    /// <param name="format">"lerobot", "rlds" or null to detect.</param>
    /// <param name="progress">Progress lines while RLDS shards are indexed (one read of every shard), e.g. for stderr.</param>
    public static VlaDataset Open(string path, DatasetConfig? config = null, string? format = null, Action<string>? progress = null, DatasetLocator? locator = null) =>
        Open([path], config, format, progress, locator);

    /// <summary>
    /// Several datasets of one layout as one (<see cref="ConcatSource"/>): episodes numbered in the order of
    /// <paramref name="paths"/>, one config for all, statistics and the held-out split over the union. The name is the
    /// config's, else the first dataset's; <see cref="Path"/> lists them all, comma-separated. Each argument is found
    /// by <paramref name="locator"/> (default: <see cref="DatasetLocator.Default"/>): a directory, a TFDS root, a LeRobot repo id.
    /// </summary>
    public static VlaDataset Open(IReadOnlyList<string> paths, DatasetConfig? config = null, string? format = null, Action<string>? progress = null,
        DatasetLocator? locator = null)
    {
        if (paths.Count == 0) throw new DatasetException("no dataset given");
        paths = paths.Select((locator ?? DatasetLocator.Default).Resolve).ToList();
        var formats = paths.Select(p => format ?? DatasetFormats.Detect(p)).ToList();
        if (formats.Distinct().Count() > 1)
            throw new DatasetException($"datasets to combine must have one layout; {string.Join(", ", paths.Select((p, i) => $"{p} is {formats[i]}"))}");
        format = formats[0];
        if (format is not (DatasetFormats.LeRobot or DatasetFormats.Rlds))
            throw new DatasetException($"unknown dataset format '{format}' (expected {DatasetFormats.LeRobot} or {DatasetFormats.Rlds})");
        if (paths.FirstOrDefault(p => !Directory.Exists(p)) is { } missing) throw new DatasetException($"dataset directory not found: {missing}");
        if (paths.Select(p => System.IO.Path.TrimEndingDirectorySeparator(System.IO.Path.GetFullPath(p))).Distinct().Count() < paths.Count)
            throw new DatasetException($"a dataset is named twice: {string.Join(", ", paths)}");
        var full = (config ?? new DatasetConfig()).WithDefaultsFor(format);
        full.Validate($"dataset config for {paths[0]}");
        var sources = new List<IEpisodeSource>();
        try
        {
            foreach (var path in paths)
                sources.Add(format == DatasetFormats.LeRobot ? new LeRobotSource(path, full) : new RldsSource(path, full, progress));
            IEpisodeSource source = sources.Count == 1 ? sources[0] : new ConcatSource(sources);
            return new VlaDataset(string.Join(",", paths), source, full);
        }
        catch { sources.ForEach(s => s.Dispose()); throw; }
    }

    /// <summary>An episode in OpenVLA's convention; without images only actions, proprio and instructions are read.</summary>
    public Episode ReadEpisode(int episode, bool withImages = true)
    {
        if (episode < 0 || episode >= _source.EpisodeCount) throw new ArgumentOutOfRangeException(nameof(episode), episode, $"the dataset has {_source.EpisodeCount} episodes");
        var raw = _source.Read(episode, withImages);
        int steps = raw.Actions.Length;
        var actions = new float[steps][];
        for (int t = 0; t < steps; t++) actions[t] = _mapper.Map(raw.Actions[t], episode, t);
        var proprio = raw.Proprio ?? Enumerable.Repeat(Array.Empty<float>(), steps).ToArray();
        if (!Config.SkipUnlabeled && raw.Instructions.All(string.IsNullOrWhiteSpace))
            throw new DatasetException($"{Name}: episode {episode} has no language (an empty instruction); set skip_unlabeled to drop such episodes");
        return new Episode(episode, actions, proprio, raw.Instructions, raw.Frames, raw.Aux);
    }

    /// <summary>
    /// Statistics of the mapped actions (and proprio) over every usable episode, as the reference computes them before
    /// training; the action mask is the config's normalization mask. With aux_keys, the same pass also gives the aux
    /// targets' statistics (<see cref="DatasetStatistics.Aux"/>).
    /// </summary>
    public DatasetStatistics ComputeStatistics()
    {
        var actions = new List<float[]>();
        var proprio = new List<float[]>();
        var aux = new List<float[]>();
        foreach (int e in _usable)
        {
            var ep = ReadEpisode(e, withImages: false);
            actions.AddRange(ep.Actions);
            proprio.AddRange(ep.Proprio);
            if (ep.Aux is not null) aux.AddRange(ep.Aux);
        }
        var action = ArrayStatistics.Compute(actions, Config.ActionDim, Config.MaskOrDefault());
        int proprioDim = proprio.Count > 0 ? proprio[0].Length : 0;
        var proprioStats = proprioDim > 0 ? ArrayStatistics.Compute(proprio, proprioDim) : ArrayStatistics.Zeros(Config.ActionDim);
        return new DatasetStatistics(Name, action, proprioStats, actions.Count, _usable.Length) { Aux = AuxStatistics(aux) };
    }

    ArrayStatistics? AuxStatistics(List<float[]> rows)
    {
        if (Config.AuxKeys is null) return null;
        if (rows.Count == 0) throw new DatasetException($"{Name}: no steps to compute aux statistics over");
        int dim = rows[0].Length;
        if (rows.Any(r => r.Length != dim)) throw new DatasetException($"{Name}: aux targets of different lengths ({dim} and {rows.First(r => r.Length != dim).Length})");
        return ArrayStatistics.Compute(rows, dim);
    }

    /// <summary>A deterministic train / held-out split by whole episodes (no episode contributes steps to both).</summary>
    public DatasetSplit SplitEpisodes(double heldOutFraction, ulong seed) => DatasetSplit.ByEpisode(_usable, heldOutFraction, seed);

    public void Dispose() => _source.Dispose();
}

/// <summary>Episode numbers for training and for held-out evaluation, each ascending.</summary>
public sealed record DatasetSplit(IReadOnlyList<int> Train, IReadOnlyList<int> HeldOut)
{
    private const ulong SplitStream = 3;   // distinct from the stream's random streams, so the split does not follow the order

    /// <summary>
    /// Shuffles the episodes with <paramref name="seed"/> and holds out round(fraction·N) of them (at least one when the
    /// fraction is positive and there are two or more episodes).
    /// </summary>
    public static DatasetSplit ByEpisode(IReadOnlyList<int> episodes, double heldOutFraction, ulong seed)
    {
        if (heldOutFraction is < 0 or >= 1 || double.IsNaN(heldOutFraction))
            throw new DatasetException($"held-out fraction must be in [0, 1), got {heldOutFraction}");
        var order = episodes.ToArray();
        Rng.For(seed, SplitStream, 0).Shuffle(order);
        int held = (int)Math.Round(heldOutFraction * order.Length);
        if (heldOutFraction > 0 && held == 0 && order.Length >= 2) held = 1;
        return new DatasetSplit(order[held..].Order().ToArray(), order[..held].Order().ToArray());
    }
}
