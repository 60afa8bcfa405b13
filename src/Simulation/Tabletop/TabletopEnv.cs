using OpenVLA.Simulation.MuJoCo;

namespace OpenVLA.Simulation.Tabletop;

/// <summary>Where every object starts: cube centres (x, y, yaw) and the plate and target centres (x, y).</summary>
public sealed record SceneLayout(
    IReadOnlyDictionary<string, (double X, double Y, double Yaw)> Cubes,
    (double X, double Y) Plate,
    IReadOnlyDictionary<string, (double X, double Y)> Targets);

/// <summary>
/// The tabletop robot at 10 Hz: an action is <c>[dx, dy, dz, droll, dpitch, dyaw, gripper]</c> (metres and radians per
/// control step, world frame; gripper 1 = open, 0 = closed), the OpenVLA EEF_POS layout (openvla-model.md §3.2).
/// Not thread-safe; rendering must stay on the creating thread.
/// </summary>
public sealed class TabletopEnv : IDisposable
{
    public const int ControlHz = 10;
    /// <summary>Values per action: [dx, dy, dz, droll, dpitch, dyaw, gripper].</summary>
    public const int ActionDim = 7;
    public const double MaxTranslation = 0.03, MaxRotation = 0.25;
    /// <summary>
    /// Proprioceptive state: tcp x, y, z; hand roll, pitch, yaw relative to the start orientation (fingers down), so the
    /// angles sit near 0 instead of wrapping at ±π; left and right finger opening (8 floats).
    /// </summary>
    public static readonly string[] StateNames = ["x", "y", "z", "roll", "pitch", "yaw", "finger_left", "finger_right"];
    public static readonly string[] ActionNames = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"];

    private readonly MjModel _model;
    private readonly MjData _data;
    private OffscreenRenderer? _renderer;
    private readonly RenderSettings _renderSettings;
    private readonly int _handBody, _tcpSite, _handMocap, _plateMocap, _agentCamera, _wristCamera;
    private readonly int[] _armQpos;
    private readonly int _fingerLeftQpos, _fingerRightQpos;
    private readonly Dictionary<string, int> _cubeBody = new(), _cubeQpos = new(), _targetMocap = new();
    private readonly int _substeps;
    private Quat _startOrientation = Quat.Identity;

    public int ImageSize { get; }
    public int StepCount { get; private set; }
    /// <summary>The last gripper command (1 open, 0 closed).</summary>
    public double GripperCommand { get; private set; } = 1;
    internal MjModel Model => _model;
    internal MjData Data => _data;

    public TabletopEnv(int imageSize = 224, RenderSettings? renderSettings = null)
    {
        if (imageSize < 16 || imageSize > 1024) throw new ArgumentOutOfRangeException(nameof(imageSize), $"image size must be 16..1024, got {imageSize}");
        ImageSize = imageSize;
        _renderSettings = renderSettings ?? new RenderSettings();
        _model = MjModel.FromXml(TabletopScene.Build(imageSize));
        _data = new MjData(_model);
        _handBody = _model.Id(MjObject.Body, "hand");
        _tcpSite = _model.Id(MjObject.Site, "tcp");
        _handMocap = _model.MocapIndex("hand_target");
        _plateMocap = _model.MocapIndex("plate");
        _agentCamera = _model.Id(MjObject.Camera, TabletopScene.AgentCamera);
        _wristCamera = _model.Id(MjObject.Camera, TabletopScene.WristCamera);
        _armQpos = Enumerable.Range(1, 7).Select(i => _model.JointQposAddress($"joint{i}")).ToArray();
        _fingerLeftQpos = _model.JointQposAddress("finger_left");
        _fingerRightQpos = _model.JointQposAddress("finger_right");
        foreach (var c in TabletopScene.CubeColours)
        {
            _cubeBody[c] = _model.Id(MjObject.Body, $"cube_{c}");
            _cubeQpos[c] = _model.JointQposAddress($"cube_{c}");
        }
        foreach (var t in TabletopScene.TargetColours) _targetMocap[t] = _model.MocapIndex($"target_{t}");
        // The weld holds the hand at the mocap pose itself (relative pose = identity), not at the qpos0 offset the compiler fills in.
        var weld = _model.EqualityData(_model.Id(MjObject.Equality, "hand_weld"));
        weld[3] = weld[4] = weld[5] = 0;
        weld[6] = 1; weld[7] = weld[8] = weld[9] = 0;
        _substeps = (int)Math.Round(1.0 / ControlHz / _model.Timestep);
    }

    /// <summary>Puts the robot at home and the objects where <paramref name="layout"/> says, then lets them settle.</summary>
    public void Reset(SceneLayout layout, int settleSteps = 10)
    {
        _data.Reset();
        var qpos = _data.Qpos;
        for (int i = 0; i < 7; i++) qpos[_armQpos[i]] = TabletopScene.HomeJoints[i];
        qpos[_fingerLeftQpos] = qpos[_fingerRightQpos] = TabletopScene.FingerOpen;
        foreach (var (colour, (x, y, yaw)) in layout.Cubes)
        {
            int a = _cubeQpos[colour];
            var q = Quat.FromYaw(yaw);
            qpos[a] = x; qpos[a + 1] = y; qpos[a + 2] = TabletopScene.CubeHalfSize;
            qpos[a + 3] = q.W; qpos[a + 4] = q.X; qpos[a + 5] = q.Y; qpos[a + 6] = q.Z;
        }
        SetMocap(_plateMocap, new Vec3(layout.Plate.X, layout.Plate.Y, TabletopScene.PlateHalfHeight));
        foreach (var (colour, (x, y)) in layout.Targets) SetMocap(_targetMocap[colour], new Vec3(x, y, 0.0005));
        _data.Forward();
        _startOrientation = _data.BodyQuaternion(_handBody);
        SetMocap(_handMocap, _data.BodyPosition(_handBody), _startOrientation);
        StepCount = 0;
        GripperCommand = 1;
        var noop = new float[] { 0, 0, 0, 0, 0, 0, 1 };
        for (int i = 0; i < settleSteps; i++) Step(noop);
        StepCount = 0;
    }

    private void SetMocap(int index, Vec3 p, Quat? q = null)
    {
        var pos = _data.MocapPos;
        pos[3 * index] = p.X; pos[3 * index + 1] = p.Y; pos[3 * index + 2] = p.Z;
        if (q is { } r)
        {
            var quat = _data.MocapQuat;
            quat[4 * index] = r.W; quat[4 * index + 1] = r.X; quat[4 * index + 2] = r.Y; quat[4 * index + 3] = r.Z;
        }
    }

    private Vec3 MocapPosition => new(_data.MocapPos[3 * _handMocap], _data.MocapPos[3 * _handMocap + 1], _data.MocapPos[3 * _handMocap + 2]);
    private Quat MocapQuaternion
    {
        get { var q = _data.MocapQuat; int i = 4 * _handMocap; return new Quat(q[i], q[i + 1], q[i + 2], q[i + 3]); }
    }

    /// <summary>Applies one 10 Hz action (clipped to ±3 cm and ±0.25 rad per step) and advances the physics by 0.1 s.</summary>
    public void Step(ReadOnlySpan<float> action)
    {
        if (action.Length != 7) throw new ArgumentException($"an action has 7 values [dx,dy,dz,droll,dpitch,dyaw,gripper], got {action.Length}");
        for (int i = 0; i < 7; i++)
            if (!float.IsFinite(action[i])) throw new ArgumentException($"action[{i}] is not a finite number");
        double Clip(float v, double limit) => Math.Clamp(v, -limit, limit);
        var delta = new Vec3(Clip(action[0], MaxTranslation), Clip(action[1], MaxTranslation), Clip(action[2], MaxTranslation));
        var rotation = new Vec3(Clip(action[3], MaxRotation), Clip(action[4], MaxRotation), Clip(action[5], MaxRotation));

        // The target leads the hand by at most 6 cm, so a blocked hand (pressing on the table) does not wind the target up.
        var hand = _data.BodyPosition(_handBody);
        var target = MocapPosition + delta;
        var lead = target - hand;
        if (lead.Length > 0.06) target = hand + lead * (0.06 / lead.Length);
        // Keep the fingertips above the table and inside the reachable box.
        target = new Vec3(Math.Clamp(target.X, 0.15, 0.85), Math.Clamp(target.Y, -0.45, 0.45), Math.Clamp(target.Z, 0.11, 0.6));
        var orientation = (Quat.FromRotationVector(rotation) * MocapQuaternion).Normalized();
        SetMocap(_handMocap, target, orientation);

        GripperCommand = Math.Clamp(action[6], 0f, 1f);
        var ctrl = _data.Ctrl;
        ctrl[0] = ctrl[1] = GripperCommand * TabletopScene.FingerOpen;
        for (int i = 0; i < _substeps; i++) _data.Step();
        StepCount++;
    }

    public Vec3 Tcp => _data.SitePosition(_tcpSite);
    public Quat HandOrientation => _data.BodyQuaternion(_handBody);
    public Vec3 CubePosition(string colour) => _data.BodyPosition(_cubeBody[colour]);
    public Quat CubeOrientation(string colour) => _data.BodyQuaternion(_cubeBody[colour]);
    public Vec3 PlatePosition => Mocap(_plateMocap);
    public Vec3 TargetPosition(string colour) => Mocap(_targetMocap[colour]);
    public double FingerLeft => _data.Qpos[_fingerLeftQpos];
    public double FingerRight => _data.Qpos[_fingerRightQpos];
    /// <summary>Distance between the fingers' inner faces, metres (0.08 fully open).</summary>
    public double GripperWidth => FingerLeft + FingerRight;
    public double SimulationTime => _data.Time;

    private Vec3 Mocap(int index) => new(_data.MocapPos[3 * index], _data.MocapPos[3 * index + 1], _data.MocapPos[3 * index + 2]);

    /// <summary>The 8-D proprioceptive state (see <see cref="StateNames"/>).</summary>
    public float[] State()
    {
        var p = Tcp;
        // World-frame rotation since the start (q = R·q_start), so the angles move the same way as droll/dpitch/dyaw.
        var e = (HandOrientation * _startOrientation.Conjugate).ToEuler();
        return [(float)p.X, (float)p.Y, (float)p.Z, (float)e.X, (float)e.Y, (float)e.Z, (float)FingerLeft, (float)FingerRight];
    }

    /// <summary>
    /// Names of <see cref="EnvironmentState"/>: every cube's centre (x, y, z), then the plate's and each target's (x, y), in
    /// metres in the world frame. LeRobot's name for such privileged simulator state is observation.environment_state.
    /// </summary>
    public static readonly string[] EnvironmentStateNames =
    [
        .. TabletopScene.CubeColours.SelectMany(c => new[] { $"{c}_x", $"{c}_y", $"{c}_z" }), "plate_x", "plate_y",
        .. TabletopScene.TargetColours.SelectMany(c => new[] { $"{c}_x", $"{c}_y" }),
    ];

    /// <summary>Where the objects are (see <see cref="EnvironmentStateNames"/>): what a policy has to find in the image.</summary>
    public float[] EnvironmentState()
    {
        var v = new List<float>(EnvironmentStateNames.Length);
        foreach (var c in TabletopScene.CubeColours) { var q = CubePosition(c); v.AddRange([(float)q.X, (float)q.Y, (float)q.Z]); }
        v.AddRange([(float)PlatePosition.X, (float)PlatePosition.Y]);
        foreach (var c in TabletopScene.TargetColours) { var q = TargetPosition(c); v.AddRange([(float)q.X, (float)q.Y]); }
        return [.. v];
    }

    /// <summary>Renders the third-person (or wrist) camera: ImageSize² RGB8, rows top to bottom.</summary>
    public byte[] Render(bool wrist = false)
    {
        _renderer ??= new OffscreenRenderer(_model, ImageSize, ImageSize, _renderSettings);
        return _renderer.Render(_data, wrist ? _wristCamera : _agentCamera);
    }

    public void Render(Span<byte> rgb, bool wrist = false)
    {
        _renderer ??= new OffscreenRenderer(_model, ImageSize, ImageSize, _renderSettings);
        _renderer.Render(_data, wrist ? _wristCamera : _agentCamera, rgb);
    }

    /// <summary>A copy of the full simulator state, to restore later with <see cref="Restore"/> bit for bit.</summary>
    public MjData Snapshot()
    {
        var copy = new MjData(_model);
        copy.CopyFrom(_data);
        return copy;
    }

    public void Restore(MjData snapshot, int stepCount, double gripperCommand)
    {
        _data.CopyFrom(snapshot);
        StepCount = stepCount;
        GripperCommand = gripperCommand;
    }

    public void Dispose()
    {
        _renderer?.Dispose();
        _data.Dispose();
        _model.Dispose();
    }
}
