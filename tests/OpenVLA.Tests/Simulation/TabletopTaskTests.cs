using OpenVLA.Simulation;
using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.Tests.Simulation;

[Collection("MuJoCo")]
public sealed class TabletopTaskTests
{
    private static (bool Success, int Steps) Run(TabletopEnv env, EpisodeSpec episode, Func<float[]> act)
    {
        env.Reset(episode.Layout);
        var start = TabletopScene.CubeColours.ToDictionary(c => c, env.CubePosition);
        for (int step = 1; step <= episode.Task.MaxSteps; step++)
        {
            env.Step(act());
            if (episode.Task.IsSuccess(env, episode.Args, start)) return (true, step);
        }
        return (false, episode.Task.MaxSteps);
    }

    public static TheoryData<string> TaskIds => new(TabletopTasks.Ids);

    [Theory]
    [MemberData(nameof(TaskIds))]
    public void Scripted_expert_succeeds_and_doing_nothing_fails(string taskId)
    {
        using var env = new TabletopEnv(imageSize: 32);
        var task = TabletopTasks.Get(taskId);
        foreach (int trial in new[] { 0, 1 })
        {
            var episode = task.Sample(TabletopTasks.EpisodeSeed(7, taskId, trial));
            var expert = new ScriptedExpert(episode);
            var (success, steps) = Run(env, episode, () => expert.Act(env));
            Assert.True(success, $"{taskId} trial {trial} ('{episode.Instruction}') failed in phase {expert.PhaseName}");
            Assert.InRange(steps, 10, task.MaxSteps);
        }
        var idle = task.Sample(TabletopTasks.EpisodeSeed(7, taskId, 0));
        Assert.False(Run(env, idle, () => [0, 0, 0, 0, 0, 0, 1]).Success);
    }

    [Fact]
    public void Noisy_expert_still_succeeds_with_recoveries()
    {
        using var env = new TabletopEnv(imageSize: 32);
        var episode = TabletopTasks.Get("place_on_plate").Sample(5);
        var expert = new ScriptedExpert(episode, new ExpertNoise(Sigma: 0.004, PauseProbability: 0.05, DetourProbability: 1.0), noiseSeed: 2);
        var clean = new ScriptedExpert(episode);
        var noisy = Run(env, episode, () => expert.Act(env));
        var reference = Run(env, episode, () => clean.Act(env));
        Assert.True(noisy.Success);
        Assert.True(noisy.Steps > reference.Steps, "pauses and the detour make the noisy demonstration longer");
    }

    [Theory]
    [InlineData("pick_up")]
    [InlineData("move_side")]
    public void An_early_grasp_in_the_air_is_labelled_open_and_descend_and_the_episode_still_succeeds(string taskId)
    {
        using var env = new TabletopEnv(imageSize: 32);
        var episode = TabletopTasks.Get(taskId).Sample(TabletopTasks.EpisodeSeed(11, taskId, 0));
        var expert = new ScriptedExpert(episode, new ExpertNoise(Sigma: 0, PauseProbability: 0, DetourProbability: 0, EarlyCloseProbability: 1), noiseSeed: 4);
        var cube = episode.Args.Cube;
        int early = 0, closedAfterLift = 0;
        var result = Run(env, episode, () =>
        {
            var executed = expert.Act(env);
            var label = expert.ExpertAction;
            double aboveTop = env.Tcp.Z - (env.CubePosition(cube).Z + TabletopScene.CubeHalfSize);
            if (executed[6] == 0 && label[6] == 1)
            {
                early++;
                Assert.InRange(aboveTop, 0.0, 0.045);               // closed in the air above the cube…
                Assert.Equal([0f, 0f, 0f], executed[..3]);          // …standing still…
                Assert.True(label[2] < 0, "the clean label keeps descending with open fingers");
            }
            if (expert.PhaseName == "Lift" && label[6] == 0) closedAfterLift++;
            return executed;
        });
        Assert.True(result.Success, $"{taskId} failed in phase {expert.PhaseName}");
        Assert.InRange(early, 2, 4);
        Assert.True(closedAfterLift > 0);
    }

    [Fact]
    public void The_grasp_lifts_as_soon_as_the_fingers_rest_on_the_cube()
    {
        using var env = new TabletopEnv(imageSize: 32);
        var episode = TabletopTasks.Get("pick_up").Sample(5);
        var expert = new ScriptedExpert(episode);
        int closeSteps = 0;
        bool lifted = false;
        Run(env, episode, () =>
        {
            var before = expert.PhaseName;
            var a = expert.Act(env);
            if (before == "Close" && expert.PhaseName == "Close") { closeSteps++; Assert.True(env.GripperWidth >= ScriptedExpert.GrippedWidth); }
            if (before == "Close" && expert.PhaseName == "Lift")
            {
                lifted = true;
                Assert.True(env.GripperWidth < ScriptedExpert.GrippedWidth, "lifts only on a closed grip");
                Assert.True(a[2] > 0 && a[6] == 0, "the first closed frame is already labelled lift");
            }
            return a;
        });
        Assert.True(lifted);
        Assert.InRange(closeSteps, 1, 7);
    }

    [Fact]
    public void An_expert_that_meets_a_held_cube_says_lift_not_approach()
    {
        // eval --diagnose starts its shadow with the episode, but a policy can reach a grasp the shadow never saw coming.
        using var env = new TabletopEnv(imageSize: 32);
        var episode = TabletopTasks.Get("place_on_plate").Sample(5);
        var driver = new ScriptedExpert(episode);
        ScriptedExpert? late = null;
        float[]? lateLabel = null;
        Run(env, episode, () =>
        {
            var a = driver.Act(env);
            if (late is null && driver.PhaseName == "Lift" && env.GripperWidth < ScriptedExpert.GrippedWidth)
            {
                late = new ScriptedExpert(episode);
                lateLabel = late.Act(env);
            }
            return a;
        });
        Assert.NotNull(late);
        Assert.Equal("Lift", late!.PhaseName);
        Assert.True(lateLabel![2] > 0 && lateLabel[6] == 0, "a held cube is lifted with closed fingers");
    }

    [Fact]
    public void A_push_labeller_reads_its_phase_from_the_state_and_still_completes_the_push()
    {
        // DAgger labels states a policy reached by its own path. A hand already low on the line behind the cube must be
        // told to push on, as the demonstrations say in that frame, not to fly back up to where the approach starts.
        using var env = new TabletopEnv(imageSize: 32);
        var episode = TabletopTasks.Get("push_to_target").Sample(TabletopTasks.EpisodeSeed(7, "push_to_target", 0));
        var driver = new ScriptedExpert(episode);
        ScriptedExpert? fromState = null, fromHistory = null;
        float[]? stateLabel = null, historyLabel = null;
        Vec3 toTarget = default;
        int pushing = 0;
        Run(env, episode, () =>
        {
            var a = driver.Act(env);
            // A few steps into the push, when the fingers touch the cube (2 cm ahead of where the lowering ends).
            if (fromState is null && driver.PhaseName == "Push" && ++pushing == 4)
            {
                fromState = new ScriptedExpert(episode, pushPhaseFromState: true);
                fromHistory = new ScriptedExpert(episode);
                stateLabel = fromState.Act(env);
                historyLabel = fromHistory.Act(env);
                var cube = env.CubePosition(episode.Args.Cube);
                toTarget = env.TargetPosition(episode.Args.Other!) - cube;
            }
            return a;
        });
        Assert.NotNull(fromState);
        Assert.Equal("Push", fromState!.PhaseName);
        Assert.True(stateLabel![0] * toTarget.X + stateLabel[1] * toTarget.Y > 0, "the label pushes towards the target");
        Assert.InRange(stateLabel[2], -0.006f, 0.006f);
        Assert.Equal("PushApproach", fromHistory!.PhaseName);
        Assert.True(historyLabel![2] > 0.01f, "with hysteresis the same state is labelled as an approach: rise");

        foreach (int trial in new[] { 0, 1, 2 })
        {
            var ep = TabletopTasks.Get("push_to_target").Sample(TabletopTasks.EpisodeSeed(7, "push_to_target", trial));
            var expert = new ScriptedExpert(ep, pushPhaseFromState: true);
            Assert.True(Run(env, ep, () => expert.Act(env)).Success, $"trial {trial} failed in phase {expert.PhaseName}");
        }
    }

    [Fact]
    public void Expert_labels_are_the_clean_command_while_the_noisy_one_is_executed()
    {
        using var env = new TabletopEnv(imageSize: 32);
        var episode = TabletopTasks.Get("pick_up").Sample(5);
        var clean = new ScriptedExpert(episode);
        Assert.True(Run(env, episode, () => { var a = clean.Act(env); Assert.Equal(a, clean.ExpertAction); return a; }).Success);

        var noisy = new ScriptedExpert(episode, new ExpertNoise(Sigma: 0.004, PauseProbability: 0, DetourProbability: 0, EarlyCloseProbability: 0), noiseSeed: 3);
        var noise = new List<double>();
        Run(env, episode, () =>
        {
            var executed = noisy.Act(env);
            var label = noisy.ExpertAction;
            for (int i = 0; i < 3; i++)
            {
                noise.Add(executed[i] - label[i]);
                Assert.InRange(label[i], -0.02f, 0.02f); // the expert's step limit: the label carries no noise
            }
            Assert.Equal(executed[3..], label[3..]);
            return executed;
        });
        double mean = noise.Average(), std = Math.Sqrt(noise.Average(d => (d - mean) * (d - mean)));
        Assert.InRange(std, 0.003, 0.005); // executed − label is exactly the injected N(0, 4 mm) noise
        Assert.InRange(Math.Abs(mean), 0, 0.0015);
    }

    [Fact]
    public void The_same_seed_gives_the_same_episode_and_seeds_differ_between_trials()
    {
        var task = TabletopTasks.Get("push_to_target");
        var a = task.Sample(TabletopTasks.EpisodeSeed(7, task.Id, 4));
        var b = task.Sample(TabletopTasks.EpisodeSeed(7, task.Id, 4));
        var c = task.Sample(TabletopTasks.EpisodeSeed(7, task.Id, 5));
        Assert.Equal(a.Instruction, b.Instruction);
        Assert.Equal(a.Layout.Cubes, b.Layout.Cubes);
        Assert.NotEqual(a.Layout.Cubes["red"], c.Layout.Cubes["red"]);
        Assert.Contains(a.Instruction, task.AllInstructions());
    }

    [Fact]
    public void Layouts_keep_objects_apart_and_inside_the_camera_view()
    {
        foreach (var task in TabletopTasks.All)
            for (int seed = 0; seed < 20; seed++)
            {
                var layout = task.Sample(seed).Layout;
                var cubes = layout.Cubes.Values.ToArray();
                for (int i = 0; i < cubes.Length; i++)
                {
                    Assert.InRange(cubes[i].X, 0.3, 0.7);
                    Assert.InRange(cubes[i].Y, -0.3, 0.3);
                    for (int j = i + 1; j < cubes.Length; j++)
                        Assert.True(double.Hypot(cubes[i].X - cubes[j].X, cubes[i].Y - cubes[j].Y) > 0.08);
                    Assert.True(double.Hypot(cubes[i].X - layout.Plate.X, cubes[i].Y - layout.Plate.Y) > TabletopScene.PlateRadius + 0.04);
                }
            }
    }

    [Fact]
    public void Instructions_name_the_objects_of_the_episode()
    {
        var stack = TabletopTasks.Get("stack").Sample(9);
        Assert.Contains(stack.Args.Cube, stack.Instruction);
        Assert.Contains(stack.Args.Other!, stack.Instruction);
        Assert.NotEqual(stack.Args.Cube, stack.Args.Other);
        var side = TabletopTasks.Get("move_side").Sample(9);
        Assert.Contains(side.Args.Direction!, side.Instruction);
        Assert.Equal(116, TabletopTasks.InstructionCatalogue(TabletopTasks.All).Count);
        Assert.Throws<ArgumentException>(() => TabletopTasks.Parse("pick_up,fly"));
    }
}
