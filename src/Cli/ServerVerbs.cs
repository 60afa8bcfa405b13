using System.CommandLine;
using System.Diagnostics;
using System.Security.Cryptography.X509Certificates;
using System.Text.Json;
using Google.Protobuf;
using Grpc.Core;
using OpenCvSharp;
using OpenVLA.Cli.Bench;
using OpenVLA.Contract.V1;
using OpenVLA.Policy;
using OpenVLA.RobotClients;
using OpenVLA.Server;

namespace OpenVLA.Cli;

/// <summary>serve, client info|predict|stream, bench-server: the policy server and the command-line robot client.</summary>
internal static class ServerVerbs
{
    /// <summary>How `serve` and `bench-server` get the policy: the policy core's loader with the serve options.</summary>
    /// <summary>The policy factory of serve and bench-server: the checkpoint with the load options every model verb
    /// shares (<see cref="ModelOptions"/>: precision, quantization, device, threads, --adapter).</summary>
    static Func<ServeOptions, CancellationToken, IActionPolicy> PolicyLoader(PolicyOptions load) =>
        (options, _) => VlaPolicy.Load(options.Checkpoint, load);

    public static IEnumerable<Command> Create()
    {
        // The evaluator's `--policy grpc://HOST:PORT` backend (eval workers are this same CLI, so registering here at
        // start-up reaches them too).
        OpenVLA.RobotClients.Evaluation.RolloutPolicies.GrpcFactory ??= (host, port) =>
            new RemotePolicy(new PolicyClient(new PolicyClientOptions { Address = new Uri($"http://{host}:{port}") }), ownsClient: true);

        yield return Serve();
        yield return Client();
        yield return Bench();
    }

    // ---------------------------------------------------------------- serve

    static readonly Option<string> Checkpoint = new("--checkpoint") { Description = "checkpoint directory to serve", Required = true };
    static readonly Option<string?> ServeCheckpoint = new("--checkpoint")
    {
        Description = $"checkpoint directory to serve (default: the embedded {DefaultModel.Name})",
    };
    static readonly Option<bool> CenterCrop = new("--center-crop") { Description = "center crop (area 0.9) for checkpoints trained with image augmentation" };

    static Command Serve()
    {
        var host = new Option<string>("--host") { Description = "address to listen on; 0.0.0.0 exposes the server to the network", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "gRPC port (HTTP/2)", DefaultValueFactory = _ => 50051 };
        var metricsPort = new Option<int?>("--metrics-port") { Description = "Prometheus /metrics port (plain HTTP, on 127.0.0.1 unless --metrics-host; default --port + 1, so servers on other ports do not collide); -1 turns it off" };
        var metricsHost = new Option<string>("--metrics-host") { Description = "address of the metrics endpoint", DefaultValueFactory = _ => "127.0.0.1" };
        var maxBatch = new Option<int>("--max-batch") { Description = "most observations per forward pass", DefaultValueFactory = _ => 8 };
        var maxDelay = new Option<double>("--max-queue-delay-ms") { Description = "longest wait for more observations before a forward pass (0: batch whatever arrived while the model was busy)", DefaultValueFactory = _ => 0 };
        var maxQueue = new Option<int>("--max-queue") { Description = "most observations waiting; more get RESOURCE_EXHAUSTED", DefaultValueFactory = _ => 64 };
        var maxMessage = new Option<int>("--max-message-bytes") { Description = "largest request accepted", DefaultValueFactory = _ => 8 << 20 };
        var maxSide = new Option<int>("--max-image-side") { Description = "largest image width or height accepted", DefaultValueFactory = _ => 2048 };
        var maxPixels = new Option<long>("--max-image-pixels") { Description = "largest width x height accepted, checked on the image header before decoding", DefaultValueFactory = _ => 2048L * 2048 };
        var apiKeyFile = new Option<string?>("--api-key-file") { Description = "file of API keys, one per line; every call then needs 'authorization: Bearer KEY'" };
        var tlsCert = new Option<string?>("--tls-cert") { Description = "PEM certificate: serve over TLS" };
        var tlsKey = new Option<string?>("--tls-key") { Description = "PEM private key of --tls-cert" };
        var tlsClientCa = new Option<string?>("--tls-client-ca") { Description = "PEM CA (or bundle): require client certificates it issued (mutual TLS)" };
        var jsonLogs = new Option<bool>("--json-logs") { Description = "structured JSON log lines on stderr" };
        var command = new Command("serve", "Serve a policy over gRPC (openvla.v1) to robots, with dynamic batching across robots.")
        {
            ServeCheckpoint, CenterCrop, host, port, metricsPort, metricsHost, maxBatch, maxDelay, maxQueue, maxMessage, maxSide, maxPixels,
            apiKeyFile, tlsCert, tlsKey, tlsClientCa, jsonLogs,
        };
        var model = new ModelOptions();
        model.AddTo(command);
        command.SetAction(async (parse, cancellationToken) =>
        {
            var load = model.Read(parse, parse.GetValue(CenterCrop));
            var options = new ServeOptions
            {
                Checkpoint = DefaultModel.Resolve(parse.GetValue(ServeCheckpoint)), Quantize = load.Quantize, Device = load.Device,
                DType = load.DType, CenterCrop = load.CenterCrop, Threads = load.Threads,
                Host = parse.GetValue(host)!, Port = parse.GetValue(port),
                MetricsHost = parse.GetValue(metricsHost)!, MetricsPort = (parse.GetValue(metricsPort) ?? ServeOptions.DefaultMetricsPort(parse.GetValue(port))) is var m && m < 0 ? null : m,
                MaxBatch = parse.GetValue(maxBatch), MaxQueueDelayMs = parse.GetValue(maxDelay), MaxQueue = parse.GetValue(maxQueue),
                MaxMessageBytes = parse.GetValue(maxMessage), MaxImageSide = parse.GetValue(maxSide), MaxImagePixels = parse.GetValue(maxPixels),
                ApiKeyFile = parse.GetValue(apiKeyFile), TlsCert = parse.GetValue(tlsCert), TlsKey = parse.GetValue(tlsKey),
                TlsClientCa = parse.GetValue(tlsClientCa), JsonLogs = parse.GetValue(jsonLogs),
            };
            if (options.Problem() is { } problem) throw new UsageException(problem);
            PolicyServer server;
            try { server = await PolicyServer.StartAsync(options, PolicyLoader(load), cancellationToken: cancellationToken); }
            catch (Exception e) when (e is ArgumentException or InvalidDataException) { throw new UsageException(e.Message); }
            catch (IOException e) { throw new UsageException($"cannot listen on {options.Host}:{options.Port}: {e.Message}"); }
            Exception? failure = null;
            try
            {
                await server.Ready.WaitAsync(cancellationToken); // a failed load ends `serve` with its one-line reason
                Console.Error.WriteLine($"openvla: serving on {server.GrpcAddress} (metrics: {server.MetricsAddress?.ToString() ?? "off"}); Ctrl+C stops");
                await server.WaitForShutdownAsync(cancellationToken);
            }
            catch (Exception e) { failure = e; }
            try { await server.DisposeAsync(); }
            catch (Exception) when (failure is not null) { } // the first failure is the one to report
            if (failure is not null) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(failure);
            return CliExit.Ok;
        });
        return command;
    }

    // ---------------------------------------------------------------- client

    static readonly Option<string> ServerAddress = new("--server") { Description = "server address (https:// for TLS)", DefaultValueFactory = _ => "http://127.0.0.1:50051", Recursive = true };
    static readonly Option<string?> ClientKeyFile = new("--api-key-file") { Description = "file whose first key line is sent as the bearer token", Recursive = true };
    static readonly Option<string?> TrustCa = new("--tls-ca") { Description = "PEM certificate to trust for the server (a CA or its self-signed certificate)", Recursive = true };
    static readonly Option<string?> ClientCert = new("--tls-client-cert") { Description = "PEM client certificate for mutual TLS", Recursive = true };
    static readonly Option<string?> ClientKey = new("--tls-client-key") { Description = "PEM private key of --tls-client-cert", Recursive = true };
    static readonly Option<int> TimeoutMs = new("--timeout-ms") { Description = "deadline of each call", DefaultValueFactory = _ => 10_000, Recursive = true };
    static readonly Option<bool> Json = new("--json") { Description = "machine-readable output", Recursive = true };
    static readonly Option<string> Instruction = new("--instruction") { Description = "what the robot should do", DefaultValueFactory = _ => "pick up the block" };
    static readonly Option<string> UnnormKeyOption = new("--unnorm-key") { Description = "dataset statistics to un-normalize with (empty: the model's only one)", DefaultValueFactory = _ => "" };

    static Command Client()
    {
        var command = new Command("client", "Talk to a policy server like a robot would: info, predict, stream.")
        {
            ServerAddress, ClientKeyFile, TrustCa, ClientCert, ClientKey, TimeoutMs, Json,
        };
        command.Subcommands.Add(Info());
        command.Subcommands.Add(Predict());
        command.Subcommands.Add(Stream());
        return command;
    }

    static Command Info()
    {
        var command = new Command("info", "Print what the served policy expects and returns (GetPolicyInfo).");
        command.SetAction(async (parse, cancellationToken) =>
        {
            using var client = Connect(parse);
            var info = await Call(() => client.GetPolicyInfoAsync(cancellationToken: cancellationToken), client);
            if (parse.GetValue(Json)) { Console.WriteLine(JsonFormatter.Default.Format(info)); return CliExit.Ok; }
            Console.WriteLine($"api:           {info.ApiVersion}");
            Console.WriteLine($"model:         {info.ModelId} (version {info.ModelVersion}, {info.Architecture})");
            Console.WriteLine($"action:        {info.ActionDim} values, chunk {info.ChunkLength} ({(info.ActionHead.Length > 0 ? info.ActionHead : "autoregressive-tokens")})");
            Console.WriteLine($"images:        {info.ImagesPerObservation} x {info.ImageSize}x{info.ImageSize} ({info.ResizeStrategy}); cameras {string.Join(", ", info.CameraNames)}; encodings {string.Join(", ", info.AcceptedEncodings)}");
            Console.WriteLine($"proprio:       {(info.ProprioDim == 0 ? "not used" : $"{info.ProprioDim} values")}");
            Console.WriteLine($"precision:     {info.Precision}, quantization {info.Quantization}");
            Console.WriteLine($"unnorm keys:   {string.Join(", ", info.UnnormKeys.Select(k => $"{k.Name} ({k.StatsSha256[..12]})"))}");
            var l = info.Limits;
            Console.WriteLine($"limits:        message {l.MaxMessageBytes} B, image side {l.MaxImageSide} and {l.MaxImagePixels} pixels, batch {l.MaxBatch} within {l.MaxQueueDelayMs} ms, queue {l.MaxQueue}");
            return CliExit.Ok;
        });
        return command;
    }

    static Command Predict()
    {
        var image = new Option<string[]>("--image") { Description = "JPEG or PNG file; repeat it for each camera of a multi-camera model, in its camera order", Required = true };
        var proprio = new Option<string?>("--proprio") { Description = "the robot's proprioceptive state, comma-separated (models with proprio_dim > 0)" };
        var repeat = new Option<int>("--repeat") { Description = "send it this many times and report latency percentiles", DefaultValueFactory = _ => 1 };
        var command = new Command("predict", "Send camera frames and an instruction; print the action (or chunk) and latency.") { image, proprio, Instruction, UnnormKeyOption, repeat };
        command.SetAction(async (parse, cancellationToken) =>
        {
            var frames = new List<(byte[], ImageEncoding, string)>();
            foreach (var path in parse.GetValue(image)!)
            {
                if (!File.Exists(path)) throw new UsageException($"--image: file not found: {path}");
                var bytes = await File.ReadAllBytesAsync(path, cancellationToken);
                var encoding = Observations.SniffEncoding(bytes) ?? throw new UsageException($"--image {path} is neither JPEG nor PNG");
                frames.Add((bytes, encoding, frames.Count == 0 ? "primary" : $"camera{frames.Count + 1}"));
            }
            var state = parse.GetValue(proprio) is string text ? PolicyVerbs.ParseVector(text, "--proprio") : null;
            int times = parse.GetValue(repeat);
            if (times is < 1 or > 100_000) throw new UsageException($"--repeat must be 1..100000, got {times}");
            using var client = Connect(parse);
            var observation = Observations.FromEncoded(frames, parse.GetValue(Instruction)!, parse.GetValue(UnnormKeyOption), state);
            var latencies = new List<double>();
            PredictResponse? reply = null;
            for (int i = 0; i < times; i++)
            {
                observation.Seq = (ulong)i + 1;
                long start = Stopwatch.GetTimestamp();
                reply = await Call(() => client.PredictAsync(observation, cancellationToken: cancellationToken), client);
                latencies.Add(Stopwatch.GetElapsedTime(start).TotalMilliseconds);
            }
            var summary = LatencySummary.Of(latencies);
            if (parse.GetValue(Json))
                Console.WriteLine(JsonSerializer.Serialize(new
                {
                    action = reply!.Action.Values, normalized = reply.Action.Normalized, token_ids = reply.Action.TokenIds,
                    actions = Observations.Chunk(reply.Action),
                    unnorm_key = reply.Action.UnnormKey, model_version = reply.ModelVersion, server_timings_ms = JsonFormatter.Default.Format(reply.Timings),
                    latency_ms = summary,
                }));
            else
            {
                var chunk = Observations.Chunk(reply!.Action);
                Console.WriteLine($"action: [{string.Join(", ", reply.Action.Values.Select(v => v.ToString("F4")))}] (unnorm key {reply.Action.UnnormKey}, model {reply.ModelVersion})");
                for (int k = 1; k < chunk.Length; k++) Console.WriteLine($"  then: [{string.Join(", ", chunk[k].Select(v => v.ToString("F4")))}]");
                var t = reply.Timings;
                Console.WriteLine($"server: total {t.ServerTotalMs:F1} ms = queue {t.QueueMs:F1} + decode {t.ImageDecodeMs:F1} + model {t.ModelTotalMs:F1} (vision {t.VisionMs:F1}, prefill {t.PrefillMs:F1}, tokens {t.DecodeTokensMs:F1})");
                Console.WriteLine($"round trip: {summary}");
            }
            return CliExit.Ok;
        });
        return command;
    }

    static Command Stream()
    {
        var images = new Option<string?>("--images") { Description = "folder of JPEG/PNG frames, sent in name order" };
        var video = new Option<string?>("--video") { Description = "video file; frames are sent as JPEG" };
        var fps = new Option<double>("--fps") { Description = "frames per second to send", DefaultValueFactory = _ => 10 };
        var maxFrames = new Option<int>("--max-frames") { Description = "stop after this many frames (0: all)", DefaultValueFactory = _ => 0 };
        var quiet = new Option<bool>("--quiet") { Description = "print only the summary" };
        var command = new Command("stream", "Stream frames like a robot camera (StreamActions, latest frame wins); print actions and latency percentiles.")
        {
            images, video, fps, maxFrames, quiet, Instruction, UnnormKeyOption,
        };
        command.SetAction(async (parse, cancellationToken) =>
        {
            var (folder, videoPath, rate, limit) = (parse.GetValue(images), parse.GetValue(video), parse.GetValue(fps), parse.GetValue(maxFrames));
            if ((folder is null) == (videoPath is null)) throw new UsageException("give exactly one of --images DIR or --video FILE");
            if (rate is <= 0 or > 1000 || double.IsNaN(rate)) throw new UsageException($"--fps must be in (0, 1000], got {rate}");
            if (limit < 0) throw new UsageException($"--max-frames must be 0 or more, got {limit}");
            using var frames = folder is not null ? FrameSource.FromFolder(folder) : FrameSource.FromVideo(videoPath!);
            using var client = Connect(parse);
            bool json = parse.GetValue(Json), silent = parse.GetValue(quiet);
            var instruction = parse.GetValue(Instruction)!;
            var unnormKey = parse.GetValue(UnnormKeyOption);

            // Connect (and check the server and key) before the clock starts, so the first frame's latency is not the handshake.
            await Call(() => client.GetPolicyInfoAsync(cancellationToken: cancellationToken), client);
            await using var stream = client.OpenStream(cancellationToken);
            var sentAt = new System.Collections.Concurrent.ConcurrentDictionary<ulong, long>();
            var latencies = new List<double>();
            long skipped = 0, errors = 0, actions = 0;
            var clock = Stopwatch.StartNew();
            var printer = Task.Run(async () =>
            {
                await foreach (var reply in stream.Replies.ReadAllAsync(CancellationToken.None))
                {
                    double ms = sentAt.TryRemove(reply.Seq, out var at) ? Stopwatch.GetElapsedTime(at).TotalMilliseconds : double.NaN;
                    skipped += reply.Skipped;
                    if (reply.ResultCase == StreamActionsResponse.ResultOneofCase.Error)
                    {
                        errors++;
                        if (!silent) Console.Error.WriteLine($"openvla: frame {reply.Seq}: {(StatusCode)reply.Error.Code}: {reply.Error.Message}");
                        continue;
                    }
                    actions++;
                    if (!double.IsNaN(ms)) latencies.Add(ms);
                    if (silent) continue;
                    Console.WriteLine(json
                        ? JsonSerializer.Serialize(new { seq = reply.Seq, action = reply.Action.Values, skipped = reply.Skipped, latency_ms = ms })
                        : $"seq {reply.Seq,5}  action [{string.Join(", ", reply.Action.Values.Select(v => v.ToString("F4")))}]  skipped {reply.Skipped}  {ms:F1} ms");
                }
            });
            var period = TimeSpan.FromSeconds(1 / rate);
            ulong seq = 0;
            foreach (var (bytes, encoding) in frames.Frames())
            {
                if (limit > 0 && (int)seq >= limit) break;
                var wait = period * seq - clock.Elapsed;
                if (wait > TimeSpan.Zero) await Task.Delay(wait, cancellationToken);
                var observation = Observations.FromEncoded(bytes, instruction, encoding, unnormKey);
                observation.Seq = ++seq;
                observation.RobotId = "openvla-cli";
                observation.CaptureTimeUnixUs = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() * 1000;
                sentAt[seq] = Stopwatch.GetTimestamp();
                if (!stream.Submit(observation)) break;
            }
            if (seq == 0) throw new UsageException("no frames to send (empty folder or unreadable video)");
            await stream.DisposeAsync(); // waits for the replies to frames already sent
            try { await printer; }
            catch (RpcException e) { throw new InvalidOperationException(Describe(e, client)); }
            var summary = LatencySummary.Of(latencies);
            var seconds = clock.Elapsed.TotalSeconds;
            if (json)
                Console.WriteLine(JsonSerializer.Serialize(new
                {
                    frames = seq, actions, skipped_stale = skipped, dropped_before_send = stream.DroppedBeforeSend, errors,
                    actions_per_second = actions / seconds, latency_ms = summary,
                }));
            else
                Console.WriteLine($"{seq} frames in {seconds:F1} s: {actions} actions ({actions / seconds:F1}/s), {skipped} skipped as stale by the server, "
                    + $"{stream.DroppedBeforeSend} dropped before sending, {errors} errors; latency {summary}");
            return errors == 0 ? CliExit.Ok : CliExit.Failure;
        });
        return command;
    }

    /// <summary>Frames from a folder (JPEG/PNG files as they are) or a video (each frame encoded as JPEG).</summary>
    sealed class FrameSource : IDisposable
    {
        readonly string[] files = [];
        readonly VideoCapture? capture;

        FrameSource(string[] files) => this.files = files;
        FrameSource(VideoCapture capture) => this.capture = capture;

        public static FrameSource FromFolder(string folder)
        {
            if (!Directory.Exists(folder)) throw new UsageException($"--images: folder not found: {folder}");
            var files = Directory.GetFiles(folder)
                .Where(f => Path.GetExtension(f).ToLowerInvariant() is ".jpg" or ".jpeg" or ".png")
                .Order(StringComparer.Ordinal).ToArray();
            if (files.Length == 0) throw new UsageException($"--images {folder} holds no .jpg, .jpeg or .png file");
            return new FrameSource(files);
        }

        public static FrameSource FromVideo(string path)
        {
            if (!File.Exists(path)) throw new UsageException($"--video: file not found: {path}");
            var capture = new VideoCapture(path);
            if (!capture.IsOpened()) { capture.Dispose(); throw new UsageException($"--video {path}: cannot open (unsupported format or codec)"); }
            return new FrameSource(capture);
        }

        public IEnumerable<(byte[] Bytes, ImageEncoding Encoding)> Frames()
        {
            if (capture is null)
            {
                foreach (var file in files)
                {
                    var bytes = File.ReadAllBytes(file);
                    yield return (bytes, Observations.SniffEncoding(bytes) ?? throw new UsageException($"{file} is neither JPEG nor PNG"));
                }
                yield break;
            }
            using var frame = new Mat();
            while (capture.Read(frame) && !frame.Empty())
            {
                Cv2.ImEncode(".jpg", frame, out var jpeg, new ImageEncodingParam(ImwriteFlags.JpegQuality, 90));
                yield return (jpeg, ImageEncoding.Jpeg);
            }
        }

        public void Dispose() => capture?.Dispose();
    }

    static PolicyClient Connect(ParseResult parse)
    {
        var address = parse.GetValue(ServerAddress)!;
        if (!Uri.TryCreate(address, UriKind.Absolute, out var uri) || uri.Scheme is not ("http" or "https"))
            throw new UsageException($"--server must be http://HOST:PORT or https://HOST:PORT, got '{address}'");
        string? key = null;
        if (parse.GetValue(ClientKeyFile) is { } keyFile)
        {
            if (!File.Exists(keyFile)) throw new UsageException($"--api-key-file: file not found: {keyFile}");
            key = File.ReadAllLines(keyFile).Select(l => l.Trim()).FirstOrDefault(l => l.Length > 0 && !l.StartsWith('#'))
                ?? throw new UsageException($"--api-key-file {keyFile} holds no key");
        }
        X509Certificate2? trust = null, clientCertificate = null;
        if (parse.GetValue(TrustCa) is { } ca)
        {
            if (!File.Exists(ca)) throw new UsageException($"--tls-ca: file not found: {ca}");
            trust = X509Certificate2.CreateFromPem(File.ReadAllText(ca));
        }
        var (certPath, keyPath) = (parse.GetValue(ClientCert), parse.GetValue(ClientKey));
        if ((certPath is null) != (keyPath is null)) throw new UsageException("--tls-client-cert and --tls-client-key go together");
        if (certPath is not null)
        {
            foreach (var p in new[] { certPath, keyPath! }) if (!File.Exists(p)) throw new UsageException($"file not found: {p}");
            using var pem = X509Certificate2.CreateFromPemFile(certPath, keyPath);
            clientCertificate = X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
        }
        int timeout = parse.GetValue(TimeoutMs);
        if (timeout <= 0) throw new UsageException($"--timeout-ms must be positive, got {timeout}");
        return new PolicyClient(new PolicyClientOptions
        {
            Address = uri, ApiKey = key, TrustedServerCertificate = trust, ClientCertificate = clientCertificate,
            DefaultDeadline = TimeSpan.FromMilliseconds(timeout),
        });
    }

    /// <summary>Runs a call; a failed call becomes one line naming the status (exit 2 for what the user sent, 1 otherwise).</summary>
    static async Task<T> Call<T>(Func<Task<T>> call, PolicyClient client)
    {
        try { return await call(); }
        catch (RpcException e) when (e.StatusCode is StatusCode.InvalidArgument or StatusCode.Unauthenticated or StatusCode.PermissionDenied)
        {
            throw new UsageException(Describe(e, client));
        }
        catch (RpcException e) { throw new InvalidOperationException(Describe(e, client)); }
    }

    static string Describe(RpcException e, PolicyClient client) => $"{client.Options.Address}: {e.StatusCode}: {e.Status.Detail}";

    // ---------------------------------------------------------------- bench-server

    static Command Bench()
    {
        var robots = new Option<string>("--robots") { Description = "robot counts to measure, comma-separated", DefaultValueFactory = _ => "1,4,8,16" };
        var duration = new Option<double>("--duration-s") { Description = "measured seconds per run", DefaultValueFactory = _ => 60 };
        var warmup = new Option<double>("--warmup-s") { Description = "unmeasured seconds at the start of each run", DefaultValueFactory = _ => 5 };
        var fps = new Option<double>("--fps") { Description = "frames per second each robot sends", DefaultValueFactory = _ => 10 };
        var repeats = new Option<int>("--repeats") { Description = "runs per configuration (median and range are reported)", DefaultValueFactory = _ => 3 };
        var maxBatch = new Option<int>("--max-batch") { Description = "server max batch", DefaultValueFactory = _ => 8 };
        var maxDelay = new Option<double>("--max-queue-delay-ms") { Description = "server max queue delay", DefaultValueFactory = _ => 0 };
        var command = new Command("bench-server",
            "Load benchmark (not a test): N simulated robots stream 224x224 JPEG frames to a loopback server; prints actions/s, latency, overhead, batching gain.")
        {
            Checkpoint, CenterCrop, robots, duration, warmup, fps, repeats, maxBatch, maxDelay, Json,
        };
        var model = new ModelOptions();
        model.AddTo(command);
        command.SetAction(async (parse, cancellationToken) =>
        {
            var load = model.Read(parse, parse.GetValue(CenterCrop));
            int[] counts;
            try { counts = parse.GetValue(robots)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(int.Parse).ToArray(); }
            catch (FormatException) { throw new UsageException($"--robots must be comma-separated numbers, got '{parse.GetValue(robots)}'"); }
            if (counts.Length == 0 || counts.Any(c => c is < 1 or > 256)) throw new UsageException("--robots: each count must be 1..256");
            var options = new LoadBenchmarkOptions
            {
                Robots = counts, Duration = TimeSpan.FromSeconds(parse.GetValue(duration)), Warmup = TimeSpan.FromSeconds(parse.GetValue(warmup)),
                Fps = parse.GetValue(fps), Repeats = parse.GetValue(repeats), MaxBatch = parse.GetValue(maxBatch),
                MaxQueueDelayMs = parse.GetValue(maxDelay),
            };
            if (options.Duration <= TimeSpan.Zero || options.Duration > TimeSpan.FromHours(1)) throw new UsageException("--duration-s must be in (0, 3600]");
            if (options.Warmup < TimeSpan.Zero || options.Fps is <= 0 or > 1000 || options.Repeats is < 1 or > 20 || options.MaxBatch is < 1 or > 1024)
                throw new UsageException("--warmup-s >= 0, --fps in (0, 1000], --repeats 1..20, --max-batch 1..1024");
            var checkpoint = DefaultModel.Resolve(parse.GetValue(Checkpoint)!);
            var serve = new ServeOptions
            {
                Checkpoint = checkpoint, Quantize = load.Quantize, Device = load.Device,
                DType = load.DType, CenterCrop = load.CenterCrop, Threads = load.Threads,
            };
            Console.Error.WriteLine($"openvla: loading {checkpoint}");
            var policy = PolicyLoader(load)(serve, cancellationToken);
            try
            {
                var report = await LoadBenchmark.RunAsync(policy, options, line => Console.Error.WriteLine($"openvla: {line}"), cancellationToken);
                Console.WriteLine(parse.GetValue(Json) ? JsonSerializer.Serialize(report) : FormatReport(report, options));
            }
            finally { (policy as IDisposable)?.Dispose(); }
            return CliExit.Ok;
        });
        return command;
    }

    static string FormatReport(LoadBenchmarkReport r, LoadBenchmarkOptions o)
    {
        var lines = new List<string>
        {
            $"model {r.Model}; max queue delay {o.MaxQueueDelayMs} ms; {o.Fps} Hz per robot, {o.Warmup.TotalSeconds:F0} s warm-up + {o.Duration.TotalSeconds:F0} s measured, {o.Repeats} run(s) each: median (min–max)",
            $"in-process forward pass (batch 1): {r.InProcess}",
            $"unary round trip over loopback:    {r.Unary}",
            $"server overhead (round trip - forward pass, per call): {r.Overhead}",
            $"  of which JPEG decode p50 {r.ServerSideDecode.P50:F2} ms, queue p50 {r.ServerSideQueue.P50:F2} ms",
            "",
            "| robots | max batch | actions/s | p50 ms | p99 ms | mean batch | sent | answered | skipped (stale) | errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        };
        foreach (var row in r.Rows.Append(r.WithoutBatching))
            lines.Add($"| {row.Robots} | {row.MaxBatch} | {row.ActionsPerSecond} | {row.P50Ms} | {row.P99Ms} | {row.MeanBatch:F2} | {row.Sent} | {row.Answered} | {row.SkippedStale} | {row.Errors} |");
        lines.Add("");
        lines.Add($"batching gain at {o.GainRobots} robots: {r.BatchingGain:F2}x the actions/s of max batch 1");
        return string.Join(Environment.NewLine, lines);
    }
}
