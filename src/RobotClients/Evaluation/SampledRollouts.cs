using OpenVLA.Policy;
using OpenVLA.Simulation;
using OpenVLA.Simulation.Tabletop;
using OpenVLA.Simulation.Workers;

namespace OpenVLA.RobotClients.Evaluation;

/// <summary>One rollout for post-training: the policy at <see cref="Checkpoint"/> (in process, its own sampling rule or
/// <see cref="Decoding"/>), the task's episode at <see cref="EpisodeSeed"/>, the sampler restarted at
/// <see cref="SampleSeed"/>; the recorded episode goes to <see cref="OutPath"/> (null: outcome only, as for held-out evaluation).</summary>
public sealed record SampledRolloutJob(string Checkpoint, string? Decoding, string TaskId, int EpisodeSeed, long SampleSeed, int Context, int Sample,
    int ImageSize, int SettleSteps, string? OutPath);

/// <summary>What came back: the outcome, and where the episode's frames and tokens were written (null when not recorded).</summary>
public sealed record SampledRolloutResult(int Context, int Sample, bool Success, int Steps, string? Path);

/// <summary>
/// Runs the rollouts post-training learns from, in worker processes (or in this one): each is an evaluation episode of
/// <see cref="Evaluator.RunEpisode"/> whose policy also records what it saw and which tokens it drew with their
/// log-probabilities (<see cref="SampledEpisode"/>). A rollout is a function of its job alone — the checkpoint, the
/// episode seed and the sampler's seed — so which worker runs it changes nothing, and a resumed run repeats it exactly.
/// </summary>
public static class SampledRollouts
{
    public static IReadOnlyList<SampledRolloutResult> Run(IReadOnlyList<SampledRolloutJob> jobs, IReadOnlyList<string>? workerCommand, int workers,
        ProgressBar? progress = null)
    {
        var results = new SampledRolloutResult[jobs.Count];
        if (workerCommand is null || workers <= 1)
        {
            var worker = new Worker();
            try
            {
                for (int i = 0; i < jobs.Count; i++)
                {
                    results[i] = worker.Run(jobs[i]);
                    progress?.Advance(Note(jobs[i], results[i]));
                }
            }
            finally { worker.Dispose(); }
        }
        else
        {
            var pool = new WorkerPool(workerCommand, workers);
            pool.Run<SampledRolloutJob, SampledRolloutResult>(jobs, (i, r) => { results[i] = r; progress?.Advance(Note(jobs[i], r)); });
        }
        return results;
    }

    static string Note(SampledRolloutJob job, SampledRolloutResult r) => $"{job.TaskId} context {job.Context} #{job.Sample} {(r.Success ? "success" : "failure")}";

    /// <summary>The worker side of <c>sim-worker --kind rollout</c>: one environment and one loaded policy, reused while
    /// the jobs name the same checkpoint.</summary>
    public static int ServeWorker()
    {
        var worker = new Worker();
        try { return WorkerLoop.Serve<SampledRolloutJob, SampledRolloutResult>(worker.Run, OpenVLA.Policy.UserErrors.Is); }
        finally { worker.Dispose(); }
    }

    sealed class Worker : IDisposable
    {
        TabletopEnv? _env;
        VlaPolicy? _policy;
        (string Checkpoint, string? Decoding)? _loaded;

        public SampledRolloutResult Run(SampledRolloutJob job)
        {
            if (_env is null || _env.ImageSize != job.ImageSize) { _env?.Dispose(); _env = new TabletopEnv(job.ImageSize); }
            if (_policy is null || _loaded != (job.Checkpoint, job.Decoding))
            {
                _policy?.Dispose();
                // One intra-op thread per worker: parallel workers would otherwise oversubscribe the cores.
                _policy = VlaPolicy.Load(job.Checkpoint, new PolicyOptions { Decoding = job.Decoding, Threads = 1 });
                _loaded = (job.Checkpoint, job.Decoding);
                if (_policy.Decoding.Mode != DecodingMode.Sample)
                    throw new PolicyInputException($"post-training needs a sampling policy; {job.Checkpoint} decodes {_policy.Decoding} (give --decode sample:...)");
                if (_policy.Description.ChunkLength != 1)
                    throw new PolicyInputException("post-training learns from sampled action tokens; this policy predicts continuous chunks");
            }
            _policy.ReseedSampling(job.SampleSeed);
            using var recorder = new Recorder(_policy);
            var episode = Evaluator.RunEpisode(new EvalJob(job.TaskId, job.Sample, job.EpisodeSeed, job.Checkpoint, job.ImageSize, job.SettleSteps, null),
                _env, recorder);
            if (job.OutPath is not null)
                new SampledEpisode(job.TaskId, episode.Instruction, job.EpisodeSeed, job.SampleSeed, job.Context, job.Sample, episode.Success, job.ImageSize,
                    recorder.Steps).Write(job.OutPath);
            return new SampledRolloutResult(job.Context, job.Sample, episode.Success, episode.Steps, job.OutPath);
        }

        public void Dispose()
        {
            _policy?.Dispose();
            _env?.Dispose();
        }
    }

    /// <summary>The policy as the evaluator drives it, keeping each step's frame, drawn tokens and their log-probabilities.</summary>
    sealed class Recorder(VlaPolicy policy) : IRolloutPolicy
    {
        public List<SampledStep> Steps { get; } = [];
        public string Name => "post-training rollout";
        public bool WantsWristImage => false;
        public int PolicyCalls => Steps.Count;
        public void BeginEpisode(EpisodeSpec episode) => Steps.Clear();

        public float[] Act(RolloutObservation observation)
        {
            var prediction = policy.Predict(new VlaObservation([observation.Image], observation.Instruction, null, null));
            var logProbs = prediction.TokenLogProbs ?? throw new InvalidOperationException("a sampling policy returned no log-probabilities");
            Steps.Add(new SampledStep(observation.Image.Pixels, prediction.ActionTokenIds, logProbs));
            return prediction.Action;
        }

        public void Dispose() { }
    }
}
