using System.Diagnostics;
using System.Text.Json.Nodes;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Tests.FineTune;
using TorchSharp;

namespace OpenVLA.Tests.FineTune.Training;

/// <summary>
/// `finetune` survives kill -9 at any moment: killed while a checkpoint is being written and again in the middle of a
/// step, `--resume` continues from the last complete checkpoint, says it ignores the half-written one, and every step's
/// loss and gradient norm equal those of a run that was never interrupted.
/// </summary>
public class KillResumeTests
{
    static string[] Args(TestPaths.TempDir tmp, string run) =>
        ["finetune", "--base", tmp["base"], "--dataset", tmp["data"], "--out", tmp[run], "--dtype", "f32", "--full", "--lr", "3e-3",
         "--batch-size", "4", "--save-steps", "2", "--keep-checkpoints", "100", "--shuffle-buffer", "32", "--threads", "1", "--max-steps", "16"];

    /// <summary>Starts the CLI and kills it (SIGKILL, no chance to clean up) the moment <paramref name="when"/> holds.</summary>
    static (bool Killed, string Stderr) RunAndKill(string[] args, Func<bool> when)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "openvla.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var process = Process.Start(psi)!;
        var stderr = process.StandardError.ReadToEndAsync();
        _ = process.StandardOutput.ReadToEndAsync();
        var clock = Stopwatch.StartNew();
        bool killed = false;
        while (!process.HasExited && clock.Elapsed < TimeSpan.FromSeconds(120))
        {
            bool due;
            try { due = when(); }
            catch (IOException) { due = false; }            // a directory renamed under the enumeration
            if (due)
            {
                process.Kill(entireProcessTree: true);      // SIGKILL
                killed = true;
                break;
            }
        }
        process.WaitForExit();
        return (killed, stderr.Result);
    }

    static bool Saving(string run) => Directory.Exists(run) && Directory.EnumerateDirectories(run, "step-*.tmp").Any();

    static int Complete(string run) => OpenVLA.FineTune.Training.Trainer.Checkpoints(run).Count;

    static List<(double Loss, double GradNorm)> TrainLog(string run) =>
        File.ReadAllLines(Path.Combine(run, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!)
            .Where(e => e["split"]!.GetValue<string>() == "train")
            .Select(e => (e["loss"]!.GetValue<double>(), e["grad_norm"]!.GetValue<double>())).ToList();

    [Fact]
    public void Killed_during_a_save_and_during_a_step_it_resumes_bit_identically()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["base"], "tiny", 3, torch.ScalarType.Float32);
        TestDatasets.WriteLeRobot(tmp["data"], [9, 9, 9, 9, 9, 9, 9, 9]);
        var straight = CliRunner.Run(Args(tmp, "a"));
        Assert.True(straight.ExitCode == 0, straight.Stderr);
        string run = tmp["b"];

        // 1. Killed while a checkpoint is being written (one complete checkpoint exists already).
        var (killedInSave, _) = RunAndKill(Args(tmp, "b"), () => Complete(run) >= 1 && Saving(run));
        Assert.True(killedInSave, "the run finished before a save could be interrupted");
        int before = Complete(run);
        if (!Saving(run))
        {
            // The kill landed a moment after the save's rename (a tiny model saves in milliseconds): leave what a kill
            // inside the save leaves, the next step's temporary directory with the weights written and no training state.
            string latest = OpenVLA.FineTune.Training.Trainer.LatestCheckpoint(run)!;
            int next = int.Parse(Path.GetFileName(latest)["step-".Length..]) + 2;
            string half = Path.Combine(run, OpenVLA.FineTune.Training.Trainer.CheckpointName(next) + ".tmp");
            Directory.CreateDirectory(half);
            foreach (var file in Directory.EnumerateFiles(Path.Combine(latest, "model"))) File.Copy(file, Path.Combine(half, Path.GetFileName(file)));
        }

        // 2. Resumed, then killed in the middle of a step: after its next complete checkpoint, while no save is running.
        var (killedInStep, resumedLog) = RunAndKill([.. Args(tmp, "b"), "--resume"], () => Complete(run) > before && !Saving(run));
        Assert.True(killedInStep, "the resumed run finished before it could be killed mid-step");
        Assert.Contains(".tmp, a save that was interrupted; resuming from step-", resumedLog);

        // 3. Resumed to the end.
        var last = CliRunner.Run([.. Args(tmp, "b"), "--resume"]);
        Assert.True(last.ExitCode == 0, last.Stderr);

        var a = TrainLog(tmp["a"]);
        Assert.Equal(16, a.Count);
        Assert.Equal(a, TrainLog(run));
        Assert.False(Saving(run));
    }
}
