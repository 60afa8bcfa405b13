using Prometheus;

namespace OpenVLA.Server;

/// <summary>
/// The Prometheus metrics of one server. Each server has its own registry (several servers can live in one process,
/// as in the tests); `/metrics` on the metrics port exports it.
/// </summary>
public sealed class ServerMetrics
{
    public CollectorRegistry Registry { get; } = Metrics.NewCustomRegistry();
    readonly Counter requests;
    readonly Histogram stages;
    readonly Histogram batchSize;
    readonly Gauge queueDepth;
    readonly Counter staleDropped;
    readonly Gauge modelLoadSeconds;
    readonly Gauge ready;

    public ServerMetrics(int maxBatch)
    {
        var factory = Metrics.WithCustomRegistry(Registry);
        requests = factory.CreateCounter("openvla_requests_total",
            "Observations answered, by gRPC method and status code (a stream counts each observation).",
            new CounterConfiguration { LabelNames = ["method", "status"] });
        stages = factory.CreateHistogram("openvla_stage_seconds", "Server-side latency of each stage of serving an observation.",
            new HistogramConfiguration
            {
                LabelNames = ["stage"],
                Buckets = Histogram.ExponentialBuckets(0.0001, 2, 18), // 0.1 ms .. 13 s
            });
        batchSize = factory.CreateHistogram("openvla_batch_size", "Observations per forward pass.",
            new HistogramConfiguration { Buckets = Histogram.LinearBuckets(1, 1, Math.Max(1, maxBatch)) });
        queueDepth = factory.CreateGauge("openvla_queue_depth", "Observations waiting for the model.");
        staleDropped = factory.CreateCounter("openvla_stale_frames_dropped_total",
            "Stream observations dropped because a newer one of the same stream arrived before the model got to them.");
        modelLoadSeconds = factory.CreateGauge("openvla_model_load_seconds", "Time to load the model and warm it up.",
            new GaugeConfiguration { LabelNames = ["phase"] });
        ready = factory.CreateGauge("openvla_ready", "1 when the model is loaded and warmed up and the server answers observations.");
    }

    public void Request(string method, Grpc.Core.StatusCode status) => requests.WithLabels(method, status.ToString()).Inc();
    public void Stage(string stage, double milliseconds) => stages.WithLabels(stage).Observe(milliseconds / 1000.0);
    public void Batch(int size) => batchSize.Observe(size);
    public void QueueDepth(int depth) => queueDepth.Set(depth);
    public void StaleDropped() => staleDropped.Inc();
    public void ModelLoad(string phase, double seconds) => modelLoadSeconds.WithLabels(phase).Set(seconds);
    public void Ready(bool isReady) => ready.Set(isReady ? 1 : 0);
}
