using Grpc.Core;
using Grpc.Health.V1;
using Grpc.Net.Client;
using OpenVLA.Contract.V1;
using OpenVLA.RobotClients;
using OpenVLA.Server;

namespace OpenVLA.Tests.Server;

/// <summary>The server end to end through the C# client: unary, info, streams, batching, deadlines, health, metrics.</summary>
public sealed class PolicyServerTests
{
    [Fact]
    public async Task Predict_returns_the_action_for_the_robots_own_frame_with_seq_and_timings()
    {
        var policy = new DeterministicPolicy();
        await using var server = await TestServer.StartAsync(policy);
        using var client = TestServer.Client(server);
        var frame = TestServer.Frame(red: 51);
        var observation = TestServer.Raw(frame);
        observation.Seq = 42;
        observation.CaptureTimeUnixUs = 1_700_000_000_000_000;

        var reply = await client.PredictAsync(observation);

        Assert.Equal(DeterministicPolicy.ExpectedAction(frame, observation.Instruction), reply.Action.Values);
        Assert.Equal(7, reply.Action.TokenIds.Count);
        Assert.Equal("bridge_orig", reply.Action.UnnormKey);
        Assert.Equal(42ul, reply.Seq);
        Assert.Equal(1_700_000_000_000_000, reply.CaptureTimeUnixUs);
        Assert.Equal(12, reply.ModelVersion.Length);
        Assert.Equal(1u, reply.Timings.BatchSize);
        Assert.Equal(0.4, reply.Timings.DecodeTokensMs);
        Assert.True(reply.Timings.ServerTotalMs > 0 && reply.Timings.ServerTotalMs < 5000);
    }

    [Fact]
    public async Task Jpeg_and_png_frames_are_decoded_to_rgb()
    {
        await using var server = await TestServer.StartAsync(new DeterministicPolicy());
        using var client = TestServer.Client(server);
        var frame = TestServer.Frame(red: 200, width: 64, height: 48);
        var expected = DeterministicPolicy.ExpectedAction(frame, "pick up the red block");

        var png = await client.PredictAsync(Observations.FromEncoded(TestServer.Encode(frame, ".png"), "pick up the red block", ImageEncoding.Png, "bridge_orig"));
        var jpeg = await client.PredictAsync(Observations.FromEncoded(TestServer.Encode(frame, ".jpg"), "pick up the red block", ImageEncoding.Jpeg, "bridge_orig"));

        Assert.Equal(expected, png.Action.Values); // lossless
        for (int i = 0; i < 7; i++) Assert.Equal(expected[i], jpeg.Action.Values[i], 0.02f * (i + 1)); // JPEG moves colours slightly
    }

    [Fact]
    public async Task GetPolicyInfo_describes_the_model_the_statistics_and_the_limits()
    {
        await using var server = await TestServer.StartAsync(new DeterministicPolicy(), o => o with { MaxBatch = 4, MaxQueue = 9 });
        using var client = TestServer.Client(server);

        var info = await client.GetPolicyInfoAsync();

        Assert.Equal("openvla.v1", info.ApiVersion);
        Assert.Equal("test/deterministic", info.ModelId);
        Assert.Equal(7u, info.ActionDim);
        Assert.Equal(1u, info.ChunkLength);
        Assert.Equal(224u, info.ImageSize);
        Assert.Equal(["bridge_orig", "fractal20220817_data"], info.UnnormKeys.Select(k => k.Name));
        Assert.Equal(64, info.UnnormKeys[0].StatsSha256.Length);
        Assert.NotEqual(info.UnnormKeys[0].StatsSha256, info.UnnormKeys[1].StatsSha256);
        Assert.Equal([ImageEncoding.RawRgb8, ImageEncoding.Jpeg, ImageEncoding.Png], info.AcceptedEncodings);
        Assert.Equal(4u, info.Limits.MaxBatch);
        Assert.Equal(9u, info.Limits.MaxQueue);
        Assert.Equal(8ul << 20, info.Limits.MaxMessageBytes);
    }

    [Fact]
    public async Task A_stream_answers_every_frame_in_order_when_the_model_keeps_up()
    {
        await using var server = await TestServer.StartAsync(new DeterministicPolicy());
        using var client = TestServer.Client(server);
        using var call = client.Raw.StreamActions(deadline: DateTime.UtcNow.AddSeconds(10));

        for (ulong seq = 1; seq <= 5; seq++)
        {
            var frame = TestServer.Frame((byte)(seq * 40));
            var observation = TestServer.Raw(frame);
            observation.Seq = seq;
            await call.RequestStream.WriteAsync(new StreamActionsRequest { Observation = observation });
            Assert.True(await call.ResponseStream.MoveNext());
            var reply = call.ResponseStream.Current;
            Assert.Equal(seq, reply.Seq);
            Assert.Equal(0u, reply.Skipped);
            Assert.Equal(DeterministicPolicy.ExpectedAction(frame, observation.Instruction), reply.Action.Values);
        }
        await call.RequestStream.CompleteAsync();
        Assert.False(await call.ResponseStream.MoveNext());
    }

    [Fact]
    public async Task Under_a_slow_model_stale_frames_are_dropped_and_counted_and_the_newest_frame_is_answered()
    {
        var policy = new SlowPolicy(TimeSpan.FromMilliseconds(150));
        await using var server = await TestServer.StartAsync(policy);
        using var client = TestServer.Client(server);
        using var call = client.Raw.StreamActions(deadline: DateTime.UtcNow.AddSeconds(20));

        const int frames = 20; // 20 frames in ~200 ms while each forward pass takes 150 ms
        for (ulong seq = 1; seq <= frames; seq++)
        {
            var observation = TestServer.Raw(TestServer.Frame((byte)seq));
            observation.Seq = seq;
            await call.RequestStream.WriteAsync(new StreamActionsRequest { Observation = observation });
            await Task.Delay(10);
        }
        await call.RequestStream.CompleteAsync();
        var replies = new List<StreamActionsResponse>();
        while (await call.ResponseStream.MoveNext()) replies.Add(call.ResponseStream.Current);

        Assert.InRange(replies.Count, 2, 10); // about one per 150 ms forward pass, not 20
        Assert.Equal((ulong)frames, replies[^1].Seq); // the robot's newest frame is always answered
        Assert.True(replies.Select(r => r.Seq).SequenceEqual(replies.Select(r => r.Seq).Order()));
        Assert.Equal(frames, replies.Count + replies.Sum(r => (int)r.Skipped)); // every frame is answered or counted
        Assert.Equal((ulong)(frames - replies.Count), replies[^1].SkippedTotal);
        Assert.All(replies, r => Assert.Equal(StreamActionsResponse.ResultOneofCase.Action, r.ResultCase));
        Assert.Equal(replies.Count, policy.Instructions.Count(i => i != "warm up")); // skipped frames were never computed
        Assert.Contains($"openvla_stale_frames_dropped_total {frames - replies.Count}", await Metrics(server));
    }

    [Fact]
    public async Task Eight_concurrent_robots_are_batched_together_and_each_gets_its_own_action()
    {
        var policy = new SlowPolicy(TimeSpan.FromMilliseconds(20));
        await using var server = await TestServer.StartAsync(policy, o => o with { MaxBatch = 8, MaxQueueDelayMs = 5 });
        var robots = Enumerable.Range(0, 8).Select(async robot =>
        {
            using var client = TestServer.Client(server);
            for (int step = 0; step < 6; step++)
            {
                var frame = TestServer.Frame((byte)(robot * 30 + step));
                var observation = TestServer.Raw(frame, instruction: $"robot {robot} task");
                observation.RobotId = $"robot-{robot}";
                var reply = await client.PredictAsync(observation);
                Assert.Equal(DeterministicPolicy.ExpectedAction(frame, observation.Instruction), reply.Action.Values);
            }
        });
        await Task.WhenAll(robots);

        var sizes = policy.BatchSizes.Skip(2).ToArray(); // after the two warm-up passes (batch 1, batch 2)
        Assert.Equal(48, sizes.Sum());
        Assert.True(sizes.Max() >= 3, $"largest batch {sizes.Max()}: robots were not batched");
        Assert.True(sizes.Length < 48, "one forward pass per request: no batching");
    }

    [Fact]
    public async Task An_expired_deadline_is_answered_DEADLINE_EXCEEDED_and_never_computed()
    {
        var policy = new SlowPolicy(TimeSpan.FromMilliseconds(400));
        await using var server = await TestServer.StartAsync(policy, o => o with { MaxBatch = 1 });
        using var client = TestServer.Client(server);

        var busy = client.PredictAsync(TestServer.Raw(TestServer.Frame(1), instruction: "occupy the model"));
        await policy.Computing("occupy the model");
        var late = await Assert.ThrowsAsync<RpcException>(() =>
            client.PredictAsync(TestServer.Raw(TestServer.Frame(2), instruction: "too late"), timeout: TimeSpan.FromMilliseconds(100)));
        await busy;
        await Task.Delay(500); // the scheduler has looked at the expired request by now

        Assert.Equal(StatusCode.DeadlineExceeded, late.StatusCode);
        Assert.DoesNotContain("too late", policy.Instructions);
        Assert.Contains("occupy the model", policy.Instructions);
    }

    [Fact]
    public async Task A_full_queue_answers_RESOURCE_EXHAUSTED()
    {
        var policy = new SlowPolicy(TimeSpan.FromMilliseconds(300));
        await using var server = await TestServer.StartAsync(policy, o => o with { MaxBatch = 1, MaxQueue = 1 });
        using var client = TestServer.Client(server);

        var calls = Enumerable.Range(0, 5).Select(i => client.PredictAsync(TestServer.Raw(TestServer.Frame((byte)i)))).ToArray();
        var outcomes = await Task.WhenAll(calls.Select(async c => { try { await c; return StatusCode.OK; } catch (RpcException e) { return e.StatusCode; } }));

        Assert.Contains(StatusCode.ResourceExhausted, outcomes);
        Assert.Contains(StatusCode.OK, outcomes);
        Assert.All(outcomes, s => Assert.True(s is StatusCode.OK or StatusCode.ResourceExhausted, s.ToString()));
    }

    [Fact]
    public async Task A_failing_model_answers_INTERNAL_without_exception_text_and_keeps_serving()
    {
        await using var server = await TestServer.StartAsync(new ThrowingPolicy());
        using var client = TestServer.Client(server);

        var failure = await Assert.ThrowsAsync<RpcException>(() => client.PredictAsync(TestServer.Raw(TestServer.Frame(1), instruction: "explode")));
        var refused = await Assert.ThrowsAsync<RpcException>(() => client.PredictAsync(TestServer.Raw(TestServer.Frame(1), instruction: "bad input")));
        var fine = await client.PredictAsync(TestServer.Raw(TestServer.Frame(1)));

        Assert.Equal(StatusCode.Internal, failure.StatusCode);
        Assert.DoesNotContain("secret", failure.Status.Detail);
        Assert.DoesNotContain("InvalidOperationException", failure.Status.Detail);
        Assert.Equal(StatusCode.InvalidArgument, refused.StatusCode);
        Assert.Equal("the policy refused this observation", refused.Status.Detail);
        Assert.Equal(7, fine.Action.Values.Count);
    }

    [Fact]
    public async Task Health_is_NOT_SERVING_while_loading_then_SERVING_and_predict_waits_for_it()
    {
        var release = new ManualResetEventSlim();
        var options = TestServer.Options();
        await using var server = await PolicyServer.StartAsync(options, (_, _) => { release.Wait(TimeSpan.FromSeconds(10)); return new DeterministicPolicy(); }, _ => { });
        using var channel = GrpcChannel.ForAddress(server.GrpcAddress);
        var health = new Health.HealthClient(channel);
        using var client = TestServer.Client(server);

        var loading = await health.CheckAsync(new HealthCheckRequest { Service = PolicyServer.ServiceName });
        var early = await Assert.ThrowsAsync<RpcException>(() => client.PredictAsync(TestServer.Raw(TestServer.Frame(1))));
        release.Set();
        await server.Ready.WaitAsync(TimeSpan.FromSeconds(10));
        var serving = await health.CheckAsync(new HealthCheckRequest { Service = PolicyServer.ServiceName });
        var overall = await health.CheckAsync(new HealthCheckRequest());

        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, loading.Status);
        Assert.Equal(StatusCode.Unavailable, early.StatusCode);
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, serving.Status);
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, overall.Status);
        Assert.Equal(7, (await client.PredictAsync(TestServer.Raw(TestServer.Frame(1)))).Action.Values.Count);
    }

    [Fact]
    public async Task A_health_Watch_sees_SERVING_then_NOT_SERVING_and_does_not_hold_up_the_stop()
    {
        var server = await TestServer.StartAsync(new DeterministicPolicy()); // shutdown timeout 5 s
        using var channel = GrpcChannel.ForAddress(server.GrpcAddress);
        using var watch = new Health.HealthClient(channel).Watch(new HealthCheckRequest { Service = PolicyServer.ServiceName });
        Assert.True(await watch.ResponseStream.MoveNext(CancellationToken.None));
        var serving = watch.ResponseStream.Current.Status;

        var clock = System.Diagnostics.Stopwatch.StartNew();
        await server.StopAsync();
        var stopTook = clock.Elapsed;
        Assert.True(await watch.ResponseStream.MoveNext(CancellationToken.None));
        var stopping = watch.ResponseStream.Current.Status;
        Assert.False(await watch.ResponseStream.MoveNext(CancellationToken.None)); // the stream ended

        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, serving);
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, stopping);
        Assert.True(stopTook < TimeSpan.FromSeconds(3), $"stop took {stopTook.TotalSeconds:F1} s");
        await server.DisposeAsync();
    }

    [Fact]
    public async Task A_policy_that_fails_to_load_leaves_the_server_NOT_SERVING()
    {
        await using var server = await PolicyServer.StartAsync(TestServer.Options(),
            (_, _) => throw new FileNotFoundException("model.safetensors not found"), _ => { });
        await Assert.ThrowsAsync<FileNotFoundException>(() => server.Ready.WaitAsync(TimeSpan.FromSeconds(10)));
        using var channel = GrpcChannel.ForAddress(server.GrpcAddress);

        var status = await new Health.HealthClient(channel).CheckAsync(new HealthCheckRequest());

        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, status.Status);
    }

    [Fact]
    public async Task Stopping_answers_requests_already_in_flight()
    {
        var policy = new SlowPolicy(TimeSpan.FromMilliseconds(300));
        await using var server = await TestServer.StartAsync(policy);
        using var client = TestServer.Client(server);

        var inFlight = client.PredictAsync(TestServer.Raw(TestServer.Frame(9), instruction: "in flight"));
        await policy.Computing("in flight");
        await server.StopAsync();

        Assert.Equal(7, (await inFlight).Action.Values.Count);
    }

    [Fact]
    public async Task Stopping_answers_the_frame_a_stream_already_sent_then_ends_the_stream_UNAVAILABLE()
    {
        var policy = new SlowPolicy(TimeSpan.FromMilliseconds(300));
        await using var server = await TestServer.StartAsync(policy);
        using var client = TestServer.Client(server);
        using var call = client.Raw.StreamActions(deadline: DateTime.UtcNow.AddSeconds(10));
        var observation = TestServer.Raw(TestServer.Frame(9), instruction: "in flight");
        observation.Seq = 1;
        await call.RequestStream.WriteAsync(new StreamActionsRequest { Observation = observation });
        await policy.Computing("in flight");

        var stopping = server.StopAsync();
        Assert.True(await call.ResponseStream.MoveNext());
        var answered = call.ResponseStream.Current;
        var end = await Assert.ThrowsAsync<RpcException>(() => call.ResponseStream.MoveNext());
        await stopping;

        Assert.Equal(1ul, answered.Seq);
        Assert.Equal(7, answered.Action.Values.Count);
        Assert.Equal(StatusCode.Unavailable, end.StatusCode);
    }

    [Fact]
    public async Task Metrics_are_served_on_their_own_port()
    {
        await using var server = await TestServer.StartAsync(new DeterministicPolicy());
        using var client = TestServer.Client(server);
        await client.PredictAsync(TestServer.Raw(TestServer.Frame(3)));
        await Assert.ThrowsAsync<RpcException>(() => client.PredictAsync(TestServer.Raw(TestServer.Frame(3), instruction: "")));

        var text = await Metrics(server);

        Assert.NotEqual(server.GrpcAddress.Port, server.MetricsAddress!.Port);
        Assert.Contains("openvla_requests_total{method=\"Predict\",status=\"OK\"} 1", text);
        Assert.Contains("openvla_requests_total{method=\"Predict\",status=\"InvalidArgument\"} 1", text);
        Assert.Contains("openvla_stage_seconds_bucket{stage=\"queue\"", text);
        Assert.Contains("openvla_stage_seconds_count{stage=\"model_total\"}", text);
        Assert.Contains("openvla_batch_size_count 1", text);
        Assert.Contains("openvla_queue_depth 0", text);
        Assert.Contains("openvla_model_load_seconds{phase=\"load\"}", text);
        Assert.Contains("openvla_ready 1", text);
    }

    [Fact]
    public async Task Reflection_lists_the_policy_and_health_services()
    {
        await using var server = await TestServer.StartAsync(new DeterministicPolicy());
        using var channel = GrpcChannel.ForAddress(server.GrpcAddress);
        using var call = new Grpc.Reflection.V1Alpha.ServerReflection.ServerReflectionClient(channel).ServerReflectionInfo();

        await call.RequestStream.WriteAsync(new Grpc.Reflection.V1Alpha.ServerReflectionRequest { ListServices = "" });
        await call.RequestStream.CompleteAsync();
        Assert.True(await call.ResponseStream.MoveNext());
        var names = call.ResponseStream.Current.ListServicesResponse.Service.Select(s => s.Name).ToArray();

        Assert.Contains("openvla.v1.PolicyService", names);
        Assert.Contains("grpc.health.v1.Health", names);
    }

    [Fact]
    public async Task The_latest_frame_helper_streams_and_reports_the_newest_action()
    {
        await using var server = await TestServer.StartAsync(new SlowPolicy(TimeSpan.FromMilliseconds(30)));
        using var client = TestServer.Client(server);
        await using var stream = client.OpenStream();

        for (ulong seq = 1; seq <= 30; seq++)
        {
            var observation = TestServer.Raw(TestServer.Frame((byte)seq));
            observation.Seq = seq;
            Assert.True(stream.Submit(observation));
            await Task.Delay(5);
        }
        StreamActionsResponse? last = null;
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        while (last?.Seq != 30) last = await stream.Replies.ReadAsync(timeout.Token);

        Assert.Equal(30ul, stream.Latest!.Seq);
        Assert.Equal(StreamActionsResponse.ResultOneofCase.Action, last.ResultCase);
    }

    [Fact]
    public async Task The_latest_frame_helper_reconnects_when_the_server_restarts()
    {
        var first = await TestServer.StartAsync(new DeterministicPolicy());
        var port = first.GrpcAddress.Port;
        using var client = TestServer.Client(first, o => o with
        {
            MaxAttempts = 30, InitialBackoff = TimeSpan.FromMilliseconds(50), MaxBackoff = TimeSpan.FromMilliseconds(200),
        });
        await using var stream = client.OpenStream();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var one = TestServer.Raw(TestServer.Frame(1));
        one.Seq = 1;
        stream.Submit(one);
        Assert.Equal(1ul, (await stream.Replies.ReadAsync(timeout.Token)).Seq);

        await first.DisposeAsync(); // the robot's server goes away ...
        await using var second = await TestServer.StartAsync(new DeterministicPolicy(), o => o with { Port = port }); // ... and comes back
        StreamActionsResponse? reply = null;
        for (ulong seq = 2; reply is null && seq < 200; seq++)
        {
            var frame = TestServer.Raw(TestServer.Frame((byte)seq));
            frame.Seq = seq;
            stream.Submit(frame);
            using var wait = CancellationTokenSource.CreateLinkedTokenSource(timeout.Token);
            wait.CancelAfter(TimeSpan.FromMilliseconds(300));
            try { reply = await stream.Replies.ReadAsync(wait.Token); }
            catch (OperationCanceledException) when (!timeout.IsCancellationRequested) { } // still reconnecting: send a newer frame
        }

        Assert.NotNull(reply);
        Assert.True(reply.Seq >= 2);
        Assert.Equal(StreamActionsResponse.ResultOneofCase.Action, reply.ResultCase);
        Assert.True(stream.Reconnects >= 1);
    }

    internal static async Task<string> Metrics(PolicyServer server)
    {
        using var http = new HttpClient();
        return await http.GetStringAsync(server.MetricsAddress);
    }
}
