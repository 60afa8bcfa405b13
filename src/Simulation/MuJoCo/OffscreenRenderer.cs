using System.Runtime.InteropServices;

namespace OpenVLA.Simulation.MuJoCo;

/// <summary>Render quality switches. Defaults are the fast CPU settings of mujoco-headless.md (no shadows, no reflections).</summary>
public sealed record RenderSettings(bool Shadows = false, bool Reflections = false);

/// <summary>
/// Offscreen RGB rendering of a model's fixed cameras through EGL surfaceless + Mesa llvmpipe (no display, no GPU).
/// A GL context is current on one thread only, so an instance must be created and used on the same thread.
/// </summary>
public sealed unsafe class OffscreenRenderer : IDisposable
{
    private readonly MjModel _model;
    private readonly IntPtr _scene, _camera, _option, _context;
    private readonly int _threadId;
    private readonly byte[] _flipBuffer;
    private bool _disposed;

    public int Width { get; }
    public int Height { get; }

    /// <summary>The model's offscreen buffer must be at least this size (MJCF &lt;visual&gt;&lt;global offwidth offheight&gt;).</summary>
    public OffscreenRenderer(MjModel model, int width, int height, RenderSettings? settings = null)
    {
        settings ??= new RenderSettings();
        _model = model;
        Width = width;
        Height = height;
        _threadId = Environment.CurrentManagedThreadId;
        Egl.MakeContextCurrentOnThisThread();

        _scene = Marshal.AllocHGlobal(MjOff.sizeof_mjvScene);
        _camera = Marshal.AllocHGlobal(MjOff.sizeof_mjvCamera);
        _option = Marshal.AllocHGlobal(MjOff.sizeof_mjvOption);
        _context = Marshal.AllocHGlobal(MjOff.sizeof_mjrContext);
        MjNative.mjv_defaultScene(_scene);
        MjNative.mjv_defaultCamera(_camera);
        MjNative.mjv_defaultOption(_option);
        MjNative.mjr_defaultContext(_context);
        MjNative.mjv_makeScene(model.Ptr, _scene, 500);
        MjNative.mjr_makeContext(model.Ptr, _context, MjOff.mjFONTSCALE_100);
        MjNative.mjr_setBuffer(MjOff.mjFB_OFFSCREEN, _context);
        int offWidth = *(int*)((byte*)_context + MjOff.con_offWidth), offHeight = *(int*)((byte*)_context + MjOff.con_offHeight);
        if (offWidth < width || offHeight < height)
        {
            Dispose();
            throw new SimulationException($"the model's offscreen buffer is {offWidth}x{offHeight}, smaller than the requested {width}x{height} image");
        }
        byte* flags = (byte*)_scene + MjOff.scn_flags;
        flags[MjOff.mjRND_SHADOW] = (byte)(settings.Shadows ? 1 : 0);
        flags[MjOff.mjRND_REFLECTION] = (byte)(settings.Reflections ? 1 : 0);
        flags[MjOff.mjRND_SKYBOX] = 0;
        _flipBuffer = new byte[width * height * 3];
    }

    /// <summary>Renders the named fixed camera into <paramref name="rgb"/> (rows top to bottom, interleaved RGB8).</summary>
    public void Render(MjData data, int cameraId, Span<byte> rgb)
    {
        if (_disposed) throw new ObjectDisposedException(nameof(OffscreenRenderer));
        if (Environment.CurrentManagedThreadId != _threadId)
            throw new InvalidOperationException("an OffscreenRenderer must be used on the thread that created it (its GL context is current there)");
        if (rgb.Length != Width * Height * 3) throw new ArgumentException($"buffer must hold {Width * Height * 3} bytes");
        *(int*)((byte*)_camera + MjOff.cam_type) = MjOff.mjCAMERA_FIXED;
        *(int*)((byte*)_camera + MjOff.cam_fixedcamid) = cameraId;
        MjNative.mjv_updateScene(_model.Ptr, data.Ptr, _option, IntPtr.Zero, _camera, MjOff.mjCAT_ALL, _scene);
        var rect = new MjNative.MjrRect { Left = 0, Bottom = 0, Width = Width, Height = Height };
        MjNative.mjr_render(rect, _scene, _context);
        fixed (byte* buffer = _flipBuffer) MjNative.mjr_readPixels(buffer, null, rect, _context);
        // OpenGL rows come bottom-up.
        int stride = Width * 3;
        for (int row = 0; row < Height; row++)
            _flipBuffer.AsSpan((Height - 1 - row) * stride, stride).CopyTo(rgb.Slice(row * stride, stride));
    }

    public byte[] Render(MjData data, int cameraId)
    {
        var rgb = new byte[Width * Height * 3];
        Render(data, cameraId, rgb);
        return rgb;
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        MjNative.mjr_freeContext(_context);
        MjNative.mjv_freeScene(_scene);
        Marshal.FreeHGlobal(_scene);
        Marshal.FreeHGlobal(_camera);
        Marshal.FreeHGlobal(_option);
        Marshal.FreeHGlobal(_context);
    }
}

/// <summary>
/// One EGL display per process (surfaceless Mesa platform) and one OpenGL context per thread, made current without a surface.
/// MuJoCo finds the GL entry points through the already loaded libEGL.so.1 (mujoco-headless.md §2).
/// </summary>
internal static unsafe partial class Egl
{
    private const string Lib = "libEGL.so.1";
    private const int EGL_PLATFORM_SURFACELESS_MESA = 0x31DD, EGL_OPENGL_API = 0x30A2, EGL_NONE = 0x3038;
    private const int EGL_RED_SIZE = 0x3024, EGL_GREEN_SIZE = 0x3023, EGL_BLUE_SIZE = 0x3022, EGL_ALPHA_SIZE = 0x3021;
    private const int EGL_DEPTH_SIZE = 0x3025, EGL_STENCIL_SIZE = 0x3026, EGL_SURFACE_TYPE = 0x3033, EGL_PBUFFER_BIT = 0x0001;
    private const int EGL_RENDERABLE_TYPE = 0x3040, EGL_OPENGL_BIT = 0x0008;

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)] private static partial IntPtr eglGetProcAddress(string name);
    [LibraryImport(Lib)] private static partial int eglInitialize(IntPtr display, int* major, int* minor);
    [LibraryImport(Lib)] private static partial int eglChooseConfig(IntPtr display, int* attribs, IntPtr* configs, int size, int* count);
    [LibraryImport(Lib)] private static partial int eglBindAPI(int api);
    [LibraryImport(Lib)] private static partial IntPtr eglCreateContext(IntPtr display, IntPtr config, IntPtr share, int* attribs);
    [LibraryImport(Lib)] private static partial int eglMakeCurrent(IntPtr display, IntPtr draw, IntPtr read, IntPtr context);
    [LibraryImport(Lib)] private static partial int eglGetError();

    private static readonly object Gate = new();
    private static IntPtr _display, _config;
    [ThreadStatic] private static IntPtr _threadContext;

    public static void MakeContextCurrentOnThisThread()
    {
        if (_threadContext != IntPtr.Zero) return;
        lock (Gate)
        {
            if (_display == IntPtr.Zero) OpenDisplay();
            if (eglBindAPI(EGL_OPENGL_API) == 0) throw Fail("eglBindAPI(OpenGL)");
            int* noAttribs = stackalloc int[] { EGL_NONE };
            IntPtr context = eglCreateContext(_display, _config, IntPtr.Zero, noAttribs);
            if (context == IntPtr.Zero) throw Fail("eglCreateContext");
            if (eglMakeCurrent(_display, IntPtr.Zero, IntPtr.Zero, context) == 0) throw Fail("eglMakeCurrent");
            _threadContext = context;
        }
    }

    private static void OpenDisplay()
    {
        IntPtr getPlatformDisplay;
        try { getPlatformDisplay = eglGetProcAddress("eglGetPlatformDisplayEXT"); }
        catch (DllNotFoundException)
        {
            throw new SimulationException("EGL is not installed (libEGL.so.1 not found: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri)");
        }
        if (getPlatformDisplay == IntPtr.Zero) throw new SimulationException("EGL has no eglGetPlatformDisplayEXT (is libegl-mesa0 installed?)");
        var getDisplay = (delegate* unmanaged[Cdecl]<int, IntPtr, int*, IntPtr>)getPlatformDisplay;
        IntPtr display = getDisplay(EGL_PLATFORM_SURFACELESS_MESA, IntPtr.Zero, null);
        if (display == IntPtr.Zero) throw Fail("eglGetPlatformDisplayEXT(surfaceless)");
        int major, minor;
        if (eglInitialize(display, &major, &minor) == 0)
            throw Fail("eglInitialize (is libgl1-mesa-dri, the llvmpipe driver, installed?)");
        int* attribs = stackalloc int[]
        {
            EGL_RED_SIZE, 8, EGL_GREEN_SIZE, 8, EGL_BLUE_SIZE, 8, EGL_ALPHA_SIZE, 8, EGL_DEPTH_SIZE, 24, EGL_STENCIL_SIZE, 8,
            EGL_SURFACE_TYPE, EGL_PBUFFER_BIT, EGL_RENDERABLE_TYPE, EGL_OPENGL_BIT, EGL_NONE,
        };
        IntPtr config;
        int count;
        if (eglChooseConfig(display, attribs, &config, 1, &count) == 0 || count < 1) throw Fail("eglChooseConfig(RGBA8, depth 24)");
        _display = display;
        _config = config;
    }

    private static SimulationException Fail(string call) =>
        new($"offscreen rendering unavailable: {call} failed (EGL error 0x{eglGetError():X4})");
}
