using System.Buffers.Binary;
using System.IO.Compression;

namespace OpenVLA.Policy.Preprocessing;

public enum ImageFormat { Jpeg, Png }

/// <summary>What a JPEG or PNG container declares, once <see cref="ImageContainer.Validate"/> has checked it is whole.</summary>
public readonly record struct ImageHeader(ImageFormat Format, int Width, int Height)
{
    public string Name => Format == ImageFormat.Jpeg ? "JPEG" : "PNG";
}

/// <summary>
/// How large a frame may be. The pixel cap is checked on the container's declared size, before the decoder allocates
/// anything, so a few kilobytes that declare a huge image cost nothing.
/// </summary>
public sealed record ImageLimits(int MaxSide = 8192, long MaxPixels = 8192L * 8192)
{
    public static readonly ImageLimits Default = new();

    public void Check(long width, long height, string what)
    {
        if (width <= 0 || height <= 0) throw new PolicyInputException($"{what} image size must be positive, got {width}x{height}");
        if (width > MaxSide || height > MaxSide)
            throw new PolicyInputException($"{what} image is {width}x{height} pixels; the largest accepted side is {MaxSide}");
        if (width * height > MaxPixels)
            throw new PolicyInputException($"{what} image is {width}x{height} = {width * height} pixels; the largest accepted is {MaxPixels}");
    }
}

/// <summary>
/// Checks that JPEG or PNG bytes are one whole, well-formed image before a decoder sees them. Decoders are lenient where a
/// robot must not be: libjpeg turns a scan that ends early (or never starts) into grey rows with only a warning, and libpng
/// trusts a chunk's declared length. Here every segment and chunk length is checked against the bytes present, PNG CRCs and
/// the zlib stream's length are verified, and a sequential JPEG's entropy-coded data is walked block by block (Huffman codes
/// only, no IDCT) so a scan that holds fewer blocks than the frame needs is refused. Work is linear in the input and memory
/// is bounded by it (plus a 64 KB buffer). Every failure is a one-line <see cref="PolicyInputException"/>.
/// </summary>
public static class ImageContainer
{
    static ReadOnlySpan<byte> PngSignature => [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A];

    public static ImageFormat? Sniff(ReadOnlySpan<byte> data) =>
        data.StartsWith(PngSignature) ? ImageFormat.Png
        : data.Length >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF ? ImageFormat.Jpeg
        : null;

    /// <summary>The image's format and size if the container is whole and within <paramref name="limits"/>; else throws.</summary>
    public static ImageHeader Validate(ReadOnlySpan<byte> data, ImageLimits limits)
    {
        if (data.IsEmpty) throw new PolicyInputException("image bytes are empty");
        return Sniff(data) switch
        {
            ImageFormat.Png => Png.Validate(data, limits),
            ImageFormat.Jpeg => Jpeg.Validate(data, limits),
            _ => throw new PolicyInputException(
                $"unknown image encoding (expected JPEG or PNG; first bytes {Convert.ToHexString(data[..Math.Min(8, data.Length)])})"),
        };
    }

    static PolicyInputException Bad(string message) => new(message);

    static class Png
    {
        public static ImageHeader Validate(ReadOnlySpan<byte> data, ImageLimits limits)
        {
            int p = 8;
            bool ended = false, palette = false, idatDone = false;
            (uint Width, uint Height, int Depth, int Color, int Interlace)? ihdr = null;
            var idat = new List<(int At, int Length)>();   // the IDAT chunks' data, in order
            while (!ended)
            {
                if (data.Length - p < 12)
                    throw Bad(ihdr is null ? "corrupt PNG image: no valid header with the image size" : $"truncated PNG image: it ends at byte {data.Length} without an IEND chunk");
                uint length = BinaryPrimitives.ReadUInt32BigEndian(data[p..]);
                var type = data.Slice(p + 4, 4);
                string name = ChunkName(type);
                if (length > int.MaxValue || length > data.Length - p - 12)
                    throw Bad($"truncated or corrupt PNG image: chunk {name} at byte {p} declares {length} bytes, {Math.Max(0, data.Length - p - 12)} remain");
                var body = data.Slice(p + 8, (int)length);
                if (Crc32(data.Slice(p + 4, 4 + (int)length)) != BinaryPrimitives.ReadUInt32BigEndian(data[(p + 8 + (int)length)..]))
                    throw Bad($"corrupt PNG image: chunk {name} at byte {p} fails its CRC");
                if (ihdr is null && name != "IHDR") throw Bad("corrupt PNG image: no valid header with the image size (first chunk is not IHDR)");
                switch (name)
                {
                    case "IHDR":
                        if (ihdr is not null) throw Bad("corrupt PNG image: a second IHDR chunk");
                        if (length != 13) throw Bad($"corrupt PNG image: IHDR holds {length} bytes, not 13");
                        ihdr = Header(body);
                        limits.Check(ihdr.Value.Width, ihdr.Value.Height, "PNG");
                        break;
                    case "PLTE":
                        if (length == 0 || length % 3 != 0 || length > 768) throw Bad($"corrupt PNG image: palette of {length} bytes");
                        palette = true;
                        break;
                    case "IDAT":
                        if (idatDone) throw Bad("corrupt PNG image: its IDAT chunks are not consecutive");
                        idat.Add((p + 8, (int)length));
                        break;
                    case "IEND":
                        ended = true;
                        break;
                    default:
                        if ((type[0] & 0x20) == 0) throw Bad($"PNG image has an unknown critical chunk {name}");
                        break;
                }
                if (idat.Count > 0 && name != "IDAT") idatDone = true;
                p += 12 + (int)length;
            }
            var h = ihdr!.Value;
            if (idat.Count == 0) throw Bad("PNG image has no image data (no IDAT chunk)");
            if (h.Color == 3 && !palette) throw Bad("corrupt PNG image: a palette image without a PLTE chunk");
            CheckImageData(data, idat, h.Width, h.Height, h.Depth, h.Color, h.Interlace);
            return new ImageHeader(ImageFormat.Png, (int)h.Width, (int)h.Height);
        }

        static (uint, uint, int, int, int) Header(ReadOnlySpan<byte> b)
        {
            uint width = BinaryPrimitives.ReadUInt32BigEndian(b), height = BinaryPrimitives.ReadUInt32BigEndian(b[4..]);
            int depth = b[8], color = b[9];
            bool valid = color switch
            {
                0 => depth is 1 or 2 or 4 or 8 or 16,
                3 => depth is 1 or 2 or 4 or 8,
                2 or 4 or 6 => depth is 8 or 16,
                _ => false,
            };
            if (!valid) throw Bad($"corrupt PNG image: colour type {color} with bit depth {depth}");
            if (b[10] != 0 || b[11] != 0) throw Bad($"corrupt PNG image: compression method {b[10]}, filter method {b[11]} (both must be 0)");
            if (b[12] > 1) throw Bad($"corrupt PNG image: interlace method {b[12]}");
            return (width, height, depth, color, b[12]);
        }

        /// <summary>The zlib stream of the IDAT chunks must inflate to at least the bytes the header implies.</summary>
        static void CheckImageData(ReadOnlySpan<byte> data, List<(int At, int Length)> idat, uint width, uint height, int depth, int color, int interlace)
        {
            int channels = color switch { 0 or 3 => 1, 4 => 2, 2 => 3, _ => 4 };
            long bitsPerPixel = (long)channels * depth;
            long expected = 0;
            if (interlace == 0) expected = Scanlines(width, height, bitsPerPixel);
            else
                foreach (var (x0, y0, dx, dy) in Adam7)
                    expected += Scanlines((width + (uint)(dx - x0 - 1)) / (uint)dx, (height + (uint)(dy - y0 - 1)) / (uint)dy, bitsPerPixel);

            var compressed = new byte[idat.Sum(c => (long)c.Length)];
            int copied = 0;
            foreach (var (at, length) in idat)
            {
                data.Slice(at, length).CopyTo(compressed.AsSpan(copied));
                copied += length;
            }
            long inflated = 0;
            var buffer = new byte[65536];
            try
            {
                using var z = new ZLibStream(new MemoryStream(compressed), CompressionMode.Decompress);
                for (int n; inflated < expected && (n = z.Read(buffer, 0, (int)Math.Min(buffer.Length, expected - inflated))) > 0;) inflated += n;
            }
            catch (InvalidDataException)
            {
                throw Bad($"corrupt PNG image: its compressed image data is invalid (after {inflated} of {expected} bytes)");
            }
            if (inflated < expected) throw Bad($"truncated PNG image: its image data holds {inflated} of the {expected} bytes the header needs");
        }

        static long Scanlines(long width, long height, long bitsPerPixel) =>
            width == 0 || height == 0 ? 0 : height * (1 + (width * bitsPerPixel + 7) / 8);

        static readonly (int X0, int Y0, int Dx, int Dy)[] Adam7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)];

        static string ChunkName(ReadOnlySpan<byte> type)
        {
            foreach (byte c in type)
                if (c is not ((>= (byte)'A' and <= (byte)'Z') or (>= (byte)'a' and <= (byte)'z'))) return $"0x{Convert.ToHexString(type)}";
            return System.Text.Encoding.ASCII.GetString(type);
        }

        static readonly uint[] CrcTable = Enumerable.Range(0, 256).Select(n =>
        {
            uint c = (uint)n;
            for (int k = 0; k < 8; k++) c = (c & 1) != 0 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            return c;
        }).ToArray();

        /// <summary>The CRC-32 of ISO 3309 that PNG uses (reflected 0x04C11DB7, initial and final complement).</summary>
        public static uint Crc32(ReadOnlySpan<byte> bytes)
        {
            uint c = 0xFFFFFFFFu;
            foreach (byte b in bytes) c = CrcTable[(c ^ b) & 0xFF] ^ (c >> 8);
            return ~c;
        }
    }

    static class Jpeg
    {
        sealed record Component(int Id, int H, int V);

        public static ImageHeader Validate(ReadOnlySpan<byte> data, ImageLimits limits)
        {
            Component[]? components = null;
            int width = 0, height = 0, frameType = -1, restartInterval = 0, scans = 0;
            var huffman = new Huffman?[2, 4];
            int p = 2;
            while (true)
            {
                if (p >= data.Length) throw Bad(scans == 0 && components is null ? "corrupt JPEG image: no valid header with the image size"
                    : "truncated JPEG image: the data ends before the end-of-image marker");
                if (data[p] != 0xFF) throw Bad($"corrupt JPEG image: expected a marker at byte {p}");
                byte marker = data[p + 1 < data.Length ? p + 1 : throw Bad("truncated JPEG image: the data ends inside a marker")];
                if (marker == 0xFF) { p++; continue; }                                  // fill byte
                if (marker is 0x01 or (>= 0xD0 and <= 0xD7)) { p += 2; continue; }      // markers without a length
                if (marker == 0xD8) throw Bad($"corrupt JPEG image: a second start-of-image marker at byte {p}");
                if (marker == 0xD9)
                {
                    if (components is null) throw Bad("corrupt JPEG image: no valid header with the image size");
                    if (scans == 0) throw Bad("JPEG image has no image data (no scan before the end-of-image marker)");
                    return new ImageHeader(ImageFormat.Jpeg, width, height);
                }
                if (p + 4 > data.Length) throw Bad("truncated JPEG image: the data ends inside a segment header");
                int length = BinaryPrimitives.ReadUInt16BigEndian(data[(p + 2)..]);
                if (length < 2 || p + 2 + length > data.Length)
                    throw Bad($"truncated or corrupt JPEG image: the segment at byte {p} declares {length} bytes, {data.Length - p - 2} remain");
                var body = data.Slice(p + 4, length - 2);
                switch (marker)
                {
                    case >= 0xC0 and <= 0xCF when marker is not (0xC4 or 0xC8 or 0xCC):
                        if (components is not null) throw Bad("corrupt JPEG image: a second frame header");
                        if (marker is 0xC3 or 0xC7 or 0xCB or 0xCF) throw Bad("lossless JPEG is not supported");
                        if (body.Length < 6) throw Bad("corrupt JPEG image: short frame header");
                        if (body[0] != 8) throw Bad($"JPEG image has {body[0]}-bit samples; only 8-bit JPEG is supported");
                        height = BinaryPrimitives.ReadUInt16BigEndian(body[1..]);
                        width = BinaryPrimitives.ReadUInt16BigEndian(body[3..]);
                        int count = body[5];
                        if (count is not (1 or 3)) throw Bad($"JPEG image has {count} colour components (expected 1 or 3)");
                        if (body.Length != 6 + 3 * count) throw Bad("corrupt JPEG image: frame header length does not match its components");
                        components = new Component[count];
                        for (int c = 0; c < count; c++)
                        {
                            int h = body[7 + 3 * c] >> 4, v = body[7 + 3 * c] & 15;
                            if (h is < 1 or > 4 || v is < 1 or > 4) throw Bad($"corrupt JPEG image: sampling factors {h}x{v}");
                            components[c] = new Component(body[6 + 3 * c], h, v);
                        }
                        limits.Check(width, height, "JPEG");
                        frameType = marker;
                        break;
                    case 0xC4:
                        Huffman.Define(body, huffman);
                        break;
                    case 0xDD:
                        if (body.Length != 2) throw Bad("corrupt JPEG image: restart interval segment of the wrong length");
                        restartInterval = BinaryPrimitives.ReadUInt16BigEndian(body);
                        break;
                    case 0xDA:
                    {
                        if (components is null) throw Bad("corrupt JPEG image: a scan before the frame header");
                        int start = p + 2 + length, end = EntropyEnd(data, start);
                        if (end == start) throw Bad("JPEG image has a scan with no image data");
                        if (frameType is 0xC0 or 0xC1) CheckSequentialScan(body, data[start..end], components, width, height, huffman, restartInterval);
                        scans++;
                        p = end;
                        continue;
                    }
                }
                p += 2 + length;
            }
        }

        /// <summary>Where a scan's entropy-coded data ends: the first marker that is neither a stuffed 0xFF nor a restart.</summary>
        static int EntropyEnd(ReadOnlySpan<byte> data, int start)
        {
            for (int i = start; i + 1 < data.Length; i++)
                if (data[i] == 0xFF && data[i + 1] is not (0x00 or 0xFF or (>= 0xD0 and <= 0xD7))) return i;
            throw Bad("truncated JPEG image: the data ends inside a scan (no end-of-image marker)");
        }

        /// <summary>Decodes the Huffman codes of every block the scan must hold; refuses a scan that runs out early.</summary>
        static void CheckSequentialScan(ReadOnlySpan<byte> header, ReadOnlySpan<byte> entropy, Component[] frame, int width, int height, Huffman?[,] tables, int restartInterval)
        {
            if (header.Length < 1) throw Bad("corrupt JPEG image: empty scan header");
            int count = header[0];
            if (count is < 1 or > 4 || header.Length != 4 + 2 * count) throw Bad("corrupt JPEG image: scan header length does not match its components");
            int hMax = frame.Max(c => c.H), vMax = frame.Max(c => c.V);
            var scan = new (Component C, Huffman Dc, Huffman Ac)[count];
            for (int i = 0; i < count; i++)
            {
                int id = header[1 + 2 * i];
                var component = Array.Find(frame, c => c.Id == id) ?? throw Bad($"corrupt JPEG image: a scan names component {id}, which the frame lacks");
                int td = header[2 + 2 * i] >> 4, ta = header[2 + 2 * i] & 15;
                if (td > 3 || ta > 3) throw Bad("corrupt JPEG image: a Huffman table index above 3");
                scan[i] = (component, tables[0, td] ?? throw Bad($"corrupt JPEG image: the scan uses DC Huffman table {td}, which is not defined"),
                           tables[1, ta] ?? throw Bad($"corrupt JPEG image: the scan uses AC Huffman table {ta}, which is not defined"));
            }
            long mcus;
            int[] blocksPerMcu;
            if (count == 1)
            {
                var c = scan[0].C;
                long w = (width * (long)c.H + hMax - 1) / hMax, h = (height * (long)c.V + vMax - 1) / vMax;
                mcus = ((w + 7) / 8) * ((h + 7) / 8);
                blocksPerMcu = [1];
            }
            else
            {
                mcus = ((width + 8L * hMax - 1) / (8L * hMax)) * ((height + 8L * vMax - 1) / (8L * vMax));
                blocksPerMcu = scan.Select(s => s.C.H * s.C.V).ToArray();
            }
            var bits = new BitReader(entropy);
            for (long m = 0; m < mcus; m++)
            {
                if (restartInterval > 0 && m > 0 && m % restartInterval == 0 && !bits.Restart())
                    throw Bad($"corrupt JPEG image: a restart marker is missing before block group {m} of {mcus}");
                for (int s = 0; s < count; s++)
                    for (int b = 0; b < blocksPerMcu[s]; b++)
                        if (!Block(ref bits, scan[s].Dc, scan[s].Ac))
                            throw Bad($"truncated or corrupt JPEG image: its scan ends after {m} of the {mcus} block groups the frame needs");
            }
        }

        static bool Block(ref BitReader bits, Huffman dc, Huffman ac)
        {
            int size = dc.Decode(ref bits);
            if (size is < 0 or > 11 || !bits.Skip(size)) return false;
            for (int k = 1; k < 64;)
            {
                int rs = ac.Decode(ref bits);
                if (rs < 0) return false;
                int run = rs >> 4, s = rs & 15;
                if (s == 0)
                {
                    if (run != 15) break;       // end of block
                    k += 16;
                    continue;
                }
                k += run;
                if (k > 63 || !bits.Skip(s)) return false;
                k++;
            }
            return true;
        }

        /// <summary>Entropy-coded bits, most significant first, with stuffed bytes (FF 00) undone; stops at any marker.</summary>
        ref struct BitReader(ReadOnlySpan<byte> data)
        {
            readonly ReadOnlySpan<byte> _data = data;
            int _at, _count;        // next byte to load; valid bits in the buffer
            ulong _buffer;          // the valid bits, aligned to bit 63
            bool _stopped;          // a marker or the end was reached: nothing more loads until Restart

            void Fill()
            {
                while (_count <= 56 && !_stopped)
                {
                    if (_at >= _data.Length) { _stopped = true; break; }
                    byte b = _data[_at];
                    if (b == 0xFF)
                    {
                        if (_at + 1 >= _data.Length || _data[_at + 1] != 0x00) { _stopped = true; break; }   // a marker
                        _at += 2;
                    }
                    else _at++;
                    _buffer |= (ulong)b << (56 - _count);
                    _count += 8;
                }
            }

            /// <summary>The next <paramref name="n"/> (1..16) bits without taking them, or -1 where fewer remain.</summary>
            public int Peek(int n)
            {
                if (_count < n) Fill();
                return _count < n ? -1 : (int)(_buffer >> (64 - n));
            }

            public void Take(int n)
            {
                _buffer <<= n;
                _count -= n;
            }

            public bool Skip(int n)
            {
                if (n == 0) return true;
                if (Peek(n) < 0) return false;
                Take(n);
                return true;
            }

            /// <summary>Drops the padding of the last byte and steps over the restart marker that must come next.</summary>
            public bool Restart()
            {
                if (_count >= 8) return false;          // whole bytes of data left before the marker
                (_buffer, _count, _stopped) = (0, 0, false);
                while (_at + 1 < _data.Length && _data[_at] == 0xFF && _data[_at + 1] == 0xFF) _at++;
                if (_at + 1 >= _data.Length || _data[_at] != 0xFF || _data[_at + 1] is < 0xD0 or > 0xD7) return false;
                _at += 2;
                return true;
            }
        }

        sealed class Huffman
        {
            const int LookupBits = 9;
            readonly int[] _maxCode = new int[18], _offset = new int[17];
            readonly byte[] _values;
            readonly ushort[] _lookup = new ushort[1 << LookupBits];   // (length << 8) | value for codes of ≤ 9 bits; 0: longer

            Huffman(ReadOnlySpan<byte> counts, ReadOnlySpan<byte> values)
            {
                _values = values.ToArray();
                int code = 0, k = 0;
                for (int length = 1; length <= 16; length++)
                {
                    int n = counts[length - 1];
                    if (code + n > 1 << length) throw Bad("corrupt JPEG image: a Huffman table with more codes than its lengths allow");
                    _offset[length] = k - code;
                    for (int i = 0; i < n && length <= LookupBits; i++)
                    {
                        int first = (code + i) << (LookupBits - length), last = (code + i + 1) << (LookupBits - length);
                        for (int j = first; j < last; j++) _lookup[j] = (ushort)(length << 8 | _values[k + i]);
                    }
                    code += n;
                    k += n;
                    _maxCode[length] = n == 0 ? -1 : code - 1;
                    code <<= 1;
                }
                _maxCode[17] = int.MaxValue;
            }

            public static void Define(ReadOnlySpan<byte> body, Huffman?[,] tables)
            {
                while (!body.IsEmpty)
                {
                    if (body.Length < 17) throw Bad("corrupt JPEG image: short Huffman table segment");
                    int tc = body[0] >> 4, th = body[0] & 15;
                    if (tc > 1 || th > 3) throw Bad($"corrupt JPEG image: Huffman table class {tc}, index {th}");
                    var counts = body.Slice(1, 16);
                    int total = 0;
                    foreach (byte c in counts) total += c;
                    if (total > 256 || body.Length < 17 + total) throw Bad("corrupt JPEG image: a Huffman table runs past its segment");
                    tables[tc, th] = new Huffman(counts, body.Slice(17, total));
                    body = body[(17 + total)..];
                }
            }

            public int Decode(ref BitReader bits)
            {
                int ahead = bits.Peek(LookupBits);
                if (ahead >= 0 && _lookup[ahead] is var entry and not 0)
                {
                    bits.Take(entry >> 8);
                    return entry & 0xFF;
                }
                for (int length = 1; length <= 16; length++)
                {
                    int code = bits.Peek(length);
                    if (code < 0) return -1;
                    if (code <= _maxCode[length])
                    {
                        bits.Take(length);
                        return _values[code + _offset[length]];
                    }
                }
                return -1;  // no code of 16 bits or fewer matches: corrupt data
            }
        }
    }
}
