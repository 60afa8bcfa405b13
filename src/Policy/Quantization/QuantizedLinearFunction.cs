using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Policy.Quantization;

/// <summary>
/// Backward through a frozen quantized weight, for LoRA training on a quantized base (QLoRA-style): the forward runs the
/// weight-only kernels, the backward gives the input gradient dy·W with W dequantized for that one call and freed after,
/// so no float copy of any base weight is kept. The weight and bias get no gradient (they are frozen). ATen's packed
/// kernels have no derivative, hence the custom function.
/// </summary>
internal sealed class QuantizedLinearFunction : torch.autograd.SingleTensorFunction<QuantizedLinearFunction>
{
    public override string Name => nameof(QuantizedLinearFunction);

    // Passed as one non-tensor argument so autograd does not treat the frozen bias as an input.
    sealed record Frozen(QuantizedWeight Weight, Tensor? Bias);

    public static Tensor Apply(Tensor x, QuantizedWeight weight, Tensor? bias) => apply(x, new Frozen(weight, bias));

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var x = (Tensor)vars[0];
        var frozen = (Frozen)vars[1];
        ctx.save_data("frozen", frozen);
        return frozen.Weight.Forward(x, frozen.Bias);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor gradOutput)
    {
        var frozen = (Frozen)ctx.get_data("frozen");
        using var scope = NewDisposeScope();
        var w = frozen.Weight.Dequantize(gradOutput.dtype);          // [N, K], alive for this call only
        return [gradOutput.matmul(w).MoveToOuterDisposeScope(), null!];
    }
}
