using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.RobotClients.Evaluation;

/// <summary>
/// What the clean scripted expert said at every step of a learned policy's rollout (<c>eval --diagnose</c>): its phase,
/// both 7-D commands, the distance in cm between their translations, whether they agreed on the gripper (open above
/// 0.5), and where the fingertips were relative to the task's cube (cm, world frame: +x away from the robot, +z up).
/// <see cref="FurthestPhase"/> is the phase of the episode's highest <see cref="ScriptedExpert.Progress"/>: where a
/// failed episode got to.
/// </summary>
public sealed record ShadowTrace(
    string[] Phases, float[][] PolicyActions, float[][] ExpertActions, float[] TranslationErrorCm, bool[] GripperAgrees,
    float[][] HandToCubeCm, string FurthestPhase);

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
    private readonly List<float> _errors = [];
    private readonly List<bool> _agrees = [];
    private string _furthest = "";
    private int _furthestProgress = -1;

    /// <summary>Asks the expert about the current state (call before the policy's action is executed).</summary>
    public void Observe(TabletopEnv env, ReadOnlySpan<float> policyAction)
    {
        var label = _expert.Act(env);
        double dx = policyAction[0] - label[0], dy = policyAction[1] - label[1], dz = policyAction[2] - label[2];
        _phases.Add(_expert.PhaseName);
        _policy.Add(policyAction.ToArray());
        _labels.Add(label);
        var d = env.Tcp - env.CubePosition(episode.Args.Cube);
        _handToCube.Add([(float)(100 * d.X), (float)(100 * d.Y), (float)(100 * d.Z)]);
        _errors.Add((float)(100 * Math.Sqrt(dx * dx + dy * dy + dz * dz)));
        _agrees.Add(policyAction[6] > 0.5f == label[6] > 0.5f);
        if (_expert.Progress > _furthestProgress) { _furthestProgress = _expert.Progress; _furthest = _expert.PhaseName; }
    }

    public ShadowTrace Trace() => new([.. _phases], [.. _policy], [.. _labels], [.. _errors], [.. _agrees], [.. _handToCube], _furthest);
}
