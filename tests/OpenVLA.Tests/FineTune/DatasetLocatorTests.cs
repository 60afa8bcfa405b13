using OpenVLA.FineTune.Data;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;

namespace OpenVLA.Tests.FineTune;

/// <summary>Where people's tools put checkpoints and datasets: the Hugging Face hub cache (snapshots symlinked to
/// blobs), LeRobot's home, TFDS roots and data dirs. Read offline; a miss says where it looked.</summary>
public class DatasetLocatorTests
{
    static HuggingFaceCache Cache(string hfHome) => new(name => name == "HF_HOME" ? hfHome : null);

    /// <summary>Lays <paramref name="checkpoint"/>'s files out as huggingface_hub does: content in blobs/, the snapshot's
    /// files symlinks to them, refs/NAME holding the commit.</summary>
    static void AddSnapshot(string repo, string commit, string checkpoint, params string[] refs)
    {
        Directory.CreateDirectory(Path.Combine(repo, "blobs"));
        string snapshot = Path.Combine(repo, "snapshots", commit);
        Directory.CreateDirectory(snapshot);
        foreach (var file in Directory.GetFiles(checkpoint))
        {
            string blob = Path.Combine(repo, "blobs", $"{commit}-{Path.GetFileName(file)}");
            File.Copy(file, blob);
            File.CreateSymbolicLink(Path.Combine(snapshot, Path.GetFileName(file)), Path.Combine("..", "..", "blobs", Path.GetFileName(blob)));
        }
        foreach (var r in refs)
        {
            Directory.CreateDirectory(Path.GetDirectoryName(Path.Combine(repo, "refs", r))!);
            File.WriteAllText(Path.Combine(repo, "refs", r), commit);   // the hub writes the hash without a newline
        }
    }

    [Fact]
    public void A_repo_id_resolves_to_its_snapshot_in_the_hub_cache_and_loads_through_the_symlinks()
    {
        using var tmp = new TestPaths.TempDir();
        CheckpointMaker.Write(tmp["ckpt-a"], "tiny", 3, torch.ScalarType.Float32);
        CheckpointMaker.Write(tmp["ckpt-b"], "tiny", 4, torch.ScalarType.Float32);
        string repo = Path.Combine(tmp["hf"], "hub", "models--acme--tiny-vla");
        AddSnapshot(repo, "1111aaaa", tmp["ckpt-a"], "main");
        AddSnapshot(repo, "2222bbbb", tmp["ckpt-b"], "v1.0", "pr/3");
        var cache = Cache(tmp["hf"]);

        Assert.Equal(Path.Combine(repo, "snapshots", "1111aaaa"), cache.ResolveModel("acme/tiny-vla"));
        Assert.Equal(Path.Combine(repo, "snapshots", "2222bbbb"), cache.ResolveModel("acme/tiny-vla@v1.0"));
        Assert.Equal(Path.Combine(repo, "snapshots", "2222bbbb"), cache.ResolveModel("acme/tiny-vla@pr/3"));
        Assert.Equal(Path.Combine(repo, "snapshots", "2222bbbb"), cache.ResolveModel("acme/tiny-vla@2222bbbb"));
        Assert.Equal(tmp["ckpt-a"], cache.ResolveModel(tmp["ckpt-a"]));   // a directory is a directory

        var missingRevision = Assert.Throws<CheckpointException>(() => cache.ResolveModel("acme/tiny-vla@v9"));
        Assert.Contains("cached refs: main, pr/3, v1.0", missingRevision.Message);
        var missingRepo = Assert.Throws<CheckpointException>(() => cache.ResolveModel("acme/other"));
        Assert.Contains(Path.Combine(tmp["hf"], "hub", "models--acme--other"), missingRepo.Message);
        Assert.Contains("nothing is downloaded", missingRepo.Message);
        Assert.Throws<CheckpointException>(() => cache.ResolveModel("acme/../../etc"));
        Assert.Throws<CheckpointException>(() => cache.ResolveModel("acme/tiny-vla@../../../etc"));   // a revision is not a path
        File.WriteAllText(Path.Combine(repo, "refs", "broken"), "3333cccc");
        Assert.Contains("snapshot", Assert.Throws<CheckpointException>(() => cache.ResolveModel("acme/tiny-vla@broken")).Message);

        // The environment's names, in huggingface_hub's order.
        Assert.Equal("/x/hub", new HuggingFaceCache(n => n == "HF_HOME" ? "/x" : null).HubCache);
        Assert.Equal("/c", new HuggingFaceCache(n => n switch { "HF_HOME" => "/x", "HF_HUB_CACHE" => "/c", _ => null }).HubCache);
        Assert.Equal("/xdg/huggingface/lerobot", new HuggingFaceCache(n => n == "XDG_CACHE_HOME" ? "/xdg" : null).LeRobotHome);
        Assert.Equal("/h/.cache/huggingface/hub", new HuggingFaceCache(n => n == "HOME" ? "/h" : null).HubCache);

        // The CLI takes the repo id wherever it takes a checkpoint, and the model behind the symlinks is the real one.
        var frame = tmp["frame.png"];
        OpenCvSharp.Cv2.ImWrite(frame, new OpenCvSharp.Mat(56, 56, OpenCvSharp.MatType.CV_8UC3, new OpenCvSharp.Scalar(40, 120, 200)));
        string[] predict = ["predict", "--image", frame, "--instruction", "pick up the cube", "--unnorm-key", "bridge_orig", "--json"];
        var env = new Dictionary<string, string> { ["HF_HOME"] = tmp["hf"] };
        var viaCache = CliRunner.Run(env, [.. predict, "--checkpoint", "acme/tiny-vla@v1.0"]);
        Assert.True(viaCache.ExitCode == 0, viaCache.Stderr);
        var direct = CliRunner.Run([.. predict, "--checkpoint", tmp["ckpt-b"]]);
        Assert.Equal(System.Text.Json.Nodes.JsonNode.Parse(direct.Stdout)!["actions"]!.ToJsonString(),
            System.Text.Json.Nodes.JsonNode.Parse(viaCache.Stdout)!["actions"]!.ToJsonString());
        CliRunner.AssertUserError(CliRunner.Run(env, [.. predict, "--checkpoint", "acme/nothing"]), "not in the Hugging Face cache");
        CliRunner.AssertUserError(CliRunner.Run(env, "eval", "--policy", "checkpoint:acme/nothing", "--trials-per-task", "1", "--out", tmp["eval"]),
            "not in the Hugging Face cache");
    }

    [Fact]
    public void Tfds_roots_data_dirs_and_lerobot_repo_ids_resolve_to_the_data()
    {
        using var tmp = new TestPaths.TempDir();
        // ~/tensorflow_datasets/toy/{1.0.0, 1.10.0, 1.2.0}: the newest by version, not by name.
        foreach (var v in new[] { "1.0.0", "1.10.0", "1.2.0" })
            RldsWriter.WriteDataset(Path.Combine(tmp["tfds"], "toy", v), "toy", TestDatasets.RldsEpisodes([4, 5]), shards: 1, gzip: false);
        var locator = new DatasetLocator(Cache: Cache(tmp["hf"]));
        Assert.Equal(Path.Combine(tmp["tfds"], "toy", "1.10.0"), locator.Resolve(Path.Combine(tmp["tfds"], "toy")));
        Assert.Equal(Path.Combine(tmp["tfds"], "toy", "1.2.0"), (locator with { Version = "1.2.0" }).Resolve(Path.Combine(tmp["tfds"], "toy")));
        Assert.Equal(Path.Combine(tmp["tfds"], "toy", "1.10.0"), (locator with { DataDir = tmp["tfds"] }).Resolve("toy"));
        Assert.Contains("has no version 2.0.0 (it has", Assert.Throws<DatasetException>(() => (locator with { Version = "2.0.0" }).Resolve(Path.Combine(tmp["tfds"], "toy"))).Message);
        Assert.Contains("is not in --data-dir", Assert.Throws<DatasetException>(() => (locator with { DataDir = tmp["tfds"] }).Resolve("other")).Message);
        using (var data = VlaDataset.Open([Path.Combine(tmp["tfds"], "toy")], locator: locator)) Assert.Equal(2, data.EpisodeCount);

        // Builder configs: NAME/CONFIG/VERSION. One config is taken; several must be named.
        RldsWriter.WriteDataset(Path.Combine(tmp["tfds"], "cfg", "small", "0.1.0"), "cfg", TestDatasets.RldsEpisodes([3]), shards: 1, gzip: false);
        Assert.Equal(Path.Combine(tmp["tfds"], "cfg", "small", "0.1.0"), locator.Resolve(Path.Combine(tmp["tfds"], "cfg")));
        RldsWriter.WriteDataset(Path.Combine(tmp["tfds"], "cfg", "large", "0.1.0"), "cfg", TestDatasets.RldsEpisodes([3]), shards: 1, gzip: false);
        Assert.Contains("several TFDS configs (large, small)", Assert.Throws<DatasetException>(() => locator.Resolve(Path.Combine(tmp["tfds"], "cfg"))).Message);

        // A LeRobot repo id: $HF_LEROBOT_HOME/ORG/NAME (default $HF_HOME/lerobot).
        TestDatasets.WriteLeRobot(Path.Combine(tmp["hf"], "lerobot", "lab", "pick"), [6, 6]);
        Assert.Equal(Path.Combine(tmp["hf"], "lerobot", "lab", "pick"), locator.Resolve("lab/pick"));
        Assert.Contains(Path.Combine(tmp["hf"], "lerobot", "lab", "place"), Assert.Throws<DatasetException>(() => locator.Resolve("lab/place")).Message);

        // Through the CLI: finetune --data-dir, and dataset inspect with a repo id.
        var inspect = CliRunner.Run(new Dictionary<string, string> { ["HF_LEROBOT_HOME"] = Path.Combine(tmp["hf"], "lerobot") }, "dataset", "inspect", "--path", "lab/pick");
        Assert.True(inspect.ExitCode == 0, inspect.Stderr);
        Assert.Contains(Path.Combine("lerobot", "lab", "pick"), inspect.Stdout);
        CheckpointMaker.Write(tmp["base"], "tiny", 3, torch.ScalarType.Float32);
        var dry = CliRunner.Run("finetune", "--base", tmp["base"], "--data-dir", tmp["tfds"], "--dataset", "nope", "--out", tmp["run"], "--max-steps", "1");
        CliRunner.AssertUserError(dry, "is not in --data-dir");
    }
}
