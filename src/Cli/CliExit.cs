using OpenVLA.Policy;

namespace OpenVLA.Cli;

/// <summary>Exit codes and the mapping of exceptions to them, shared by every verb.</summary>
public static class CliExit
{
    public const int Ok = 0, Failure = 1, Usage = 2;

    /// <summary>Errors caused by what the user passed (arguments, files, checkpoint contents): exit code 2.</summary>
    /// <remarks><see cref="UserErrors.Is"/>, and that rule's verdict on a job that failed in a worker process.</remarks>
    public static bool IsUserError(Exception e) => UserErrors.Is(e) || e is OpenVLA.Simulation.Workers.WorkerJobException { UserError: true };

    public static string OneLine(string message) => message.ReplaceLineEndings(" ").Trim();
}

/// <summary>Thrown by a verb for invalid arguments; the message is shown as one line and the exit code is 2.</summary>
public sealed class UsageException(string message) : Exception(message), IUserError;
