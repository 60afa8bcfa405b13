using System.Diagnostics;

namespace OpenVLA.Simulation;

/// <summary>A one-line progress bar on stderr; when stderr is not a terminal it prints a line every 10% instead.</summary>
public sealed class ProgressBar(string label, int total, string unit)
{
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private readonly bool _interactive = !Console.IsErrorRedirected;
    private readonly object _gate = new();
    private int _done, _lastDecile = -1;

    public void Advance(string? note = null)
    {
        lock (_gate)
        {
            _done++;
            double rate = _done / Math.Max(_clock.Elapsed.TotalSeconds, 1e-9);
            double eta = (total - _done) / Math.Max(rate, 1e-9);
            string text = $"{label} {_done}/{total} {unit} | {rate * 60:F1}/min | ETA {TimeSpan.FromSeconds(Math.Round(eta)):mm\\:ss}" +
                          (note is null ? "" : $" | {note}");
            if (_interactive)
            {
                int width = 24, filled = total == 0 ? width : width * _done / total;
                Console.Error.Write($"\r[{new string('#', filled)}{new string('.', width - filled)}] {text}   ");
                if (_done == total) Console.Error.WriteLine();
            }
            else
            {
                int decile = total == 0 ? 10 : 10 * _done / total;
                if (decile != _lastDecile) { _lastDecile = decile; Console.Error.WriteLine(text); }
            }
        }
    }
}
