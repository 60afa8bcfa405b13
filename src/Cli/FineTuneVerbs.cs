using System.CommandLine;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using OpenVLA.Policy.Model;
using TorchSharp;

namespace OpenVLA.Cli;

/// <summary>finetune and merge: the verbs of the LoRA / full fine-tuning tool.</summary>
internal static class FineTuneVerbs
{
    public static IEnumerable<Command> Create() => [Merge()];

    static Command Merge()
    {
        var baseDir = new Option<string>("--base") { Description = "base Hugging Face OpenVLA checkpoint directory", Required = true };
        var adapter = new Option<string>("--adapter") { Description = "PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors)", Required = true };
        var outDir = new Option<string>("--out") { Description = "directory to write the merged checkpoint to", Required = true };
        var dtype = new Option<string?>("--dtype") { Description = "stored precision: bf16 or f32 (default: the base's torch_dtype)" };
        var cmd = new Command("merge", "Fold a LoRA adapter into its base model and write a complete Hugging Face checkpoint.")
            { baseDir, adapter, outDir, dtype };
        cmd.SetAction(r =>
        {
            var checkpoint = VlaCheckpoint.Open(r.GetValue(baseDir)!);
            var stored = StoredType(r.GetValue(dtype) ?? checkpoint.Config.TorchDType);
            // Merge in float32 and round once to the stored precision (re-merging in bf16 is a known source of drift).
            using var model = new OpenVlaModel(checkpoint.Config, ModelPrecision.Cpu(torch.ScalarType.Float32));
            WeightLoader.Load(model, checkpoint);
            var adapterDir = r.GetValue(adapter)!;
            var paths = PeftAdapter.Load(adapterDir, model);
            var statsPath = Path.Combine(adapterDir, "dataset_statistics.json");
            var stats = File.Exists(statsPath) ? System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(statsPath))!.AsObject() : null;
            CheckpointWriter.Write(r.GetValue(outDir)!, checkpoint, model, stored, stats);
            Console.Error.WriteLine($"merge: {paths.Count} adapted layers folded into {checkpoint.Config.Text.NumHiddenLayers}-layer base");
            Console.WriteLine(Path.GetFullPath(r.GetValue(outDir)!));
            return CliExit.Ok;
        });
        return cmd;
    }

    internal static torch.ScalarType StoredType(string name) => name switch
    {
        "bf16" or "bfloat16" => torch.ScalarType.BFloat16,
        "f32" or "float32" => torch.ScalarType.Float32,
        _ => throw new UsageException($"unknown dtype '{name}' (valid: bf16, f32)"),
    };
}
