using System.Buffers.Binary;
using System.IO.Compression;
using System.Numerics;

namespace OpenVLA.FineTune.Data;

/// <summary>
/// TFRecord framing: each record is <c>u64 length (LE)</c>, <c>u32 masked CRC32C of those 8 bytes</c>, <c>data</c>,
/// <c>u32 masked CRC32C of data</c>. Masking: <c>((crc &gt;&gt; 15) | (crc &lt;&lt; 17)) + 0xA282EAD8</c>.
/// A shard may be GZIP-compressed as a whole (TFDS "GZIP" compression); the reader detects that.
/// </summary>
public static class TfRecordFormat
{
    private const uint MaskDelta = 0xA282EAD8;

    /// <summary>CRC-32C (Castagnoli), as in TensorFlow's crc32c::Value: initial ~0, final complement.</summary>
    public static uint Crc32C(ReadOnlySpan<byte> data)
    {
        uint crc = ~0u;
        int i = 0;
        for (; i + 8 <= data.Length; i += 8) crc = BitOperations.Crc32C(crc, BinaryPrimitives.ReadUInt64LittleEndian(data[i..]));
        for (; i < data.Length; i++) crc = BitOperations.Crc32C(crc, data[i]);
        return ~crc;
    }

    public static uint MaskedCrc32C(ReadOnlySpan<byte> data)
    {
        uint crc = Crc32C(data);
        return ((crc >> 15) | (crc << 17)) + MaskDelta;
    }

    /// <summary>True when the file starts with the GZIP magic and is not a plain TFRecord whose first length happens to match it.</summary>
    public static bool IsGzip(string path)
    {
        Span<byte> head = stackalloc byte[12];
        using var f = File.OpenRead(path);
        int n = f.ReadAtLeast(head, 12, throwOnEndOfStream: false);
        if (n < 3 || head[0] != 0x1f || head[1] != 0x8b || head[2] != 0x08) return false;
        // A plain TFRecord header carries a valid masked CRC of its length; a GZIP header almost surely does not.
        return n < 12 || BinaryPrimitives.ReadUInt32LittleEndian(head[8..]) != MaskedCrc32C(head[..8]);
    }
}

/// <summary>
/// Reads the records of one TFRecord shard in order, checking both CRCs. Errors name the file and the 0-based record index.
/// <see cref="Offset"/> is the position of the next record in the (decompressed) stream, so a caller can index records and
/// come back to one with <see cref="SkipTo"/>.
/// </summary>
public sealed class TfRecordReader : IDisposable
{
    private readonly Stream _stream;
    private readonly byte[] _header = new byte[12];
    private readonly byte[] _footer = new byte[4];

    public string Path { get; }
    public bool Compressed { get; }
    public bool CanSeekBack => _stream.CanSeek;
    /// <summary>Index of the record the next read returns.</summary>
    public long RecordIndex { get; private set; }
    /// <summary>Byte offset of the next record in the decompressed stream.</summary>
    public long Offset { get; private set; }

    private TfRecordReader(string path, Stream stream, bool compressed)
    {
        Path = path;
        _stream = stream;
        Compressed = compressed;
    }

    /// <param name="gzip">null: detect from the file's first bytes.</param>
    public static TfRecordReader Open(string path, bool? gzip = null)
    {
        if (!File.Exists(path)) throw new DatasetException($"TFRecord file not found: {path}");
        bool compressed = gzip ?? TfRecordFormat.IsGzip(path);
        Stream s = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        if (compressed) s = new BufferedStream(new GZipStream(s, CompressionMode.Decompress), 1 << 16);
        return new TfRecordReader(path, s, compressed);
    }

    /// <summary>Reads the next record; false at a clean end of file.</summary>
    public bool TryRead(out byte[] record)
    {
        record = [];
        if (!TryReadLength(out long length)) return false;
        if (length > Array.MaxLength) throw Corrupt($"declares a length of {length} bytes");
        record = new byte[length];
        ReadExactly(record, "data");
        ReadExactly(_footer, "data CRC");
        uint expected = BinaryPrimitives.ReadUInt32LittleEndian(_footer);
        if (expected != TfRecordFormat.MaskedCrc32C(record))
            throw Corrupt($"has a data CRC mismatch (stored 0x{expected:X8}, computed 0x{TfRecordFormat.MaskedCrc32C(record):X8}): the file is corrupt");
        Advance(length);
        return true;
    }

    /// <summary>Skips the next record without reading its data into memory (its length CRC is still checked); false at end of file.</summary>
    public bool TrySkip()
    {
        if (!TryReadLength(out long length)) return false;
        SkipBytes(length + 4);
        Advance(length);
        return true;
    }

    /// <summary>
    /// Moves to the record at <paramref name="offset"/> (an earlier <see cref="Offset"/>): anywhere in a plain file, only
    /// forward in a GZIP one (<see cref="CanSeekBack"/>).
    /// </summary>
    public void SkipTo(long offset, long recordIndex)
    {
        if (offset < Offset && !_stream.CanSeek) throw new InvalidOperationException($"{Path}: cannot move back from offset {Offset} to {offset} in a GZIP file; reopen it");
        if (_stream.CanSeek) _stream.Position = offset;
        else SkipBytes(offset - Offset);
        Offset = offset;
        RecordIndex = recordIndex;
    }

    /// <summary>Every record of a shard in order.</summary>
    public static IEnumerable<byte[]> ReadAll(string path)
    {
        using var reader = Open(path);
        while (reader.TryRead(out var record)) yield return record;
    }

    private bool TryReadLength(out long length)
    {
        length = 0;
        int n = _stream.ReadAtLeast(_header, _header.Length, throwOnEndOfStream: false);
        if (n == 0) return false;
        if (n < _header.Length) throw Corrupt($"is truncated: {n} of 12 header bytes before the end of the file");
        ulong raw = BinaryPrimitives.ReadUInt64LittleEndian(_header);
        uint expected = BinaryPrimitives.ReadUInt32LittleEndian(_header.AsSpan(8));
        if (expected != TfRecordFormat.MaskedCrc32C(_header.AsSpan(0, 8)))
            throw Corrupt($"has a length CRC mismatch (stored 0x{expected:X8}, computed 0x{TfRecordFormat.MaskedCrc32C(_header.AsSpan(0, 8)):X8}): the file is corrupt or not a TFRecord file");
        length = raw > long.MaxValue ? long.MaxValue : (long)raw;
        return true;
    }

    private void ReadExactly(byte[] buffer, string what)
    {
        int n = _stream.ReadAtLeast(buffer, buffer.Length, throwOnEndOfStream: false);
        if (n < buffer.Length) throw Corrupt($"is truncated: the file ends after {n} of {buffer.Length} bytes of its {what}");
    }

    private void SkipBytes(long count)
    {
        if (_stream.CanSeek)
        {
            if (_stream.Position + count > _stream.Length) throw Corrupt("is truncated: the file ends inside its data");
            _stream.Seek(count, SeekOrigin.Current);
            return;
        }
        var buffer = new byte[(int)Math.Min(count, 1 << 16)];
        while (count > 0)
        {
            int n = _stream.Read(buffer, 0, (int)Math.Min(count, buffer.Length));
            if (n == 0) throw Corrupt("is truncated: the file ends inside its data");
            count -= n;
        }
    }

    private void Advance(long length)
    {
        Offset += 16 + length;
        RecordIndex++;
    }

    private DatasetException Corrupt(string what) => new($"TFRecord file {Path}: record {RecordIndex} {what}");

    public void Dispose() => _stream.Dispose();
}

/// <summary>Writes TFRecord shards (plain or GZIP), e.g. to convert a dataset into RLDS layout or in tests.</summary>
public sealed class TfRecordWriter : IDisposable
{
    private readonly Stream _stream;
    private readonly byte[] _header = new byte[12];
    private readonly byte[] _footer = new byte[4];

    private TfRecordWriter(Stream stream) => _stream = stream;

    public static TfRecordWriter Create(string path, bool gzip = false)
    {
        Stream s = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16);
        if (gzip) s = new GZipStream(s, CompressionLevel.Fastest);
        return new TfRecordWriter(s);
    }

    public void Write(ReadOnlySpan<byte> record)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(_header, (ulong)record.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(_header.AsSpan(8), TfRecordFormat.MaskedCrc32C(_header.AsSpan(0, 8)));
        BinaryPrimitives.WriteUInt32LittleEndian(_footer, TfRecordFormat.MaskedCrc32C(record));
        _stream.Write(_header);
        _stream.Write(record);
        _stream.Write(_footer);
    }

    public void Dispose() => _stream.Dispose();
}
