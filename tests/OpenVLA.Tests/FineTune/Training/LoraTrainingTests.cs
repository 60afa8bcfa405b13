using System.Text.Json.Nodes;
using OpenVLA.FineTune.Training;
using OpenVLA.Tests.Policy;
using OpenVLA.Policy;
using OpenVLA.Policy.Checkpoint;
using TorchSharp;
using static TorchSharp.torch;

namespace OpenVLA.Tests.FineTune.Training;

public class LoraTrainingTests
{
    static Tensor Logits(Trainer trainer, IReadOnlyList<TrainingExample> examples)
    {
        using var noGrad = torch.no_grad();
        trainer.Model.eval();
        using var batch = trainer.Objective.Build(examples, CPU, ScalarType.Float32);
        var (hidden, _) = ActionObjective.Forward(trainer.Model, batch);
        var logits = trainer.Model.language_model.Logits(hidden);
        trainer.Model.train();
        return logits;
    }

    [Fact]
    public void AdaptersStartAsTheBaseAndOnlyTheyChange()
    {
        using var tmp = new TestPaths.TempDir();
        var dir = TrainingFixtures.MakeBase(tmp["base"]);
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(dir);
        using var _ = model;
        var examples = TrainingFixtures.Examples(6);
        var baseParams = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        Tensor baseLogits;
        using (torch.no_grad())
        {
            model.eval();
            var objective = ActionObjective.ForCheckpoint(checkpoint, tokenizer);
            using var batch = objective.Build(examples.Take(3).ToList(), CPU, ScalarType.Float32);
            baseLogits = model.language_model.Logits(ActionObjective.Forward(model, batch).Hidden);
        }

        using var trainer = new Trainer(model, checkpoint, tokenizer, TrainingFixtures.SmallRun(), tmp["run"], TrainingFixtures.Statistics());
        // all-linear: 4 per ViT block (2 towers × 2 built blocks), projector 3, 7 per decoder layer (2 layers); never lm_head.
        Assert.Equal(4 * 2 * 2 + 3 + 7 * 2, trainer.AdaptedModules.Count);
        Assert.DoesNotContain("language_model.lm_head", trainer.AdaptedModules);
        Assert.Contains("vision_backbone.fused_featurizer.blocks.0.attn.qkv", trainer.AdaptedModules);
        Assert.True(Tensors.Identical(baseLogits, Logits(trainer, examples.Take(3).ToList())));   // B = 0 at init

        var source = new InMemoryExampleSource(examples, seed: 5);
        for (int i = 0; i < 3; i++) trainer.TrainStep(source);

        foreach (var (name, p) in model.named_parameters())
        {
            if (name.Contains(".lora_"))
            {
                if (name.EndsWith("lora_B.weight")) Assert.True(p.abs().sum().item<float>() > 0, $"{name} did not move");
                continue;
            }
            Assert.True(Tensors.Identical(baseParams[name], p), $"frozen {name} changed");
        }
        Assert.Equal(model.named_parameters().Where(p => p.name.Contains(".lora_")).Sum(p => p.parameter.numel()), trainer.TrainableParameters);
    }

    [Fact]
    public void LossDecreasesAndHeldOutAccuracyRises()
    {
        using var tmp = new TestPaths.TempDir();
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(TrainingFixtures.MakeBase(tmp["base"]));
        using var _ = model;
        var examples = TrainingFixtures.Examples(6);
        using var trainer = new Trainer(model, checkpoint, tokenizer, TrainingFixtures.SmallRun() with { MaxSteps = 40 }, tmp["run"], TrainingFixtures.Statistics());
        var source = new InMemoryExampleSource(examples, seed: 5);
        var before = trainer.Evaluate(examples);
        var losses = Enumerable.Range(0, 40).Select(_ => trainer.TrainStep(source).Loss).ToList();
        var after = trainer.Evaluate(examples);
        Assert.True(losses.Skip(35).Average() < 0.5 * losses.Take(5).Average(), $"loss {losses[0]:0.###} → {losses[^1]:0.###}");
        Assert.True(after.Loss < before.Loss);
        Assert.True(after.ActionAccuracy > before.ActionAccuracy, $"accuracy {before.ActionAccuracy} → {after.ActionAccuracy}");

        // The held-out "vision gain": the fixture's first three action values are its frame's colour, so the trained
        // policy loses clearly when each frame is swapped for another example's; with one frame for every example the swap
        // changes nothing (gain exactly 0); a single example has nothing to swap with.
        Assert.True(after.VisionGain > 0.5, $"loss {after.Loss:0.###}, with swapped frames {after.ShuffledImageLoss:0.###}");
        Assert.Equal(after.ShuffledImageLoss, after.ToJson()["shuffled_image_loss"]!.GetValue<double>());
        Assert.Equal(0.0, trainer.Evaluate(examples.Select(e => e with { Image = examples[0].Image }).ToList()).VisionGain);
        var single = trainer.Evaluate(examples.Take(1).ToList());
        Assert.True(double.IsNaN(single.VisionGain));
        Assert.False(single.ToJson().ContainsKey("shuffled_image_loss"));
    }

    [Fact]
    public void MergedCheckpointAndAdapterReproduceTheTrainedModel()
    {
        using var tmp = new TestPaths.TempDir();
        var baseDir = TrainingFixtures.MakeBase(tmp["base"]);
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(baseDir);
        using var _ = model;
        var examples = TrainingFixtures.Examples(6);
        // The run's statistics know only its own robot: loading them is what makes "my_robot" a valid unnorm key.
        var stats = new JsonObject { ["my_robot"] = TrainingFixtures.Statistics()["sim_tabletop"]!.DeepClone() };
        using var trainer = new Trainer(model, checkpoint, tokenizer, TrainingFixtures.SmallRun() with { Merge = true }, tmp["run"], stats);
        var source = new InMemoryExampleSource(examples, seed: 5);
        for (int i = 0; i < 5; i++) trainer.TrainStep(source);
        var trained = Logits(trainer, examples.Take(3).ToList());
        var saved = trainer.Save(source, baseDir);

        // The merged checkpoint: a complete HF directory that the policy loads unchanged, with the run's statistics.
        var mergedDir = Path.Combine(saved, Trainer.ModelDirName);
        var (merged, _, _) = TrainingFixtures.Load(mergedDir);
        using (merged)
        using (var probe = new Trainer(merged, VlaCheckpoint.Open(mergedDir), tokenizer, TrainingFixtures.SmallRun(full: true), tmp["probe"], TrainingFixtures.Statistics()))
        {
            var mergedLogits = Logits(probe, examples.Take(3).ToList());
            float diff = (mergedLogits - trained).abs().max().item<float>();
            Assert.True(diff < 1e-4, $"merged vs adapter logits differ by {diff}");
        }
        var unusedInBase = SafetensorsFile.Open(Path.Combine(baseDir, "model.safetensors"));
        var unusedInMerged = SafetensorsFile.Open(Path.Combine(mergedDir, "model.safetensors"));
        Assert.Equal(unusedInBase.Tensors.Keys.Order(), unusedInMerged.Tensors.Keys.Order());   // every layout tensor, incl. unused ones
        Assert.True(Tensors.Identical(unusedInBase.Load("vision_backbone.fused_featurizer.attn_pool.latent"), unusedInMerged.Load("vision_backbone.fused_featurizer.attn_pool.latent")));
        unusedInBase.Dispose(); unusedInMerged.Dispose();

        using var policy = VlaPolicy.Load(mergedDir);
        var prediction = policy.Predict(new VlaObservation([examples[0].Image], examples[0].Instruction, "my_robot"));
        Assert.Equal(7, prediction.Action.Length);
        Assert.Equal(7, prediction.ActionTokenIds.Length);

        // Base + adapter directory, as the server would load them, gives the trained model too.
        var (fresh, _, _) = TrainingFixtures.Load(baseDir);
        using (fresh)
        {
            var adapted = PeftAdapter.Load(Path.Combine(saved, Trainer.AdapterDirName), fresh);
            Assert.Equal(trainer.AdaptedModules, adapted);
            using var probe = new Trainer(fresh, checkpoint, tokenizer, TrainingFixtures.SmallRun(full: true), tmp["probe2"], TrainingFixtures.Statistics());
            Assert.True(Tensors.Identical(trained, Logits(probe, examples.Take(3).ToList())));
        }

        // The policy loads base + adapter directly (merged at load) and predicts exactly as from the merged checkpoint,
        // un-normalizing with the adapter's statistics.
        using (var adapted = VlaPolicy.Load(baseDir, new PolicyOptions { Adapter = Path.Combine(saved, Trainer.AdapterDirName) }))
        {
            var p2 = adapted.Predict(new VlaObservation([examples[0].Image], examples[0].Instruction, "my_robot"));
            Assert.Equal(prediction.ActionTokenIds, p2.ActionTokenIds);
            Assert.Equal(prediction.Action, p2.Action);
        }
        var cliPredict = CliRunner.Run("predict", "--checkpoint", baseDir, "--adapter", Path.Combine(saved, Trainer.AdapterDirName),
            "--image", WritePng(tmp["frame.png"], examples[0].Image), "--instruction", examples[0].Instruction, "--unnorm-key", "my_robot", "--json");
        Assert.True(cliPredict.ExitCode == 0, cliPredict.Stderr);

        // `merge` does the same offline.
        var cli = CliRunner.Run("merge", "--base", baseDir, "--adapter", Path.Combine(saved, Trainer.AdapterDirName), "--out", tmp["merged-cli"], "--dtype", "f32");
        Assert.True(cli.ExitCode == 0, cli.Stderr);
        using var a = SafetensorsFile.Open(Path.Combine(mergedDir, "model.safetensors"));
        using var b = SafetensorsFile.Open(Path.Combine(tmp["merged-cli"], "model.safetensors"));
        foreach (var name in a.Tensors.Keys) Assert.True(Tensors.Identical(a.Load(name), b.Load(name)), name);
        Assert.Equal(File.ReadAllText(Path.Combine(saved, "dataset_statistics.json")), File.ReadAllText(Path.Combine(tmp["merged-cli"], "dataset_statistics.json")));
    }

    static string WritePng(string path, RgbImage image)
    {
        using var mat = new OpenCvSharp.Mat(image.Height, image.Width, OpenCvSharp.MatType.CV_8UC3);
        var bgr = new byte[image.Pixels.Length];
        for (int i = 0; i < bgr.Length; i += 3) { bgr[i] = image.Pixels[i + 2]; bgr[i + 1] = image.Pixels[i + 1]; bgr[i + 2] = image.Pixels[i]; }
        System.Runtime.InteropServices.Marshal.Copy(bgr, 0, mat.Data, bgr.Length);
        OpenCvSharp.Cv2.ImWrite(path, mat);
        return path;
    }

    [Fact]
    public void AdapterDirectoryHasThePeftLayout()
    {
        using var tmp = new TestPaths.TempDir();
        var baseDir = TrainingFixtures.MakeBase(tmp["base"]);
        var (model, checkpoint, tokenizer) = TrainingFixtures.Load(baseDir);
        using var _ = model;
        using var trainer = new Trainer(model, checkpoint, tokenizer, TrainingFixtures.SmallRun(), tmp["run"], TrainingFixtures.Statistics());
        var dir = tmp["adapter"];
        PeftAdapter.Save(dir, model, trainer.Options.Lora, "openvla/openvla-7b");

        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")))!.AsObject();
        Assert.Equal("LORA", config["peft_type"]!.GetValue<string>());
        Assert.Equal(4, config["r"]!.GetValue<int>());
        Assert.Equal(8, config["lora_alpha"]!.GetValue<int>());
        Assert.Equal(0.0, config["lora_dropout"]!.GetValue<double>());
        Assert.Equal("none", config["bias"]!.GetValue<string>());
        Assert.Equal("gaussian", config["init_lora_weights"]!.GetValue<string>());
        Assert.Equal("openvla/openvla-7b", config["base_model_name_or_path"]!.GetValue<string>());
        Assert.Equal(["down_proj", "fc1", "fc2", "fc3", "gate_proj", "k_proj", "o_proj", "proj", "q_proj", "qkv", "up_proj", "v_proj"],
            config["target_modules"]!.AsArray().Select(n => n!.GetValue<string>()).ToArray());

        using var st = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        Assert.Equal(2 * trainer.AdaptedModules.Count, st.Tensors.Count);
        var q = st.Tensors["base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"];
        Assert.Equal("F32", q.DType);
        Assert.Equal([4L, 64L], q.Shape);
        Assert.Equal([64L, 4L], st.Tensors["base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_B.weight"].Shape);
        Assert.Contains("base_model.model.projector.fc1.lora_A.weight", st.Tensors.Keys);
        Assert.Contains("base_model.model.vision_backbone.featurizer.blocks.1.mlp.fc2.lora_B.weight", st.Tensors.Keys);
        Assert.All(st.Tensors.Keys, k => Assert.Matches(@"^base_model\.model\.[a-z_.0-9]+\.lora_[AB]\.weight$", k));

        var read = PeftAdapter.ReadConfig(dir);
        Assert.Equal(4, read.Rank);
        Assert.Equal(8, read.Alpha);
    }

    [Fact]
    public void TargetModulesSelectLayersByPeftRules()
    {
        using var tmp = new TestPaths.TempDir();
        var (model, _, _) = TrainingFixtures.Load(TrainingFixtures.MakeBase(tmp.Path));
        using var _ = model;
        var paths = PeftAdapter.Attach(model, new LoraSettings(2, 2, 0, ["q_proj", "v_proj", "projector.fc3"]));
        Assert.Equal(["projector.fc3", "language_model.model.layers.0.self_attn.q_proj", "language_model.model.layers.0.self_attn.v_proj",
            "language_model.model.layers.1.self_attn.q_proj", "language_model.model.layers.1.self_attn.v_proj"], paths);
        var e = Assert.Throws<PolicyInputException>(() => PeftAdapter.ResolveTargets(model, ["lm_head"]));
        Assert.Contains("matches no linear layer", e.Message);
    }
}
