using System.Diagnostics;
using OpenVLA.Simulation.Tabletop;

namespace OpenVLA.Simulation;

/// <summary>One measured throughput: median and range over repeats (after one discarded warm-up repeat).</summary>
public sealed record Throughput(string Name, string Unit, double Median, double Min, double Max, int Repeats);

/// <summary>Throughput measurements of the tabletop simulator (for docs/benchmarks.md; not a test).</summary>
public static class SimBenchmark
{
    private static Throughput Measure(string name, string unit, int repeats, Func<double> oneRepeatRate)
    {
        oneRepeatRate(); // warm-up: JIT, GL context, caches
        var rates = Enumerable.Range(0, repeats).Select(_ => oneRepeatRate()).Order().ToArray();
        return new Throughput(name, unit, rates[rates.Length / 2], rates[0], rates[^1], repeats);
    }

    /// <summary>Raw mj_step calls per second in a settled scene (4 cubes resting on the table, arm holding still).</summary>
    public static Throughput Physics(TabletopEnv env, int repeats = 5, int steps = 5000)
    {
        env.Reset(TabletopTasks.Get("pick_up").Sample(1).Layout);
        return Measure("physics", "steps/s", repeats, () =>
        {
            long t0 = Stopwatch.GetTimestamp();
            for (int i = 0; i < steps; i++) env.Data.Step();
            return steps / Stopwatch.GetElapsedTime(t0).TotalSeconds;
        });
    }

    public static Throughput Render(TabletopEnv env, int repeats = 5, int frames = 100)
    {
        env.Reset(TabletopTasks.Get("pick_up").Sample(1).Layout);
        var buffer = new byte[env.ImageSize * env.ImageSize * 3];
        return Measure($"render {env.ImageSize}x{env.ImageSize}", "frames/s", repeats, () =>
        {
            long t0 = Stopwatch.GetTimestamp();
            for (int i = 0; i < frames; i++) env.Render(buffer);
            return frames / Stopwatch.GetElapsedTime(t0).TotalSeconds;
        });
    }

    /// <summary>Full 10 Hz control steps as the evaluator runs them: render, state, scripted action, 50 physics steps.</summary>
    public static Throughput Control(TabletopEnv env, int repeats = 5, int stepsPerRepeat = 150)
    {
        int seed = 0;
        return Measure($"control step ({env.ImageSize}px render + expert + physics)", "steps/s", repeats, () =>
        {
            long t0 = Stopwatch.GetTimestamp();
            int done = 0;
            while (done < stepsPerRepeat)
            {
                var task = TabletopTasks.All[seed % TabletopTasks.All.Count];
                var episode = task.Sample(seed++);
                env.Reset(episode.Layout);
                var start = TabletopScene.CubeColours.ToDictionary(c => c, env.CubePosition);
                var expert = new ScriptedExpert(episode);
                for (int k = 0; k < task.MaxSteps && done < stepsPerRepeat; k++, done++)
                {
                    env.Render();
                    env.State();
                    env.Step(expert.Act(env));
                    if (task.IsSuccess(env, episode.Args, start)) break;
                }
            }
            return stepsPerRepeat / Stopwatch.GetElapsedTime(t0).TotalSeconds;
        });
    }
}
