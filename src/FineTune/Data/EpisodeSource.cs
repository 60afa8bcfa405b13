namespace OpenVLA.FineTune.Data;

/// <summary>An episode as stored: the concatenated action keys, before the config's dim selection and gripper mapping.</summary>
/// <param name="Aux">The config's aux_keys concatenated per step; null when none are configured.</param>
internal sealed record RawEpisode(float[][] Actions, float[][]? Proprio, string[] Instructions, Frame?[][]? Frames, float[][]? Aux = null);

/// <summary>A readable dataset layout (LeRobot, RLDS): episode count and lengths up front, episodes read one at a time.</summary>
internal interface IEpisodeSource : IDisposable
{
    string Format { get; }
    /// <summary>The dataset's own name (TFDS builder name, or the directory name).</summary>
    string DefaultName { get; }
    int EpisodeCount { get; }
    int EpisodeLength(int episode);
    /// <summary>Episodes that are read sequentially together (one GZIP shard); reading them out of order costs a re-read.</summary>
    int GroupOf(int episode);
    /// <summary>True when any episode can be read without reading the ones before it (files per episode, seekable shards).</summary>
    bool RandomAccess { get; }
    RawEpisode Read(int episode, bool withFrames);
}

/// <summary>Maps stored actions onto the configured 7-D EEF layout: dim selection, then the gripper convention.</summary>
internal sealed class ActionMapper(DatasetConfig config, string datasetName)
{
    public float[] Map(float[] stored, int episode, int step)
    {
        float[] action;
        if (config.ActionDims is { } dims)
        {
            action = new float[dims.Count];
            for (int i = 0; i < dims.Count; i++)
            {
                if (dims[i] >= stored.Length)
                    throw new DatasetException($"{datasetName}: action_dims selects dim {dims[i]} but episode {episode} step {step} has a {stored.Length}-D action");
                action[i] = stored[dims[i]];
            }
        }
        else
        {
            if (stored.Length != config.ActionDim)
                throw new DatasetException($"{datasetName}: episode {episode} step {step} has a {stored.Length}-D action but the config expects {config.ActionDim} (set action_dims to select dims)");
            action = (float[])stored.Clone();
        }
        if (config.Gripper.Index is { } g) action[g] = config.Gripper.Apply(action[g]);
        return action;
    }
}
