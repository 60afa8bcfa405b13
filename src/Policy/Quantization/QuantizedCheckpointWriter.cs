using System.Text.Json;
using System.Text.Json.Nodes;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Quantization;

/// <summary>
/// Writes a pre-quantized copy of a checkpoint directory (docs/quantization.md): every linear weight the options cover
/// becomes its portable int8/int4 tensors, everything else is copied unchanged, and config.json gains a
/// `quantization_config`. Tensors stream one at a time, so a 7B checkpoint converts in the memory of its largest tensor.
/// With <c>calibrated</c> (<see cref="CalibratedQuantizer"/>) the quantized weights are given instead of computed by
/// round-to-nearest, and the config records how they were calibrated.
/// </summary>
public static class QuantizedCheckpointWriter
{
    public static void Write(string sourceDir, string outDir, QuantizationOptions options, IProgress<double>? progress = null,
        IReadOnlyDictionary<string, PortableQuantized>? calibrated = null, JsonObject? calibration = null)
    {
        if (options.Mode == QuantMode.None) throw new PolicyInputException("choose int8 or int4 to write a quantized checkpoint");
        var source = VlaCheckpoint.Open(sourceDir);
        if (source.Config.StoredQuantization is not null) throw new PolicyInputException($"{sourceDir} is already quantized");
        if (Path.GetFullPath(sourceDir).TrimEnd('/') == Path.GetFullPath(outDir).TrimEnd('/'))
            throw new PolicyInputException("--out must differ from the source checkpoint");
        Directory.CreateDirectory(outDir);
        var linearWeights = CheckpointLayout.Enumerate(source.Config)
            .Where(s => s.UsedByInference && s.Shape.Length == 2 && s.Name.EndsWith(".weight") && !s.Name.EndsWith("embed_tokens.weight") && options.Covers(s.Name))
            .Select(s => s.Name).ToHashSet();

        foreach (var f in Directory.EnumerateFiles(sourceDir))
        {
            var name = Path.GetFileName(f);
            if (name.EndsWith(".safetensors") || name == "model.safetensors.index.json" || name == "config.json") continue;
            File.Copy(f, Path.Combine(outDir, name), overwrite: true);
        }
        var config = source.Config.Raw.DeepClone().AsObject();
        config["quantization_config"] = new JsonObject
        {
            ["quant_method"] = VlaConfig.QuantMethod,
            ["format_version"] = 1,
            ["bits"] = options.Mode == QuantMode.Int8 ? 8 : 4,
            ["group_size"] = options.Mode == QuantMode.Int4 ? options.GroupSize : null,
            ["modules"] = new JsonArray(options.IncludeVision ? ["language_model", "projector", "vision_backbone"] : new JsonNode[] { "language_model", "projector" }),
        };
        if (calibration is not null) config["quantization_config"]!["calibration"] = calibration.DeepClone();
        if (calibrated is not null && linearWeights.FirstOrDefault(w => !calibrated.ContainsKey(w)) is { } uncalibrated)
            throw new PolicyInputException($"no calibrated weight for '{uncalibrated}' (no calibration input reached it)");

        var weightMap = new JsonObject();
        long total = 0, done = 0;
        foreach (var file in source.WeightFiles) { using var st = SafetensorsFile.Open(file); total += st.Tensors.Count; }
        long totalBytes = 0;
        foreach (var file in source.WeightFiles)
        {
            using var st = SafetensorsFile.Open(file);
            var entries = new List<SafetensorsWriter.Entry>();
            var producers = new List<Func<Tensor>>();
            foreach (var info in st.Tensors.Values.OrderBy(t => t.Begin))
            {
                if (!linearWeights.Contains(info.Name))
                {
                    var dt = SafetensorsFile.TorchType(info.DType);
                    entries.Add(new(info.Name, dt, info.Shape));
                    producers.Add(() => st.Load(info.Name));
                    continue;
                }
                long n = info.Shape[0], k = info.Shape[1];
                string b = info.Name[..^".weight".Length];
                // One quantization per weight, shared by the producers of its two or three parts.
                PortableQuantized? cached = null;
                PortableQuantized Quantized()
                {
                    if (cached is not null) return cached;
                    if (calibrated is not null)
                    {
                        cached = calibrated[info.Name];
                        if (cached.Mode != options.ModeFor(n, k) || cached.OutFeatures != n || cached.InFeatures != k || (cached.Mode == QuantMode.Int4 && cached.GroupSize != options.GroupSize))
                            throw new PolicyInputException($"the calibrated weight for '{info.Name}' does not match {options.Name} of a [{n}, {k}] layer");
                    }
                    else { using var w = st.Load(info.Name); cached = WeightQuantizer.Quantize(w, options.ModeFor(n, k), options.GroupSize, options.SearchRange); }
                    return cached;
                }
                if (options.ModeFor(n, k) == QuantMode.Int8)
                {
                    entries.Add(new(info.Name, ScalarType.Int8, [n, k])); producers.Add(() => Quantized().Q);
                    entries.Add(new(b + ".weight_scale", ScalarType.BFloat16, [n])); producers.Add(() => Quantized().Scale);
                }
                else
                {
                    entries.Add(new(info.Name, ScalarType.Byte, [n, k / 2])); producers.Add(() => Quantized().Q);
                    entries.Add(new(b + ".weight_scale", ScalarType.BFloat16, [n, k / options.GroupSize])); producers.Add(() => Quantized().Scale);
                    entries.Add(new(b + ".weight_zero", ScalarType.BFloat16, [n, k / options.GroupSize])); producers.Add(() => Quantized().Zero!);
                }
            }
            var outName = Path.GetFileName(file);
            SafetensorsWriter.Write(Path.Combine(outDir, outName), entries, i =>
            {
                var t = producers[i]();
                progress?.Report(Math.Min(1.0, (double)++done / (total + linearWeights.Count * 2)));
                return t;
            }, new Dictionary<string, string> { ["format"] = "pt" });
            foreach (var e in entries) weightMap[e.Name] = outName;
            totalBytes += new FileInfo(Path.Combine(outDir, outName)).Length;
        }
        var indexed = source.WeightFiles.Count > 1;
        if (indexed)
        {
            var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = totalBytes }, ["weight_map"] = weightMap };
            File.WriteAllText(Path.Combine(outDir, "model.safetensors.index.json"), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        }
        File.WriteAllText(Path.Combine(outDir, "config.json"), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }
}
