using TorchSharp;

namespace OpenVLA.Policy.Model;

/// <summary>
/// Scalars that live as long as the process. TorchSharp 0.107 turns a number given to a tensor operator (the implicit
/// alpha of <c>a + b</c>, the <c>0.5</c> of <c>x * 0.5</c>) into a <see cref="Scalar"/> that nothing references while the
/// native call runs, so a garbage collection on another thread can finalize it mid-call; libtorch then fails with
/// "Expected false to be true ... toFloat". The hot paths (every layer's forward pass, every optimizer step) pass these
/// rooted Scalars, or Scalars held by their module or a <c>using</c>, instead.
/// </summary>
public static class KeptScalars
{
    public static readonly Scalar One = 1.ToScalar();
    public static readonly Scalar Zero = 0.ToScalar();
}
