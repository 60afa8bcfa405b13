using System.Text.Json;
using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;
using OpenVLA.Policy.Tokenization;
using TorchSharp;

// Usage: dotnet run -- OUT_DIR. Writes tokenizer.model, prompts.json (instruction → our prompt ids), and for several
// synthetic frames: frame_N.png plus our pixel_values [6, S, S] float32 (frame_N_S.f32) for target sizes S.
var outDir = args.Length > 0 ? args[0] : "crosscheck-out";
Directory.CreateDirectory(outDir);
SentencePieceModelWriter.Write(Path.Combine(outDir, "tokenizer.model"), 1024);
var tok = VlaTokenizer.Load(Path.Combine(outDir, "tokenizer.model"));
string[] instructions =
[
    "pick up the red cube", "Put the BLUE cube on the plate", "stack the green block on top of the yellow block",
    "push the red cube to the left", "move the purple cube onto the orange target", "wipe the café table  twice",
    "open the drawer, then close it", "place 3 cubes in the box", "grab the item at 12 o'clock", "lift it",
];
var prompts = instructions.ToDictionary(i => i, i => tok.PromptIds(i));
File.WriteAllText(Path.Combine(outDir, "prompts.json"), JsonSerializer.Serialize(prompts));

var rng = new Random(42);
var frames = new List<object>();
(int W, int H)[] sizes = [(640, 480), (97, 41), (224, 224), (300, 301), (33, 250)];
for (int n = 0; n < sizes.Length; n++)
{
    var (w, h) = sizes[n];
    var px = new byte[w * h * 3];
    // Smooth gradients plus noise plus a hard-edged square: exercises both the kernel and the clipping.
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < 3; c++)
            {
                bool square = x > w / 3 && x < w / 2 && y > h / 3 && y < h / 2;
                int v = square ? (c == 0 ? 250 : 5) : (x * 255 / w + y * 97 / h * c + rng.Next(40)) % 256;
                px[(y * w + x) * 3 + c] = (byte)v;
            }
    var image = new RgbImage(w, h, px);
    var pngPath = Path.Combine(outDir, $"frame_{n}.png");
    OpenCvSharp.Cv2.ImWrite(pngPath, ToMat(image));
    foreach (var s in new[] { 224, 56 })
    {
        var pre = new ImagePreprocessor(PreprocessorConfig.CreateDefault(s));
        using var t = pre.Preprocess(ImageDecoder.Load(pngPath)).contiguous();
        File.WriteAllBytes(Path.Combine(outDir, $"frame_{n}_{s}.f32"), t.bytes.ToArray());
    }
    frames.Add(new { file = $"frame_{n}.png", width = w, height = h });
}
File.WriteAllText(Path.Combine(outDir, "frames.json"), JsonSerializer.Serialize(frames));
Console.WriteLine($"wrote {outDir}");

static OpenCvSharp.Mat ToMat(RgbImage img)
{
    var mat = new OpenCvSharp.Mat(img.Height, img.Width, OpenCvSharp.MatType.CV_8UC3);
    var bgr = new byte[img.Pixels.Length];
    for (int i = 0; i < bgr.Length; i += 3) { bgr[i] = img.Pixels[i + 2]; bgr[i + 1] = img.Pixels[i + 1]; bgr[i + 2] = img.Pixels[i]; }
    System.Runtime.InteropServices.Marshal.Copy(bgr, 0, mat.Data, bgr.Length);
    return mat;
}
