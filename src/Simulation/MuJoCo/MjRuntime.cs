using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace OpenVLA.Simulation.MuJoCo;

/// <summary>Thrown when the MuJoCo library is missing, of the wrong version, or rejects a model.</summary>
public sealed class SimulationException(string message) : Exception(message);

/// <summary>
/// Process-wide MuJoCo set-up, done once before the first model loads: the library is found, its version matches the
/// headers our offsets were generated from, and MuJoCo's error/warning hooks point to us.
/// </summary>
public static unsafe class MjRuntime
{
    private static readonly object Gate = new();
    private static bool _ready;
    private static int _warnings;

    /// <summary>MuJoCo warnings seen by this process (e.g. unstable simulation, contact buffer full).</summary>
    public static int WarningCount => Volatile.Read(ref _warnings);

    public static string Version { get; private set; } = "";

    public static void EnsureInitialized()
    {
        lock (Gate)
        {
            if (_ready) return;
            IntPtr lib;
            try { lib = NativeLibrary.Load(MjNative.Lib); }
            catch (DllNotFoundException e)
            {
                throw new SimulationException($"MuJoCo 2.2.2 is not installed ({MjNative.Lib} not found: apt-get install libmujoco2.2.2): {e.Message}");
            }
            int version = MjNative.mj_version();
            if (version != MjOff.HeaderVersion)
                throw new SimulationException(
                    $"MuJoCo library version {version} does not match the headers the struct offsets were generated from ({MjOff.HeaderVersion})");
            Version = Marshal.PtrToStringUTF8(MjNative.mj_versionString()) ?? version.ToString();

            // MuJoCo's default error handler waits for Enter and exits; and if a user handler returns, 2.2.2 carries on in an
            // undefined state (mujoco-headless.md, Pitfalls). Ours reports and ends the process at once. Rollouts run in
            // worker processes, so the parent sees a crashed worker and retries its episodes.
            *(delegate* unmanaged[Cdecl]<byte*, void>*)NativeLibrary.GetExport(lib, "mju_user_error") = &OnError;
            *(delegate* unmanaged[Cdecl]<byte*, void>*)NativeLibrary.GetExport(lib, "mju_user_warning") = &OnWarning;
            _ready = true;
        }
    }

    /// <summary>Raises a MuJoCo fatal error through the library itself (what a corrupt model or exhausted stack does):
    /// used to check, in a throw-away worker process, that the process ends at once with the message.</summary>
    public static void RaiseFatalErrorForTest(string message)
    {
        EnsureInitialized();
        MjNative.mju_error(message);
    }

    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static void OnError(byte* message)
    {
        string text = Marshal.PtrToStringUTF8((IntPtr)message) ?? "(no message)";
        try { Console.Error.WriteLine($"openvla: MuJoCo fatal error: {text}"); Console.Error.Flush(); } catch { }
        Environment.FailFast($"MuJoCo fatal error: {text}");
    }

    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static void OnWarning(byte* message)
    {
        if (Interlocked.Increment(ref _warnings) <= 5)
        {
            string text = Marshal.PtrToStringUTF8((IntPtr)message) ?? "";
            try { Console.Error.WriteLine($"openvla: MuJoCo warning: {text}"); } catch { }
        }
    }
}
