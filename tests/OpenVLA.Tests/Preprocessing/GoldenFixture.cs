namespace OpenVLA.Tests.Preprocessing;

/// <summary>The golden fixture committed under tests/fixtures/openvla-golden.</summary>
internal static class GoldenFixture
{
    public static string Directory { get; } = TestPaths.Fixture("openvla-golden");

    public static string File(string relative) => Path.Combine(Directory, relative);
}
