using OpenVLA.Policy;

namespace OpenVLA.Tests.Policy;

public class ActionTokenizerTests
{
    readonly ActionTokenizer _t = new(vocabSize: 32000);

    [Theory]
    // Bin edges are −1 + 2i/255; digitize gives the first edge index above the value; id = 32000 − that index.
    [InlineData(0.0, 31872)]            // edges[127] = −0.00392 ≤ 0 < edges[128] = 0.00392 → digitize 128
    [InlineData(-1.0, 31999)]           // = edges[0] → digitize 1
    [InlineData(-5.0, 31999)]           // clipped to −1
    [InlineData(1.0, 31744)]            // = last edge → digitize 256
    [InlineData(3.0, 31744)]            // clipped to 1
    [InlineData(0.5, 31808)]            // edges[191] = 0.498 ≤ 0.5 < edges[192] = 0.5059 → 192
    [InlineData(-0.004, 31873)]         // just below edges[127] = −0.0039216 → 127
    public void EncodeFollowsNumpyDigitize(double value, int expectedId) => Assert.Equal(expectedId, _t.Encode(value));

    [Theory]
    [InlineData(31872, 0.0)]                        // d = 128 → centre 127 = (edges[127] + edges[128]) / 2 = 0
    [InlineData(31999, -1 + 1 / 255.0)]             // d = 1 → centre 0 = −0.996078
    [InlineData(31744, 1 - 1 / 255.0)]              // d = 256 → index 255 clipped to 254 = +0.996078
    [InlineData(31745, 1 - 1 / 255.0)]              // d = 255 → centre 254
    [InlineData(100, 1 - 1 / 255.0)]                // a text token: d − 1 far above 254 → clipped to the top centre
    [InlineData(32000, -1 + 1 / 255.0)]             // PAD: d = 0 → index −1 clipped to 0
    [InlineData(32063, -1 + 1 / 255.0)]             // padded embedding rows likewise
    public void DecodeUsesBinCentresAndClipsLikeTheReference(int id, double expected) => Assert.Equal(expected, _t.Decode(id), 12);

    [Fact]
    public void EncodeThenDecodeLandsWithinHalfABin()
    {
        for (double v = -1; v <= 1; v += 0.013)
            Assert.InRange(Math.Abs(_t.Decode(_t.Encode(v)) - v), 0, 1 / 255.0 + 1e-12);
    }

    static readonly ActionStats Stats = new(
        Q01: [-0.02, -0.04, 0.0, -0.1, -0.2, -0.3, 0.0],
        Q99: [0.02, 0.06, 0.1, 0.1, 0.2, 0.5, 1.0],
        Mask: [true, true, true, true, true, true, false]);

    [Fact]
    public void UnnormalizeMapsBinCentresToTheQ01Q99RangeAndLeavesMaskedDimsRaw()
    {
        double[] n = [-1, 1, 0, 0.5, -0.5, 0.25, 0.996078431372549];
        var a = ActionNormalizer.Unnormalize(n, Stats);
        // a = 0.5·(n+1)·(q99−q01) + q01
        Assert.Equal(-0.02f, a[0], 6);                  // n = −1 → q01
        Assert.Equal(0.06f, a[1], 6);                   // n = 1 → q99
        Assert.Equal(0.05f, a[2], 6);                   // midpoint of [0, 0.1]
        Assert.Equal(0.05f, a[3], 6);                   // 0.5·1.5·0.2 − 0.1
        Assert.Equal(-0.1f, a[4], 6);                   // 0.5·0.5·0.4 − 0.2
        Assert.Equal(0.2f, a[5], 6);                    // 0.5·1.25·0.8 − 0.3
        Assert.Equal(0.996078431f, a[6], 6);            // gripper: mask false → the normalized value itself
    }

    [Fact]
    public void NormalizeClipsToUnitRangeAndInvertsUnnormalize()
    {
        var n = ActionNormalizer.Normalize([0.0f, 1.0f, 0.05f, -0.5f, 0.0f, 0.1f, 1.0f], Stats);
        Assert.Equal(0.0, n[0], 6);       // 2(0 + 0.02)/0.04 − 1
        Assert.Equal(1.0, n[1]);          // far above q99 → clipped
        Assert.Equal(0.0, n[2], 6);
        Assert.Equal(-1.0, n[3]);         // below q01 → clipped
        Assert.Equal(1.0, n[6]);          // gripper passes through
        var back = ActionNormalizer.Unnormalize(n, Stats);
        Assert.Equal(0.05f, back[2], 6);
    }
}
