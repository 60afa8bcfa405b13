using OpenVLA.Policy.Checkpoint;

namespace OpenVLA.FineTune.Training;

/// <summary>
/// One complete, named description of a training run (reference defaults from finetune.py, openvla-model.md §5.1–5.2).
/// Saved with every checkpoint; a resumed run must agree on the fields that shape the computation.
/// </summary>
public sealed record TrainerOptions
{
    /// <summary>Train every parameter (from-scratch training of small models) instead of LoRA adapters.</summary>
    public bool Full { get; init; }
    /// <summary>The vision towers stay as loaded: no adapters on them (LoRA), no updates (full), so no backward runs
    /// through them. The projector and everything after it train.</summary>
    public bool FreezeVision { get; init; }
    public LoraSettings Lora { get; init; } = LoraSettings.Reference;
    public AdamW.Settings Optimizer { get; init; } = new();
    /// <summary>"constant" (finetune.py) or "cosine".</summary>
    public string Schedule { get; init; } = "constant";
    public int WarmupSteps { get; init; }
    public int MaxSteps { get; init; } = 1000;
    /// <summary>Examples per micro-batch (reference 16).</summary>
    public int BatchSize { get; init; } = 16;
    public int GradAccumulation { get; init; } = 1;
    /// <summary>Global gradient-norm clip; 0 turns it off (finetune.py does not clip; OpenVLA pretraining clips at 1.0).</summary>
    public double MaxGradNorm { get; init; } = 1.0;
    public bool GradientCheckpointing { get; init; }
    public ulong Seed { get; init; } = 7;
    /// <summary>Save every this many optimizer steps (and at the end); 0 saves only at the end.</summary>
    public int SaveSteps { get; init; } = 5000;
    /// <summary>Evaluate on the held-out examples every this many steps (and at the end); 0 only at the end.</summary>
    public int EvalSteps { get; init; } = 500;
    /// <summary>Held-out examples scored per evaluation (at most; the whole split when smaller).</summary>
    public int EvalExamples { get; init; } = 256;
    /// <summary>Also write the merged Hugging Face checkpoint at every save (LoRA runs; full runs always write the model).</summary>
    public bool Merge { get; init; }
    /// <summary>
    /// Weight of the auxiliary loss (0: off): a linear head on the projected image tokens regresses the examples' aux
    /// targets (the dataset config's aux_keys, standardized), and its mean squared error is added to the action loss times
    /// this. The head is a training device only: it is never part of the exported checkpoint.
    /// </summary>
    public double AuxWeight { get; init; }
    /// <summary>Checkpoints kept on disk (finetune.py keeps the latest only).</summary>
    public int KeepCheckpoints { get; init; } = 1;

    public int EffectiveBatch => BatchSize * GradAccumulation;

    public void Validate()
    {
        if (MaxSteps < 1) throw new ArgumentException($"max steps must be at least 1, got {MaxSteps}");
        if (BatchSize < 1) throw new ArgumentException($"batch size must be at least 1, got {BatchSize}");
        if (GradAccumulation < 1) throw new ArgumentException($"gradient accumulation must be at least 1, got {GradAccumulation}");
        if (!LearningRateSchedule.Kinds.Contains(Schedule)) throw new ArgumentException($"unknown schedule '{Schedule}' (valid: {string.Join(", ", LearningRateSchedule.Kinds)})");
        if (WarmupSteps < 0) throw new ArgumentException($"warm-up steps must be non-negative, got {WarmupSteps}");
        if (Optimizer.LearningRate <= 0) throw new ArgumentException($"learning rate must be positive, got {Optimizer.LearningRate}");
        if (MaxGradNorm < 0) throw new ArgumentException($"max grad norm must be non-negative, got {MaxGradNorm}");
        if (SaveSteps < 0 || EvalSteps < 0 || EvalExamples < 0) throw new ArgumentException("save, eval steps and eval examples must be non-negative");
        if (!double.IsFinite(AuxWeight) || AuxWeight < 0) throw new ArgumentException($"aux weight must be a finite non-negative number, got {AuxWeight}");
        if (KeepCheckpoints < 1) throw new ArgumentException($"keep checkpoints must be at least 1, got {KeepCheckpoints}");
    }
}
