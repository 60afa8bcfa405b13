using System.Collections;
using OpenVLA.Policy;

namespace OpenVLA.FineTune.Data;

/// <summary>One training example: what the model sees (frames, instruction) and the action it should output.</summary>
/// <param name="Images">One per configured camera, primary first; resized and augmented as the stream's options say.</param>
/// <param name="Action">The 7-D EEF action, not normalized.</param>
/// <param name="NormalizedAction">BOUNDS_Q99-normalized action in [−1, 1] on masked dims: what the action tokenizer bins.</param>
/// <param name="Proprio">Proprioceptive state, empty when the dataset has none.</param>
/// <param name="Aux">The config's aux targets (not normalized); null when none are configured.</param>
/// <param name="NormalizedChunk">With <see cref="StreamOptions.ActionChunk"/> K: this step's action and the next K−1,
/// normalized (OpenVLA-OFT's targets); null otherwise.</param>
/// <param name="NormalizedProprio">The proprio normalized like the actions (BOUNDS_Q99, clipped), when the statistics have
/// proprio; null otherwise.</param>
public sealed record TrainingSample(
    string DatasetName,
    int EpisodeIndex,
    int StepIndex,
    IReadOnlyList<RgbImage> Images,
    string Instruction,
    float[] Action,
    float[] NormalizedAction,
    float[] Proprio,
    float[]? Aux = null,
    float[][]? NormalizedChunk = null,
    float[]? NormalizedProprio = null)
{
    /// <summary>The stream's cursor just after this sample: save the one of the last sample a finished optimizer step used, so
    /// samples prefetched but not yet trained on are handed out again after a resume.</summary>
    public StreamCursor? CursorAfter { get; init; }

    /// <summary>The policy's input for this sample (held-out evaluation through <see cref="IActionPolicy"/>), un-normalized with this dataset's key.</summary>
    public VlaObservation ToObservation() => new(Images, Instruction, DatasetName, Proprio.Length > 0 ? Proprio : null);
}

/// <summary>How a <see cref="TrainingStream"/> orders and prepares samples.</summary>
public sealed record StreamOptions
{
    /// <summary>Steps held for shuffling (reference default 100,000). Memory: this many encoded frames plus one episode.</summary>
    public int ShuffleBufferSize { get; init; } = 10_000;
    public ulong Seed { get; init; } = 7;
    /// <summary>False: episodes in ascending order, steps in order (evaluation).</summary>
    public bool Shuffle { get; init; } = true;
    /// <summary>True: start the next epoch (reshuffled) when one ends; false: the stream ends.</summary>
    public bool Repeat { get; init; } = true;
    /// <summary>Resize frames to this square size before augmentation (the reference resizes to 224 in its RLDS pipeline); null keeps the stored size.</summary>
    public int? ImageSize { get; init; }
    /// <summary>
    /// How frames are resized to <see cref="ImageSize"/> (width, height); null: <see cref="ImageCodec.Resize"/>. Pass the
    /// policy's own resize here so training sees frames resized exactly as at inference.
    /// </summary>
    public Func<RgbImage, int, int, RgbImage>? Resizer { get; init; }
    /// <summary>Augmentation (OpenVLA's image_aug, <see cref="RandomShift"/>), or null for none.</summary>
    public IImageAugmentation? Augmentation { get; init; }
    /// <summary>
    /// A mixture over the datasets of a union (<see cref="VlaDataset.Open(IReadOnlyList{string}, DatasetConfig?, string?, Action{string}?, DatasetLocator?)"/>),
    /// one positive weight per dataset in the order given: a frame of dataset i is sampled in proportion to weight i (1, 1:
    /// plain concatenation, each dataset in proportion to its size; 1, 3: the second's frames three times as often as the
    /// first's). Only ratios matter. Each epoch takes every episode of the most heavily weighted datasets and a fresh random
    /// subset of weight / max-weight of the others' episodes (of their shards, where a layout is read in shard order), so no
    /// episode is read twice in an epoch. Null: no mixture.
    /// </summary>
    public IReadOnlyList<double>? DatasetWeights { get; init; }
    /// <summary>
    /// OpenVLA-OFT action chunks of K actions: each sample carries its action and the next K−1 as
    /// <see cref="TrainingSample.NormalizedChunk"/>. As in openvla-oft's RLDS pipeline (traj_transforms.chunk_act_obs with
    /// future_action_window_size = K−1), the last K−1 steps of every episode are not samples: every chunk is whole, none
    /// is padded. 1: no chunks.
    /// </summary>
    public int ActionChunk { get; init; } = 1;
}

/// <summary>
/// Where a stream stands after the last sample it handed out: enough to continue exactly there in a new process
/// (save it with the training state, pass it back to the constructor). The buffer contents are not stored: the order of
/// samples depends only on the seed and the episode lengths, so the stream replays that order without reading data.
/// </summary>
public sealed record StreamCursor(int Epoch, long Position, ulong Seed, int ShuffleBufferSize, bool Shuffle, string Fingerprint);

/// <summary>
/// Samples of a set of episodes, shuffled through a bounded buffer like the reference's tf.data pipeline: each epoch the
/// episode order is shuffled (whole shards when a shard must be read in order, e.g. GZIP), steps enter a buffer of
/// <see cref="StreamOptions.ShuffleBufferSize"/>, and each sample is drawn at random from it. An episode is read when its
/// first step enters the buffer and each frame is dropped once handed out, so at most buffer + one episode of frames are in
/// memory, whatever the dataset's size. Deterministic for a seed; resumable through <see cref="Cursor"/>.
/// </summary>
public sealed class TrainingStream : IEnumerable<TrainingSample>
{
    private readonly VlaDataset _dataset;
    private readonly int[] _episodes;
    private readonly ArrayStatistics _action;
    private readonly ArrayStatistics? _proprio;
    private readonly StreamOptions _options;
    private readonly int _bufferSize;
    private readonly string _fingerprint;

    // Independent random streams derived from the one seed (Rng.For(seed, stream, index)).
    private const ulong EpisodeOrderStream = 1, BufferPickStream = 2, MixtureStream = 3, AugmentationStream = 16;   // + camera

    // Epoch plan: episode order, the pull pointer into it, the buffer of (episode, step) references and its generator.
    private int _epoch;
    private long _position;
    private int[] _order = [];
    private int _nextEpisode;   // index into _order of the episode whose steps are being pulled
    private int _nextStep;      // next step of that episode to pull
    private readonly List<(int Episode, int Step)> _buffer = [];
    private Rng _pick = new(0);
    private bool _ended;

    // Episodes read into memory, and how many of their steps have yet to be handed out.
    private readonly Dictionary<int, (Episode Data, int Remaining)> _loaded = [];
    private bool _materialize = true;

    /// <summary>Frames currently held in memory (encoded or decoded); bounded by buffer size + one episode.</summary>
    public long ResidentFrames { get; private set; }
    public long PeakResidentFrames { get; private set; }

    public int Epoch => _epoch;
    /// <summary>Samples in one pass over the episodes (each episode's steps less the last chunk − 1).</summary>
    public long SamplesPerEpoch => _episodes.Sum(e => (long)Usable(e));
    public StreamCursor Cursor => new(_epoch, _position, _options.Seed, _bufferSize, _options.Shuffle, _fingerprint);

    /// <param name="episodes">Episode numbers to stream, e.g. <see cref="DatasetSplit.Train"/>.</param>
    /// <param name="statistics">Normalization statistics (usually <see cref="VlaDataset.ComputeStatistics"/>).</param>
    /// <param name="resumeFrom">A cursor from an earlier run over the same dataset, episodes and options.</param>
    public TrainingStream(VlaDataset dataset, IReadOnlyList<int> episodes, DatasetStatistics statistics, StreamOptions? options = null, StreamCursor? resumeFrom = null)
    {
        _dataset = dataset;
        _options = options ?? new StreamOptions();
        if (_options.ShuffleBufferSize < 1) throw new DatasetException($"shuffle buffer size must be at least 1, got {_options.ShuffleBufferSize}");
        if (episodes.Count == 0) throw new DatasetException($"{dataset.Name}: no episodes to stream");
        if (statistics.Action.Dim != dataset.Config.ActionDim)
            throw new DatasetException($"statistics '{statistics.DatasetName}' have {statistics.Action.Dim} action dims, the dataset {dataset.Config.ActionDim}");
        _episodes = episodes.Order().ToArray();
        foreach (int e in _episodes)
            if (e < 0 || e >= dataset.EpisodeCount) throw new DatasetException($"{dataset.Name}: episode {e} does not exist ({dataset.EpisodeCount} episodes)");
        _action = statistics.Action;
        _proprio = statistics.Proprio.Dim > 0 && statistics.Proprio.Q99.Zip(statistics.Proprio.Q01).Any(p => p.First != p.Second)
            ? statistics.Proprio : null;
        if (_options.ActionChunk < 1) throw new DatasetException($"action chunk must be at least 1, got {_options.ActionChunk}");
        if (_options.ActionChunk > 1 && _episodes.All(e => Usable(e) == 0))
            throw new DatasetException($"{dataset.Name}: every episode is shorter than a chunk of {_options.ActionChunk} actions");
        _bufferSize = _options.Shuffle ? _options.ShuffleBufferSize : 1;
        if (_options.DatasetWeights is { } weights)
        {
            if (weights.Count != dataset.PartCount)
                throw new DatasetException($"{weights.Count} dataset weight(s) for {dataset.PartCount} dataset(s); give one per dataset, in order");
            if (weights.Any(w => !double.IsFinite(w) || w <= 0)) throw new DatasetException($"dataset weights must be positive, got {string.Join(", ", weights)}");
            if (!_options.Shuffle) throw new DatasetException("dataset weights need a shuffled stream");
        }
        _fingerprint = Fingerprint(dataset, _episodes) + (_options.DatasetWeights is { } mix ? ":mix=" + string.Join("/", mix.Select(w => w.ToString("R", System.Globalization.CultureInfo.InvariantCulture))) : "")
            + (_options.ActionChunk > 1 ? $":chunk={_options.ActionChunk}" : "");
        StartEpoch(0);
        if (resumeFrom is not null) Resume(resumeFrom);
    }

    /// <summary>The next sample; false when a non-repeating stream has ended.</summary>
    public bool TryNext(out TrainingSample sample)
    {
        sample = null!;
        if (!TryAdvance(out var r)) return false;
        sample = Materialize(r.Episode, r.Step);
        return true;
    }

    public TrainingSample Next() => TryNext(out var s) ? s : throw new InvalidOperationException("the stream has ended (Repeat is false)");

    /// <summary>Hands out samples until the stream ends (forever when repeating).</summary>
    public IEnumerator<TrainingSample> GetEnumerator()
    {
        while (TryNext(out var s)) yield return s;
    }

    IEnumerator IEnumerable.GetEnumerator() => GetEnumerator();

    private void StartEpoch(int epoch)
    {
        _epoch = epoch;
        _position = 0;
        _order = EpochOrder(epoch);
        _nextEpisode = 0;
        _nextStep = 0;
        _buffer.Clear();
        _pick = Rng.For(_options.Seed, BufferPickStream, (ulong)epoch);
    }

    /// <summary>Shuffled episodes, or shuffled groups of episodes in stored order when the layout must be read in order;
    /// with <see cref="StreamOptions.DatasetWeights"/>, this epoch's subsets of the lighter datasets only.</summary>
    private int[] EpochOrder(int epoch)
    {
        if (!_options.Shuffle) return _episodes;
        var rng = Rng.For(_options.Seed, EpisodeOrderStream, (ulong)epoch);
        if (_dataset.RandomAccess)
        {
            var order = Mixture(_episodes.Select(e => new[] { e }).ToList(), epoch).Select(u => u[0]).ToArray();
            rng.Shuffle(order);
            return order;
        }
        var groups = Mixture(_episodes.GroupBy(_dataset.GroupOf).Select(g => g.ToArray()).ToList(), epoch);
        rng.Shuffle(groups);
        return groups.SelectMany(g => g).ToArray();
    }

    /// <summary>The units (episodes, or shards read whole) this epoch keeps: all of a dataset with the largest weight, a
    /// random round(n · weight / max) of each other's n (at least one).</summary>
    private List<int[]> Mixture(List<int[]> units, int epoch)
    {
        if (_options.DatasetWeights is not { } weights || weights.Distinct().Count() == 1) return units;
        var rng = Rng.For(_options.Seed, MixtureStream, (ulong)epoch);
        double max = weights.Max();
        var kept = new List<int[]>();
        foreach (var part in units.GroupBy(u => _dataset.PartOf(u[0])).OrderBy(g => g.Key))
        {
            var list = part.ToArray();
            int keep = Math.Max(1, (int)Math.Round(list.Length * weights[part.Key] / max));
            if (keep < list.Length) rng.Shuffle(list);
            kept.AddRange(list.Take(keep).OrderBy(u => u[0]));
        }
        return kept;
    }

    private bool TryPull(out (int Episode, int Step) r)
    {
        r = default;
        while (_nextEpisode < _order.Length && _nextStep >= Usable(_order[_nextEpisode]))
        {
            _nextEpisode++;
            _nextStep = 0;
        }
        if (_nextEpisode >= _order.Length) return false;
        int e = _order[_nextEpisode];
        if (_nextStep == 0 && _materialize) Load(e, live: null);
        r = (e, _nextStep++);
        return true;
    }

    /// <summary>Picks the next reference: top the buffer up, draw one at random (the first when not shuffling).</summary>
    private bool TryAdvance(out (int Episode, int Step) r)
    {
        r = default;
        if (_ended) return false;
        while (true)
        {
            while (_buffer.Count < _bufferSize && TryPull(out var pulled)) _buffer.Add(pulled);
            if (_buffer.Count > 0) break;
            if (!_options.Repeat) { _ended = true; return false; }
            StartEpoch(_epoch + 1);
        }
        int i = _options.Shuffle ? _pick.NextInt(_buffer.Count) : 0;
        r = _buffer[i];
        if (_options.Shuffle) { _buffer[i] = _buffer[^1]; _buffer.RemoveAt(_buffer.Count - 1); }
        else _buffer.RemoveAt(0);
        _position++;
        return true;
    }

    private TrainingSample Materialize(int episode, int step)
    {
        var (data, remaining) = _loaded[episode];
        var images = new RgbImage[data.Frames!.Length];
        ulong sampleKey = ((ulong)(uint)_epoch << 40) ^ (ulong)(_position - 1);
        for (int c = 0; c < images.Length; c++)
        {
            var frame = data.Frames[c][step] ?? throw new InvalidOperationException($"frame {step} of episode {episode} was already handed out");
            var image = frame.Decode();
            if (_options.ImageSize is { } size) image = (_options.Resizer ?? ImageCodec.Resize)(image, size, size);
            if (_options.Augmentation is { } aug) image = aug.Apply(image, Rng.For(_options.Seed, AugmentationStream + (ulong)c, sampleKey));
            images[c] = image;
            data.Frames[c][step] = null;
            ResidentFrames--;
        }
        if (remaining == 1) _loaded.Remove(episode);
        else _loaded[episode] = (data, remaining - 1);
        var action = data.Actions[step];
        var chunk = _options.ActionChunk > 1 ? Enumerable.Range(step, _options.ActionChunk).Select(t => _action.Normalize(data.Actions[t])).ToArray() : null;
        var proprio = data.Proprio[step];
        var normalizedProprio = _proprio is not null && proprio.Length == _proprio.Dim ? _proprio.Normalize(proprio) : null;
        return new TrainingSample(_dataset.Name, episode, step, images, data.Instructions[step], action, _action.Normalize(action), proprio, data.Aux?[step],
            chunk, normalizedProprio)
        {
            CursorAfter = Cursor,
        };
    }

    /// <summary>Reads an episode; with <paramref name="live"/>, keeps only those steps' frames (resume).</summary>
    private void Load(int episode, HashSet<int>? live)
    {
        var data = _dataset.ReadEpisode(episode, withImages: true);
        int remaining = Usable(episode);
        if (live is not null)
        {
            for (int c = 0; c < data.Frames!.Length; c++)
                for (int t = 0; t < data.Length; t++)
                    if (!live.Contains(t)) data.Frames[c][t] = null;
            remaining = live.Count;
        }
        _loaded[episode] = (data, remaining);
        ResidentFrames += (long)remaining * data.Frames!.Length;
        PeakResidentFrames = Math.Max(PeakResidentFrames, ResidentFrames);
    }

    /// <summary>Replays the order up to the cursor without reading any data, then reads the episodes still in play.</summary>
    private void Resume(StreamCursor cursor)
    {
        if (cursor.Fingerprint != _fingerprint || cursor.Seed != _options.Seed || cursor.ShuffleBufferSize != _bufferSize || cursor.Shuffle != _options.Shuffle)
            throw new DatasetException($"cannot resume: the cursor was saved for another dataset, episode split or stream options (saved {cursor.Fingerprint}, seed {cursor.Seed}, buffer {cursor.ShuffleBufferSize}; now {_fingerprint}, seed {_options.Seed}, buffer {_bufferSize})");
        _materialize = false;
        StartEpoch(cursor.Epoch);
        for (long i = 0; i < cursor.Position; i++)
            if (!TryAdvance(out _)) throw new DatasetException($"cannot resume: epoch {cursor.Epoch} has fewer than {cursor.Position} samples");
        _materialize = true;

        var live = new Dictionary<int, HashSet<int>>();
        foreach (var (e, t) in _buffer) (live.TryGetValue(e, out var set) ? set : live[e] = []).Add(t);
        if (_nextEpisode < _order.Length)
        {
            int e = _order[_nextEpisode];
            for (int t = _nextStep; t < Usable(e) && _nextStep > 0; t++) (live.TryGetValue(e, out var set) ? set : live[e] = []).Add(t);
        }
        // Read in planned order so shards that must be read sequentially are read forward.
        var rank = new Dictionary<int, int>();
        for (int i = 0; i < _order.Length; i++) rank[_order[i]] = i;
        foreach (var (e, steps) in live.OrderBy(kv => rank[kv.Key])) Load(e, steps);
    }

    /// <summary>Steps of an episode that are samples: all of them, or those with a whole chunk ahead.</summary>
    private int Usable(int episode) => Math.Max(0, _dataset.EpisodeLength(episode) - (_options.ActionChunk - 1));

    private static string Fingerprint(VlaDataset dataset, int[] episodes)
    {
        ulong hash = 14695981039346656037UL;
        foreach (int e in episodes)
        {
            hash = (hash ^ (uint)e) * 1099511628211UL;
            hash = (hash ^ (uint)dataset.EpisodeLength(e)) * 1099511628211UL;
        }
        return $"{dataset.Name}:{episodes.Length}ep:{hash:x16}";
    }
}
