using System.IO.Compression;
using System.Text;

namespace OpenVLA.Policy.Checkpoint;

/// <summary>One tensor of a PyTorch state dict, materialised contiguous (row-major) as float32.</summary>
/// <param name="DType">The stored element type as PyTorch names its storage ("BFloat16", "Float", "Half", ...).</param>
public sealed record TorchTensor(string DType, long[] Shape, float[] Data)
{
    public long NumElements => Shape.Aggregate(1L, (a, b) => a * b);
    public string ShapeText => "[" + string.Join(", ", Shape) + "]";
}

/// <summary>
/// Reads a state dict saved by <c>torch.save(module.state_dict(), path)</c> (the zip format PyTorch has written since
/// 1.6: <c>&lt;name&gt;/data.pkl</c> and one raw little-endian storage per tensor under <c>&lt;name&gt;/data/</c>) without
/// running any pickle code. The pickle is interpreted by a small stack machine that knows only the opcodes a state dict
/// uses and only these globals: <c>collections.OrderedDict</c>, <c>torch._utils._rebuild_tensor_v2</c>,
/// <c>torch._utils._rebuild_parameter</c> and the typed storages (<c>torch.FloatStorage</c>, ...). Anything else — a
/// global such as <c>os.system</c>, an unknown opcode, a tensor view outside its storage — is refused with one line,
/// before any storage is read. This is the whitelist that <c>torch.load(weights_only=True)</c> applies, which is how the
/// openvla-oft scripts load these files. Keys keep their names; <see cref="StripPrefix"/> removes DDP's "module.".
/// </summary>
public static class TorchStateDict
{
    /// <summary>Largest data.pkl read (a state dict's pickle holds names and shapes only: a few hundred bytes per tensor).</summary>
    const long MaxPickleBytes = 64L << 20;

    static readonly Dictionary<string, int> StorageElementSize = new(StringComparer.Ordinal)
    {
        ["FloatStorage"] = 4, ["BFloat16Storage"] = 2, ["HalfStorage"] = 2, ["DoubleStorage"] = 8,
        ["LongStorage"] = 8, ["IntStorage"] = 4, ["ShortStorage"] = 2, ["CharStorage"] = 1, ["ByteStorage"] = 1, ["BoolStorage"] = 1,
    };

    public static Dictionary<string, TorchTensor> Load(string path)
    {
        if (!File.Exists(path)) throw new CheckpointException($"{path}: file not found");
        ZipArchive zip;
        try { zip = ZipFile.OpenRead(path); }
        catch (InvalidDataException) { throw new CheckpointException($"{Path.GetFileName(path)}: not a PyTorch zip checkpoint (the legacy pre-1.6 format is not supported; re-save it with a current torch.save)"); }
        using (zip)
        {
            var pkl = zip.Entries.Where(e => e.FullName.EndsWith("/data.pkl", StringComparison.Ordinal) && e.FullName.Count(c => c == '/') == 1).ToList();
            if (pkl.Count != 1) throw new CheckpointException($"{Path.GetFileName(path)}: expected one <name>/data.pkl in the zip, found {pkl.Count}");
            string prefix = pkl[0].FullName[..^"data.pkl".Length];
            if (pkl[0].Length > MaxPickleBytes) throw new CheckpointException($"{Path.GetFileName(path)}: data.pkl is {pkl[0].Length} bytes, more than a state dict needs");
            byte[] bytes;
            using (var s = pkl[0].Open())
            using (var ms = new MemoryStream())
            {
                s.CopyTo(ms);
                bytes = ms.ToArray();
            }
            object root;
            try { root = new Unpickler(bytes).Run(); }
            catch (PickleException e) { throw new CheckpointException($"{Path.GetFileName(path)}: {e.Message}"); }
            if (root is not Dictionary<object, object?> dict)
                throw new CheckpointException($"{Path.GetFileName(path)}: the pickle holds a {TypeName(root)}, not a state dict");

            var result = new Dictionary<string, TorchTensor>(StringComparer.Ordinal);
            var storages = new Dictionary<string, byte[]>(StringComparer.Ordinal);
            foreach (var (k, v) in dict)
            {
                if (k is not string name) throw new CheckpointException($"{Path.GetFileName(path)}: a state-dict key is a {TypeName(k)}, not a string");
                if (v is not TensorRef t) throw new CheckpointException($"{Path.GetFileName(path)}: '{name}' holds a {TypeName(v)}, not a tensor");
                if (!storages.TryGetValue(t.Storage.Key, out var data))
                {
                    var entry = zip.GetEntry(prefix + "data/" + t.Storage.Key)
                        ?? throw new CheckpointException($"{Path.GetFileName(path)}: storage '{t.Storage.Key}' of '{name}' is missing from the zip");
                    long expected = t.Storage.NumElements * t.Storage.ElementSize;
                    if (entry.Length != expected)
                        throw new CheckpointException($"{Path.GetFileName(path)}: storage '{t.Storage.Key}' has {entry.Length} bytes, its header says {expected}");
                    data = new byte[expected];
                    using var s = entry.Open();
                    s.ReadExactly(data);
                    storages[t.Storage.Key] = data;
                }
                result[name] = Materialise(name, t, data, path);
            }
            return result;
        }
    }

    /// <summary>
    /// Writes tensors as <c>torch.save(state_dict)</c> does: a zip named after the file, with <c>data.pkl</c> (pickle
    /// protocol 2: an OrderedDict of <c>torch._utils._rebuild_tensor_v2</c> calls on typed storages), one little-endian
    /// storage per tensor under <c>data/</c>, and the <c>version</c> and <c>byteorder</c> records. PyTorch's
    /// <c>torch.load(weights_only=True)</c> reads it (checked with Debian's torch 1.13, tools/oftref).
    /// </summary>
    /// <param name="dtype">"Float" or "BFloat16" (bf16 is rounded to nearest even, as torch's .to does)</param>
    public static void Save(string path, IReadOnlyList<(string Name, long[] Shape, float[] Data)> tensors, string dtype)
    {
        if (dtype is not ("Float" or "BFloat16")) throw new ArgumentException($"unsupported dtype {dtype}", nameof(dtype));
        var archive = Path.GetFileNameWithoutExtension(path);
        var pickle = new MemoryStream();
        void Op(byte b) => pickle.WriteByte(b);
        void Text(string s) { var b = Encoding.UTF8.GetBytes(s); Op((byte)'X'); pickle.Write(BitConverter.GetBytes(b.Length)); pickle.Write(b); }
        void Global(string module, string name) { Op((byte)'c'); pickle.Write(Encoding.ASCII.GetBytes(module + "\n" + name + "\n")); }
        void Int(long v)
        {
            if (v is >= int.MinValue and <= int.MaxValue) { Op((byte)'J'); pickle.Write(BitConverter.GetBytes((int)v)); }
            else { Op(0x8a); Op(8); pickle.Write(BitConverter.GetBytes(v)); }
        }
        void Tuple(IEnumerable<long> values) { Op((byte)'('); foreach (var v in values) Int(v); Op((byte)'t'); }

        Op(0x80); Op(2);                                                       // PROTO 2
        Global("collections", "OrderedDict"); Op((byte)')'); Op((byte)'R');   // OrderedDict()
        Op((byte)'(');
        for (int i = 0; i < tensors.Count; i++)
        {
            var (name, shape, data) = tensors[i];
            long numel = shape.Aggregate(1L, (a, b) => a * b);
            if (numel != data.LongLength) throw new ArgumentException($"'{name}': shape [{string.Join(", ", shape)}] holds {numel} values, got {data.LongLength}");
            Text(name);
            Global("torch._utils", "_rebuild_tensor_v2");
            Op((byte)'(');
            Op((byte)'('); Text("storage"); Global("torch", dtype + "Storage"); Text(i.ToString(System.Globalization.CultureInfo.InvariantCulture)); Text("cpu"); Int(numel); Op((byte)'t');
            Op((byte)'Q');                                                     // BINPERSID
            Int(0);                                                            // storage offset
            Tuple(shape);
            var stride = new long[shape.Length];
            for (int d = shape.Length - 1, acc = 1; d >= 0; d--) { stride[d] = acc; acc = checked(acc * (int)shape[d]); }
            Tuple(stride);
            Op(0x89);                                                          // requires_grad False
            Global("collections", "OrderedDict"); Op((byte)')'); Op((byte)'R'); // backward hooks
            Op((byte)'t');
            Op((byte)'R');
        }
        Op((byte)'u');                                                         // SETITEMS
        Op((byte)'.');

        var tmp = path + ".tmp";
        using (var file = File.Create(tmp))
        using (var zip = new ZipArchive(file, ZipArchiveMode.Create))
        {
            void Entry(string name, ReadOnlySpan<byte> bytes)
            {
                using var w = zip.CreateEntry(archive + "/" + name, CompressionLevel.NoCompression).Open();
                w.Write(bytes);
            }
            Entry("data.pkl", pickle.ToArray());
            Entry("byteorder", "little"u8);
            for (int i = 0; i < tensors.Count; i++)
            {
                var data = tensors[i].Data;
                var bytes = new byte[data.LongLength * (dtype == "Float" ? 4 : 2)];
                if (dtype == "Float") Buffer.BlockCopy(data, 0, bytes, 0, bytes.Length);
                else
                    for (long j = 0; j < data.LongLength; j++)
                        BitConverter.TryWriteBytes(bytes.AsSpan((int)(j * 2), 2), BFloat16Bits(data[j]));
                Entry("data/" + i.ToString(System.Globalization.CultureInfo.InvariantCulture), bytes);
            }
            Entry("version", "3\n"u8);
        }
        File.Move(tmp, path, overwrite: true);
    }

    /// <summary>float32 → bf16 bits, round to nearest even (NaN stays NaN).</summary>
    static ushort BFloat16Bits(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        if (float.IsNaN(value)) return (ushort)((bits >> 16) | 0x40);
        return (ushort)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }

    /// <summary>Keys without a leading prefix (DDP saves <c>module.</c>); keys without it stay as they are.</summary>
    public static Dictionary<string, TorchTensor> StripPrefix(Dictionary<string, TorchTensor> stateDict, string prefix)
    {
        var result = new Dictionary<string, TorchTensor>(StringComparer.Ordinal);
        foreach (var (k, v) in stateDict)
        {
            var key = k.StartsWith(prefix, StringComparison.Ordinal) ? k[prefix.Length..] : k;
            if (!result.TryAdd(key, v)) throw new CheckpointException($"tensor '{key}' appears both with and without the '{prefix}' prefix");
        }
        return result;
    }

    static TorchTensor Materialise(string name, TensorRef t, byte[] data, string path)
    {
        long n = 1;
        foreach (var d in t.Shape)
        {
            if (d < 0) throw new CheckpointException($"{Path.GetFileName(path)}: '{name}' has a negative dimension");
            n = checked(n * d);
        }
        if (t.Shape.Length != t.Stride.Length) throw new CheckpointException($"{Path.GetFileName(path)}: '{name}' has {t.Shape.Length} sizes but {t.Stride.Length} strides");
        if (n > 0)
        {
            long last = t.Offset;
            for (int i = 0; i < t.Shape.Length; i++)
            {
                if (t.Stride[i] < 0) throw new CheckpointException($"{Path.GetFileName(path)}: '{name}' has a negative stride");
                last += (t.Shape[i] - 1) * t.Stride[i];
            }
            if (t.Offset < 0 || last >= t.Storage.NumElements)
                throw new CheckpointException($"{Path.GetFileName(path)}: '{name}' reaches element {last} of a storage of {t.Storage.NumElements}");
        }
        var values = new float[n];
        var index = new long[t.Shape.Length];
        for (long i = 0; i < n; i++)
        {
            long src = t.Offset;
            for (int d = 0; d < index.Length; d++) src += index[d] * t.Stride[d];
            values[i] = Element(data, src, t.Storage.DType);
            for (int d = index.Length - 1; d >= 0; d--)
            {
                if (++index[d] < t.Shape[d]) break;
                index[d] = 0;
            }
        }
        return new TorchTensor(t.Storage.DType, t.Shape, values);
    }

    static float Element(byte[] data, long i, string dtype) => dtype switch
    {
        "Float" => BitConverter.ToSingle(data, (int)(i * 4)),
        "BFloat16" => BitConverter.Int32BitsToSingle(BitConverter.ToUInt16(data, (int)(i * 2)) << 16),
        "Half" => (float)BitConverter.ToHalf(data, (int)(i * 2)),
        "Double" => (float)BitConverter.ToDouble(data, (int)(i * 8)),
        "Long" => BitConverter.ToInt64(data, (int)(i * 8)),
        "Int" => BitConverter.ToInt32(data, (int)(i * 4)),
        "Short" => BitConverter.ToInt16(data, (int)(i * 2)),
        "Char" => (sbyte)data[i],
        "Byte" => data[i],
        "Bool" => data[i] != 0 ? 1f : 0f,
        _ => throw new CheckpointException($"unsupported storage type {dtype}"),
    };

    static string TypeName(object? o) => o switch
    {
        null => "None",
        string => "string",
        long or System.Numerics.BigInteger => "int",
        double => "float",
        bool => "bool",
        object[] => "tuple",
        List<object?> => "list",
        Dictionary<object, object?> => "dict",
        TensorRef => "tensor",
        _ => o.GetType().Name,
    };

    sealed class PickleException(string message) : Exception(message);

    sealed record StorageRef(string DType, int ElementSize, string Key, long NumElements);
    sealed record TensorRef(StorageRef Storage, long Offset, long[] Shape, long[] Stride);
    sealed record Global(string Module, string Name)
    {
        public string FullName => Module + "." + Name;
    }
    sealed class Mark { public static readonly Mark Instance = new(); }

    /// <summary>The subset of the pickle machine (protocols 2–4) that torch.save uses for a state dict.</summary>
    sealed class Unpickler(byte[] bytes)
    {
        int _pos;
        readonly List<object?> _stack = [];
        readonly Dictionary<long, object?> _memo = [];

        public object Run()
        {
            while (true)
            {
                if (_pos >= bytes.Length) throw new PickleException("the pickle ends without a STOP");
                byte op = bytes[_pos++];
                switch (op)
                {
                    case 0x80: _pos++; break;                                           // PROTO n
                    case 0x95: Take(8); break;                                          // FRAME length
                    case (byte)'.':                                                     // STOP
                        return Pop() ?? throw new PickleException("the pickle holds None, not a state dict");
                    case (byte)'}': Push(new Dictionary<object, object?>()); break;     // EMPTY_DICT
                    case (byte)']': Push(new List<object?>()); break;                   // EMPTY_LIST
                    case (byte)')': Push(Array.Empty<object?>()); break;                // EMPTY_TUPLE
                    case (byte)'(': Push(Mark.Instance); break;                         // MARK
                    case (byte)'t': Push(PopToMark().ToArray()); break;                 // TUPLE
                    case 0x85: { var a = Pop(); Push(new[] { a }); break; }             // TUPLE1
                    case 0x86: { var b = Pop(); var a = Pop(); Push(new[] { a, b }); break; }
                    case 0x87: { var c = Pop(); var b = Pop(); var a = Pop(); Push(new[] { a, b, c }); break; }
                    case (byte)'N': Push(null); break;
                    case 0x88: Push(true); break;
                    case 0x89: Push(false); break;
                    case (byte)'K': Push((long)bytes[_pos++]); break;                   // BININT1
                    case (byte)'M': Push((long)BitConverter.ToUInt16(Take(2))); break;  // BININT2
                    case (byte)'J': Push((long)BitConverter.ToInt32(Take(4))); break;   // BININT
                    case 0x8a: Push(Long1()); break;                                    // LONG1
                    case (byte)'G':                                                     // BINFLOAT (big-endian)
                    {
                        var f = Take(8).ToArray();
                        Array.Reverse(f);
                        Push(BitConverter.ToDouble(f));
                        break;
                    }
                    case (byte)'X': Push(Utf8(BitConverter.ToInt32(Take(4)))); break;  // BINUNICODE
                    case 0x8c: Push(Utf8(bytes[_pos++])); break;                        // SHORT_BINUNICODE
                    case (byte)'T': Push(Latin1(BitConverter.ToInt32(Take(4)))); break; // BINSTRING
                    case (byte)'U': Push(Latin1(bytes[_pos++])); break;                 // SHORT_BINSTRING
                    case (byte)'q': _memo[bytes[_pos++]] = Peek(); break;               // BINPUT
                    case (byte)'r': _memo[BitConverter.ToUInt32(Take(4))] = Peek(); break;
                    case 0x94: _memo[_memo.Count] = Peek(); break;                      // MEMOIZE
                    case (byte)'h': Push(Get(bytes[_pos++])); break;                    // BINGET
                    case (byte)'j': Push(Get(BitConverter.ToUInt32(Take(4)))); break;   // LONG_BINGET
                    case (byte)'c': Push(Whitelisted(Line(), Line())); break;           // GLOBAL
                    case 0x93:                                                          // STACK_GLOBAL
                    {
                        var name = Pop() as string; var module = Pop() as string;
                        if (name is null || module is null) throw new PickleException("STACK_GLOBAL without two strings");
                        Push(Whitelisted(module, name));
                        break;
                    }
                    case (byte)'Q': Push(PersistentLoad(Pop())); break;                 // BINPERSID
                    case (byte)'R': { var args = Pop(); var f = Pop(); Push(Call(f, args)); break; }  // REDUCE
                    case (byte)'b': { var state = Pop(); Build(Peek(), state); break; } // BUILD
                    case (byte)'s': { var v = Pop(); var k = Pop(); SetItem(Peek(), k, v); break; }
                    case (byte)'u':                                                     // SETITEMS
                    {
                        var items = PopToMark();
                        if (items.Count % 2 != 0) throw new PickleException("SETITEMS with an odd number of items");
                        var target = Peek();
                        for (int i = 0; i < items.Count; i += 2) SetItem(target, items[i], items[i + 1]);
                        break;
                    }
                    case (byte)'a': { var v = Pop(); AsList(Peek()).Add(v); break; }    // APPEND
                    case (byte)'e': { var items = PopToMark(); AsList(Peek()).AddRange(items); break; }
                    default:
                        throw new PickleException($"pickle opcode 0x{op:x2} at byte {_pos - 1} is not one a state dict uses; refusing to read further");
                }
            }
        }

        static Global Whitelisted(string module, string name)
        {
            bool ok = (module, name) switch
            {
                ("collections", "OrderedDict") => true,
                ("torch._utils", "_rebuild_tensor_v2") or ("torch._utils", "_rebuild_parameter") => true,
                ("torch", _) when StorageElementSize.ContainsKey(name) => true,
                _ => false,
            };
            if (!ok) throw new PickleException($"refusing the pickle global '{module}.{name}': only state dicts of tensors are read (allowed: collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch.*Storage)");
            return new Global(module, name);
        }

        static object? Call(object? f, object? args)
        {
            if (f is not Global g) throw new PickleException("REDUCE on something that is not an allowed global");
            var a = args as object?[] ?? throw new PickleException($"{g.FullName} called without an argument tuple");
            switch (g.FullName)
            {
                case "collections.OrderedDict":
                    if (a.Length != 0) throw new PickleException("collections.OrderedDict called with arguments");
                    return new Dictionary<object, object?>();
                case "torch._utils._rebuild_tensor_v2":
                    // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
                    if (a.Length < 6 || a[0] is not StorageRef storage || a[1] is not long offset || a[2] is not object?[] size || a[3] is not object?[] stride)
                        throw new PickleException("torch._utils._rebuild_tensor_v2 called with unexpected arguments");
                    return new TensorRef(storage, offset, size.Select(ToLong).ToArray(), stride.Select(ToLong).ToArray());
                case "torch._utils._rebuild_parameter":
                    if (a.Length < 1 || a[0] is not TensorRef t) throw new PickleException("torch._utils._rebuild_parameter called without a tensor");
                    return t;
                default:
                    throw new PickleException($"{g.FullName} cannot be called");
            }
        }

        static long ToLong(object? o) => o is long l ? l : throw new PickleException("a tensor size or stride is not an integer");

        static object PersistentLoad(object? pid)
        {
            // ('storage', <storage type global>, key, location, numel)
            if (pid is not object?[] { Length: 5 } t || t[0] as string != "storage" || t[1] is not Global g || t[2] is not string key || t[4] is not long numel)
                throw new PickleException("a persistent id that is not a ('storage', type, key, location, numel) record");
            if (g.Module != "torch" || !StorageElementSize.TryGetValue(g.Name, out int size))
                throw new PickleException($"unsupported storage type {g.FullName}");
            if (numel < 0 || key.Length == 0 || key.Contains('/') || key.Contains('\\') || key.Contains(".."))
                throw new PickleException($"invalid storage record '{key}'");
            return new StorageRef(g.Name[..^"Storage".Length], size, key, numel);
        }

        static void Build(object? target, object? state)
        {
            // An OrderedDict subclass instance's __dict__ (state_dict()._metadata): accepted and ignored.
            if (target is Dictionary<object, object?> && state is Dictionary<object, object?> or null) return;
            throw new PickleException("BUILD on an object a state dict does not contain");
        }

        static void SetItem(object? target, object? key, object? value)
        {
            if (target is not Dictionary<object, object?> d) throw new PickleException("SETITEM on something that is not a dict");
            if (key is null or Dictionary<object, object?> or List<object?>) throw new PickleException("a dict key that is not hashable");
            d[key is object?[] tuple ? string.Join("\u0001", tuple) : key] = value;
        }

        static List<object?> AsList(object? o) => o as List<object?> ?? throw new PickleException("APPEND on something that is not a list");

        object Long1()
        {
            int n = bytes[_pos++];
            var raw = Take(n);
            if (n > 8) throw new PickleException("an integer wider than 64 bits");
            long v = 0;
            for (int i = n - 1; i >= 0; i--) v = (v << 8) | raw[i];
            if (n > 0 && n < 8 && (raw[n - 1] & 0x80) != 0) v -= 1L << (8 * n);
            return v;
        }

        ReadOnlySpan<byte> Take(int n)
        {
            if (n < 0 || _pos + n > bytes.Length) throw new PickleException("the pickle is truncated");
            var s = bytes.AsSpan(_pos, n);
            _pos += n;
            return s;
        }

        string Utf8(int n) => Encoding.UTF8.GetString(Take(n));
        string Latin1(int n) => Encoding.Latin1.GetString(Take(n));

        string Line()
        {
            int end = Array.IndexOf(bytes, (byte)'\n', _pos);
            if (end < 0 || end - _pos > 256) throw new PickleException("a malformed GLOBAL");
            var s = Encoding.ASCII.GetString(bytes, _pos, end - _pos);
            _pos = end + 1;
            return s;
        }

        void Push(object? o)
        {
            if (_stack.Count > 1_000_000) throw new PickleException("the pickle's stack grows without bound");
            _stack.Add(o);
        }

        object? Pop()
        {
            if (_stack.Count == 0 || _stack[^1] is Mark) throw new PickleException("the pickle pops an empty stack");
            var o = _stack[^1];
            _stack.RemoveAt(_stack.Count - 1);
            return o;
        }

        object? Peek() => _stack.Count > 0 && _stack[^1] is not Mark ? _stack[^1] : throw new PickleException("the pickle reads an empty stack");

        object? Get(long i) => _memo.TryGetValue(i, out var o) ? o : throw new PickleException($"the pickle reads memo {i} before writing it");

        List<object?> PopToMark()
        {
            int m = _stack.FindLastIndex(o => o is Mark);
            if (m < 0) throw new PickleException("the pickle closes a MARK it never opened");
            var items = _stack.GetRange(m + 1, _stack.Count - m - 1);
            _stack.RemoveRange(m, _stack.Count - m);
            return items;
        }
    }
}
