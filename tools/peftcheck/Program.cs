using OpenVLA.FineTune.Training;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Tokenization;
using static TorchSharp.torch;

// Writes <out>/base (tiny preset, f32) and <out>/run/step-0000005/{adapter, model}: an adapter trained for 5 steps with
// every adapter non-zero, and the merged checkpoint our CheckpointWriter makes from it.
string outDir = args.Length > 0 ? args[0] : "out";
if (Directory.Exists(outDir)) Directory.Delete(outDir, true);
string baseDir = Path.Combine(outDir, "base");
CheckpointMaker.Write(baseDir, "tiny", 3, ScalarType.Float32);
var checkpoint = VlaCheckpoint.Open(baseDir);
using var model = new OpenVlaModel(checkpoint.Config, ModelPrecision.Cpu(ScalarType.Float32));
WeightLoader.Load(model, checkpoint);
var options = new TrainerOptions
{
    Lora = new LoraSettings(4, 8, 0.0, [PeftAdapter.AllLinear]), Optimizer = new AdamW.Settings(LearningRate: 1e-2),
    MaxSteps = 5, BatchSize = 2, Merge = true, SaveSteps = 0, EvalSteps = 0,
};
using var trainer = new Trainer(model, checkpoint, VlaTokenizer.Load(checkpoint.TokenizerPath), options, Path.Combine(outDir, "run"), CheckpointMaker.ExampleStats());
var rng = new Random(1);
var examples = Enumerable.Range(0, 8).Select(i =>
{
    var px = new byte[56 * 56 * 3];
    rng.NextBytes(px);
    return new TrainingExample(new RgbImage(56, 56, px), "pick up the red cube", Enumerable.Range(0, 7).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray(), "sim_tabletop");
}).ToList();
var source = new InMemoryExampleSource(examples, 1);
for (int i = 0; i < 5; i++) Console.WriteLine($"step {i + 1}: loss {trainer.TrainStep(source).Loss:0.0000}");
Console.WriteLine(trainer.Save(source, "openvla-tiny-random"));
