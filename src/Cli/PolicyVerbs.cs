using System.CommandLine;

namespace OpenVLA.Cli;

/// <summary>predict, make-checkpoint: the verbs of the policy core.</summary>
internal static class PolicyVerbs
{
    public static IEnumerable<Command> Create()
    {
        yield break;
    }
}
