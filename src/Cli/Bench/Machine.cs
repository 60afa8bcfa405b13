using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Cli.Bench;

/// <summary>This machine as benchmarks describe and measure it: CPU, memory, and the two roofline ceilings measured
/// in the same run as the model (bf16 GEMM throughput for compute-bound stages, read bandwidth for decode).</summary>
internal sealed record Machine(string Cpu, int Cores, double MemoryGiB, int TorchThreads, double Bf16GemmGflops, double ReadBandwidthGBs)
{
    public static Machine Measure()
    {
        string cpu = File.Exists("/proc/cpuinfo")
            ? File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name"))?.Split(':', 2)[1].Trim() ?? "unknown" : "unknown";
        double memGiB = 0;
        if (File.Exists("/proc/meminfo"))
        {
            var line = File.ReadLines("/proc/meminfo").First(l => l.StartsWith("MemTotal"));
            memGiB = long.Parse(line.Split([' ', '\t'], StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0 / 1024.0;
        }
        return new Machine(cpu, Environment.ProcessorCount, memGiB, torch.get_num_threads(), GemmGflops(), BandwidthGBs());
    }

    /// <summary>Best of several bf16 x·Wᵀ products of a ViT/LLM-like shape (512×2048 · 2048×2048).</summary>
    static double GemmGflops()
    {
        using var scope = NewDisposeScope();
        using var noGrad = torch.no_grad();
        var x = randn(512, 2048).to(ScalarType.BFloat16);
        var w = randn(2048, 2048).to(ScalarType.BFloat16);
        double best = double.MaxValue;
        for (int i = 0; i < 12; i++)
        {
            var sw = Stopwatch.StartNew();
            using var y = nn.functional.linear(x, w);
            best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        return 2.0 * 512 * 2048 * 2048 / best / 1e9;
    }

    /// <summary>Best of several full reads (a vectorized float32 sum) of a 1 GiB tensor: the rate at which a decode
    /// step can stream weights from memory.</summary>
    static double BandwidthGBs()
    {
        using var scope = NewDisposeScope();
        using var noGrad = torch.no_grad();
        long n = 256L << 20; // 1 GiB of float32
        var t = ones(n, ScalarType.Float32);
        double best = double.MaxValue;
        for (int i = 0; i < 8; i++)
        {
            var sw = Stopwatch.StartNew();
            using var s = t.sum();
            _ = s.item<float>();
            best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        return n * 4 / best / 1e9;
    }
}
