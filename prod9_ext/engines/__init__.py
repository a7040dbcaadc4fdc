"""What MONAI's trainers and evaluators need beyond their defaults: iterations, prepare_batch, metrics, handlers."""

from prod9_ext.engines.autoencoder_evaluation import (
    AutoencoderSlidingWindowInferer,
    CodebookUsage,
    ReconstructionSnapshot,
    autoencoder_eval_iteration,
)
from prod9_ext.engines.autoencoder_training import AutoencoderGanIteration, StackModalities, build_perceptual_loss
from prod9_ext.engines.checkpoints import (
    AtomicCheckpointSaver,
    BestMetricState,
    latest_checkpoint,
    load_network_weights,
)
from prod9_ext.engines.maskgit_training import MaskGiTIteration, modality_ids, num_classes
from prod9_ext.engines.metrics_json import MetricsJsonWriter
from prod9_ext.engines.precision import Bf16Trainer, amp_enabled, bf16_is_fast
from prod9_ext.engines.snapshots import VolumeSnapshot, save_mid_slices
from prod9_ext.engines.ssim_loss import SeparableSSIMLoss
from prod9_ext.engines.stage1_link import Stage1Tokenizer, check_stage2_setup, load_stage1_tokenizer
from prod9_ext.engines.synthesis import SynthesisInferer, synthesis_iteration
from prod9_ext.engines.synthesis_io import SaveSynthesisd, case_meta, generate_volumes, synthesis_datalist
from prod9_ext.engines.synthesis_metrics import RegionSSIMMetric, TokenAccuracyMetric, with_region
from prod9_ext.engines.token_cache import pretokenize
from prod9_ext.engines.training_handlers import LearningRateState, ResumableEarlyStop

__all__ = [
    "AtomicCheckpointSaver",
    "AutoencoderGanIteration",
    "AutoencoderSlidingWindowInferer",
    "BestMetricState",
    "Bf16Trainer",
    "CodebookUsage",
    "LearningRateState",
    "MaskGiTIteration",
    "MetricsJsonWriter",
    "ReconstructionSnapshot",
    "RegionSSIMMetric",
    "ResumableEarlyStop",
    "SaveSynthesisd",
    "SeparableSSIMLoss",
    "StackModalities",
    "Stage1Tokenizer",
    "SynthesisInferer",
    "TokenAccuracyMetric",
    "VolumeSnapshot",
    "amp_enabled",
    "autoencoder_eval_iteration",
    "bf16_is_fast",
    "build_perceptual_loss",
    "case_meta",
    "check_stage2_setup",
    "generate_volumes",
    "latest_checkpoint",
    "load_network_weights",
    "load_stage1_tokenizer",
    "modality_ids",
    "num_classes",
    "pretokenize",
    "save_mid_slices",
    "synthesis_datalist",
    "synthesis_iteration",
    "with_region",
]
