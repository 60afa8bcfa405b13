using OpenVLA.FineTune.Data;

namespace OpenVLA.Tests.FineTune;

public class DatasetConfigTests
{
    private static string Example(string name) => Path.Combine(AppContext.BaseDirectory, "FineTune", name);

    [Fact]
    public void The_shipped_examples_parse()
    {
        var libero = DatasetConfig.Load(Example("libero_rlds.json"));
        Assert.Equal("libero_spatial_no_noops", libero.Name);
        Assert.True(libero.Gripper.Clip && libero.Gripper.Invert);
        var sim = DatasetConfig.Load(Example("sim_lerobot.json"));
        Assert.Equal(["observation.images.image"], sim.ImageKeys!);
        Assert.Equal("task", sim.Instruction);
        var bridge = DatasetConfig.Load(Example("bridge_rlds.json"));
        Assert.Equal(0.5, bridge.Gripper.BinarizeThreshold);
        Assert.True(bridge.SkipUnlabeled);
    }

    [Fact]
    public void Gripper_conventions_apply_in_order()
    {
        Assert.Equal(1f, new GripperConvention { Clip = true, Invert = true }.Apply(-1f));
        Assert.Equal(0f, new GripperConvention { Clip = true, Invert = true }.Apply(1f));
        Assert.Equal(1f, new GripperConvention { BinarizeThreshold = 0.5 }.Apply(0.7f));
        Assert.Equal(0f, new GripperConvention { BinarizeThreshold = 0.5 }.Apply(0.3f));
        // RT-1 style closedness in [−1, 1] (1 = close): rescale onto [0, 1], invert → 1 = open.
        Assert.Equal(0.25f, new GripperConvention { FromRange = [-1, 1], Invert = true }.Apply(0.5f));
    }

    [Fact]
    public void Defaults_fill_what_a_file_leaves_out()
    {
        var config = DatasetConfig.Parse("""{ "name": "mine", "gripper": { "index": 6, "invert": true } }""").WithDefaultsFor(DatasetFormats.LeRobot);
        Assert.Equal("mine", config.Name);
        Assert.Equal(["action"], config.ActionKeys!);
        Assert.Equal("observation.state", config.ProprioKey);
        var noProprio = DatasetConfig.Parse("""{ "proprio_key": null }""").WithDefaultsFor(DatasetFormats.LeRobot);
        Assert.Null(noProprio.ProprioKey);
    }

    [Fact]
    public void Mistakes_in_a_config_file_are_one_line_errors()
    {
        var e = Assert.Throws<DatasetException>(() => DatasetConfig.Parse("""{ "image_key": "x" }""", "my.json"));
        Assert.StartsWith("my.json:", e.Message);
        Assert.Contains("image_key", e.Message);
        e = Assert.Throws<DatasetException>(() => DatasetConfig.Parse("""{ "normalization_mask": [true, false] }""", "my.json"));
        Assert.Equal("my.json: normalization_mask has 2 entries but action_dim is 7", e.Message);
        e = Assert.Throws<DatasetException>(() => DatasetConfig.Parse("""{ "action_dims": [0, 1, 2] }""", "my.json"));
        Assert.Equal("my.json: action_dims selects 3 dims but action_dim is 7", e.Message);
    }
}
