namespace OpenVLA.FineTune.Data;

/// <summary>
/// A dataset on disk cannot be used as configured: a corrupt record, a missing key, a wrong shape. The message is one line
/// that names the file (and record, episode or key) and what was expected, meant to be shown to the user as is.
/// </summary>
public sealed class DatasetException(string message, Exception? inner = null) : Exception(message, inner), OpenVLA.Policy.IUserError;
