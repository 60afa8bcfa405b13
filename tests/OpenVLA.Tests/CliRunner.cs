using System.Diagnostics;

namespace OpenVLA.Tests;

/// <summary>Runs the `openvla` CLI (the built openvla.dll next to the test binaries) as a separate process.</summary>
public static class CliRunner
{
    public sealed record Result(int ExitCode, string Stdout, string Stderr);

    public static Result Run(params string[] args) => Run(new Dictionary<string, string>(), args);

    /// <summary>As <see cref="Run(string[])"/>, with these environment variables set for the child process only.</summary>
    public static Result Run(IReadOnlyDictionary<string, string> environment, params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var (k, v) in environment) psi.Environment[k] = v;
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "openvla.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(120_000)) { p.Kill(true); throw new TimeoutException($"openvla {string.Join(' ', args)} did not finish in 120 s"); }
        return new Result(p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>The user-error contract: exit code 2, one line on stderr that contains <paramref name="expected"/>, nothing on stdout.</summary>
    public static void AssertUserError(Result r, string expected)
    {
        Assert.Equal(2, r.ExitCode);
        Assert.Contains(expected, r.Stderr);
        Assert.Single(r.Stderr.Trim().Split('\n'));
        Assert.Equal("", r.Stdout);
    }
}
