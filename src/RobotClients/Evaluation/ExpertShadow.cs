using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.RobotClients.Evaluation;

/// <summary>
/// What the clean scripted expert said at every step of a learned policy's rollout (<c>eval --diagnose</c>): its phase,
/// both 7-D commands, and where the fingertips were relative to the task's cube (cm, world frame: +x away from the
/// robot, +z up). <see cref="FurthestPhase"/> is the phase of the episode's highest <see cref="ScriptedExpert.Progress"/>:
/// where a failed episode got to. The per-step measures the summary reports are derived from the two commands.
/// </summary>
public sealed record ShadowTrace(string[] Phases, float[][] PolicyActions, float[][] ExpertActions, float[][] HandToCubeCm, string FurthestPhase)
{
    /// <summary>Distance in cm between the policy's and the expert's translation commands at a step.</summary>
    public double TranslationErrorCm(int step)
    {
        float[] p = PolicyActions[step], e = ExpertActions[step];
        double dx = p[0] - e[0], dy = p[1] - e[1], dz = p[2] - e[2];
        return 100 * Math.Sqrt(dx * dx + dy * dy + dz * dz);
    }

    /// <summary>Whether both commanded the same gripper state (open above 0.5) at a step.</summary>
    public bool GripperAgrees(int step) => PolicyActions[step][6] > 0.5f == ExpertActions[step][6] > 0.5f;

    /// <summary>
    /// Whether the policy stood still (under 3 mm on every axis) while the expert asked for at least 5 mm: a one-frame
    /// policy that stands still sees the same frame again, so such stalls last.
    /// </summary>
    public bool Stalled(int step)
    {
        float[] p = PolicyActions[step], e = ExpertActions[step];
        return Math.Max(Math.Abs(p[0]), Math.Max(Math.Abs(p[1]), Math.Abs(p[2]))) < 0.003f
            && Math.Sqrt(e[0] * e[0] + e[1] * e[1] + e[2] * e[2]) >= 0.005;
    }
}

/// <summary>
/// Runs a clean <see cref="ScriptedExpert"/> beside a learned policy on the simulator's privileged state, which the
/// policy never sees. The expert's phase follows the state the policy creates (its transitions test where the hand and
/// the cube are), so its command is the DART-style label of that state: what the demonstrations would have taught there.
/// </summary>
public sealed class ExpertShadow(EpisodeSpec episode)
{
    private readonly ScriptedExpert _expert = new(episode);
    private readonly List<string> _phases = [];
    private readonly List<float[]> _policy = [], _labels = [], _handToCube = [];
    private string _furthest = "";
    private int _furthestProgress = -1;

    /// <summary>Asks the expert about the current state (call before the policy's action is executed).</summary>
    public void Observe(TabletopEnv env, ReadOnlySpan<float> policyAction)
    {
        _labels.Add(_expert.Act(env));
        _phases.Add(_expert.PhaseName);
        _policy.Add(policyAction.ToArray());
        var d = env.Tcp - env.CubePosition(episode.Args.Cube);
        _handToCube.Add([(float)(100 * d.X), (float)(100 * d.Y), (float)(100 * d.Z)]);
        if (_expert.Progress > _furthestProgress) { _furthestProgress = _expert.Progress; _furthest = _expert.PhaseName; }
    }

    public ShadowTrace Trace() => new([.. _phases], [.. _policy], [.. _labels], [.. _handToCube], _furthest);
}
