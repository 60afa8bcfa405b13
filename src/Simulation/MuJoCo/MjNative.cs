using System.Runtime.InteropServices;

namespace OpenVLA.Simulation.MuJoCo;

/// <summary>The C API of Debian's libmujoco 2.2.2, used through opaque pointers (mjModel*, mjData*) and generated offsets.</summary>
internal static unsafe partial class MjNative
{
    // The versioned name: the unversioned libmujoco.so symlink exists only with libmujoco-dev.
    public const string Lib = "libmujoco.so.2.2.2";

    [StructLayout(LayoutKind.Sequential)]
    public struct MjrRect { public int Left, Bottom, Width, Height; }

    [LibraryImport(Lib)] public static partial int mj_version();
    [LibraryImport(Lib)] public static partial IntPtr mj_versionString();
    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    public static partial IntPtr mj_loadXML(string filename, IntPtr vfs, byte* error, int errorSize);
    [LibraryImport(Lib)] public static partial void mj_deleteModel(IntPtr m);
    [LibraryImport(Lib)] public static partial IntPtr mj_makeData(IntPtr m);
    [LibraryImport(Lib)] public static partial void mj_deleteData(IntPtr d);
    [LibraryImport(Lib)] public static partial IntPtr mj_copyData(IntPtr dest, IntPtr m, IntPtr src);
    [LibraryImport(Lib)] public static partial void mj_resetData(IntPtr m, IntPtr d);
    [LibraryImport(Lib)] public static partial void mj_step(IntPtr m, IntPtr d);
    [LibraryImport(Lib)] public static partial void mj_forward(IntPtr m, IntPtr d);
    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int mj_name2id(IntPtr m, int type, string name);

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)] public static partial void mju_error(string message);

    [LibraryImport(Lib)] public static partial void mjv_defaultScene(IntPtr scn);
    [LibraryImport(Lib)] public static partial void mjv_makeScene(IntPtr m, IntPtr scn, int maxgeom);
    [LibraryImport(Lib)] public static partial void mjv_freeScene(IntPtr scn);
    [LibraryImport(Lib)] public static partial void mjv_defaultCamera(IntPtr cam);
    [LibraryImport(Lib)] public static partial void mjv_defaultOption(IntPtr opt);
    [LibraryImport(Lib)]
    public static partial void mjv_updateScene(IntPtr m, IntPtr d, IntPtr opt, IntPtr pert, IntPtr cam, int catmask, IntPtr scn);
    [LibraryImport(Lib)] public static partial void mjr_defaultContext(IntPtr con);
    [LibraryImport(Lib)] public static partial void mjr_makeContext(IntPtr m, IntPtr con, int fontscale);
    [LibraryImport(Lib)] public static partial void mjr_freeContext(IntPtr con);
    [LibraryImport(Lib)] public static partial void mjr_setBuffer(int framebuffer, IntPtr con);
    [LibraryImport(Lib)] public static partial void mjr_render(MjrRect viewport, IntPtr scn, IntPtr con);
    [LibraryImport(Lib)] public static partial void mjr_readPixels(byte* rgb, float* depth, MjrRect viewport, IntPtr con);
}
