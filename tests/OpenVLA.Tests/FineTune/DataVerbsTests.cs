using System.Diagnostics;
using System.Text.Json;
using OpenVLA.FineTune.Data;

namespace OpenVLA.Tests.FineTune;

public class DataVerbsTests
{
    private static (int Code, string Stdout, string Stderr) Openvla(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "openvla.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        p.WaitForExit();
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    [Fact]
    public void Stats_writes_dataset_statistics_json_and_inspect_describes_the_dataset()
    {
        using var dir = new TempDir();
        string data = dir["sim_pick"];
        TestDatasets.WriteLeRobot(data, [3, 2]);

        var (code, _, stderr) = Openvla("dataset", "stats", "--path", data, "--out", dir["run"] + "/");
        Assert.True(code == 0, stderr);
        var stats = DatasetStatistics.Load(dir["run/dataset_statistics.json"])["sim_pick"];
        Assert.Equal(5, stats.NumTransitions);
        Assert.Equal(2, stats.NumTrajectories);

        (code, var stdout, stderr) = Openvla("dataset", "inspect", "--path", data, "--json");
        Assert.True(code == 0, stderr);
        using var doc = JsonDocument.Parse(stdout);
        Assert.Equal("lerobot", doc.RootElement.GetProperty("format").GetString());
        Assert.Equal(5, doc.RootElement.GetProperty("steps").GetInt32());
        Assert.Equal("6x4", doc.RootElement.GetProperty("first_episodes")[0].GetProperty("frame_sizes")[0].GetString());
    }

    [Fact]
    public void A_dataset_error_is_one_line_and_exit_code_2()
    {
        using var dir = new TempDir();
        var (code, stdout, stderr) = Openvla("dataset", "stats", "--path", dir.Path);
        Assert.Equal(2, code);
        Assert.Equal("", stdout);
        Assert.Equal($"openvla: unknown dataset layout in {dir.Path}: expected meta/info.json (LeRobot v2.1) or *.tfrecord* shards (RLDS/TFDS)", stderr.Trim());
    }
}
