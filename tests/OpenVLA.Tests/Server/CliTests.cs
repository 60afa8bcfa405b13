using System.Diagnostics;

namespace OpenVLA.Tests.Server;

/// <summary>The command-line client and `serve`, run as the real executable against a test server.</summary>
public sealed class CliTests
{
    static readonly string Cli = Path.Combine(AppContext.BaseDirectory, "openvla.dll");

    [Fact]
    public async Task Client_info_predict_and_stream_print_actions_and_latency()
    {
        await using var server = await TestServer.StartAsync(new DeterministicPolicy());
        var dir = Directory.CreateTempSubdirectory("openvla-cli-").FullName;
        try
        {
            for (int i = 0; i < 4; i++) File.WriteAllBytes(Path.Combine(dir, $"frame{i}.png"), TestServer.Encode(TestServer.Frame((byte)(i * 50)), ".png"));
            var address = server.GrpcAddress.ToString();

            var info = await RunAsync("client", "info", "--server", address);
            var predict = await RunAsync("client", "predict", "--server", address, "--image", Path.Combine(dir, "frame1.png"),
                "--unnorm-key", "bridge_orig", "--repeat", "3");
            var stream = await RunAsync("client", "stream", "--server", address, "--images", dir, "--fps", "50", "--unnorm-key", "bridge_orig");
            var bad = await RunAsync("client", "predict", "--server", address, "--image", Path.Combine(dir, "frame1.png"), "--unnorm-key", "nope");

            Assert.True(info.Code == 0, info.Output);
            Assert.Contains("model:         test/deterministic", info.Output);
            Assert.True(predict.Code == 0, predict.Output);
            Assert.Contains("action: [", predict.Output);
            Assert.Contains("round trip: p50", predict.Output);
            Assert.True(stream.Code == 0, stream.Output);
            Assert.Contains("4 frames in", stream.Output);
            Assert.Contains("p99", stream.Output);
            Assert.Equal(2, bad.Code);
            Assert.Contains("InvalidArgument: unknown unnorm_key 'nope'", bad.Output);
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Fact]
    public async Task Client_stream_sends_the_frames_of_a_video()
    {
        await using var server = await TestServer.StartAsync(new DeterministicPolicy());
        var dir = Directory.CreateTempSubdirectory("openvla-video-").FullName;
        try
        {
            var video = Path.Combine(dir, "clip.avi");
            using (var writer = new OpenCvSharp.VideoWriter(video, OpenCvSharp.FourCC.MJPG, 10, new OpenCvSharp.Size(64, 48)))
            {
                Assert.True(writer.IsOpened(), "OpenCV cannot write MJPG video here");
                for (int i = 0; i < 6; i++)
                {
                    using var frame = new OpenCvSharp.Mat(48, 64, OpenCvSharp.MatType.CV_8UC3, new OpenCvSharp.Scalar(200, 40, i * 40));
                    writer.Write(frame);
                }
            }

            var stream = await RunAsync("client", "stream", "--server", server.GrpcAddress.ToString(), "--video", video, "--fps", "30",
                "--unnorm-key", "bridge_orig", "--json", "--quiet");

            Assert.True(stream.Code == 0, stream.Output);
            Assert.Contains("\"frames\":6,", stream.Output);
            Assert.Contains("\"errors\":0", stream.Output);
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Fact]
    public async Task Eval_refuses_an_adapter_it_cannot_apply_with_one_line()
    {
        var dir = Directory.CreateTempSubdirectory("openvla-adapter-").FullName;
        try
        {
            var notCheckpoint = await RunAsync("eval", "--policy", "scripted", "--adapter", dir, "--tasks", "pick_up", "--trials-per-task", "1");
            var missing = await RunAsync("eval", "--adapter", Path.Combine(dir, "absent"), "--tasks", "pick_up", "--trials-per-task", "1");

            Assert.Equal(2, notCheckpoint.Code);
            Assert.Contains("--adapter applies to checkpoint:DIR policies", notCheckpoint.Output);
            Assert.Single(notCheckpoint.Output.Trim().Split('\n'));
            Assert.Equal(2, missing.Code);
            Assert.Contains("does not exist", missing.Output);
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Fact]
    public async Task Eval_refuses_to_diagnose_the_scripted_expert_with_one_line()
    {
        var result = await RunAsync("eval", "--policy", "scripted", "--diagnose", "--tasks", "pick_up", "--trials-per-task", "1");
        Assert.Equal(2, result.Code);
        Assert.Contains("--diagnose compares a learned policy with the scripted expert", result.Output);
        Assert.Single(result.Output.Trim().Split('\n'));
    }

    [Theory]
    [InlineData("scripted", "sample:0.8", "--decode applies to checkpoint:DIR policies")]
    [InlineData(null, "sample:0", "temperature must be a positive number")]
    [InlineData(null, "beam:4", "unknown decoding 'beam:4'")]
    public async Task Eval_refuses_a_decoding_it_cannot_apply_with_one_line(string? policy, string decode, string message)
    {
        string[] args = ["eval", "--decode", decode, "--tasks", "pick_up", "--trials-per-task", "1"];
        var result = await RunAsync(policy is null ? args : [.. args, "--policy", policy]);
        Assert.Equal(2, result.Code);
        Assert.Contains(message, result.Output);
        Assert.Single(result.Output.Trim().Split('\n'));
    }

    [Fact]
    public async Task Convert_records_sampling_in_generation_config_and_refuses_expected()
    {
        using var tmp = new TestPaths.TempDir();
        var golden = TestPaths.Fixture("openvla-golden", "checkpoint");
        var refused = await RunAsync("convert", "--checkpoint", golden, "--out", tmp["expected"], "--dtype", "f32", "--decode", "expected");
        Assert.Equal(2, refused.Code);
        Assert.Contains("no generation_config.json form", refused.Output);
        Assert.False(Directory.Exists(tmp["expected"]));

        var ok = await RunAsync("convert", "--checkpoint", golden, "--out", tmp["sampled"], "--dtype", "f32", "--decode", "sample:0.6,top_k=10");
        Assert.Equal(0, ok.Code);
        var config = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(tmp["sampled"], "generation_config.json")))!;
        Assert.True((bool)config["do_sample"]!);
        Assert.Equal(0.6, (double)config["temperature"]!);
        Assert.Equal(10, (int)config["top_k"]!);
        Assert.Equal(1, (int)config["bos_token_id"]!);   // the source's keys are kept
    }

    [Fact]
    public async Task Eval_against_an_unreachable_policy_server_fails_with_one_line()
    {
        var result = await RunAsync("eval", "--policy", "grpc://127.0.0.1:1", "--tasks", "pick_up", "--trials-per-task", "1",
            "--out", Path.Combine(Path.GetTempPath(), "openvla-eval-never-written"));

        Assert.Equal(1, result.Code);
        Assert.Contains("openvla: error: policy server http://127.0.0.1:1/: Unavailable:", result.Output);
        Assert.Single(result.Output.Trim().Split('\n'));
    }

    [Fact]
    public async Task Serve_refuses_with_one_line_what_it_cannot_serve()
    {
        var dir = Directory.CreateTempSubdirectory("openvla-ckpt-").FullName;
        try
        {
            var missing = await RunAsync("serve", "--checkpoint", Path.Combine(dir, "absent"));
            var notACheckpoint = await RunAsync("serve", "--checkpoint", dir, "--port", "0", "--metrics-port", "-1");
            var badFlags = await RunAsync("serve", "--checkpoint", dir, "--max-batch", "0");
            var badQuantize = await RunAsync("serve", "--checkpoint", dir, "--quantize", "int4", "--group-size", "48");

            Assert.Equal(2, missing.Code);
            Assert.Contains($"openvla: checkpoint directory '{Path.Combine(dir, "absent")}' does not exist", missing.Output);
            Assert.Equal(2, notACheckpoint.Code);
            Assert.Contains("config.json is missing", notACheckpoint.Output);
            Assert.Equal(2, badFlags.Code);
            Assert.Contains("--max-batch must be 1..1024, got 0", badFlags.Output);
            // serve takes the model options every loading verb shares (ModelOptions), validated before anything starts.
            Assert.Equal(2, badQuantize.Code);
            Assert.Contains("int4 group size must be 32, 64, 128 or 256, got 48", badQuantize.Output);
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Theory]
    [InlineData(50051, 50052)]
    [InlineData(6000, 6001)]
    [InlineData(0, 0)]
    [InlineData(65535, 65534)]
    public void The_metrics_port_follows_the_grpc_port(int port, int metrics) =>
        Assert.Equal(metrics, OpenVLA.Server.ServeOptions.DefaultMetricsPort(port));

    [Fact]
    public async Task Serve_serves_a_checkpoint_until_SIGTERM_then_stops_cleanly()
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        // No --metrics-port: it follows --port (here ephemeral too), so servers on different ports never collide on 50052.
        foreach (var a in new[] { Cli, "serve", "--checkpoint", TestPaths.Fixture("openvla-golden", "checkpoint"), "--port", "0" })
            start.ArgumentList.Add(a);
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var log = new System.Text.StringBuilder();
        string? address = null;
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        try
        {
            while (address is null && await process.StandardError.ReadLineAsync(timeout.Token) is { } line)
            {
                log.AppendLine(line);
                if (line.StartsWith("openvla: serving on ")) address = line["openvla: serving on ".Length..].Split(' ')[0];
            }
            Assert.True(address is not null, log.ToString());
            var stderrRest = process.StandardError.ReadToEndAsync();

            var predict = await RunAsync("client", "predict", "--server", address!, "--image", TestPaths.Fixture("openvla-golden", "image0.png"),
                "--instruction", "Pick up the red cube", "--unnorm-key", "sim_alpha", "--json");
            Process.Start("kill", ["-TERM", process.Id.ToString()])!.WaitForExit();
            await process.WaitForExitAsync(timeout.Token);

            Assert.True(predict.Code == 0, predict.Output);
            Assert.Contains("\"action\":[0.0362", predict.Output);
            Assert.Equal(0, process.ExitCode);
            Assert.Contains("stopped", await stderrRest);
            Assert.Equal("", await stdout);
        }
        finally { if (!process.HasExited) process.Kill(entireProcessTree: true); }
    }

    static async Task<(int Code, string Output)> RunAsync(params string[] args)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(Cli);
        foreach (var a in args) start.ArgumentList.Add(a);
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        try { await process.WaitForExitAsync(timeout.Token); }
        catch (OperationCanceledException) { process.Kill(entireProcessTree: true); throw new TimeoutException($"openvla {string.Join(' ', args)} ran past 60 s"); }
        return (process.ExitCode, await stdout + await stderr);
    }
}
