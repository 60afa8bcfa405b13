using System.Diagnostics;

namespace OpenVLA.Tests.Simulation;

/// <summary>The simulation verbs reject bad input with one line on stderr and exit code 2, before doing any work.</summary>
[Collection("MuJoCo")]
public sealed class SimulationCliTests
{
    private static (int Code, string Stdout, string Stderr) Cli(params string[] args)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false, WorkingDirectory = TestPaths.RepoRoot };
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "openvla.dll"));
        foreach (var a in args) start.ArgumentList.Add(a);
        using var p = Process.Start(start)!;
        string stdout = p.StandardOutput.ReadToEnd(), stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, stdout, stderr);
    }

    [Theory]
    [InlineData("--policy 'foo' is not one of", "eval", "--policy", "foo")]
    [InlineData("unknown tabletop task 'fly'", "demos", "--tasks", "fly", "--episodes-per-task", "1", "--out", "/tmp/openvla-never-written")]
    [InlineData("--suite 'libero' is unknown", "eval", "--suite", "libero", "--policy", "scripted")]
    [InlineData("--noise must be 0..0.05", "demos", "--noise", "0.5", "--episodes-per-task", "1", "--out", "/tmp/openvla-never-written")]
    [InlineData("the expert already drives demos", "demos", "--policy", "scripted", "--episodes-per-task", "1", "--out", "/tmp/openvla-never-written")]
    [InlineData("with --policy the learned policy drives", "demos", "--policy", "checkpoint:tests/fixtures/openvla-golden/checkpoint", "--noise", "0.005",
        "--episodes-per-task", "1", "--out", "/tmp/openvla-never-written")]
    [InlineData("--decode applies to --policy checkpoint:DIR", "demos", "--decode", "sample", "--episodes-per-task", "1", "--out", "/tmp/openvla-never-written")]
    public void Bad_input_is_one_line_and_exit_code_2(string expected, params string[] args)
    {
        var (code, stdout, stderr) = Cli(args);
        Assert.Equal(2, code);
        Assert.Equal("", stdout);
        Assert.Contains(expected, stderr);
        Assert.Single(stderr.Trim().Split('\n'));
        Assert.False(Directory.Exists("/tmp/openvla-never-written"));
    }
}
