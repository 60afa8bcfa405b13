using OpenVLA.Policy.Checkpoint;

namespace OpenVLA.Cli;

/// <summary>
/// The embedded default policy: `models/openvla-small-tabletop`, a small model of the OpenVLA architecture trained on the
/// tabletop simulation suite by `scripts/train-default-model`, committed to the repository and copied next to the build.
/// `serve`, `predict`, `eval` and `demo` use it when no checkpoint is given.
/// </summary>
internal static class DefaultModel
{
    public const string Name = "openvla-small-tabletop";

    public static string Directory => Path.Combine(AppContext.BaseDirectory, "models", Name);

    /// <summary><paramref name="given"/> when set (a directory, or ORG/NAME[@REVISION] in the Hugging Face cache:
    /// <see cref="HuggingFaceCache.ResolveModel"/>), else the default model (saying so on stderr).</summary>
    public static string Resolve(string? given, string flag = "--checkpoint")
    {
        if (given is not null) return HuggingFaceCache.FromEnvironment().ResolveModel(given);
        if (!File.Exists(Path.Combine(Directory, "config.json")))
            throw new UsageException($"the default model is missing from this build ({Directory}): pass {flag}");
        Console.Error.WriteLine($"openvla: no {flag} given: using the default model {Name} (trained on the tabletop suite)");
        return Directory;
    }
}
