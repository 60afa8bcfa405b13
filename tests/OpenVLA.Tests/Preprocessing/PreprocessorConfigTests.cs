using OpenVLA.Policy;
using OpenVLA.Policy.Preprocessing;

namespace OpenVLA.Tests.Preprocessing;

public class PreprocessorConfigTests
{
    [Fact]
    public void GoldenCheckpointConfigParsesToTwoResizeNaiveTowers()
    {
        var config = PreprocessorConfig.Load(GoldenFixture.File("checkpoint/preprocessor_config.json"));

        Assert.Equal("resize-naive", config.ImageResizeStrategy);
        Assert.True(config.UseFusedVisionBackbone);
        Assert.False(config.DoLetterbox);
        Assert.Equal(2, config.Towers.Count);
        Assert.Equal(6, config.Channels);
        Assert.Equal((56, 56), config.OutputSize);
        var dino = config.Towers[0];
        Assert.Equal((56, 56), dino.ResizeSize);
        Assert.Null(dino.ResizeShorterSide);
        Assert.Equal(3, dino.InterpolationCode);
        // tvf_normalize_params win over means/stds: the bf16-rounded ImageNet statistics.
        Assert.Equal([0.484375f, 0.455078125f, 0.40625f], dino.NormalizeMean);
        Assert.Equal([0.228515625f, 0.2236328125f, 0.224609375f], dino.NormalizeStd);
        Assert.Equal([0.485, 0.456, 0.406], dino.Mean);
        Assert.Equal([0.5f, 0.5f, 0.5f], config.Towers[1].NormalizeMean);
    }

    [Fact]
    public void DefaultConfigWritesExactlyTheCheckpointLayout()
    {
        string expected = File.ReadAllText(GoldenFixture.File("checkpoint/preprocessor_config.json"));
        Assert.Equal(expected, PreprocessorConfig.CreateDefault(56).ToJson());
    }

    [Fact]
    public void DefaultConfigRoundTripsThroughItsJson()
    {
        var config = PreprocessorConfig.CreateDefault(112);
        var again = PreprocessorConfig.Parse(config.ToJson());
        Assert.Equal(config.ToJson(), again.ToJson());
        Assert.Equal((112, 112), again.OutputSize);
        Assert.Equal(config.Towers[0].NormalizeStd, again.Towers[0].NormalizeStd);
    }

    [Fact]
    public void SingleTowerDefaultIsSigLipOnly()
    {
        var config = PreprocessorConfig.CreateDefault(224, fused: false);
        Assert.Single(config.Towers);
        Assert.Equal(3, config.Channels);
        Assert.Equal([0.5f, 0.5f, 0.5f], config.Towers[0].NormalizeStd);
        Assert.Contains("\"use_fused_vision_backbone\": false", config.ToJson());
    }

    [Theory]
    [InlineData(0.485f, 0.484375f)]
    [InlineData(0.456f, 0.455078125f)]
    [InlineData(0.406f, 0.40625f)]
    [InlineData(0.229f, 0.228515625f)]
    [InlineData(0.224f, 0.2236328125f)]
    [InlineData(0.225f, 0.224609375f)]
    [InlineData(0.5f, 0.5f)]
    public void BFloat16RoundingGivesThePublishedValues(float value, float rounded) =>
        Assert.Equal(rounded, PreprocessorConfig.RoundToBFloat16(value));

    [Fact]
    public void LetterboxStrategyWithoutTvfKeysDerivesThemLikeTheReferenceConstructor()
    {
        const string json = """
            {"image_resize_strategy": "letterbox", "use_fused_vision_backbone": true,
             "input_sizes": [[3, 224, 224], [3, 224, 224]], "interpolations": ["bicubic", "bicubic"],
             "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]], "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]]}
            """;
        var config = PreprocessorConfig.Parse(json);
        Assert.True(config.DoLetterbox);
        Assert.Equal([127, 127, 127], config.LetterboxFill); // int(0.5·255): the last tower's means, as the reference loop leaves it
        Assert.Null(config.Towers[0].ResizeSize);
        Assert.Equal(224, config.Towers[0].ResizeShorterSide);
        Assert.Equal([0.485f, 0.456f, 0.406f], config.Towers[0].NormalizeMean); // no tvf_normalize_params: the plain float32 values
        Assert.Contains("\"tvf_letterbox_fill\"", config.ToJson());
    }

    [Fact]
    public void ResizeCropStrategyResizesTheShorterSide()
    {
        var config = PreprocessorConfig.Parse("""{"image_resize_strategy": "resize-crop", "input_sizes": [[3, 224, 224]], "interpolations": ["bicubic"]}""");
        Assert.False(config.DoLetterbox);
        Assert.Equal(224, config.Towers[0].ResizeShorterSide);
        var intCrop = PreprocessorConfig.Parse("""{"tvf_crop_params": [{"output_size": 200}]}""");
        Assert.Equal((200, 200), intCrop.OutputSize);
    }

    [Theory]
    [InlineData("""{"image_resize_strategy": "squash"}""", "image_resize_strategy must be one of resize-naive, letterbox, resize-crop")]
    [InlineData("""{"image_resize_strategy": "resize-naive", "input_sizes": [[3, 224]]}""", "input_sizes[0] must be a list of 3 integers")]
    [InlineData("""{"use_fused_vision_backbone": true, "input_sizes": [[3, 224, 224]]}""", "needs 2 entries in input_sizes")]
    [InlineData("""{"interpolations": ["nearest"]}""", "interpolations[0] must be one of bicubic")]
    [InlineData("""{"means": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}""", "means has 2 entries, expected 1")]
    [InlineData("""{"tvf_normalize_params": [{"mean": [0, 0, 0], "std": [1, 0, 1]}]}""", "normalization std of tower 0 must be positive")]
    [InlineData("""{"tvf_resize_params": [{"size": [224, 224], "interpolation": 0}]}""", "interpolation code 0 of tower 0 is not supported")]
    [InlineData("""{"tvf_resize_params": [{"size": 224, "antialias": false}]}""", "antialias=false is not supported")]
    [InlineData("""[1, 2]""", "expected a JSON object")]
    [InlineData("""{"input_sizes": """, "invalid JSON")]
    public void InvalidConfigsFailWithAMessageNamingTheField(string json, string message)
    {
        var e = Assert.Throws<CheckpointException>(() => PreprocessorConfig.Parse(json, "ckpt/preprocessor_config.json"));
        Assert.StartsWith("ckpt/preprocessor_config.json: ", e.Message);
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void MissingFileNamesThePath()
    {
        var e = Assert.Throws<CheckpointException>(() => PreprocessorConfig.Load("/nonexistent/preprocessor_config.json"));
        Assert.Contains("/nonexistent/preprocessor_config.json", e.Message);
    }
}
