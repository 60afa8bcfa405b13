namespace OpenVLA.Simulation.MuJoCo;

/// <summary>Object kinds for name lookups (values generated from mjtObj).</summary>
public enum MjObject
{
    Body = MjOff.mjOBJ_BODY,
    Joint = MjOff.mjOBJ_JOINT,
    Geom = MjOff.mjOBJ_GEOM,
    Site = MjOff.mjOBJ_SITE,
    Camera = MjOff.mjOBJ_CAMERA,
    Equality = MjOff.mjOBJ_EQUALITY,
    Actuator = MjOff.mjOBJ_ACTUATOR,
}

/// <summary>A compiled MuJoCo model (mjModel*). Read-only after loading except for the few parameters we set on purpose.</summary>
public sealed unsafe class MjModel : IDisposable
{
    internal IntPtr Ptr { get; private set; }

    private MjModel(IntPtr ptr) => Ptr = ptr;

    /// <summary>Compiles MJCF text. 2.2.2 has no mj_loadXMLString, so the text goes through a temporary file.</summary>
    public static MjModel FromXml(string xml)
    {
        MjRuntime.EnsureInitialized();
        string path = Path.Combine(Path.GetTempPath(), $"openvla-mjcf-{Environment.ProcessId}-{Guid.NewGuid():N}.xml");
        File.WriteAllText(path, xml);
        try { return FromFile(path); }
        finally { File.Delete(path); }
    }

    public static MjModel FromFile(string path)
    {
        MjRuntime.EnsureInitialized();
        if (!File.Exists(path)) throw new FileNotFoundException($"MJCF file not found: {path}");
        byte* error = stackalloc byte[1000];
        error[0] = 0;
        IntPtr m = MjNative.mj_loadXML(path, IntPtr.Zero, error, 1000);
        if (m == IntPtr.Zero)
            throw new SimulationException($"MuJoCo rejected the model: {System.Runtime.InteropServices.Marshal.PtrToStringUTF8((IntPtr)error)}");
        return new MjModel(m);
    }

    private int Int(int offset) => *(int*)((byte*)Ptr + offset);
    internal T* Array<T>(int offset) where T : unmanaged => *(T**)((byte*)Ptr + offset);

    public int Nq => Int(MjOff.m_nq);
    public int Nv => Int(MjOff.m_nv);
    public int Nu => Int(MjOff.m_nu);
    public int NBody => Int(MjOff.m_nbody);
    public int NMocap => Int(MjOff.m_nmocap);
    public int NSite => Int(MjOff.m_nsite);
    public int NGeom => Int(MjOff.m_ngeom);
    public int NEq => Int(MjOff.m_neq);
    public double Timestep => *(double*)((byte*)Ptr + MjOff.m_opt_timestep);

    /// <summary>Id of a named object; throws when the model has no such object (a bug in our MJCF, not user input).</summary>
    public int Id(MjObject kind, string name)
    {
        int id = MjNative.mj_name2id(Ptr, (int)kind, name);
        if (id < 0) throw new SimulationException($"the model has no {kind.ToString().ToLowerInvariant()} named '{name}'");
        return id;
    }

    public int JointQposAddress(string joint) => Array<int>(MjOff.m_jnt_qposadr)[Id(MjObject.Joint, joint)];
    public int JointDofAddress(string joint) => Array<int>(MjOff.m_jnt_dofadr)[Id(MjObject.Joint, joint)];
    public int MocapIndex(string body) => Array<int>(MjOff.m_body_mocapid)[Id(MjObject.Body, body)];

    /// <summary>The 11 numbers of an equality constraint (2.2.2 weld: anchor[3], relpos[3], relquat[4], torquescale).</summary>
    public Span<double> EqualityData(int eqId) => new(Array<double>(MjOff.m_eq_data) + eqId * 11, 11);

    /// <summary>RGBA of a geom without material; used to recolour objects per episode.</summary>
    public Span<float> GeomRgba(int geomId) => new(Array<float>(MjOff.m_geom_rgba) + geomId * 4, 4);

    public void Dispose()
    {
        if (Ptr != IntPtr.Zero) { MjNative.mj_deleteModel(Ptr); Ptr = IntPtr.Zero; }
    }
}

/// <summary>Simulation state (mjData*) of one model: positions, velocities, controls, and what forward kinematics derives.</summary>
public sealed unsafe class MjData : IDisposable
{
    public MjModel Model { get; }
    internal IntPtr Ptr { get; private set; }

    public MjData(MjModel model)
    {
        Model = model;
        Ptr = MjNative.mj_makeData(model.Ptr);
        if (Ptr == IntPtr.Zero) throw new SimulationException("mj_makeData failed (out of memory?)");
    }

    private T* Array<T>(int offset) where T : unmanaged => *(T**)((byte*)Ptr + offset);

    public double Time => *(double*)((byte*)Ptr + MjOff.d_time);
    public int ContactCount => *(int*)((byte*)Ptr + MjOff.d_ncon);
    public Span<double> Qpos => new(Array<double>(MjOff.d_qpos), Model.Nq);
    public Span<double> Qvel => new(Array<double>(MjOff.d_qvel), Model.Nv);
    public Span<double> Ctrl => new(Array<double>(MjOff.d_ctrl), Model.Nu);
    public Span<double> MocapPos => new(Array<double>(MjOff.d_mocap_pos), Model.NMocap * 3);
    public Span<double> MocapQuat => new(Array<double>(MjOff.d_mocap_quat), Model.NMocap * 4);
    public Span<double> Xpos => new(Array<double>(MjOff.d_xpos), Model.NBody * 3);
    public Span<double> Xquat => new(Array<double>(MjOff.d_xquat), Model.NBody * 4);
    public Span<double> Xmat => new(Array<double>(MjOff.d_xmat), Model.NBody * 9);
    public Span<double> SiteXpos => new(Array<double>(MjOff.d_site_xpos), Model.NSite * 3);
    public Span<double> SiteXmat => new(Array<double>(MjOff.d_site_xmat), Model.NSite * 9);

    public Vec3 BodyPosition(int bodyId) { var x = Xpos; return new Vec3(x[3 * bodyId], x[3 * bodyId + 1], x[3 * bodyId + 2]); }
    public Quat BodyQuaternion(int bodyId) { var q = Xquat; return new Quat(q[4 * bodyId], q[4 * bodyId + 1], q[4 * bodyId + 2], q[4 * bodyId + 3]); }
    public Vec3 SitePosition(int siteId) { var x = SiteXpos; return new Vec3(x[3 * siteId], x[3 * siteId + 1], x[3 * siteId + 2]); }

    public void Step() => MjNative.mj_step(Model.Ptr, Ptr);
    public void Forward() => MjNative.mj_forward(Model.Ptr, Ptr);
    public void Reset() => MjNative.mj_resetData(Model.Ptr, Ptr);

    /// <summary>Makes this state an exact copy of <paramref name="source"/> (2.2.2 has no mj_getState/mj_setState).</summary>
    public void CopyFrom(MjData source)
    {
        if (source.Model != Model) throw new ArgumentException("states of different models cannot be copied");
        MjNative.mj_copyData(Ptr, Model.Ptr, source.Ptr);
    }

    public void Dispose()
    {
        if (Ptr != IntPtr.Zero) { MjNative.mj_deleteData(Ptr); Ptr = IntPtr.Zero; }
    }
}
