namespace OpenVLA.Simulation.Tabletop;

/// <summary>
/// How a noisy expert deviates from the clean one: Gaussian noise on the translation (metres per step, the <c>--noise</c>
/// σ), short pauses, detours that push the hand off course so the expert has to recover, and (in pick-and-place tasks) a
/// grasp closed too early, 1–4 cm above the cube, so the data shows what to do with closed fingers in the air: open and
/// go on down.
/// </summary>
public sealed record ExpertNoise(double Sigma, double PauseProbability = 0.04, double DetourProbability = 0.3, double EarlyCloseProbability = 0.3)
{
    public static ExpertNoise? FromSigma(double sigma) => sigma > 0 ? new ExpertNoise(sigma) : null;
}

/// <summary>
/// A scripted policy with privileged simulator state (object poses), one instance per episode. Pick-and-place tasks run
/// approach → descend → close → lift → carry → lower → open → retreat, going back to approach when the cube slips out;
/// the push task pushes from behind with closed fingers and re-approaches when the cube drifts off the line.
/// Close and open end on what the fingers did, not after a fixed count of steps: a policy that sees one frame can tell
/// closed-on-the-cube (lift) from still-closing (wait), but not the third waiting step from the fourth.
/// </summary>
public sealed class ScriptedExpert
{
    private enum Phase { Approach, Descend, Close, Lift, Carry, Lower, Open, Retreat, Done, PushApproach, PushLower, Push }

    private const double Step = 0.02, CarryZ = 0.16, Half = TabletopScene.CubeHalfSize;
    /// <summary>Push: the fingers' distance behind the cube's centre at contact, and their height.</summary>
    private const double Contact = Half + 0.013, PushZ = 0.012;
    /// <summary>Finger opening below which the fingers rest on a cube (its width plus 5 mm): the grasp is closed.</summary>
    public const double GrippedWidth = 2 * Half + 0.005;
    private readonly EpisodeSpec _episode;
    private readonly ExpertNoise? _noise;
    private readonly Random _rng;
    private Phase _phase;
    private int _phaseSteps, _pauseLeft, _detourLeft;
    private Vec3 _detour;
    private Vec3? _sideDestination;
    private int _detourAt = -1, _step, _earlyCloseLeft, _reopenLeft;
    private bool _earlyClosePending;
    private readonly bool _pushPhaseFromState;

    /// <param name="pushPhaseFromState">
    /// Derive the push phase from the current state at every step instead of from the phases before it. A labeller of
    /// states a learned policy reached (DAgger) needs this: with hysteresis, a hand that came down beside the cube by
    /// another path is still "approaching", and its label (rise and fly over) contradicts the demonstrations' label for
    /// the same frame (push on). Pick-and-place phases always follow history (their <c>holding</c> test already reads the
    /// state).
    /// </param>
    public ScriptedExpert(EpisodeSpec episode, ExpertNoise? noise = null, int noiseSeed = 0, bool pushPhaseFromState = false)
    {
        _episode = episode;
        _pushPhaseFromState = pushPhaseFromState;
        _noise = noise;
        _rng = new Random(noiseSeed);
        _phase = episode.TaskId == "push_to_target" ? Phase.PushApproach : Phase.Approach;
        if (noise is not null && _rng.NextDouble() < noise.DetourProbability) _detourAt = 2 + _rng.Next(10);
        _earlyClosePending = noise is not null && episode.TaskId != "push_to_target" && _rng.NextDouble() < noise.EarlyCloseProbability;
    }

    public string PhaseName => _phase.ToString();

    /// <summary>
    /// How far along the task the current phase is, 0 (approach) to 8 (done), on one scale for both scripts: the push's
    /// approach, lower and push rank with pick-and-place's approach, descend and close, and both end in retreat (7) and done.
    /// </summary>
    public int Progress => _phase switch
    {
        Phase.PushApproach => 0,
        Phase.PushLower => 1,
        Phase.Push => 2,
        var p => (int)p,
    };

    /// <summary>
    /// What the clean expert would have commanded at the last <see cref="Act"/> (before noise, pause or detour): the
    /// label of DART-style demonstrations, which execute the noisy action but teach the clean one.
    /// </summary>
    public float[] ExpertAction { get; private set; } = [];

    public float[] Act(TabletopEnv env)
    {
        _step++;
        var (goal, gripper) = _episode.TaskId == "push_to_target" ? PushGoal(env) : PickPlaceGoal(env);
        ExpertAction = Command(goal - env.Tcp, gripper);
        if (_noise is not null)
        {
            if (_step == _detourAt)
            {
                _detourLeft = 3 + _rng.Next(3);
                double angle = _rng.NextDouble() * 2 * Math.PI;
                _detour = new Vec3(Math.Cos(angle) * 0.06, Math.Sin(angle) * 0.06, 0.02);
            }
            if (_detourLeft > 0) { _detourLeft--; goal = env.Tcp + _detour; }
            // The early grasp: stop and close 1–4 cm above the cube's top, hold 2–4 steps, open again and wait 2 steps for
            // the fingers to clear the cube before the clean expert's descent goes on.
            if (_earlyClosePending && _phase == Phase.Descend)
            {
                double aboveTop = env.Tcp.Z - (env.CubePosition(_episode.Args.Cube).Z + Half);
                if (aboveTop is > 0.01 and < 0.04) { _earlyClosePending = false; _earlyCloseLeft = 2 + _rng.Next(3); _reopenLeft = 2; }
            }
            if (_earlyCloseLeft > 0) { _earlyCloseLeft--; return [0, 0, 0, 0, 0, 0, 0]; }
            if (_reopenLeft > 0) { _reopenLeft--; return [0, 0, 0, 0, 0, 0, 1]; }
            if (_pauseLeft > 0) { _pauseLeft--; return [0, 0, 0, 0, 0, 0, (float)env.GripperCommand]; }
            if (_rng.NextDouble() < _noise.PauseProbability) _pauseLeft = _rng.Next(1, 4);
        }
        var action = Command(goal - env.Tcp, gripper);
        if (_noise is not null)
            for (int i = 0; i < 3; i++) action[i] += (float)(Gaussian() * _noise.Sigma);
        return action;
    }

    private static float[] Command(Vec3 d, double gripper) =>
    [
        (float)Math.Clamp(d.X, -Step, Step), (float)Math.Clamp(d.Y, -Step, Step), (float)Math.Clamp(d.Z, -Step, Step),
        0, 0, 0, (float)gripper,
    ];

    private double Gaussian() => Math.Sqrt(-2 * Math.Log(1 - _rng.NextDouble())) * Math.Cos(2 * Math.PI * _rng.NextDouble());

    private void Enter(Phase phase) { _phase = phase; _phaseSteps = 0; }

    private (Vec3 Goal, double Gripper) PickPlaceGoal(TabletopEnv env)
    {
        var args = _episode.Args;
        var cube = env.CubePosition(args.Cube);
        var tcp = env.Tcp;
        bool holding = tcp.HorizontalDistance(cube) < 0.025 && Math.Abs(tcp.Z - cube.Z) < 0.03 && env.GripperWidth < GrippedWidth;
        _phaseSteps++;
        switch (_phase)
        {
            case Phase.Approach or Phase.Descend when holding:
                // The expert itself never holds the cube before it closes; a policy it shadows (eval --diagnose) can, by
                // another path, and the shadow should then say what comes next (lift), not re-approach a held cube.
                Enter(Phase.Lift);
                return (new Vec3(tcp.X, tcp.Y, CarryZ), 0);
            case Phase.Approach:
            {
                var goal = cube + new Vec3(0, 0, 0.10);
                if (tcp.HorizontalDistance(goal) < 0.012 && Math.Abs(tcp.Z - goal.Z) < 0.04) Enter(Phase.Descend);
                return (goal, 1);
            }
            case Phase.Descend:
            {
                var goal = cube + new Vec3(0, 0, -0.004);
                if (tcp.HorizontalDistance(cube) > 0.02) Enter(Phase.Approach);
                else if ((goal - tcp).Length < 0.008) Enter(Phase.Close);
                return (goal, 1);
            }
            case Phase.Close:
                // Lift as soon as the fingers rest on the cube (or have closed past it: the lift then finds no cube and
                // re-approaches); 8 steps at most.
                if (env.GripperWidth < GrippedWidth || _phaseSteps >= 8)
                {
                    Enter(Phase.Lift);
                    return (new Vec3(tcp.X, tcp.Y, CarryZ), 0);
                }
                return (tcp, 0);
            case Phase.Lift:
                if (!holding) { Enter(Phase.Approach); return (tcp + new Vec3(0, 0, 0.05), 1); }
                if (tcp.Z > CarryZ - 0.015 && _episode.TaskId != "pick_up") Enter(Phase.Carry);
                return (new Vec3(tcp.X, tcp.Y, CarryZ), 0);
            case Phase.Carry:
            {
                if (!holding) { Enter(Phase.Approach); return (tcp + new Vec3(0, 0, 0.05), 1); }
                var dest = Destination(env);
                var goal = new Vec3(dest.X, dest.Y, CarryZ);
                if (tcp.HorizontalDistance(goal) < 0.008) Enter(Phase.Lower);
                return (goal, 0);
            }
            case Phase.Lower:
            {
                if (!holding) { Enter(Phase.Approach); return (tcp + new Vec3(0, 0, 0.05), 1); }
                var goal = Destination(env);
                if (tcp.HorizontalDistance(goal) > 0.02) { Enter(Phase.Carry); return (new Vec3(goal.X, goal.Y, tcp.Z), 0); }
                if (Math.Abs(tcp.Z - goal.Z) < 0.006) Enter(Phase.Open);
                return (goal, 0);
            }
            case Phase.Open:
                // Retreat once the fingers have let go (1.5 cm clear of the cube), 6 steps at most.
                if (env.GripperWidth > 2 * Half + 0.015 || _phaseSteps >= 6)
                {
                    Enter(Phase.Retreat);
                    return (new Vec3(tcp.X, tcp.Y, cube.Z + 0.09), 1);
                }
                return (tcp, 1);
            case Phase.Retreat:
            {
                if (_phaseSteps > 6) Enter(Phase.Done);
                return (new Vec3(tcp.X, tcp.Y, cube.Z + 0.09), 1);
            }
            default:
                return (tcp, 1);
        }
    }

    /// <summary>Where the held cube's centre should go down to.</summary>
    private Vec3 Destination(TabletopEnv env)
    {
        var args = _episode.Args;
        switch (_episode.TaskId)
        {
            case "place_on_plate":
            {
                var p = env.PlatePosition;
                return new Vec3(p.X, p.Y, 2 * TabletopScene.PlateHalfHeight + Half + 0.004);
            }
            case "stack":
            {
                var o = env.CubePosition(args.Other!);
                return new Vec3(o.X, o.Y, o.Z + 2 * Half + 0.004);
            }
            case "move_side":
            {
                if (_sideDestination is null)
                {
                    var (x, y, _) = _episode.Layout.Cubes[args.Cube];
                    _sideDestination = new Vec3(x, y + TabletopTasks.DirectionSign(args.Direction!) * TabletopTasks.SideShift, Half + 0.004);
                }
                return _sideDestination.Value;
            }
            default:
                throw new InvalidOperationException($"task {_episode.TaskId} has no place destination");
        }
    }

    private (Vec3 Goal, double Gripper) PushGoal(TabletopEnv env)
    {
        var cube = env.CubePosition(_episode.Args.Cube);
        var target = env.TargetPosition(_episode.Args.Other!);
        var tcp = env.Tcp;
        var toTarget = new Vec3(target.X - cube.X, target.Y - cube.Y, 0);
        double remaining = toTarget.Length;
        var dir = remaining > 1e-6 ? toTarget * (1 / remaining) : new Vec3(1, 0, 0);
        var behind = new Vec3(cube.X - dir.X * (Contact + 0.02), cube.Y - dir.Y * (Contact + 0.02), PushZ);
        if (_pushPhaseFromState && _phase is Phase.PushApproach or Phase.PushLower or Phase.Push)
        {
            var phase = PushPhaseOf(tcp, cube, dir, behind);
            if (phase != _phase) Enter(phase);
        }
        _phaseSteps++;
        switch (_phase)
        {
            case Phase.PushApproach:
            {
                var goal = behind with { Z = 0.09 };
                if (tcp.HorizontalDistance(goal) < 0.01) Enter(Phase.PushLower);
                return (goal, 0);
            }
            case Phase.PushLower:
                if (tcp.HorizontalDistance(behind) > 0.02) Enter(Phase.PushApproach);
                else if (Math.Abs(tcp.Z - PushZ) < 0.006) Enter(Phase.Push);
                return (behind, 0);
            case Phase.Push:
            {
                if (remaining < 0.008) { Enter(Phase.Retreat); return (tcp, 0); }
                if (!BehindOnLine(tcp, cube, dir)) { Enter(Phase.PushApproach); return (tcp with { Z = 0.09 }, 0); }
                double advance = Math.Min(0.01, remaining);
                var goal = new Vec3(cube.X - dir.X * (Contact - advance), cube.Y - dir.Y * (Contact - advance), PushZ);
                return (goal, 0);
            }
            case Phase.Retreat:
                if (_phaseSteps > 5) Enter(Phase.Done);
                return (tcp with { Z = 0.1 }, 0);
            default:
                return (tcp, 0);
        }
    }

    /// <summary>
    /// The push phase a state is in, whatever came before: pushing when the closed fingers are at push height on the line
    /// behind the cube (the tests <see cref="Phase.Push"/> keeps), lowering when above the point behind it (halfway between
    /// the 1 cm at which the approach hands over and the 2 cm at which lowering gives up), else approaching.
    /// </summary>
    private static Phase PushPhaseOf(Vec3 tcp, Vec3 cube, Vec3 dir, Vec3 behind)
    {
        if (BehindOnLine(tcp, cube, dir, maxBehind: Contact + 0.03) && Math.Abs(tcp.Z - PushZ) < 0.006) return Phase.Push;
        return tcp.HorizontalDistance(behind) < 0.015 ? Phase.PushLower : Phase.PushApproach;
    }

    /// <summary>Whether the hand is on the push line behind the cube: within 1.4 cm of the line, behind the cube's back face,
    /// and (when given) at most <paramref name="maxBehind"/> behind its centre. Push keeps pushing while this holds.</summary>
    private static bool BehindOnLine(Vec3 tcp, Vec3 cube, Vec3 dir, double maxBehind = double.PositiveInfinity)
    {
        double rx = tcp.X - cube.X, ry = tcp.Y - cube.Y;
        double along = rx * dir.X + ry * dir.Y;
        double lateral = Math.Abs(rx * dir.Y - ry * dir.X);
        return lateral <= 0.014 && along <= -Half && along >= -maxBehind;
    }
}
