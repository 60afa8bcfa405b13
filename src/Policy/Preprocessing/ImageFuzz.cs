namespace OpenVLA.Policy.Preprocessing;

/// <summary>What a mutation run saw: how many frames decoded, how many were refused, and how the refusals read.</summary>
/// <param name="MaxManagedBytes">The most managed memory one decode allocated (this thread's allocations across the call):
/// what a declared length or size could make the decode path reserve before refusing.</param>
public sealed record ImageFuzzResult(int Decoded, int Refused, IReadOnlyDictionary<string, int> Reasons, TimeSpan Elapsed, long MaxManagedBytes);

/// <summary>
/// Mutation fuzzing of the one decode path: seeded random edits of valid frames must decode to an image within the limits
/// or be refused with a one-line <see cref="PolicyInputException"/>. Any other exception, a multi-line message or an image
/// beyond the limits is a bug and is thrown as <see cref="InvalidOperationException"/> with the seed and mutation that found
/// it, so it can be replayed.
/// </summary>
public static class ImageFuzz
{
    public static ImageFuzzResult Run(IReadOnlyList<byte[]> seeds, int mutations, int seed, ImageLimits limits, Action<int>? progress = null)
    {
        if (seeds.Count == 0) throw new ArgumentException("no seed images to mutate");
        var random = new Random(seed);
        int decoded = 0, refused = 0;
        long maxManaged = 0;
        var reasons = new Dictionary<string, int>();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        for (int i = 0; i < mutations; i++)
        {
            var source = seeds[random.Next(seeds.Count)];
            var (bytes, how) = Mutate(source, random);
            long before = GC.GetAllocatedBytesForCurrentThread();
            try
            {
                var image = ImageDecoder.Decode(bytes, limits);
                if (image.Width > limits.MaxSide || image.Height > limits.MaxSide || (long)image.Width * image.Height > limits.MaxPixels)
                    throw new InvalidOperationException($"mutation {i} (seed {seed}, {how}) decoded to {image.Width}x{image.Height}, beyond the limits");
                decoded++;
            }
            catch (PolicyInputException e)
            {
                if (e.Message.Contains('\n') || e.Message.Length > 300)
                    throw new InvalidOperationException($"mutation {i} (seed {seed}, {how}) was refused with a message that is not one short line: {e.Message}");
                refused++;
                string reason = Reason(e.Message);
                reasons[reason] = reasons.GetValueOrDefault(reason) + 1;
            }
            catch (Exception e) when (e is not InvalidOperationException)
            {
                throw new InvalidOperationException($"mutation {i} (seed {seed}, {how}) escaped as {e.GetType().Name}: {e.Message}", e);
            }
            maxManaged = Math.Max(maxManaged, GC.GetAllocatedBytesForCurrentThread() - before);
            progress?.Invoke(i + 1);
        }
        return new ImageFuzzResult(decoded, refused, reasons, clock.Elapsed, maxManaged);
    }

    /// <summary>Two synthetic frames (a JPEG and a PNG of 224x224 gradients and noise) when the user gives none.</summary>
    public static List<byte[]> SampleFrames()
    {
        using var bgr = new OpenCvSharp.Mat(224, 224, OpenCvSharp.MatType.CV_8UC3);
        var noise = new Random(3);
        for (int y = 0; y < 224; y++)
            for (int x = 0; x < 224; x++) bgr.Set(y, x, new OpenCvSharp.Vec3b((byte)x, (byte)y, (byte)noise.Next(64)));
        OpenCvSharp.Cv2.ImEncode(".jpg", bgr, out byte[] jpeg);
        OpenCvSharp.Cv2.ImEncode(".png", bgr, out byte[] png);
        return [jpeg, png];
    }

    /// <summary>A message without its numbers, so refusals group by kind.</summary>
    static string Reason(string message) => System.Text.RegularExpressions.Regex.Replace(message, @"\d+", "N");

    static (byte[] Bytes, string How) Mutate(byte[] source, Random random)
    {
        var bytes = (byte[])source.Clone();
        switch (random.Next(6))
        {
            case 0:
            {
                int flips = 1 + random.Next(8);
                for (int k = 0; k < flips; k++) bytes[random.Next(bytes.Length)] ^= (byte)(1 << random.Next(8));
                return (bytes, $"{flips} bit flips");
            }
            case 1:
            {
                int at = random.Next(bytes.Length), length = Math.Min(1 + random.Next(16), bytes.Length - at);
                random.NextBytes(bytes.AsSpan(at, length));
                return (bytes, $"{length} random bytes at {at}");
            }
            case 2:
            {
                int length = random.Next(bytes.Length);
                return (bytes[..length], $"truncated to {length} bytes");
            }
            case 3:
            {
                int at = random.Next(bytes.Length);
                var inserted = new byte[1 + random.Next(32)];
                random.NextBytes(inserted);
                return ([.. bytes[..at], .. inserted, .. bytes[at..]], $"{inserted.Length} bytes inserted at {at}");
            }
            case 4:
            {
                int at = random.Next(bytes.Length), length = Math.Min(1 + random.Next(32), bytes.Length - at);
                return ([.. bytes[..at], .. bytes[(at + length)..]], $"{length} bytes deleted at {at}");
            }
            default:
            {
                // Lengths and sizes are where decoders trust the file: overwrite a 16- or 32-bit big-endian field with an extreme.
                int at = random.Next(Math.Max(1, bytes.Length - 4));
                uint value = random.Next(4) switch { 0 => 0, 1 => 0xFFFFFFFF, 2 => 0x7FFFFFFF, _ => (uint)random.Next() };
                int width = random.Next(2) == 0 ? 2 : 4;
                for (int k = 0; k < width && at + k < bytes.Length; k++) bytes[at + k] = (byte)(value >> (8 * (width - 1 - k)));
                return (bytes, $"{width * 8}-bit field at {at} set to {value}");
            }
        }
    }
}
