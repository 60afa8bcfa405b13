using OpenVLA.Policy.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.FineTune.Training;

/// <summary>
/// Activation (gradient) checkpointing of one block, reentrant as torch.utils.checkpoint: the forward runs without
/// building a graph and keeps only the block's input; backward re-runs the block with grad enabled from that input and
/// back-propagates the incoming gradient through the recomputation, which accumulates the parameters' gradients and
/// yields the input's. TorchSharp 0.107 has no torch.utils.checkpoint; a custom autograd function is the way.
/// The state of the generator that draws dropout masks is saved before the forward and restored for the recomputation,
/// so the recomputed block draws the same masks.
/// </summary>
public sealed class CheckpointedBlock : torch.autograd.SingleTensorFunction<CheckpointedBlock>
{
    public override string Name => nameof(CheckpointedBlock);

    /// <summary>Runs <paramref name="block"/> on <paramref name="input"/> with its activations recomputed in backward.</summary>
    public static Tensor Run(Tensor input, Func<Tensor, Tensor> block, Generator? dropoutGenerator = null)
    {
        if (!torch.is_grad_enabled()) return block(input);
        // With a frozen stem (LoRA) the first block's input needs no grad; an autograd function whose inputs need none
        // is never called back, and the adapters inside would get no gradient. Make the input a grad-requiring leaf.
        var x = input.requires_grad ? input : input.detach().requires_grad_(true);
        return apply(x, block, dropoutGenerator!);
    }

    public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
    {
        var x = (Tensor)vars[0];
        var block = (Func<Tensor, Tensor>)vars[1];
        ctx.save_for_backward([x]);
        var generator = vars[2] as Generator;
        ctx.save_data("block", block);
        if (generator is not null) ctx.save_data("generator", generator);
        ctx.save_data("rng", RngState(generator));
        return block(x);
    }

    public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor gradOutput)
    {
        var saved = ctx.get_saved_variables()[0];
        var block = (Func<Tensor, Tensor>)ctx.get_data("block");
        var generator = ctx.get_data("generator") as Generator;
        var current = RngState(generator);
        SetRngState(generator, (byte[])ctx.get_data("rng"));
        Tensor inputGrad;
        // The recomputed activations must die with this call, not with whatever dispose scope is open around the
        // training step: otherwise every block's recomputation stays alive until the step ends and checkpointing saves
        // nothing.
        using (var scope = NewDisposeScope())
        using (torch.enable_grad())
        {
            var x = saved.detach().requires_grad_(true);
            var y = block(x);
            torch.autograd.backward([y], [gradOutput]);
            // The leaf gradient may keep the layout of whichever contribution arrived first; the plain graph hands the
            // previous block a dense sum. Reductions over a differently-strided tensor round differently (bias grads
            // differed by 1 ulp), so pass it on contiguous.
            inputGrad = (x.grad ?? zeros_like(x)).contiguous().MoveToOuterDisposeScope();
        }
        SetRngState(generator, current);
        return [inputGrad, null!, null!];
    }

    // Kept as bytes: the context's data slots are for non-tensors.
    // null: the process-wide generator.
    static byte[] RngState(Generator? generator)
    {
        using var state = generator is null ? torch.random.get_rng_state() : generator.get_state();
        return state.data<byte>().ToArray();
    }

    static void SetRngState(Generator? generator, byte[] state)
    {
        using var t = torch.tensor(state, ScalarType.Byte);
        if (generator is null) torch.random.set_rng_state(t);
        else generator.set_state(t);
    }
}

/// <summary>Wires <see cref="CheckpointedBlock"/> into the model's per-block hooks (decoder layers and ViT blocks).</summary>
public static class GradientCheckpointing
{
    /// <summary>The layer runner of the training forward that checkpoints every decoder layer.</summary>
    public static Func<LlamaDecoderLayer, Tensor, Func<Tensor, Tensor>, Tensor> DecoderLayers(Generator? dropoutGenerator) =>
        (_, x, run) => CheckpointedBlock.Run(x, run, dropoutGenerator);

    /// <summary>Checkpoints (or stops checkpointing) both vision towers' blocks.</summary>
    public static void SetVision(OpenVlaModel model, bool enabled, Generator? dropoutGenerator)
    {
        Func<VitBlock, Tensor, Func<Tensor, Tensor>, Tensor>? runner = enabled ? (_, x, run) => CheckpointedBlock.Run(x, run, dropoutGenerator) : null;
        model.vision_backbone.featurizer.BlockRunner = runner;
        model.vision_backbone.fused_featurizer.BlockRunner = runner;
    }
}
