using System.Reflection;
using System.Xml.Linq;
using OpenVLA.RobotClients;
using OpenVLA.Server;

namespace OpenVLA.Tests;

/// <summary>
/// The project references form a tree: the contract and the policy core at the bottom, the server and the robot clients
/// beside each other, the CLI on top. Read from the csproj files (what the build is told) and checked once more on the
/// compiled assemblies (what the build did), so that a serving binary never pulls in MuJoCo or a robot controller the model.
/// </summary>
public sealed class ProjectGraphTests
{
    sealed record Project(string Name, string File, IReadOnlyList<string> ProjectReferences, IReadOnlyList<string> Packages);

    /// <summary>Every project of the repository (src, tools, tests) by name, e.g. "OpenVLA.Server".</summary>
    static readonly IReadOnlyDictionary<string, Project> Projects = Load();

    static IReadOnlyDictionary<string, Project> Load()
    {
        var projects = new Dictionary<string, Project>(StringComparer.Ordinal);
        foreach (var top in new[] { "src", "tools", "tests" })
        {
            foreach (var file in Directory.EnumerateFiles(Path.Combine(TestPaths.RepoRoot, top), "*.csproj", SearchOption.AllDirectories))
            {
                var relative = Path.GetRelativePath(TestPaths.RepoRoot, file).Split(Path.DirectorySeparatorChar);
                if (relative.Contains("bin") || relative.Contains("obj")) continue;
                var xml = XDocument.Load(file);
                var directory = Path.GetDirectoryName(file)!;
                var references = xml.Descendants("ProjectReference")
                    .Select(r => Path.GetFullPath(Path.Combine(directory, ((string?)r.Attribute("Include"))!.Replace('\\', '/'))))
                    .ToList();
                var packages = xml.Descendants("PackageReference").Select(p => (string)p.Attribute("Include")!).ToList();
                var name = Path.GetFileNameWithoutExtension(file);
                projects.Add(name, new Project(name, file, references, packages));
            }
        }
        return projects;
    }

    static Project Get(string name) =>
        Projects.TryGetValue(name, out var p) ? p : throw new Xunit.Sdk.XunitException($"{name}.csproj not found under src/, tools/ or tests/");

    static string NameOf(string csprojPath) => Path.GetFileNameWithoutExtension(csprojPath);

    static IEnumerable<string> DirectReferences(string name) => Get(name).ProjectReferences.Select(NameOf);

    /// <summary>Every project <paramref name="name"/> depends on, directly or through others.</summary>
    static SortedSet<string> Closure(string name)
    {
        var seen = new SortedSet<string>(StringComparer.Ordinal);
        var pending = new Stack<string>(DirectReferences(name));
        while (pending.Count > 0)
        {
            var next = pending.Pop();
            if (seen.Add(next)) foreach (var r in DirectReferences(next)) pending.Push(r);
        }
        return seen;
    }

    [Fact]
    public void Every_project_reference_names_an_existing_project()
    {
        foreach (var p in Projects.Values)
            foreach (var r in p.ProjectReferences)
            {
                Assert.True(File.Exists(r), $"{p.Name} references {r}, which does not exist");
                Assert.True(Projects.ContainsKey(NameOf(r)), $"{p.Name} references {r}, outside src/, tools/ and tests/");
            }
    }

    [Fact]
    public void The_contract_references_no_project_and_only_the_protobuf_and_grpc_packages()
    {
        var contract = Get("OpenVLA.Contract");
        Assert.Empty(contract.ProjectReferences);
        Assert.Equal(["Google.Protobuf", "Grpc.Core.Api", "Grpc.Tools"], contract.Packages.Order(StringComparer.Ordinal));
    }

    [Fact]
    public void The_client_library_depends_only_on_the_contract_and_Grpc_Net_Client()
    {
        var clients = Get("OpenVLA.RobotClients");
        Assert.Equal(["OpenVLA.Contract"], DirectReferences(clients.Name));
        Assert.Equal(["OpenVLA.Contract"], Closure(clients.Name));
        Assert.Equal(["Grpc.Net.Client"], clients.Packages);
    }

    [Fact]
    public void The_server_references_exactly_the_policy_core_and_the_contract()
    {
        Assert.Equal(["OpenVLA.Contract", "OpenVLA.Policy"], DirectReferences("OpenVLA.Server").Order(StringComparer.Ordinal));
        Assert.Equal(["OpenVLA.Contract", "OpenVLA.Policy"], Closure("OpenVLA.Server"));
    }

    [Fact]
    public void The_policy_core_and_the_simulation_reference_no_project()
    {
        Assert.Empty(Get("OpenVLA.Policy").ProjectReferences);
        Assert.Empty(Get("OpenVLA.Simulation").ProjectReferences);
    }

    [Fact]
    public void Nothing_but_the_tests_references_the_CLI()
    {
        var referrers = Projects.Values.Where(p => DirectReferences(p.Name).Contains("OpenVLA.Cli")).Select(p => p.Name).Order(StringComparer.Ordinal);
        Assert.Equal(["OpenVLA.Tests"], referrers);
    }

    [Fact]
    public void The_references_have_no_cycle()
    {
        foreach (var name in Projects.Keys)
        {
            var closure = Closure(name);
            if (closure.Contains(name)) Assert.Fail($"{name} depends on itself through {string.Join(", ", closure.Where(n => n != name))}");
        }
    }

    static string[] OpenVlaReferences(Assembly assembly) =>
        [.. assembly.GetReferencedAssemblies().Select(a => a.Name!).Where(n => n.StartsWith("OpenVLA.", StringComparison.Ordinal)).Order(StringComparer.Ordinal)];

    [Fact]
    public void The_built_assemblies_follow_the_graph()
    {
        var clients = typeof(PolicyClient).Assembly;
        Assert.Equal("OpenVLA.RobotClients", clients.GetName().Name);
        Assert.Equal(["OpenVLA.Contract"], OpenVlaReferences(clients));
        Assert.DoesNotContain(clients.GetReferencedAssemblies(), a => a.Name is "ScottPlot" or "Parquet" or "TorchSharp" or "OpenCvSharp");
        // The evaluator's sources sit in a subfolder of the client library's project: none may be compiled into it.
        Assert.DoesNotContain(clients.GetTypes(), t => t.Namespace?.StartsWith("OpenVLA.RobotClients.Evaluation", StringComparison.Ordinal) == true);
        Assert.Equal("OpenVLA.Evaluation", typeof(RemotePolicy).Assembly.GetName().Name);

        var server = typeof(PolicyServer).Assembly;
        Assert.Equal(["OpenVLA.Contract", "OpenVLA.Policy"], OpenVlaReferences(server));
        Assert.Equal("OpenVLA.Contract", typeof(OpenVLA.Contract.V1.PolicyService).Assembly.GetName().Name);
    }
}
