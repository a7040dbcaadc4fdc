"""What MONAI's trainers and evaluators need beyond their defaults, grouped by what a reader looks for.

- :mod:`~prod9_ext.engines.stage1_training`: the autoencoder's GAN iteration, its SSIM and perceptual losses, the
  ``prepare_batch`` that stacks modalities.
- :mod:`~prod9_ext.engines.stage1_inference`: sliding-window reconstruction for the stage-1 evaluators, codebook
  metrics, the inference file list and token files.
- :mod:`~prod9_ext.engines.stage2_training`: the stage-1 tokenizer stage 2 reads, the token cache, the MaskGiT
  iteration.
- :mod:`~prod9_ext.engines.decoder_training`: the source-aware decoder's training, saving and loading.
- :mod:`~prod9_ext.engines.synthesis`: the inferer and iteration that synthesise volumes (validation, evaluation,
  inference), and their metrics; :mod:`~prod9_ext.engines.synthesis_io`: which cases, where the volumes go, sampling
  without sources.
- :mod:`~prod9_ext.engines.scoring`: the whole-brain scores every synthesis method is reported with (BraSyn's
  normalisation, PSNR, SSIM inside and outside the tumour, HFEN); :mod:`~prod9_ext.engines.uncertainty`: how well the
  spread of several samples marks the errors; :mod:`~prod9_ext.engines.segmentation`: the tumour segmenter whose Dice
  is BraSyn's second score.
- :mod:`~prod9_ext.engines.checkpoints`: checkpoints that survive a kill and resume; :mod:`~prod9_ext.engines.handlers`:
  the other handlers and the files they write (metrics, snapshots, run record).
- :mod:`~prod9_ext.engines.startup`: the one start-up call of each bundle (values, keys, folders, device, seed,
  stage 2 against stage 1) and a run's precision; :mod:`~prod9_ext.engines.config_keys`: unknown config keys;
  :mod:`~prod9_ext.engines.error_summary`: a failed run ends in one line.

Configs and scripts name everything through this package (``prod9_ext.engines.<Name>``), never a submodule.
"""

from prod9_ext.engines.checkpoints import (
    AtomicCheckpointSaver,
    BestMetricState,
    CheckedCheckpointLoader,
    latest_checkpoint,
    load_network_weights,
)
from prod9_ext.engines.decoder_training import (
    SourceDecoderIteration,
    SourceDecoderSaver,
    build_source_decoder,
    load_source_decoder_for,
)
from prod9_ext.engines.handlers import (
    AtomicMetricsSaver,
    AtomicNibabelWriter,
    LearningRateState,
    MetricsJsonWriter,
    ResumableEarlyStop,
    RunRecord,
    VolumeSnapshot,
    save_mid_slices,
)
from prod9_ext.engines.scoring import (
    brain_mask,
    brasyn_normalise,
    closest_source,
    hfen,
    score_synthesis,
)
from prod9_ext.engines.segmentation import (
    BRATS_REGIONS,
    brats_regions,
    build_segmenter,
    load_segmenter,
    region_dice,
    save_segmenter,
    segment,
    segmentation_loss,
)
from prod9_ext.engines.stage1_inference import (
    AutoencoderSlidingWindowInferer,
    CodebookUsage,
    SaveTokensd,
    autoencoder_eval_iteration,
    inference_datalist,
)
from prod9_ext.engines.stage1_training import (
    AutoencoderGanIteration,
    SeparableSSIMLoss,
    StackModalities,
    build_perceptual_loss,
)
from prod9_ext.engines.stage2_training import (
    MaskGiTIteration,
    Stage1Tokenizer,
    TokenVoxelCropd,
    load_stage1_tokenizer,
    modality_ids,
    num_classes,
    pretokenize,
)
from prod9_ext.engines.startup import (
    Bf16Trainer,
    amp_enabled,
    bf16_is_fast,
    check_stage2_setup,
    start_stage1,
    start_stage2,
)
from prod9_ext.engines.synthesis import (
    RegionSSIMMetric,
    SynthesisInferer,
    TokenAccuracyMetric,
    synthesis_iteration,
    with_region,
)
from prod9_ext.engines.synthesis_io import (
    SaveSynthesisd,
    case_meta,
    generate_volumes,
    synthesis_datalist,
    synthesis_output_path,
    write_nifti,
)
from prod9_ext.engines.timed_training import endless, train_for_seconds
from prod9_ext.engines.uncertainty import calibration, sample_diversity

__all__ = [
    "BRATS_REGIONS",
    "AtomicCheckpointSaver",
    "AtomicMetricsSaver",
    "AtomicNibabelWriter",
    "AutoencoderGanIteration",
    "AutoencoderSlidingWindowInferer",
    "BestMetricState",
    "Bf16Trainer",
    "CheckedCheckpointLoader",
    "CodebookUsage",
    "LearningRateState",
    "MaskGiTIteration",
    "MetricsJsonWriter",
    "RegionSSIMMetric",
    "ResumableEarlyStop",
    "RunRecord",
    "SaveSynthesisd",
    "SaveTokensd",
    "SeparableSSIMLoss",
    "SourceDecoderIteration",
    "SourceDecoderSaver",
    "StackModalities",
    "Stage1Tokenizer",
    "SynthesisInferer",
    "TokenAccuracyMetric",
    "TokenVoxelCropd",
    "VolumeSnapshot",
    "amp_enabled",
    "autoencoder_eval_iteration",
    "bf16_is_fast",
    "brain_mask",
    "brasyn_normalise",
    "brats_regions",
    "build_perceptual_loss",
    "build_segmenter",
    "build_source_decoder",
    "calibration",
    "case_meta",
    "check_stage2_setup",
    "closest_source",
    "endless",
    "generate_volumes",
    "hfen",
    "inference_datalist",
    "latest_checkpoint",
    "load_network_weights",
    "load_segmenter",
    "load_source_decoder_for",
    "load_stage1_tokenizer",
    "modality_ids",
    "num_classes",
    "pretokenize",
    "region_dice",
    "sample_diversity",
    "save_mid_slices",
    "save_segmenter",
    "score_synthesis",
    "segment",
    "segmentation_loss",
    "start_stage1",
    "start_stage2",
    "synthesis_datalist",
    "synthesis_iteration",
    "synthesis_output_path",
    "train_for_seconds",
    "with_region",
    "write_nifti",
]
