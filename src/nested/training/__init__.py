"""Training: the LightningModule (frozen backbone + trainable adapter, the diffusion loss) and preemption-safe,
exactly resumable checkpoints."""

from nested._lazy import lazy_exports

lazy_exports(
    globals(),
    {
        "ConditioningDropout": "nested.training.module",
        "NestedAttentionModule": "nested.training.module",
        "AtomicCheckpointIO": "nested.training.resume",
        "PreemptionCheckpoint": "nested.training.resume",
        "TensorBoardLogger": "nested.training.loggers",
    },
)
