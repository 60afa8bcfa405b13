using System.CommandLine;
using OpenVLA.Cli;

// `openvla <verb> --long-option value`. Exit codes: 0 ok, 1 failure, 2 usage or input error.
// Each area contributes its verbs from its own file (PolicyVerbs.cs, ...); this file only dispatches and maps errors.
// Policy backends the evaluator can name (eval and its worker processes run this same start-up).
// Large tensors are mapped and unmapped rather than kept in glibc's heap (see ProcessMemory): resident memory then
// follows the live tensors in every verb, which matters for a 7B model on a 24 GB machine.
ProcessMemory.LimitHeapFragmentation();
PolicyBackends.InWorker = args.Length > 0 && args[0] == "sim-worker";
OpenVLA.RobotClients.Evaluation.RolloutPolicies.UnnormKey = PolicyBackends.UnnormKey;
OpenVLA.RobotClients.Evaluation.RolloutPolicies.CheckpointFactory = dir => OpenVLA.Policy.VlaPolicy.Load(dir, PolicyBackends.FromEnvironment());
OpenVLA.Simulation.Datasets.DemoRecorder.DriverFactory = spec =>
    new OpenVLA.RobotClients.Evaluation.RolloutDemoDriver(OpenVLA.RobotClients.Evaluation.RolloutPolicies.Create(OpenVLA.RobotClients.Evaluation.RolloutPolicies.Parse(spec)));

var root = new RootCommand("OpenVLA.NET: serve, fine-tune and evaluate OpenVLA vision-language-action policies.");
foreach (var command in Verbs.All()) root.Subcommands.Add(command);

var parse = root.Parse(args);
if (parse.Errors.Count > 0)
{
    Console.Error.WriteLine($"openvla: {parse.Errors[0].Message} (see --help)");
    return CliExit.Usage;
}
try
{
    return parse.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
}
catch (Exception e) when (CliExit.IsUserError(e))
{
    Console.Error.WriteLine($"openvla: {CliExit.OneLine(e.Message)}");
    return CliExit.Usage;
}
catch (Exception e)
{
    Console.Error.WriteLine($"openvla: error: {CliExit.OneLine(e.Message)}");
    if (Environment.GetEnvironmentVariable("OPENVLA_DEBUG") == "1") Console.Error.WriteLine(e);
    return CliExit.Failure;
}
