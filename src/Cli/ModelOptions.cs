using System.CommandLine;
using OpenVLA.Policy;

namespace OpenVLA.Cli;

/// <summary>The options every verb that loads a model shares: precision, quantization, device, threads.</summary>
internal sealed class ModelOptions
{
    public Option<string?> DType { get; } = new("--dtype") { Description = "compute precision: f32 or bf16 (default f32; bf16 when quantized)" };
    public Option<string> Quantize { get; } = new("--quantize") { Description = "weight-only quantization at load: none, int8, int4", DefaultValueFactory = _ => "none" };
    public Option<int> GroupSize { get; } = new("--group-size") { Description = "int4 group size: 32, 64, 128 or 256", DefaultValueFactory = _ => 128 };
    public Option<bool> KeepVisionFloat { get; } = new("--keep-vision-float") { Description = "do not quantize the vision towers" };
    public Option<bool> Int4MinMax { get; } = new("--int4-minmax")
    {
        Description = "int4: take each group's min–max range instead of searching the least-error one (13x faster to quantize, less accurate; for loading large models on CPU)",
    };
    public Option<string> Device { get; } = new("--device") { Description = "TorchSharp device (cpu, cuda, cuda:N)", DefaultValueFactory = _ => "cpu" };
    public Option<int?> Threads { get; } = new("--threads") { Description = "CPU threads (default: one per core)" };
    public Option<string?> Adapter { get; } = new("--adapter") { Description = "PEFT LoRA adapter directory (from finetune) merged into the checkpoint at load" };
    public Option<string?> Decode { get; } = new("--decode")
    {
        Description = $"action decoding: {ActionDecoding.Syntax} (default: the checkpoint's generation_config.json; greedy when it states no sampling)",
    };

    public Option<int?> ActionChunk { get; } = new("--action-chunk")
    {
        Description = "OpenVLA-OFT: actions per chunk (default: config.json's \"oft\" block, else the reference's constants for the dataset: LIBERO 8, ALOHA 25, Bridge 5)",
    };
    public Option<int?> NumImages { get; } = new("--num-images")
    {
        Description = "OpenVLA-OFT: cameras per observation (default: config.json's \"oft\" block, else LIBERO 2, ALOHA 3, Bridge 1)",
    };

    public void AddTo(Command command)
    {
        foreach (var o in new Option[] { DType, Quantize, GroupSize, KeepVisionFloat, Int4MinMax, Device, Threads, Adapter, Decode, ActionChunk, NumImages }) command.Options.Add(o);
    }

    public PolicyOptions Read(ParseResult r, bool centerCrop = false)
    {
        var options = new PolicyOptions
        {
            DType = r.GetValue(DType), Quantize = r.GetValue(Quantize)!, GroupSize = r.GetValue(GroupSize),
            QuantizeVision = !r.GetValue(KeepVisionFloat), Int4RangeSearch = !r.GetValue(Int4MinMax), Device = r.GetValue(Device)!, Threads = r.GetValue(Threads), CenterCrop = centerCrop,
            Adapter = r.GetValue(Adapter), Decoding = r.GetValue(Decode), ActionChunk = r.GetValue(ActionChunk), NumImages = r.GetValue(NumImages),
        };
        if (options.ActionChunk is <= 0) throw new UsageException("--action-chunk must be positive");
        if (options.NumImages is <= 0) throw new UsageException("--num-images must be positive");
        if (options.Threads is <= 0) throw new UsageException("--threads must be positive");
        _ = options.ScalarType;   // validates --dtype
        _ = options.Quantization; // validates --quantize and --group-size
        _ = options.ActionDecoding; // validates --decode
        return options;
    }
}
