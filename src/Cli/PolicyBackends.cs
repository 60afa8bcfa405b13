using OpenVLA.Policy;

namespace OpenVLA.Cli;

/// <summary>
/// Load options for policies the evaluator builds by name (`--policy checkpoint:DIR`). eval passes its --quantize/--dtype/--adapter/--decode
/// to its worker processes through these environment variables, so every worker loads the model the same way.
/// </summary>
internal static class PolicyBackends
{
    public const string QuantizeVariable = "OPENVLA_EVAL_QUANTIZE", DTypeVariable = "OPENVLA_EVAL_DTYPE", UnnormKeyVariable = "OPENVLA_EVAL_UNNORM_KEY",
        AdapterVariable = "OPENVLA_EVAL_ADAPTER", DecodeVariable = "OPENVLA_EVAL_DECODE";

    public static string? UnnormKey => Environment.GetEnvironmentVariable(UnnormKeyVariable) is { Length: > 0 } k ? k : null;

    public static PolicyOptions FromEnvironment() => new()
    {
        Quantize = Environment.GetEnvironmentVariable(QuantizeVariable) is { Length: > 0 } q ? q : "none",
        DType = Environment.GetEnvironmentVariable(DTypeVariable) is { Length: > 0 } d ? d : null,
        Adapter = Environment.GetEnvironmentVariable(AdapterVariable) is { Length: > 0 } a ? a : null,
        Decoding = Environment.GetEnvironmentVariable(DecodeVariable) is { Length: > 0 } c ? c : null,
        // Each worker process loads its own model: one thread each keeps parallel workers from oversubscribing cores.
        Threads = InWorker ? 1 : null,
    };

    /// <summary>Set at start-up when this process is an eval worker (the hidden sim-worker verb).</summary>
    public static bool InWorker { get; set; }
}
