namespace OpenVLA.Cli;

/// <summary>Resident memory of this process from /proc (Linux): current, peak since the last reset.</summary>
internal static class ProcessMemory
{
    public static long CurrentRss() => Field("VmRSS:");
    public static long PeakRss() => Field("VmHWM:");

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "mallopt")]
    static extern int MallOpt(int param, int value);

    /// <summary>Blocks from this size up are mapped on their own and unmapped when freed.</summary>
    public const int MmapThreshold = 32 << 20;

    /// <summary>
    /// Fixes glibc's mmap threshold at <see cref="MmapThreshold"/> (32 MiB, the most glibc's own dynamic threshold rises
    /// to on 64-bit). Left dynamic, the threshold follows the largest block freed so far, and the activations of later
    /// steps come from the heap and stay resident after they are freed (fragmentation). It was 128 KiB until
    /// 2026-12-02: every tensor from 128 KiB up was then a fresh mapping whose pages the kernel faults in and zeroes at
    /// each use, which made the default model's OFT fine-tune 4× slower (7.5 against 30.1 samples/s, 87 s of 127 s in
    /// the kernel; AMD EPYC Zen 5, 2 cores) for 0.7 GB less peak RSS. Large weights and the 7B model's activations are
    /// above 32 MiB and are still returned to the system when freed.
    /// </summary>
    public static void LimitHeapFragmentation()
    {
        if (!OperatingSystem.IsLinux()) return;
        const int M_MMAP_THRESHOLD = -3;
        try { MallOpt(M_MMAP_THRESHOLD, MmapThreshold); } catch (DllNotFoundException) { } catch (EntryPointNotFoundException) { }
    }

    /// <summary>Resets the peak (VmHWM) to the current RSS, so a later <see cref="PeakRss"/> measures one phase.</summary>
    public static void ResetPeak()
    {
        try { File.WriteAllText("/proc/self/clear_refs", "5"); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    static long Field(string name)
    {
        if (!File.Exists("/proc/self/status")) return 0;
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith(name)) return long.Parse(line[name.Length..].Trim().Split(' ')[0]) * 1024;
        return 0;
    }
}
