namespace OpenVLA.Simulation.Tabletop;

/// <summary>The objects one episode is about: a cube, and a second cube or target colour, or a direction.</summary>
public sealed record TaskArgs(string Cube, string? Other = null, string? Direction = null);

/// <summary>Everything that fixes one episode: task, seed, instruction, arguments and the initial layout.</summary>
public sealed record EpisodeSpec(string TaskId, int Seed, string Instruction, TaskArgs Args, SceneLayout Layout)
{
    public TabletopTask Task => TabletopTasks.Get(TaskId);
}

/// <summary>
/// A language-conditioned task: how an episode is drawn from a seed, what counts as success on simulator state, and the step
/// budget (10 Hz control steps after the settling steps, as LIBERO counts max_steps).
/// </summary>
public sealed class TabletopTask
{
    public required string Id { get; init; }
    public required string Description { get; init; }
    public required int MaxSteps { get; init; }
    /// <summary>Instruction templates: {cube}, {other}, {direction} are filled from <see cref="TaskArgs"/>.</summary>
    public required string[] Phrasings { get; init; }
    public required Func<Random, TaskArgs> DrawArgs { get; init; }
    /// <summary>Every argument combination, for the instruction catalogue.</summary>
    public required Func<IEnumerable<TaskArgs>> AllArgs { get; init; }

    /// <summary>Every instruction this task can give, in a fixed order.</summary>
    public IEnumerable<string> AllInstructions() =>
        AllArgs().SelectMany(a => Enumerable.Range(0, Phrasings.Length).Select(p => Instruction(a, p)));
    /// <summary>Extra layout requirement of the task (free path, free destination), checked while sampling.</summary>
    public Func<SceneLayout, TaskArgs, bool> LayoutOk { get; init; } = (_, _) => true;
    /// <summary>Success predicate on simulator state; <paramref name="start"/> holds the cube positions after settling.</summary>
    public required Func<TabletopEnv, TaskArgs, IReadOnlyDictionary<string, Vec3>, bool> IsSuccess { get; init; }

    public string Instruction(TaskArgs a, int phrasing) =>
        Phrasings[phrasing % Phrasings.Length].Replace("{cube}", a.Cube).Replace("{other}", a.Other ?? "").Replace("{direction}", a.Direction ?? "");

    /// <summary>Draws the episode of <paramref name="seed"/>; the same seed always gives the same episode.</summary>
    public EpisodeSpec Sample(int seed)
    {
        var rng = new Random(seed);
        for (int attempt = 0; attempt < 1000; attempt++)
        {
            var args = DrawArgs(rng);
            var layout = TabletopTasks.DrawLayout(rng);
            if (layout is null || !LayoutOk(layout, args)) continue;
            return new EpisodeSpec(Id, seed, Instruction(args, rng.Next(Phrasings.Length)), args, layout);
        }
        throw new InvalidOperationException($"task {Id}: no valid layout for seed {seed} after 1000 draws");
    }
}

/// <summary>The tabletop suite: five tasks over four coloured cubes, a plate and two flat targets (all always present).</summary>
public static class TabletopTasks
{
    public const string SuiteName = "tabletop";
    // Where objects may start: in front of the robot, inside the third-person camera's view.
    internal const double MinX = 0.36, MaxX = 0.66, MinY = -0.24, MaxY = 0.24;
    /// <summary>How far "to the left/right" moves a cube (success needs 12 cm; the expert moves 16 cm).</summary>
    public const double SideShift = 0.16, SideSuccess = 0.12;
    private const double Half = TabletopScene.CubeHalfSize;

    // Image left is world -y: the third-person camera faces the robot (TabletopScene).
    public static double DirectionSign(string direction) => direction == "left" ? -1 : 1;

    public static readonly IReadOnlyList<TabletopTask> All =
    [
        new TabletopTask
        {
            Id = "pick_up", Description = "lift a cube 8 cm off the table and hold it", MaxSteps = 80,
            Phrasings = ["pick up the {cube} cube", "lift the {cube} cube", "grab the {cube} cube and lift it up", "raise the {cube} cube off the table"],
            DrawArgs = rng => new TaskArgs(Pick(rng, TabletopScene.CubeColours)),
            AllArgs = () => TabletopScene.CubeColours.Select(c => new TaskArgs(c)),
            IsSuccess = (env, a, _) =>
            {
                var c = env.CubePosition(a.Cube);
                return c.Z > Half + 0.08 && env.Tcp.HorizontalDistance(c) < 0.03 && env.GripperWidth < 2 * Half + 0.01;
            },
        },
        new TabletopTask
        {
            Id = "place_on_plate", Description = "put a cube on the plate and let go", MaxSteps = 120,
            Phrasings = ["put the {cube} cube on the plate", "place the {cube} cube onto the plate", "move the {cube} cube onto the white plate", "pick up the {cube} cube and set it on the plate"],
            DrawArgs = rng => new TaskArgs(Pick(rng, TabletopScene.CubeColours)),
            AllArgs = () => TabletopScene.CubeColours.Select(c => new TaskArgs(c)),
            IsSuccess = (env, a, _) =>
            {
                var c = env.CubePosition(a.Cube);
                var p = env.PlatePosition;
                return c.HorizontalDistance(p) < TabletopScene.PlateRadius - 0.015 && c.Z < 2 * TabletopScene.PlateHalfHeight + Half + 0.01
                    && c.Z > 2 * TabletopScene.PlateHalfHeight + Half - 0.01 && Released(env, c);
            },
        },
        new TabletopTask
        {
            Id = "stack", Description = "put one cube on top of another and let go", MaxSteps = 120,
            Phrasings = ["stack the {cube} cube on the {other} cube", "put the {cube} cube on top of the {other} cube", "place the {cube} cube onto the {other} cube"],
            DrawArgs = rng =>
            {
                var pair = TabletopScene.CubeColours.OrderBy(_ => rng.Next()).Take(2).ToArray();
                return new TaskArgs(pair[0], pair[1]);
            },
            AllArgs = () => from a in TabletopScene.CubeColours from b in TabletopScene.CubeColours where a != b select new TaskArgs(a, b),
            IsSuccess = (env, a, _) =>
            {
                var c = env.CubePosition(a.Cube);
                var o = env.CubePosition(a.Other!);
                return c.HorizontalDistance(o) < 0.025 && Math.Abs(c.Z - o.Z - 2 * Half) < 0.01 && o.Z < Half + 0.005 && Released(env, c);
            },
        },
        new TabletopTask
        {
            Id = "push_to_target", Description = "push a cube along the table onto a flat coloured target", MaxSteps = 120,
            Phrasings = ["push the {cube} cube onto the {other} target", "slide the {cube} cube to the {other} target", "push the {cube} cube to the {other} circle"],
            DrawArgs = rng => new TaskArgs(Pick(rng, TabletopScene.CubeColours), Pick(rng, TabletopScene.TargetColours)),
            AllArgs = () => from c in TabletopScene.CubeColours from t in TabletopScene.TargetColours select new TaskArgs(c, t),
            LayoutOk = (layout, a) =>
            {
                var (cx, cy, _) = layout.Cubes[a.Cube];
                var (tx, ty) = layout.Targets[a.Other!];
                double d = Math.Sqrt((tx - cx) * (tx - cx) + (ty - cy) * (ty - cy));
                if (d < 0.12 || d > 0.26) return false;
                // The pusher starts 6 cm behind the cube; cube, pusher and path must keep clear of every other object.
                double ux = (tx - cx) / d, uy = (ty - cy) / d;
                var (sx, sy) = (cx - ux * 0.065, cy - uy * 0.065);
                var others = layout.Cubes.Where(kv => kv.Key != a.Cube).Select(kv => (kv.Value.X, kv.Value.Y, R: 0.075))
                    .Append((layout.Plate.X, layout.Plate.Y, R: TabletopScene.PlateRadius + 0.05));
                return others.All(o => SegmentDistance(o.X, o.Y, sx, sy, tx, ty) > o.R);
            },
            IsSuccess = (env, a, _) =>
            {
                var c = env.CubePosition(a.Cube);
                return c.HorizontalDistance(env.TargetPosition(a.Other!)) < TabletopScene.TargetRadius - 0.01 && c.Z < Half + 0.005;
            },
        },
        new TabletopTask
        {
            Id = "move_side", Description = "move a cube 12+ cm to the left or right (as seen from the camera) and let go", MaxSteps = 100,
            Phrasings = ["move the {cube} cube to the {direction}", "put the {cube} cube further to the {direction}", "shift the {cube} cube {direction}wards"],
            DrawArgs = rng => new TaskArgs(Pick(rng, TabletopScene.CubeColours), Direction: rng.Next(2) == 0 ? "left" : "right"),
            AllArgs = () => from c in TabletopScene.CubeColours from d in new[] { "left", "right" } select new TaskArgs(c, Direction: d),
            LayoutOk = (layout, a) =>
            {
                var (cx, cy, _) = layout.Cubes[a.Cube];
                double dy = cy + DirectionSign(a.Direction!) * SideShift;
                if (dy < MinY - 0.06 || dy > MaxY + 0.06) return false;
                var others = layout.Cubes.Where(kv => kv.Key != a.Cube).Select(kv => (kv.Value.X, kv.Value.Y, R: 0.085))
                    .Append((layout.Plate.X, layout.Plate.Y, R: TabletopScene.PlateRadius + 0.05))
                    .Concat(layout.Targets.Values.Select(t => (t.X, t.Y, R: TabletopScene.TargetRadius + 0.035)));
                return others.All(o => Math.Sqrt((o.X - cx) * (o.X - cx) + (o.Y - dy) * (o.Y - dy)) > o.R);
            },
            IsSuccess = (env, a, start) =>
            {
                var c = env.CubePosition(a.Cube);
                var s = start[a.Cube];
                return DirectionSign(a.Direction!) * (c.Y - s.Y) > SideSuccess && c.Z < Half + 0.005 && Released(env, c);
            },
        },
    ];

    public static IReadOnlyList<string> Ids => All.Select(t => t.Id).ToArray();

    /// <summary>All instructions of the given tasks, in a fixed order: the LeRobot task list (task_index = position).</summary>
    public static IReadOnlyList<string> InstructionCatalogue(IEnumerable<TabletopTask> tasks) =>
        tasks.SelectMany(t => t.AllInstructions()).Distinct().ToArray();

    public static TabletopTask Get(string id) =>
        All.FirstOrDefault(t => t.Id == id) ?? throw new ArgumentException($"unknown tabletop task '{id}' (known: {string.Join(", ", Ids)})");

    /// <summary>Parses "all" or a comma-separated list of task ids.</summary>
    public static IReadOnlyList<TabletopTask> Parse(string spec)
    {
        if (spec.Trim() == "all") return All;
        return spec.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(Get).Distinct().ToArray();
    }

    /// <summary>
    /// The seed of trial <paramref name="trial"/> of a task under suite seed <paramref name="suiteSeed"/>: a fixed function, so
    /// two evaluations with the same seed see identical initial states (LIBERO's fixed initial_states).
    /// </summary>
    public static int EpisodeSeed(int suiteSeed, string taskId, int trial)
    {
        uint h = 2166136261;
        foreach (char ch in $"{suiteSeed}/{taskId}/{trial}") h = (h ^ ch) * 16777619;
        return (int)(h & 0x7FFFFFFF);
    }

    // The gripper has let go: fingers open and the fingertips above the cube's top face.
    private static bool Released(TabletopEnv env, Vec3 cube) => env.GripperWidth > 2 * Half + 0.015 && env.Tcp.Z > cube.Z + 0.01;

    private static string Pick(Random rng, string[] items) => items[rng.Next(items.Length)];

    private static double SegmentDistance(double px, double py, double ax, double ay, double bx, double by)
    {
        double vx = bx - ax, vy = by - ay, t = Math.Clamp(((px - ax) * vx + (py - ay) * vy) / (vx * vx + vy * vy), 0, 1);
        double dx = px - (ax + t * vx), dy = py - (ay + t * vy);
        return Math.Sqrt(dx * dx + dy * dy);
    }

    /// <summary>Random, well separated positions for all cubes (yaw within ±15°), the plate and both targets.</summary>
    internal static SceneLayout? DrawLayout(Random rng)
    {
        var placed = new List<(double X, double Y, double R)>();
        (double, double)? Place(double radius)
        {
            for (int i = 0; i < 200; i++)
            {
                double x = MinX + rng.NextDouble() * (MaxX - MinX), y = MinY + rng.NextDouble() * (MaxY - MinY);
                if (placed.All(p => Math.Sqrt((p.X - x) * (p.X - x) + (p.Y - y) * (p.Y - y)) > p.R + radius))
                {
                    placed.Add((x, y, radius));
                    return (x, y);
                }
            }
            return null;
        }
        var plate = Place(TabletopScene.PlateRadius + 0.01);
        if (plate is null) return null;
        var targets = new Dictionary<string, (double, double)>();
        foreach (var t in TabletopScene.TargetColours)
        {
            if (Place(TabletopScene.TargetRadius + 0.005) is not { } p) return null;
            targets[t] = p;
        }
        var cubes = new Dictionary<string, (double, double, double)>();
        foreach (var c in TabletopScene.CubeColours)
        {
            if (Place(0.045) is not { } p) return null;
            cubes[c] = (p.Item1, p.Item2, (rng.NextDouble() - 0.5) * 0.5);
        }
        return new SceneLayout(cubes, plate.Value, targets);
    }
}
