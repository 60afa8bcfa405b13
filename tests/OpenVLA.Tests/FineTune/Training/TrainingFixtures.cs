using System.Text.Json.Nodes;
using OpenVLA.FineTune.Training;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.FineTune.Training;

/// <summary>A tiny random-weight base checkpoint and a small in-memory dataset whose actions depend on the frame.</summary>
public static class TrainingFixtures
{
    public static string MakeBase(string dir, int seed = 3, ScalarType dtype = ScalarType.Float32)
    {
        CheckpointMaker.Write(dir, "tiny", seed, dtype);
        return dir;
    }

    public static (OpenVlaModel Model, VlaCheckpoint Checkpoint, VlaTokenizer Tokenizer) Load(string dir, ScalarType dtype = ScalarType.Float32)
    {
        var checkpoint = VlaCheckpoint.Open(dir);
        var model = new OpenVlaModel(checkpoint.Config, ModelPrecision.Cpu(dtype));
        WeightLoader.Load(model, checkpoint);
        return (model, checkpoint, VlaTokenizer.Load(checkpoint.TokenizerPath));
    }

    /// <summary>Frames of one flat colour per example; the action's first dims follow the colour, so it can be learned.</summary>
    public static List<TrainingExample> Examples(int count, int size = 56, int seed = 1)
    {
        var rng = new Random(seed);
        string[] instructions = ["pick up the red cube", "push the blue block left", "open the drawer"];
        var list = new List<TrainingExample>();
        for (int i = 0; i < count; i++)
        {
            byte r = (byte)rng.Next(256), g = (byte)rng.Next(256), b = (byte)rng.Next(256);
            var px = new byte[size * size * 3];
            for (int p = 0; p < size * size; p++) { px[p * 3] = r; px[p * 3 + 1] = g; px[p * 3 + 2] = b; }
            float[] action = [r / 127.5f - 1, g / 127.5f - 1, b / 127.5f - 1, 0.1f * (i % 5), -0.2f, 0.3f, i % 2];
            list.Add(new TrainingExample(new RgbImage(size, size, px), instructions[i % instructions.Length], action, "sim_tabletop"));
        }
        return list;
    }

    public static JsonObject Statistics() => CheckpointMaker.ExampleStats();

    public static TrainerOptions SmallRun(bool full = false) => new()
    {
        Full = full,
        Lora = new LoraSettings(4, 8, 0.0, [PeftAdapter.AllLinear]),
        Optimizer = new AdamW.Settings(LearningRate: full ? 1e-3 : 5e-3),
        MaxSteps = 10,
        BatchSize = 3,
        GradAccumulation = 1,
        SaveSteps = 0,
        EvalSteps = 0,
        Seed = 11,
    };
}
