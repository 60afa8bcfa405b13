using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.FineTune.Data;
using OpenVLA.FineTune.Training;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using OpenVLA.Policy.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

// Usage: dotnet run -c Release -- DATASET CHECK_CHECKPOINT OUT [SEED] [AUX_KEYS]
//        dotnet run -c Release -- check DATASET CHECK_CHECKPOINT OUT [SEED] [AUX_KEYS]   (only check.*, for an existing pack)
//        dotnet run -c Release -- plot METRICS_JSONL PNG      (train_gpu.py's metrics, drawn as finetune draws its own)
// Writes OUT/meta.json, frames.u8 (N×S×S×3), ids.i16 (N×T, −1 padded), aux.f32 (N×A), split.u8 (0 train, 1 held out),
// task.u8 (the example's suite task, an index into meta's "tasks"; 255 when the dataset does not record one), and
// check.* : the first two examples' pixel values and our model's logits and loss for them, computed with
// CHECK_CHECKPOINT (any checkpoint with the dataset's image size), so train_gpu.py can verify its forward pass.
// `check` recomputes only check.* and meta.json's check entries, so a pack can be verified against another checkpoint.
if (args is ["plot", var metricsPath, var pngPath])
{
    new MetricsLog(metricsPath).Plot(pngPath);
    return 0;
}
bool checkOnly = args.Length > 0 && args[0] == "check";
if (checkOnly) args = args[1..];
if (args.Length < 3) { Console.Error.WriteLine("usage: [check] DATASET CHECK_CHECKPOINT OUT [SEED] [AUX_KEYS]"); return 2; }
string datasetPath = args[0], checkPath = args[1], outDir = args[2];
ulong seed = args.Length > 3 ? ulong.Parse(args[3]) : 7;
string[] auxKeys = args.Length > 4 ? args[4].Split(',') : ["observation.state"];
Directory.CreateDirectory(outDir);

var checkpoint = VlaCheckpoint.Open(checkPath);
var tokenizer = VlaTokenizer.Load(checkpoint.TokenizerPath);
var objective = ActionObjective.ForCheckpoint(checkpoint, tokenizer);
using var data = VlaDataset.Open(datasetPath, new DatasetConfig { AuxKeys = auxKeys });
var stats = data.ComputeStatistics();
var split = data.SplitEpisodes(0.05, seed);
int size = checkpoint.Config.ImageSize;

// The suite task of each episode, as the demo recorder writes it into LeRobot's meta/episodes.jsonl ("suite_task").
var episodeTask = new Dictionary<int, string>();
var episodesJsonl = Path.Combine(datasetPath, "meta", "episodes.jsonl");
if (File.Exists(episodesJsonl))
    foreach (var line in File.ReadLines(episodesJsonl).Where(l => l.Length > 0))
        if (JsonNode.Parse(line) is JsonObject o && o["suite_task"] is JsonNode task)
            episodeTask[(int)o["episode_index"]!] = (string)task!;
var taskNames = episodeTask.Values.Distinct().Order(StringComparer.Ordinal).ToList();

var examples = new List<(TrainingExample Example, byte Split, byte Task)>();
foreach (var (episodes, flag) in new[] { (split.Train, (byte)0), (split.HeldOut, (byte)1) })
{
    var stream = new TrainingStream(data, episodes, stats, new StreamOptions { Shuffle = false, Repeat = false, ImageSize = size, Seed = seed });
    foreach (var s in stream)
    {
        byte task = episodeTask.TryGetValue(s.EpisodeIndex, out var name) ? (byte)taskNames.IndexOf(name) : (byte)255;
        examples.Add((StreamExampleSource.ToExample(s), flag, task));
        if (checkOnly && examples.Count == 2) break;
    }
    Console.Error.WriteLine($"pack: {examples.Count} examples");
    if (checkOnly) break;
}
int t = 0, a = stats.Aux!.Dim;
if (!checkOnly)
{
    var rows = examples.Select(e => objective.SequenceIds(e.Example)).ToArray();
    t = rows.Max(r => r.Length);
    using (var frames = File.Create(Path.Combine(outDir, "frames.u8")))
        foreach (var e in examples) frames.Write(e.Example.Image.Pixels);
    var ids = new short[examples.Count * t];
    Array.Fill(ids, (short)-1);
    for (int i = 0; i < rows.Length; i++) for (int j = 0; j < rows[i].Length; j++) ids[i * t + j] = checked((short)rows[i][j]);
    File.WriteAllBytes(Path.Combine(outDir, "ids.i16"), System.Runtime.InteropServices.MemoryMarshal.AsBytes(ids.AsSpan()).ToArray());
    File.WriteAllBytes(Path.Combine(outDir, "aux.f32"), System.Runtime.InteropServices.MemoryMarshal.AsBytes(examples.SelectMany(e => e.Example.Aux!).ToArray().AsSpan()).ToArray());
    File.WriteAllBytes(Path.Combine(outDir, "split.u8"), examples.Select(e => e.Split).ToArray());
    File.WriteAllBytes(Path.Combine(outDir, "task.u8"), examples.Select(e => e.Task).ToArray());
}

// Reference computation on the first two examples.
var pair = examples.Take(2).Select(e => e.Example).ToList();
using var model = new OpenVlaModel(checkpoint.Config, ModelPrecision.Cpu(ScalarType.Float32));
WeightLoader.Load(model, checkpoint);
model.eval();
using (torch.no_grad())
using (var batch = objective.Build(pair, CPU, ScalarType.Float32))
{
    var (hidden, labels) = ActionObjective.Forward(model, batch);
    var logits = model.language_model.Logits(hidden);
    var result = objective.Score(hidden, labels, model.language_model.Logits);
    File.WriteAllBytes(Path.Combine(outDir, "check.pixels.f32"), System.Runtime.InteropServices.MemoryMarshal.AsBytes(batch.PixelValues.data<float>().ToArray().AsSpan()).ToArray());
    File.WriteAllBytes(Path.Combine(outDir, "check.logits.f32"), System.Runtime.InteropServices.MemoryMarshal.AsBytes(logits.contiguous().data<float>().ToArray().AsSpan()).ToArray());
    var metaPath = Path.Combine(outDir, "meta.json");
    if (checkOnly)
    {
        var existing = JsonNode.Parse(File.ReadAllText(metaPath))!.AsObject();
        existing["check_checkpoint"] = Path.GetFullPath(checkPath);
        existing["check_loss"] = result.LossValue;
        existing["check_logits_shape"] = new JsonArray(logits.shape.Select(v => (JsonNode)v).ToArray());
        File.WriteAllText(metaPath, existing.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        Console.Error.WriteLine($"check: loss {result.LossValue:0.000000} with {checkPath}");
        return 0;
    }
    var meta = new JsonObject
    {
        ["count"] = examples.Count, ["image_size"] = size, ["seq_len"] = t, ["aux_dim"] = a,
        ["aux_mean"] = new JsonArray(stats.Aux.Mean.Select(v => (JsonNode)v).ToArray()),
        ["aux_std"] = new JsonArray(stats.Aux.Std.Select(v => (JsonNode)(v + AuxHead.StdFloor)).ToArray()),
        ["pad_id"] = checkpoint.Config.Text.PadTokenId, ["first_action_id"] = objective.ActionTokenizer.FirstActionId,
        ["action_vocab_end"] = objective.ActionTokenizer.VocabSize, ["action_dim"] = pair[0].NormalizedAction.Length,
        ["train_episodes"] = split.Train.Count, ["held_out_episodes"] = split.HeldOut.Count, ["seed"] = seed.ToString(),
        ["check_checkpoint"] = Path.GetFullPath(checkPath), ["check_loss"] = result.LossValue,
        ["check_logits_shape"] = new JsonArray(logits.shape.Select(v => (JsonNode)v).ToArray()),
        ["tasks"] = new JsonArray(taskNames.Select(n => (JsonNode)n).ToArray()),
        ["dataset"] = Path.GetFullPath(datasetPath), ["aux_keys"] = new JsonArray(auxKeys.Select(k => (JsonNode)k).ToArray()),
    };
    File.WriteAllText(metaPath, meta.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    Console.Error.WriteLine($"pack: {examples.Count} examples, seq {t}, aux {a}, check loss {result.LossValue:0.000000}");
}
return 0;
