using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Quantization;

/// <summary>ATen weight-only kernels TorchSharp 0.107 does not bind, compiled once per process as TorchScript.</summary>
internal static class QuantKernels
{
    static readonly Lazy<jit.CompilationUnit> Unit = new(() => jit.compile(@"
def w8(x: Tensor, w: Tensor, s: Tensor) -> Tensor:
    return torch._weight_int8pack_mm(x, w, s)
def conv4(w: Tensor, k: int) -> Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(w, k)
def w4(x: Tensor, w: Tensor, gs: int, sz: Tensor) -> Tensor:
    return torch._weight_int4pack_mm_for_cpu(x, w, gs, sz)
"));

    /// <summary>x [M, K] bf16 · (q [N, K] int8 · s [N])ᵀ → [M, N].</summary>
    public static Tensor Int8Mm(Tensor x, Tensor q, Tensor scale) => Unit.Value.invoke<Tensor>("w8", x, q, scale);

    /// <summary>q [N, K] int32 values 0..15 → the CPU kernel's packed layout.</summary>
    public static Tensor ConvertInt4(Tensor q) => Unit.Value.invoke<Tensor>("conv4", q, 2L);

    /// <summary>x [M, K] bf16 · W ᵀ where W = (q − 8)·scale + zero per group; scaleZero [K/gs, N, 2].</summary>
    public static Tensor Int4Mm(Tensor x, Tensor packed, int groupSize, Tensor scaleZero) =>
        Unit.Value.invoke<Tensor>("w4", x, packed, (long)groupSize, scaleZero);
}
