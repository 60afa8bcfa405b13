namespace OpenVLA.Tests.Preprocessing;

/// <summary>Finds <c>shared/fixtures/openvla-golden</c>: the repository's sibling <c>shared/</c> folder (as CI lays it out) or an ancestor's.</summary>
internal static class GoldenFixture
{
    public static string Directory { get; } = Find();

    public static string File(string relative) => Path.Combine(Directory, relative);

    private static string Find()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, "shared", "fixtures", "openvla-golden");
            if (System.IO.Directory.Exists(candidate)) return candidate;
        }
        throw new DirectoryNotFoundException($"shared/fixtures/openvla-golden not found above {AppContext.BaseDirectory}");
    }
}
