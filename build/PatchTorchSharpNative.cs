// Makes TorchSharp-cpu 0.107.0's native wrapper load on systems whose libstdc++ predates GLIBCXX_3.4.32 (Debian 12).
//
// libLibTorchSharp.so was linked with GCC 13, whose <iostream> plants one undefined reference,
// _ZSt21ios_base_library_initv@GLIBCXX_3.4.32, only to force a dependency on the newer libstdc++; the function is never
// called (libc10/libtorch_cpu construct their own std::ios_base::Init). We change two fields of the ELF file:
//   * the .dynsym entry of that symbol becomes STB_WEAK, so an unresolved reference is left at 0 instead of failing;
//   * the Vernaux entry for GLIBCXX_3.4.32 in .gnu.version_r gets VER_FLG_WEAK, so the loader accepts the missing version.
// No compiler, no patchelf, no environment variable. Nothing is changed where the system libstdc++ already has the version.
// The file is rewritten through a temporary copy and a rename, so a hard-linked package cache is never modified.
using System;
using System.IO;
using System.Text;
using Microsoft.Build.Framework;
using Microsoft.Build.Utilities;

public sealed class PatchTorchSharpNative : Task
{
    [Required] public string NativeDirectory { get; set; } = "";

    const string Symbol = "_ZSt21ios_base_library_initv";
    const string Version = "GLIBCXX_3.4.32";

    public override bool Execute()
    {
        var target = Path.Combine(NativeDirectory, "libLibTorchSharp.so");
        if (!File.Exists(target)) return true;
        if (SystemLibStdCxxHas(Version))
        {
            Log.LogMessage(MessageImportance.Low, "libstdc++ provides " + Version + "; TorchSharp native left unchanged.");
            return true;
        }
        byte[] elf = File.ReadAllBytes(target);
        int changed;
        try { changed = Patch(elf); }
        catch (Exception e) { Log.LogError("cannot patch " + target + ": " + e.Message); return false; }
        if (changed == 0) return true;
        var tmp = target + ".patching";
        File.WriteAllBytes(tmp, elf);
        File.Delete(target);
        File.Move(tmp, target);
        Log.LogMessage(MessageImportance.Normal, "patched " + target + " for a libstdc++ without " + Version + " (" + changed + " fields)");
        return true;
    }

    static bool SystemLibStdCxxHas(string version)
    {
        foreach (var dir in new[] { "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib" })
        {
            var p = Path.Combine(dir, "libstdc++.so.6");
            if (!File.Exists(p)) continue;
            var bytes = File.ReadAllBytes(p);
            var needle = Encoding.ASCII.GetBytes(version + "\0");
            return IndexOf(bytes, needle) >= 0;
        }
        return false; // no system libstdc++ found: patching is harmless, the symbol is never called
    }

    // Returns how many fields were changed (0 when the file is already patched or has nothing to patch).
    public static int Patch(byte[] f)
    {
        if (f.Length < 64 || f[0] != 0x7f || f[1] != (byte)'E' || f[2] != (byte)'L' || f[3] != (byte)'F' || f[4] != 2 || f[5] != 1)
            throw new InvalidDataException("not a little-endian ELF64 file");
        long shoff = (long)BitConverter.ToUInt64(f, 0x28);
        int shentsize = BitConverter.ToUInt16(f, 0x3A), shnum = BitConverter.ToUInt16(f, 0x3C);
        int changed = 0;
        for (int i = 0; i < shnum; i++)
        {
            long sh = shoff + (long)i * shentsize;
            uint type = BitConverter.ToUInt32(f, (int)sh + 4);
            long off = (long)BitConverter.ToUInt64(f, (int)sh + 0x18);
            long size = (long)BitConverter.ToUInt64(f, (int)sh + 0x20);
            int link = (int)BitConverter.ToUInt32(f, (int)sh + 0x28);
            int info = (int)BitConverter.ToUInt32(f, (int)sh + 0x2C);
            long strOff = (long)BitConverter.ToUInt64(f, (int)(shoff + (long)link * shentsize) + 0x18);
            if (type == 11) // SHT_DYNSYM
            {
                for (long e = off; e + 24 <= off + size; e += 24)
                {
                    if (CString(f, strOff + BitConverter.ToUInt32(f, (int)e)) != Symbol) continue;
                    byte stInfo = f[e + 4];
                    if ((stInfo >> 4) != 2) { f[e + 4] = (byte)((2 << 4) | (stInfo & 0xF)); changed++; }
                }
            }
            else if (type == 0x6ffffffe) // SHT_GNU_verneed
            {
                long vn = off;
                for (int n = 0; n < info; n++)
                {
                    int cnt = BitConverter.ToUInt16(f, (int)vn + 2);
                    long aux = vn + BitConverter.ToUInt32(f, (int)vn + 8);
                    for (int a = 0; a < cnt; a++)
                    {
                        if (CString(f, strOff + BitConverter.ToUInt32(f, (int)aux + 8)) == Version)
                        {
                            ushort flags = BitConverter.ToUInt16(f, (int)aux + 4);
                            if ((flags & 0x2) == 0) { f[aux + 4] = (byte)(f[aux + 4] | 0x2); changed++; }
                        }
                        aux += BitConverter.ToUInt32(f, (int)aux + 12);
                    }
                    uint next = BitConverter.ToUInt32(f, (int)vn + 12);
                    if (next == 0) break;
                    vn += next;
                }
            }
        }
        return changed;
    }

    static int IndexOf(byte[] hay, byte[] needle)
    {
        for (int i = 0; i + needle.Length <= hay.Length; i++)
        {
            if (hay[i] != needle[0]) continue;
            int k = 1;
            while (k < needle.Length && hay[i + k] == needle[k]) k++;
            if (k == needle.Length) return i;
        }
        return -1;
    }

    static string CString(byte[] f, long at)
    {
        int end = (int)at;
        while (f[end] != 0) end++;
        return Encoding.ASCII.GetString(f, (int)at, end - (int)at);
    }
}
