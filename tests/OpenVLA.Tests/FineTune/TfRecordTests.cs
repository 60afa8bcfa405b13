using System.Text;
using OpenVLA.FineTune.Data;

namespace OpenVLA.Tests.FineTune;

public class TfRecordTests
{
    [Fact]
    public void Crc32C_matches_the_standard_check_value()
    {
        // The CRC-32C check value of "123456789" (RFC 3720 / iSCSI).
        Assert.Equal(0xE3069283u, TfRecordFormat.Crc32C(Encoding.ASCII.GetBytes("123456789")));
        Assert.Equal(0u, TfRecordFormat.Crc32C([]));
    }

    [Fact]
    public void Framing_is_length_then_masked_crcs_around_the_data()
    {
        using var dir = new TempDir();
        string path = dir["one.tfrecord"];
        using (var w = TfRecordWriter.Create(path)) w.Write("abc"u8);
        var bytes = File.ReadAllBytes(path);
        Assert.Equal(8 + 4 + 3 + 4, bytes.Length);
        Assert.Equal(3UL, BitConverter.ToUInt64(bytes, 0));
        uint crc = TfRecordFormat.Crc32C(bytes.AsSpan(0, 8));
        Assert.Equal(((crc >> 15) | (crc << 17)) + 0xA282EAD8u, BitConverter.ToUInt32(bytes, 8));
        Assert.Equal("abc"u8.ToArray(), bytes[12..15]);
        Assert.Equal(TfRecordFormat.MaskedCrc32C("abc"u8), BitConverter.ToUInt32(bytes, 15));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Records_round_trip_plain_and_gzip(bool gzip)
    {
        using var dir = new TempDir();
        string path = dir["shard.tfrecord-00000-of-00001"];
        var records = new[] { "first"u8.ToArray(), Array.Empty<byte>(), Enumerable.Range(0, 70_000).Select(i => (byte)i).ToArray() };
        using (var w = TfRecordWriter.Create(path, gzip)) foreach (var r in records) w.Write(r);

        Assert.Equal(gzip, TfRecordFormat.IsGzip(path));
        Assert.Equal(records, TfRecordReader.ReadAll(path).ToArray());

        // Skipping and coming back to an offset, as the RLDS index does.
        using var reader = TfRecordReader.Open(path);
        Assert.True(reader.TrySkip());
        Assert.True(reader.TrySkip());
        long offset = reader.Offset;
        Assert.Equal(2, reader.RecordIndex);
        using var again = TfRecordReader.Open(path);
        again.SkipTo(offset, 2);
        Assert.True(again.TryRead(out var third));
        Assert.Equal(records[2], third);
        Assert.False(again.TryRead(out _));

        // A plain file can go back; a GZIP stream cannot and says so.
        if (gzip) Assert.Throws<InvalidOperationException>(() => again.SkipTo(0, 0));
        else
        {
            again.SkipTo(0, 0);
            Assert.True(again.TryRead(out var first));
            Assert.Equal(records[0], first);
        }
    }

    [Fact]
    public void A_corrupted_data_crc_names_the_file_and_the_record()
    {
        using var dir = new TempDir();
        string path = dir["bad.tfrecord"];
        using (var w = TfRecordWriter.Create(path)) { w.Write("zero"u8); w.Write("one"u8); w.Write("two"u8); }
        var bytes = File.ReadAllBytes(path);
        int third = (16 + 4) + (16 + 3);   // start of record 2
        bytes[third + 12] ^= 0x01;         // flip a bit of its data
        File.WriteAllBytes(path, bytes);

        using var reader = TfRecordReader.Open(path);
        Assert.True(reader.TryRead(out _));
        Assert.True(reader.TryRead(out _));
        var e = Assert.Throws<DatasetException>(() => reader.TryRead(out _));
        Assert.Contains(path, e.Message);
        Assert.Contains("record 2", e.Message);
        Assert.Contains("CRC", e.Message);
    }

    [Fact]
    public void A_corrupted_length_and_a_truncated_file_are_reported()
    {
        using var dir = new TempDir();
        string path = dir["bad.tfrecord"];
        using (var w = TfRecordWriter.Create(path)) { w.Write("zero"u8); w.Write("one"u8); }
        var bytes = File.ReadAllBytes(path);

        var lengthFlipped = (byte[])bytes.Clone();
        lengthFlipped[20] ^= 0x02;   // first byte of record 1's length
        File.WriteAllBytes(path, lengthFlipped);
        var e = Assert.Throws<DatasetException>(() => TfRecordReader.ReadAll(path).ToList());
        Assert.Contains("record 1 has a length CRC mismatch", e.Message);

        File.WriteAllBytes(path, bytes[..^2]);
        e = Assert.Throws<DatasetException>(() => TfRecordReader.ReadAll(path).ToList());
        Assert.Contains($"TFRecord file {path}: record 1 is truncated", e.Message);
    }
}
