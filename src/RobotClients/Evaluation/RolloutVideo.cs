using OpenCvSharp;

namespace OpenVLA.RobotClients.Evaluation;

/// <summary>Writes rollout frames as an MP4 (OpenCV's FFmpeg back end, MPEG-4 Part 2 'mp4v').</summary>
public static class RolloutVideo
{
    /// <summary>Writes <paramref name="count"/> evenly spaced frames side by side as one PNG: a rollout at a glance.</summary>
    public static void WriteFilmstrip(string path, IReadOnlyList<byte[]> rgbFrames, int size, int count = 6)
    {
        count = Math.Min(count, rgbFrames.Count);
        var strip = new byte[size * size * count * 3];
        int rowBytes = size * 3, stripRow = rowBytes * count;
        for (int k = 0; k < count; k++)
        {
            var frame = rgbFrames[count == 1 ? 0 : k * (rgbFrames.Count - 1) / (count - 1)];
            for (int y = 0; y < size; y++) frame.AsSpan(y * rowBytes, rowBytes).CopyTo(strip.AsSpan(y * stripRow + k * rowBytes));
        }
        File.WriteAllBytes(path, OpenVLA.Simulation.Datasets.Png.EncodeRgb(strip, size * count, size, System.IO.Compression.CompressionLevel.Optimal));
    }

    /// <returns>The written file, or a PNG-frames folder when this OpenCV build cannot encode video.</returns>
    public static string Write(string path, IReadOnlyList<byte[]> rgbFrames, int size, int fps)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        using (var writer = new VideoWriter(path, FourCC.MP4V, fps, new Size(size, size)))
        {
            if (writer.IsOpened())
            {
                using var bgr = new Mat(size, size, MatType.CV_8UC3);
                foreach (var frame in rgbFrames)
                {
                    using var rgb = Mat.FromPixelData(size, size, MatType.CV_8UC3, frame);
                    Cv2.CvtColor(rgb, bgr, ColorConversionCodes.RGB2BGR);
                    writer.Write(bgr);
                }
                writer.Release();
                if (new FileInfo(path).Length > 0) return path;
            }
        }
        // Fallback: PNG frames, so a rollout is never lost silently.
        string dir = Path.ChangeExtension(path, null) + "_frames";
        Directory.CreateDirectory(dir);
        for (int i = 0; i < rgbFrames.Count; i++)
            File.WriteAllBytes(Path.Combine(dir, $"{i:0000}.png"), OpenVLA.Simulation.Datasets.Png.EncodeRgb(rgbFrames[i], size, size));
        return dir;
    }
}
