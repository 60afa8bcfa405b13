using System.CommandLine;

namespace OpenVLA.Cli;

/// <summary>The verbs of the command line, one provider per area of the product.</summary>
internal static class Verbs
{
    public static IEnumerable<Command> All() =>
        PolicyVerbs.Create()
            .Concat(QuantizationVerbs.Create())
            .Concat(FineTuneVerbs.Create())
            .Concat(PostTrainVerbs.Create())
            .Concat(BenchVerbs.Create())
            .Concat(DataVerbs.Create())
            .Concat(SimulationVerbs.Create())
            .Concat(ServerVerbs.Create());
}
