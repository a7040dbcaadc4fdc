"""What MONAI's trainers and evaluators need beyond their defaults: iterations, prepare_batch, metrics, handlers."""

from prod9_ext.engines.autoencoder_evaluation import (
    AutoencoderSlidingWindowInferer,
    CodebookUsage,
    ReconstructionSnapshot,
    autoencoder_eval_iteration,
)
from prod9_ext.engines.autoencoder_training import AutoencoderGanIteration, StackModalities, build_perceptual_loss
from prod9_ext.engines.checkpoints import AtomicCheckpointSaver, latest_checkpoint

__all__ = [
    "AtomicCheckpointSaver",
    "AutoencoderGanIteration",
    "AutoencoderSlidingWindowInferer",
    "CodebookUsage",
    "ReconstructionSnapshot",
    "StackModalities",
    "autoencoder_eval_iteration",
    "build_perceptual_loss",
    "latest_checkpoint",
]
