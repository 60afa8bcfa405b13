using System.Text.RegularExpressions;
using OpenVLA.Policy.Checkpoint;

namespace OpenVLA.FineTune.Data;

/// <summary>
/// Turns a dataset argument into the directory the readers open, with the conventions people's tools use. Nothing is
/// downloaded; a miss is a one-line <see cref="DatasetException"/> that names where it looked.
/// <list type="bullet">
/// <item>A directory that holds the data (LeRobot's <c>meta/info.json</c>, or RLDS/TFDS shards): itself.</item>
/// <item>A TFDS dataset root (<c>~/tensorflow_datasets/NAME</c>): its newest version folder (<c>1.0.0</c>, ... compared
/// as versions), or <see cref="Version"/>; with builder configs (<c>NAME/CONFIG/VERSION</c>) the only config, else an
/// error that lists them.</item>
/// <item>With <see cref="DataDir"/> (TFDS's data_dir): the argument is the dataset's name under it.</item>
/// <item>A LeRobot repo id ORG/NAME that is not a path here: <c>$HF_LEROBOT_HOME/ORG/NAME</c>, where LeRobot keeps it.</item>
/// </list>
/// </summary>
public sealed partial record DatasetLocator(string? DataDir = null, string? Version = null, HuggingFaceCache? Cache = null)
{
    public static DatasetLocator Default { get; } = new();

    [GeneratedRegex(@"^\d+\.\d+\.\d+$")]
    private static partial Regex VersionName();

    public string Resolve(string given)
    {
        string path = DataDir is null ? given : Path.Combine(DataDir, given);
        if (Directory.Exists(path)) return Tfds(path);
        if (DataDir is not null) throw new DatasetException($"dataset '{given}' is not in --data-dir {DataDir} (looked for {path})");
        if (HuggingFaceCache.TryParseRepoId(given, out var repoId, out var revision) && revision is null)
        {
            string local = Path.Combine((Cache ?? HuggingFaceCache.FromEnvironment()).LeRobotHome, repoId);
            if (Directory.Exists(local)) return Tfds(local);
            throw new DatasetException($"dataset directory not found: {given} (nor as a LeRobot repo id at {local}; nothing is downloaded)");
        }
        throw new DatasetException($"dataset directory not found: {given}");
    }

    /// <summary>The version folder of a TFDS root, or <paramref name="dir"/> itself when it holds data.</summary>
    string Tfds(string dir)
    {
        if (HoldsData(dir))
        {
            if (Version is not null && Path.GetFileName(Path.TrimEndingDirectorySeparator(dir)) != Version)
                throw new DatasetException($"--dataset-version {Version}: {dir} is a dataset itself, not a TFDS root with version folders");
            return dir;
        }
        var versions = VersionFolders(dir);
        if (versions.Count == 0)
        {
            // NAME/CONFIG/VERSION: builder configs, each with its versions.
            var configs = Directory.EnumerateDirectories(dir).Where(c => VersionFolders(c).Count > 0).Order(StringComparer.Ordinal).ToList();
            if (configs.Count == 1) return Tfds(configs[0]);
            if (configs.Count > 1)
                throw new DatasetException($"{dir} holds several TFDS configs ({string.Join(", ", configs.Select(Path.GetFileName))}): name one, e.g. {configs[0]}");
            return dir;   // not a TFDS root either: the format check says what is missing
        }
        if (Version is not null)
        {
            var chosen = versions.FirstOrDefault(v => Path.GetFileName(v) == Version)
                ?? throw new DatasetException($"{dir} has no version {Version} (it has {string.Join(", ", versions.Select(Path.GetFileName))})");
            return chosen;
        }
        return versions.MaxBy(v => System.Version.Parse(Path.GetFileName(v)))!;
    }

    List<string> VersionFolders(string dir) =>
        Directory.EnumerateDirectories(dir).Where(v => VersionName().IsMatch(Path.GetFileName(v)) && HoldsData(v)).ToList();

    static bool HoldsData(string dir) => File.Exists(Path.Combine(dir, "meta", "info.json")) || RldsSource.FindShards(dir).Count > 0;
}
