using OpenVLA.Simulation;
using OpenVLA.Simulation.MuJoCo;
using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.Tests.Simulation;

/// <summary>One collection: MuJoCo tests share a process-wide EGL display and are cheap enough to run in sequence.</summary>
[CollectionDefinition("MuJoCo", DisableParallelization = true)]
public sealed class MuJoCoCollection;

[Collection("MuJoCo")]
public sealed class MuJoCoBindingsTests
{
    private const string FallingBox = """
        <mujoco>
          <visual><global offwidth="32" offheight="32"/><quality offsamples="0"/></visual>
          <worldbody>
            <geom type="plane" size="1 1 0.1" rgba="0.2 0.2 0.2 1"/>
            <camera name="top" pos="0 0 1.5" xyaxes="1 0 0 0 1 0"/>
            <body name="box" pos="0 0 1"><freejoint/><geom type="box" size="0.1 0.1 0.1" rgba="1 0 0 1"/></body>
          </worldbody>
        </mujoco>
        """;

    [Fact]
    public void Library_version_matches_the_headers_the_offsets_came_from()
    {
        MjRuntime.EnsureInitialized();
        Assert.Equal("2.2.2", MjRuntime.Version);
    }

    [Fact]
    public void A_loaded_model_steps_and_a_free_box_falls_under_gravity()
    {
        using var model = MjModel.FromXml(FallingBox);
        using var data = new MjData(model);
        Assert.Equal(7, model.Nq);
        Assert.Equal(0.002, model.Timestep);
        int box = model.Id(MjObject.Body, "box");
        data.Forward();
        Assert.Equal(1.0, data.BodyPosition(box).Z, 6);
        for (int i = 0; i < 100; i++) data.Step();
        Assert.Equal(0.2, data.Time, 9);
        // Free fall for 0.2 s: z = 1 - g t² / 2 = 0.804 (Euler integration lands within a few mm).
        Assert.InRange(data.BodyPosition(box).Z, 0.795, 0.81);
    }

    [Fact]
    public void An_invalid_model_is_reported_with_MuJoCos_message()
    {
        var e = Assert.Throws<SimulationException>(() => MjModel.FromXml("<mujoco><worldbody><geom type=\"nonsense\"/></worldbody></mujoco>"));
        Assert.Contains("nonsense", e.Message);
    }

    [Fact]
    public void Rendering_is_not_blank_and_changes_when_an_object_moves()
    {
        using var env = new TabletopEnv(imageSize: 48);
        var episode = TabletopTasks.Get("pick_up").Sample(seed: 3);
        env.Reset(episode.Layout, settleSteps: 0);
        var before = env.Render();
        Assert.Equal(48 * 48 * 3, before.Length);
        Assert.True(before.Distinct().Count() > 20, "a rendered frame has many distinct values");
        Assert.True(before.Select(b => (int)b).Average() > 40, "the scene is lit");

        // Lift the red cube 10 cm by editing its free joint and recomputing kinematics.
        env.Data.Qpos[env.Model.JointQposAddress("cube_red") + 2] += 0.10;
        env.Data.Forward();
        var after = env.Render();
        int changed = before.Zip(after).Count(p => Math.Abs(p.First - p.Second) > 30);
        Assert.True(changed > 10, $"moving a cube changes pixels (changed: {changed})");
        Assert.Equal(after, env.Render()); // same state, same image
    }

    [Fact]
    public void Restoring_a_saved_state_replays_bit_identically()
    {
        using var env = new TabletopEnv(imageSize: 32);
        var episode = TabletopTasks.Get("stack").Sample(seed: 11);
        env.Reset(episode.Layout);
        using var saved = env.Snapshot();
        var actions = Enumerable.Range(0, 15).Select(i => new float[] { 0.01f, -0.005f * (i % 3), -0.02f, 0, 0, 0.05f, i < 10 ? 1 : 0 }).ToArray();

        double[] Rollout()
        {
            env.Restore(saved, 0, 1);
            foreach (var a in actions) env.Step(a);
            return env.Data.Qpos.ToArray().Concat(env.Data.Qvel.ToArray()).ToArray();
        }
        var first = Rollout();
        var second = Rollout();
        Assert.Equal(first.Select(BitConverter.DoubleToInt64Bits), second.Select(BitConverter.DoubleToInt64Bits));
        Assert.NotEqual(saved.Qpos.ToArray(), env.Data.Qpos.ToArray()); // the actions did move the arm
    }

    [Fact]
    public void End_effector_deltas_move_the_tool_centre_point_in_world_metres()
    {
        using var env = new TabletopEnv(imageSize: 32);
        env.Reset(TabletopTasks.Get("pick_up").Sample(seed: 1).Layout);
        var start = env.Tcp;
        for (int i = 0; i < 5; i++) env.Step([0.02f, -0.01f, -0.02f, 0, 0, 0, 1]);
        var moved = env.Tcp - start;
        Assert.Equal(0.10, moved.X, 2);
        Assert.Equal(-0.05, moved.Y, 2);
        Assert.Equal(-0.10, moved.Z, 2);
        // Deltas beyond the 3 cm limit are clipped.
        var before = env.Tcp;
        env.Step([0.5f, 0, 0, 0, 0, 0, 1]);
        env.Step([0, 0, 0, 0, 0, 0, 1]);
        Assert.InRange(env.Tcp.X - before.X, 0.025, 0.035);
        // Rotation deltas turn the hand about world axes; the state reports the turn with the same sign.
        Assert.Equal(0, env.State()[5], 3);
        for (int i = 0; i < 4; i++) env.Step([0, 0, 0, 0, 0, 0.1f, 1]);
        for (int i = 0; i < 3; i++) env.Step([0, 0, 0, 0, 0, 0, 1]);
        Assert.Equal(0.4, env.State()[5], 2);
        Assert.Equal(0, env.State()[3], 2);
        // Closing the gripper on nothing brings the fingers together.
        for (int i = 0; i < 5; i++) env.Step([0, 0, 0, 0, 0, 0, 0]);
        Assert.True(env.GripperWidth < 0.005, $"closed width {env.GripperWidth}");
    }
}
