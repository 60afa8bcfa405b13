using OpenVLA.Policy;
using OpenVLA.Simulation;
using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.RobotClients.Evaluation;

/// <summary>What a policy gets each control step: the camera frame(s) at the policy resolution, the instruction and the
/// proprioceptive state; <see cref="Privileged"/> is the simulator itself, for scripted policies only.
/// <see cref="WristImage"/> is rendered only for policies that take a second camera.</summary>
public sealed record RolloutObservation(RgbImage Image, string Instruction, float[] State, PrivilegedState? Privileged = null, RgbImage? WristImage = null);

/// <summary>Simulator access for scripted policies (never given to a learned policy).</summary>
public sealed record PrivilegedState(TabletopEnv Env, EpisodeSpec Episode);

/// <summary>
/// The evaluator's policy seam: one 7-D action <c>[dx,dy,dz,droll,dpitch,dyaw,gripper]</c> per observation. Adapters
/// exist for the scripted expert and for any <see cref="IActionPolicy"/> (the in-process checkpoint, a gRPC client).
/// </summary>
public interface IRolloutPolicy : IDisposable
{
    string Name { get; }
    /// <summary>Whether the policy takes the wrist camera as a second image (then it is rendered every step too).</summary>
    bool WantsWristImage { get; }
    /// <summary>Called before the first step of every episode (resets any per-episode state).</summary>
    void BeginEpisode(EpisodeSpec episode);
    float[] Act(RolloutObservation observation);
    /// <summary>Times the model was asked since <see cref="BeginEpisode"/> (fewer than the steps when chunks are executed).</summary>
    int PolicyCalls { get; }
}

/// <summary>The scripted expert with privileged state: the upper reference and the check that the pipeline works.</summary>
public sealed class ScriptedRolloutPolicy : IRolloutPolicy
{
    private ScriptedExpert? _expert;
    public string Name => "scripted";
    public bool WantsWristImage => false;
    public int PolicyCalls { get; private set; }
    public void BeginEpisode(EpisodeSpec episode) { _expert = new ScriptedExpert(episode); PolicyCalls = 0; }

    public float[] Act(RolloutObservation observation)
    {
        var privileged = observation.Privileged ?? throw new InvalidOperationException("the scripted policy needs privileged simulator state");
        PolicyCalls++;
        return (_expert ?? throw new InvalidOperationException("BeginEpisode was not called")).Act(privileged.Env);
    }

    public void Dispose() { }
}

/// <summary>
/// Wraps any <see cref="IActionPolicy"/>: the third-person camera (plus the wrist camera when the policy takes two images),
/// the robot state as proprio when the policy takes it, the instruction and the unnorm key in; chunks executed open loop
/// by an <see cref="ActionChunkBroker"/> (the first <c>executeSteps</c> actions of each, default the whole chunk) out.
/// Our simulator uses OpenVLA's gripper convention (1 open, 0 closed), so no LIBERO-style gripper inversion is applied.
/// </summary>
public sealed class ActionPolicyRolloutPolicy(IActionPolicy policy, string name, string? unnormKey = null, bool ownsPolicy = true, int? executeSteps = null) : IRolloutPolicy
{
    readonly ActionChunkBroker _broker = new(executeSteps);
    public string Name => name;
    public bool WantsWristImage { get; } = policy.Description.ImagesPerObservation >= 2;
    public int PolicyCalls => _broker.PolicyCalls;
    public void BeginEpisode(EpisodeSpec episode) => _broker.Reset();

    public float[] Act(RolloutObservation observation)
    {
        float[] action;
        try { action = _broker.Next(() => Predict(observation)); }
        catch (ChunkTooShortException e)
        {
            // executeSteps is the user's --execute-steps: a setting that does not fit the policy is their error (exit code 2).
            throw new PolicyInputException($"--execute-steps {e.ExecuteSteps} is longer than the policy's chunk of {e.ChunkLength}");
        }
        if (action.Length != TabletopEnv.ActionDim)
            throw new PolicyInputException($"policy {name} returned {action.Length} action values; the tabletop suite takes {TabletopEnv.ActionDim}");
        return action;
    }

    float[][] Predict(RolloutObservation observation)
    {
        RgbImage[] images = WantsWristImage
            ? [observation.Image, observation.WristImage ?? throw new InvalidOperationException("the wrist image was not rendered")]
            : [observation.Image];
        int proprioDim = policy.Description.ProprioDim;
        if (proprioDim > 0 && observation.State.Length != proprioDim)
            throw new PolicyInputException($"policy {name} takes a {proprioDim}-D proprio; the tabletop robot state has {observation.State.Length} values");
        return policy.PredictBatch([new VlaObservation(images, observation.Instruction, unnormKey, proprioDim > 0 ? observation.State : null)])[0].Actions;
    }

    public void Dispose()
    {
        if (ownsPolicy && policy is IDisposable d) d.Dispose();
    }
}

/// <summary>A learned rollout policy as the driver of DAgger recording (<c>demos --policy</c>): it sees what it sees in
/// evaluation, the expert only labels.</summary>
public sealed class RolloutDemoDriver(IRolloutPolicy policy) : OpenVLA.Simulation.Datasets.IDemoDriver
{
    public void BeginEpisode(EpisodeSpec episode) => policy.BeginEpisode(episode);

    public float[] Act(byte[] frame, byte[]? wristFrame, int imageSize, string instruction, float[] state)
    {
        RgbImage? wrist = null;
        if (policy.WantsWristImage)
            wrist = RgbImage.Create(imageSize, imageSize, wristFrame ?? throw new PolicyInputException($"policy {policy.Name} takes the wrist camera: record with --wrist"));
        return policy.Act(new RolloutObservation(RgbImage.Create(imageSize, imageSize, frame), instruction, state, null, wrist));
    }

    public void Dispose() => policy.Dispose();
}

/// <summary>A policy backend named on the command line is not available in this build.</summary>
public sealed class PolicyUnavailableException(string message) : Exception(message);

/// <summary>
/// Parses <c>scripted</c> | <c>checkpoint:DIR</c> | <c>grpc://HOST:PORT</c> and builds the policy. The checkpoint and gRPC
/// backends live in other projects; the CLI registers them through <see cref="CheckpointFactory"/> and <see cref="GrpcFactory"/>
/// at start-up, before any verb runs — eval worker processes are the same CLI (hidden sim-worker verb), so each worker
/// builds its own policy from the same registration. Until then both are null and eval exits with code 2.
/// </summary>
public static class RolloutPolicies
{
    /// <summary>Loads a checkpoint directory as an in-process policy (wired by the CLI to VlaPolicy.Load).</summary>
    public static Func<string, IActionPolicy>? CheckpointFactory { get; set; }

    /// <summary>Connects to a policy server (wired by the CLI to the gRPC robot client, which uses StreamActions).</summary>
    public static Func<string, int, IActionPolicy>? GrpcFactory { get; set; }

    /// <summary>Which dataset statistics checkpoint and gRPC policies un-normalize with (null: the policy's only one).</summary>
    public static string? UnnormKey { get; set; }

    public abstract record Spec(string Text);
    public sealed record Scripted() : Spec("scripted");
    public sealed record Checkpoint(string Directory) : Spec($"checkpoint:{Directory}");
    public sealed record Grpc(string Host, int Port) : Spec($"grpc://{Host}:{Port}");

    /// <summary>Parses and validates a policy argument; throws <see cref="PolicyUnavailableException"/> or
    /// <see cref="ArgumentException"/> with a one-line message.</summary>
    public static Spec Parse(string text)
    {
        text = text.Trim();
        if (text == "scripted") return new Scripted();
        if (text.StartsWith("checkpoint:", StringComparison.Ordinal))
        {
            string dir = text["checkpoint:".Length..];
            if (dir.Length == 0) throw new ArgumentException("--policy checkpoint:DIR needs a directory");
            return new Checkpoint(Path.GetFullPath(dir));
        }
        if (text.StartsWith("grpc://", StringComparison.Ordinal))
        {
            string rest = text["grpc://".Length..].TrimEnd('/');
            int colon = rest.LastIndexOf(':');
            if (colon <= 0 || !int.TryParse(rest[(colon + 1)..], out int port) || port is < 1 or > 65535)
                throw new ArgumentException($"--policy {text}: expected grpc://HOST:PORT with a port 1..65535");
            return new Grpc(rest[..colon], port);
        }
        throw new ArgumentException($"--policy '{text}' is not one of: scripted, checkpoint:DIR, grpc://HOST:PORT");
    }

    /// <summary>Checks that the backend of <paramref name="spec"/> exists before any worker starts.</summary>
    public static void EnsureAvailable(Spec spec)
    {
        switch (spec)
        {
            case Checkpoint c:
                if (!Directory.Exists(c.Directory)) throw new DirectoryNotFoundException($"checkpoint directory not found: {c.Directory}");
                if (CheckpointFactory is null)
                    throw new PolicyUnavailableException("--policy checkpoint:DIR is not available yet: this build has no in-process checkpoint loader wired to the evaluator");
                break;
            case Grpc:
                if (GrpcFactory is null)
                    throw new PolicyUnavailableException("--policy grpc://HOST:PORT is not available yet: this build has no gRPC robot client wired to the evaluator");
                break;
        }
    }

    /// <param name="executeSteps">actions of each chunk executed before the policy is asked again (null: the whole chunk)</param>
    public static IRolloutPolicy Create(Spec spec, int? executeSteps = null)
    {
        EnsureAvailable(spec);
        return spec switch
        {
            Scripted => new ScriptedRolloutPolicy(),
            Checkpoint c => new ActionPolicyRolloutPolicy(CheckpointFactory!(c.Directory), spec.Text, UnnormKey, executeSteps: executeSteps),
            Grpc g => new ActionPolicyRolloutPolicy(GrpcFactory!(g.Host, g.Port), spec.Text, UnnormKey, executeSteps: executeSteps),
            _ => throw new ArgumentException($"unknown policy {spec.Text}"),
        };
    }
}
