namespace OpenVLA.Cli;

/// <summary>Resident memory of this process from /proc (Linux): current, peak since the last reset.</summary>
internal static class ProcessMemory
{
    public static long CurrentRss() => Field("VmRSS:");
    public static long PeakRss() => Field("VmHWM:");

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "mallopt")]
    static extern int MallOpt(int param, int value);

    /// <summary>
    /// Fixes glibc's mmap threshold at 128 KiB. By default glibc raises it after large blocks are freed, so the activations
    /// of later steps come from the heap and stay resident after they are freed (fragmentation: +300 MiB on the mini
    /// preset, more than its checkpointed activations). With a fixed threshold, tensors of 128 KiB and more are mapped and
    /// returned to the system when freed, so resident memory tracks live tensors.
    /// </summary>
    public static void LimitHeapFragmentation()
    {
        if (!OperatingSystem.IsLinux()) return;
        const int M_MMAP_THRESHOLD = -3;
        try { MallOpt(M_MMAP_THRESHOLD, 128 * 1024); } catch (DllNotFoundException) { } catch (EntryPointNotFoundException) { }
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
