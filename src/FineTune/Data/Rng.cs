namespace OpenVLA.FineTune.Data;

/// <summary>
/// A small deterministic random generator (SplitMix64) whose whole state is one ulong, so a data cursor can store it and a
/// resumed run draws the same numbers. System.Random is avoided because its sequence is not part of .NET's contract.
/// </summary>
public sealed class Rng(ulong state)
{
    public ulong State { get; private set; } = state;

    /// <summary>A generator for one (seed, stream, index) triple, independent of how many numbers other streams drew.</summary>
    public static Rng For(ulong seed, ulong stream, ulong index) => new(Mix(Mix(seed ^ 0x6A09E667F3BCC909UL) ^ stream) ^ Mix(index + 0x9E3779B97F4A7C15UL));

    public ulong NextUInt64()
    {
        State += 0x9E3779B97F4A7C15UL;
        return Mix(State);
    }

    /// <summary>Uniform in [0, 1) with 53 random bits.</summary>
    public double NextDouble() => (NextUInt64() >> 11) * (1.0 / (1UL << 53));

    /// <summary>Uniform in [low, high).</summary>
    public double Uniform(double low, double high) => low + (high - low) * NextDouble();

    /// <summary>Uniform integer in [0, n), without modulo bias.</summary>
    public int NextInt(int n)
    {
        if (n <= 0) throw new ArgumentOutOfRangeException(nameof(n), n, "must be positive");
        ulong bound = (ulong)n, limit = ulong.MaxValue - ulong.MaxValue % bound;
        ulong x;
        do x = NextUInt64(); while (x >= limit);
        return (int)(x % bound);
    }

    /// <summary>Fisher-Yates shuffle in place.</summary>
    public void Shuffle<T>(IList<T> items)
    {
        for (int i = items.Count - 1; i > 0; i--)
        {
            int j = NextInt(i + 1);
            (items[i], items[j]) = (items[j], items[i]);
        }
    }

    private static ulong Mix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
