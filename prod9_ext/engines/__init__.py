"""What MONAI's trainers and evaluators need beyond their defaults: iterations, prepare_batch, metrics, handlers."""

from prod9_ext.engines.autoencoder_evaluation import (
    AutoencoderSlidingWindowInferer,
    CodebookUsage,
    ReconstructionSnapshot,
    autoencoder_eval_iteration,
)
from prod9_ext.engines.autoencoder_training import AutoencoderGanIteration, StackModalities, build_perceptual_loss
from prod9_ext.engines.checkpoints import AtomicCheckpointSaver, latest_checkpoint
from prod9_ext.engines.metrics_json import MetricsJsonWriter

__all__ = [
    "AtomicCheckpointSaver",
    "AutoencoderGanIteration",
    "AutoencoderSlidingWindowInferer",
    "CodebookUsage",
    "MetricsJsonWriter",
    "ReconstructionSnapshot",
    "StackModalities",
    "autoencoder_eval_iteration",
    "build_perceptual_loss",
    "latest_checkpoint",
]
