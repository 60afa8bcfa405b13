using OpenVLA.FineTune.Training;

namespace OpenVLA.Cli;

/// <summary>The training progress line on stderr: step, loss, action accuracy, L1, samples/s and ETA; redrawn in place on
/// a terminal, one line per <paramref name="everySteps"/> steps otherwise. Evaluations print on their own line.</summary>
internal sealed class TrainingProgress(long totalSteps, int everySteps) : IDisposable
{
    readonly bool _tty = !Console.IsErrorRedirected;
    bool _drawn;
    int _lastLength;

    public void Report(StepMetrics m)
    {
        if (!_tty && m.Step % everySteps != 0 && m.Step != totalSteps) return;
        double fraction = (double)m.Step / totalSteps;
        int filled = (int)Math.Round(20 * Math.Clamp(fraction, 0, 1));
        double etaSeconds = m.SamplesPerSecond > 0 ? m.ElapsedSeconds / Math.Max(fraction, 1e-9) * (1 - fraction) : 0;
        string line = $"step {m.Step}/{totalSteps} [{new string('#', filled).PadRight(20, '.')}] loss {m.Loss:0.0000} " +
                      (double.IsFinite(m.ActionAccuracy) ? $"acc {m.ActionAccuracy:0.000} " : "") + $"L1 {m.L1:0.0000}" + (double.IsFinite(m.AuxLoss) ? $" aux {m.AuxLoss:0.0000}" : "") +
                      $" lr {m.LearningRate:0.##e+0} | {m.SamplesPerSecond:0.0} samples/s | " +
                      $"ETA {Format(etaSeconds)}";
        if (_tty)
        {
            // Pad to the previous line's length so a shorter line leaves no remnants.
            Console.Error.Write("\r" + line.PadRight(_lastLength));
            _lastLength = line.Length;
            _drawn = true;
        }
        else Console.Error.WriteLine(line);
    }

    public void Note(string text)
    {
        if (_drawn) { Console.Error.WriteLine(); _drawn = false; _lastLength = 0; }
        Console.Error.WriteLine(text);
    }

    public static string Format(double seconds) =>
        seconds >= 3600 ? $"{(int)(seconds / 3600)}h{(int)(seconds % 3600 / 60):00}m" : $"{(int)(seconds / 60):00}:{(int)(seconds % 60):00}";

    public void Dispose()
    {
        if (_drawn) Console.Error.WriteLine();
    }
}
