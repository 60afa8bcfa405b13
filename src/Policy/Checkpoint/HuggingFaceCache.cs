namespace OpenVLA.Policy.Checkpoint;

/// <summary>
/// Where the Hugging Face tools keep what they downloaded, read offline: nothing is ever fetched. The locations follow
/// huggingface_hub's constants: <c>HF_HOME</c> (default <c>$XDG_CACHE_HOME/huggingface</c>, else
/// <c>~/.cache/huggingface</c>); the hub cache <c>HF_HUB_CACHE</c> (legacy <c>HUGGINGFACE_HUB_CACHE</c>, default
/// <c>$HF_HOME/hub</c>); LeRobot's datasets <c>HF_LEROBOT_HOME</c> (default <c>$HF_HOME/lerobot</c>).
/// </summary>
/// <remarks>
/// A model in the hub cache is <c>models--ORG--NAME/</c> with <c>refs/&lt;branch or tag&gt;</c> files holding a commit
/// hash, <c>snapshots/&lt;commit&gt;/</c> whose files are symlinks into <c>blobs/</c>. Reading a snapshot's files follows
/// the symlinks, so a snapshot directory is an ordinary checkpoint directory.
/// </remarks>
public sealed class HuggingFaceCache(Func<string, string?> environment)
{
    /// <summary>The locations this process's environment names.</summary>
    public static HuggingFaceCache FromEnvironment() => new(System.Environment.GetEnvironmentVariable);

    public string Home => Nonempty("HF_HOME") ?? Path.Combine(Nonempty("XDG_CACHE_HOME") ?? Path.Combine(UserHome, ".cache"), "huggingface");
    public string HubCache => Nonempty("HF_HUB_CACHE") ?? Nonempty("HUGGINGFACE_HUB_CACHE") ?? Path.Combine(Home, "hub");
    public string LeRobotHome => Nonempty("HF_LEROBOT_HOME") ?? Path.Combine(Home, "lerobot");

    string UserHome => Nonempty("HOME") ?? System.Environment.GetFolderPath(System.Environment.SpecialFolder.UserProfile);
    string? Nonempty(string name) => environment(name) is { Length: > 0 } v ? v : null;

    /// <summary>
    /// ORG/NAME (a Hugging Face repo id: two parts, letters, digits, '-', '_', '.'), optionally @REVISION. A path that
    /// exists is never read as a repo id.
    /// </summary>
    public static bool TryParseRepoId(string text, out string repoId, out string? revision)
    {
        repoId = text;
        revision = null;
        int at = text.IndexOf('@');
        if (at >= 0)
        {
            repoId = text[..at];
            revision = text[(at + 1)..];
            // A branch, tag (refs/ may nest them, as pr/3) or commit: never a path out of the repo's folder.
            if (revision.Length == 0 || revision.StartsWith('/') || revision.Split('/').Any(p => p is "" or "." or "..")
                || !revision.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.' or '/')) return false;
        }
        var parts = repoId.Split('/');
        return parts.Length == 2 && parts.All(p => p.Length > 0 && p != "." && p != ".." && p.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.'));
    }

    /// <summary>
    /// A checkpoint argument: an existing directory as is; else ORG/NAME[@REVISION] found in the hub cache (the snapshot
    /// that <c>refs/main</c>, or the branch, tag or commit REVISION, names). Anything else is a one-line error that
    /// says where it looked.
    /// </summary>
    public string ResolveModel(string given)
    {
        if (Directory.Exists(given)) return given;
        if (!TryParseRepoId(given, out var repoId, out var revision))
            throw new CheckpointException($"checkpoint directory '{given}' does not exist (and it is not a Hugging Face repo id ORG/NAME[@REVISION])");
        string repo = Path.Combine(HubCache, "models--" + repoId.Replace("/", "--"));
        if (!Directory.Exists(repo))
            throw new CheckpointException($"{repoId} is not a directory here and not in the Hugging Face cache (looked for {repo}; nothing is downloaded: fetch it with `hf download {repoId}` or pass a directory)");
        string rev = revision ?? "main";
        string refFile = Path.Combine(repo, "refs", rev);
        string commit;
        if (File.Exists(refFile))
        {
            commit = File.ReadAllText(refFile).Trim();
            if (commit.Length == 0 || commit.Contains('/') || commit.Contains('\\') || commit.Contains(".."))
                throw new CheckpointException($"{refFile} does not hold a commit hash");
        }
        else if (revision is not null && !revision.Contains('/') && Directory.Exists(Path.Combine(repo, "snapshots", revision))) commit = revision;
        else
        {
            var known = Directory.Exists(Path.Combine(repo, "refs"))
                ? Directory.EnumerateFiles(Path.Combine(repo, "refs"), "*", SearchOption.AllDirectories).Select(f => Path.GetRelativePath(Path.Combine(repo, "refs"), f)).Order().ToList()
                : [];
            throw new CheckpointException($"{repoId}: revision '{rev}' is not in the cache (looked for {refFile}{(revision is null ? "" : $" and snapshots/{revision}")}; cached refs: {(known.Count == 0 ? "none" : string.Join(", ", known))})");
        }
        string snapshot = Path.Combine(repo, "snapshots", commit);
        if (!Directory.Exists(snapshot))
            throw new CheckpointException($"{repoId}@{rev}: {refFile} names commit {commit}, whose snapshot {snapshot} is missing (an interrupted download?)");
        return snapshot;
    }
}
