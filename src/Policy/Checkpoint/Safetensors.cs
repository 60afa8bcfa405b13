using System.IO.MemoryMappedFiles;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>Name, dtype, shape and byte range (relative to the data section) of one tensor in a safetensors file.</summary>
public sealed record SafetensorInfo(string Name, string DType, long[] Shape, long Begin, long End)
{
    public long ElementCount => Shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>
/// A safetensors file (https://github.com/huggingface/safetensors format: u64 little-endian header length, a JSON header
/// of {name: {dtype, shape, data_offsets}} plus optional "__metadata__", then the raw little-endian data).
/// The file is memory-mapped; <see cref="Load"/> copies one tensor out of the mapping, so peak memory while loading a
/// model is the model plus its largest tensor. The header is validated completely on open: a corrupt file fails with a
/// message naming the file and the problem, never with a crash or an out-of-range read.
/// </summary>
public sealed class SafetensorsFile : IDisposable
{
    /// <summary>safetensors dtype name → (TorchSharp type, bytes per element).</summary>
    static readonly Dictionary<string, (ScalarType Type, int Size)> DTypes = new()
    {
        ["F64"] = (ScalarType.Float64, 8), ["F32"] = (ScalarType.Float32, 4), ["F16"] = (ScalarType.Float16, 2),
        ["BF16"] = (ScalarType.BFloat16, 2), ["I64"] = (ScalarType.Int64, 8), ["I32"] = (ScalarType.Int32, 4),
        ["I16"] = (ScalarType.Int16, 2), ["I8"] = (ScalarType.Int8, 1), ["U8"] = (ScalarType.Byte, 1), ["BOOL"] = (ScalarType.Bool, 1),
    };

    const long MaxHeaderBytes = 100L << 20; // the reference implementation refuses headers over 100 MB

    readonly MemoryMappedFile? _map;
    readonly MemoryMappedViewAccessor? _view;
    readonly long _dataStart;

    public string Path { get; }
    public IReadOnlyDictionary<string, SafetensorInfo> Tensors { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }

    SafetensorsFile(string path, MemoryMappedFile? map, MemoryMappedViewAccessor? view, long dataStart,
        Dictionary<string, SafetensorInfo> tensors, Dictionary<string, string> metadata)
    {
        Path = path; _map = map; _view = view; _dataStart = dataStart; Tensors = tensors; Metadata = metadata;
    }

    public static SafetensorsFile Open(string path)
    {
        if (!File.Exists(path)) throw new CheckpointException($"{path}: file not found");
        long fileLength;
        byte[] header;
        using (var fs = File.OpenRead(path))
        {
            // The opened file's length: for a symlink (the Hugging Face cache links snapshots to blobs/) FileInfo.Length
            // is the link's own, not its target's.
            fileLength = fs.Length;
            if (fileLength < 8) throw new CheckpointException($"{path}: not a safetensors file ({fileLength} bytes, the header length alone takes 8)");
            Span<byte> lenBytes = stackalloc byte[8];
            fs.ReadExactly(lenBytes);
            ulong headerLength = BitConverter.ToUInt64(lenBytes);
            if (headerLength > (ulong)(fileLength - 8))
                throw new CheckpointException($"{path}: header length {headerLength} runs past the end of the file ({fileLength} bytes)");
            if (headerLength > MaxHeaderBytes) throw new CheckpointException($"{path}: header of {headerLength} bytes exceeds the 100 MB limit");
            header = new byte[headerLength];
            fs.ReadExactly(header);
        }
        long dataStart = 8 + header.LongLength, dataLength = fileLength - dataStart;
        var (tensors, metadata) = ParseHeader(path, header, dataLength);
        MemoryMappedFile? map = null; MemoryMappedViewAccessor? view = null;
        if (fileLength > 0 && tensors.Count > 0)
        {
            map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            view = map.CreateViewAccessor(0, fileLength, MemoryMappedFileAccess.Read);
        }
        return new SafetensorsFile(path, map, view, dataStart, tensors, metadata);
    }

    static (Dictionary<string, SafetensorInfo>, Dictionary<string, string>) ParseHeader(string path, byte[] header, long dataLength)
    {
        JsonObject root;
        try
        {
            root = JsonNode.Parse(Encoding.UTF8.GetString(header).TrimEnd(' ')) as JsonObject
                   ?? throw new CheckpointException($"{path}: header is not a JSON object");
        }
        catch (JsonException e) { throw new CheckpointException($"{path}: header is not valid JSON ({e.Message.Split('.')[0]})"); }

        var tensors = new Dictionary<string, SafetensorInfo>();
        var metadata = new Dictionary<string, string>();
        foreach (var (name, node) in root)
        {
            if (name == "__metadata__")
            {
                if (node is JsonObject meta)
                    foreach (var (k, v) in meta) metadata[k] = v?.GetValueKind() == JsonValueKind.String ? v.GetValue<string>() : v?.ToJsonString() ?? "";
                continue;
            }
            if (node is not JsonObject entry) throw new CheckpointException($"{path}: entry '{name}' is not an object");
            string dtype = entry["dtype"]?.GetValueKind() == JsonValueKind.String ? entry["dtype"]!.GetValue<string>() : "";
            if (!DTypes.TryGetValue(dtype, out var dt))
                throw new CheckpointException($"{path}: tensor '{name}' has unknown dtype '{dtype}' (supported: {string.Join(", ", DTypes.Keys)})");
            long[] shape = ReadLongs(path, name, entry["shape"], "shape");
            long[] offsets = ReadLongs(path, name, entry["data_offsets"], "data_offsets");
            if (shape.Any(d => d < 0)) throw new CheckpointException($"{path}: tensor '{name}' has a negative dimension in shape [{string.Join(",", shape)}]");
            if (offsets.Length != 2 || offsets[0] < 0 || offsets[1] < offsets[0])
                throw new CheckpointException($"{path}: tensor '{name}' has invalid data_offsets [{string.Join(",", offsets)}]");
            if (offsets[1] > dataLength)
                throw new CheckpointException($"{path}: tensor '{name}' ends at byte {offsets[1]} past the data section ({dataLength} bytes)");
            var info = new SafetensorInfo(name, dtype, shape, offsets[0], offsets[1]);
            long expectedBytes;
            try { expectedBytes = checked(info.ElementCount * dt.Size); }
            catch (OverflowException) { throw new CheckpointException($"{path}: tensor '{name}' shape [{string.Join(",", shape)}] is too large"); }
            if (expectedBytes != offsets[1] - offsets[0])
                throw new CheckpointException($"{path}: tensor '{name}' of {dtype} [{string.Join(",", shape)}] needs {expectedBytes} bytes, its offsets span {offsets[1] - offsets[0]}");
            tensors[name] = info;
        }
        SafetensorInfo? previous = null;
        foreach (var t in tensors.Values.OrderBy(t => t.Begin).ThenBy(t => t.End))
        {
            if (previous != null && t.Begin < previous.End)
                throw new CheckpointException($"{path}: tensors '{previous.Name}' and '{t.Name}' overlap (bytes {t.Begin}..{previous.End})");
            previous = t;
        }
        return (tensors, metadata);
    }

    static long[] ReadLongs(string path, string name, JsonNode? node, string field)
    {
        if (node is not JsonArray arr) throw new CheckpointException($"{path}: tensor '{name}' has no '{field}' array");
        var result = new long[arr.Count];
        for (int i = 0; i < arr.Count; i++)
        {
            if (arr[i]?.GetValueKind() != JsonValueKind.Number || !arr[i]!.AsValue().TryGetValue(out long v))
                throw new CheckpointException($"{path}: tensor '{name}' has a non-integer entry in '{field}'");
            result[i] = v;
        }
        return result;
    }

    public static ScalarType TorchType(string dtype) => DTypes[dtype].Type;

    public static string DTypeName(ScalarType type) =>
        DTypes.FirstOrDefault(kv => kv.Value.Type == type).Key ?? throw new ArgumentException($"dtype {type} cannot be stored in safetensors");

    /// <summary>Copies a tensor out of the mapping into a new CPU tensor of its stored dtype.</summary>
    public unsafe Tensor Load(string name)
    {
        if (!Tensors.TryGetValue(name, out var info)) throw new CheckpointException($"{Path}: no tensor named '{name}'");
        var t = torch.empty(info.Shape, DTypes[info.DType].Type);
        long bytes = info.End - info.Begin;
        if (bytes == 0) return t;
        byte* basePtr = null;
        _view!.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            byte* src = basePtr + _view.PointerOffset + _dataStart + info.Begin;
            new ReadOnlySpan<byte>(src, checked((int)bytes)).CopyTo(t.bytes);
        }
        finally { _view.SafeMemoryMappedViewHandle.ReleasePointer(); }
        return t;
    }

    public void Dispose()
    {
        _view?.Dispose();
        _map?.Dispose();
    }
}

/// <summary>Writes safetensors files: header padded with spaces to a multiple of 8 bytes, tensors in the given order,
/// written to a temporary file and renamed, so a reader never sees a half-written file.</summary>
public static class SafetensorsWriter
{
    public sealed record Entry(string Name, ScalarType DType, long[] Shape);

    public static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.ToList();
        Write(path, list.Select(kv => new Entry(kv.Key, kv.Value.dtype, kv.Value.shape)).ToList(), i => list[i].Value, metadata, disposeProduced: false);
    }

    /// <summary>Streams tensors produced one at a time (e.g. random weights of a 7B model), so at most one is in memory.</summary>
    public static void Write(string path, IReadOnlyList<Entry> entries, Func<int, Tensor> produce,
        IReadOnlyDictionary<string, string>? metadata = null, bool disposeProduced = true)
    {
        var header = new JsonObject();
        if (metadata is { Count: > 0 })
        {
            var meta = new JsonObject();
            foreach (var (k, v) in metadata) meta[k] = v;
            header["__metadata__"] = meta;
        }
        long offset = 0;
        foreach (var e in entries)
        {
            long bytes = e.Shape.Aggregate(1L, (a, b) => a * b) * ElementSize(e.DType);
            header[e.Name] = new JsonObject
            {
                ["dtype"] = SafetensorsFile.DTypeName(e.DType),
                ["shape"] = new JsonArray(e.Shape.Select(d => (JsonNode)d).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + bytes),
            };
            offset += bytes;
        }
        var headerBytes = Encoding.UTF8.GetBytes(header.ToJsonString());
        int padded = (headerBytes.Length + 7) / 8 * 8;
        var tmp = path + ".tmp";
        using (var fs = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
        {
            fs.Write(BitConverter.GetBytes((ulong)padded));
            fs.Write(headerBytes);
            for (int i = headerBytes.Length; i < padded; i++) fs.WriteByte((byte)' ');
            for (int i = 0; i < entries.Count; i++)
            {
                var t = produce(i);
                try
                {
                    if (t.dtype != entries[i].DType || !t.shape.SequenceEqual(entries[i].Shape))
                        throw new InvalidOperationException($"tensor '{entries[i].Name}' produced as {t.dtype} [{string.Join(",", t.shape)}], declared {entries[i].DType} [{string.Join(",", entries[i].Shape)}]");
                    WriteData(fs, t);
                }
                finally { if (disposeProduced) t.Dispose(); }
            }
        }
        File.Move(tmp, path, overwrite: true);
    }

    static long ElementSize(ScalarType t) => t switch
    {
        ScalarType.Float64 or ScalarType.Int64 => 8,
        ScalarType.Float32 or ScalarType.Int32 => 4,
        ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Int16 => 2,
        ScalarType.Int8 or ScalarType.Byte or ScalarType.Bool => 1,
        _ => throw new ArgumentException($"dtype {t} cannot be stored in safetensors"),
    };

    static void WriteData(Stream fs, Tensor t)
    {
        using var c = t.device_type == DeviceType.CPU ? t.contiguous() : t.cpu().contiguous();
        if (c.NumberOfElements > 0) fs.Write(c.bytes);
    }
}
