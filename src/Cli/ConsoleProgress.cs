namespace OpenVLA.Cli;

/// <summary>A one-line progress bar on stderr (redrawn in place on a terminal, a line every 10% otherwise).</summary>
internal sealed class ConsoleProgress(string label) : IProgress<double>, IDisposable
{
    readonly System.Diagnostics.Stopwatch _clock = System.Diagnostics.Stopwatch.StartNew();
    int _lastDrawn = -1;

    public void Report(double fraction)
    {
        int pct = (int)Math.Clamp(fraction * 100, 0, 100);
        bool tty = !Console.IsErrorRedirected;
        if (pct == _lastDrawn || (!tty && pct / 10 == _lastDrawn / 10 && pct != 100)) return;
        _lastDrawn = pct;
        double elapsed = _clock.Elapsed.TotalSeconds;
        string eta = fraction > 0.01 ? $"ETA {TimeSpan.FromSeconds(elapsed / fraction - elapsed):mm\\:ss}" : "";
        string bar = new string('#', pct / 4).PadRight(25, '.');
        string line = $"{label} [{bar}] {pct,3}% {TimeSpan.FromSeconds(elapsed):mm\\:ss} {eta}";
        if (tty) Console.Error.Write("\r" + line);
        else Console.Error.WriteLine(line);
    }

    public void Dispose()
    {
        if (!Console.IsErrorRedirected && _lastDrawn >= 0) Console.Error.WriteLine();
    }
}
