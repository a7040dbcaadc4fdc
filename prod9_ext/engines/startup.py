"""Start-up of a bundle run: one call per bundle checks every value, key, folder and device before anything is built.

Each bundle's configs name one start-up call, e.g. ``"startup": "$prod9_ext.engines.start_stage2('train')"`` and
``"initialize": ["$@startup"]``. :func:`start_stage1` (``autoencoder_fsq``) and :func:`start_stage2`
(``maskgit_transformer``) read the run's config (:func:`~prod9_ext.engines.config_keys.running_config`) and, in order:

1. make a failure end in one line (:func:`prod9_ext.engines.error_summary.install`);
2. refuse config keys the run would ignore (:func:`prod9_ext.engines.config_keys.check_config_keys`);
3. check the device, the numbers and the ROI (:func:`check_device`, :func:`check_ints`, :func:`check_numbers`,
   :func:`check_roi_size`), and that no earlier results are in the way (:func:`check_output_dir`); read the
   datalists and fill the datasets' disk caches (:func:`fill_disk_cache`: stage 1's training and evaluation);
4. seed the run (``seed``, plus the process ``rank`` in a multi-GPU run);
5. stage 2 only: check that it fits its stage-1 tokenizer (:func:`check_stage2_setup`).

What each workflow checks is listed in :data:`STAGE1_RUNS` and :data:`STAGE2_RUNS`. Each failure is one line naming the
key and its value. Also here, because a run's precision is part of its set-up: :func:`amp_enabled`,
:func:`bf16_is_fast` and :class:`Bf16Trainer`.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.bundle import ConfigParser
from monai.data import PersistentDataset
from monai.engines import SupervisedTrainer
from monai.engines.workflow import Workflow
from monai.utils import set_determinism, str2bool
from torch.utils.data import DataLoader, Subset

from prod9_ext.data.brats import MODALITIES, SINGLE_IMAGE, check_modalities
from prod9_ext.engines import error_summary
from prod9_ext.engines.config_keys import check_config_keys, running_config
from prod9_ext.engines.stage2_training import Stage1Tokenizer

__all__ = [
    "STAGE1_RUNS",
    "STAGE2_RUNS",
    "Bf16Trainer",
    "RunChecks",
    "amp_enabled",
    "bf16_is_fast",
    "bf16_is_supported",
    "check_choice",
    "check_device",
    "check_ints",
    "check_numbers",
    "check_output_dir",
    "check_roi_size",
    "check_stage2_setup",
    "fill_disk_cache",
    "start_stage1",
    "start_stage2",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunChecks:
    """What the start-up of one workflow checks, by config id.

    Attributes:
        positive: integers ``>= 1``.
        counts: integers ``>= 0`` (``early_stop_patience`` may also be ``null``: off).
        numbers: finite numbers ``>= 0``.
        folders: output folder key -> the names (``fnmatch`` patterns) of the result files a run there writes.
        datasets: config ids of the datasets the run reads: their datalists are read first (every file's header
            checked), then every case not yet in a dataset's disk cache is preprocessed into it
            (:func:`fill_disk_cache`), so that a bad case stops the run before training writes anything.
        resumable: a training run, whose ``resume`` lets it continue the results in its folders.
        fits_stage1: stage 2: check the network and the modalities against the stage-1 tokenizer.
    """

    positive: tuple[str, ...] = ()
    counts: tuple[str, ...] = ()
    numbers: tuple[str, ...] = ()
    folders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    datasets: tuple[str, ...] = ()
    resumable: bool = False
    fits_stage1: bool = False

    def keys(self) -> set[str]:
        """The config ids these checks read (besides those every start-up reads)."""
        keys = {*self.positive, *self.counts, *self.numbers, *self.folders}
        return keys | ({"resume"} if self.resumable else set())


_CHECKPOINTS = ("model.pt", "checkpoint_epoch=*.pt")
_METRICS = ("metrics.json", "metrics.csv", "*_raw.csv", "*_summary.csv")

STAGE1_RUNS: dict[str, RunChecks] = {
    "train": RunChecks(
        positive=("max_epochs", "val_interval", "batch_size", "sw_batch_size"),
        counts=(
            "seed",
            "num_workers",
            "val_num_cases",
            "warmup_iterations",
            "adv_warmup_iterations",
            "early_stop_patience",
        ),
        numbers=("learning_rate", "d_learning_rate", "ssim_weight", "adv_weight", "perceptual_weight"),
        folders={"ckpt_dir": _CHECKPOINTS, "output_dir": ("events.out.tfevents.*", "reconstruction_epoch*.png")},
        datasets=("train#dataset", "validate#dataset"),
        resumable=True,
    ),
    "evaluate": RunChecks(
        counts=("seed", "num_workers"), folders={"output_dir": _METRICS}, datasets=("validate#dataset",)
    ),
    "inference": RunChecks(counts=("seed", "num_workers"), folders={"output_dir": ("*_recon.nii.gz", "*_tokens.npz")}),
}
"""The checks of each ``autoencoder_fsq`` workflow (every one also checks ``roi_size`` against the network)."""

STAGE2_RUNS: dict[str, RunChecks] = {
    "train": RunChecks(
        positive=("max_epochs", "val_interval", "batch_size", "sampler#steps"),
        counts=("seed", "num_workers", "val_num_cases", "warmup_iterations", "early_stop_patience"),
        numbers=("learning_rate", "weight_decay", "max_grad_norm"),
        folders={"ckpt_dir": _CHECKPOINTS, "output_dir": ("events.out.tfevents.*", "synthesis_epoch*.png")},
        resumable=True,
        fits_stage1=True,
    ),
    "train_decoder": RunChecks(
        positive=("decoder_epochs", "decoder_batch_size", "decoder_channels"),
        counts=("seed", "num_workers"),
        numbers=("decoder_learning_rate", "decoder_ssim_weight", "decoder_expected_prob", "decoder_corrupt_max"),
        folders={"decoder_ckpt_dir": _CHECKPOINTS},
        resumable=True,
        fits_stage1=True,
    ),
    "evaluate": RunChecks(positive=("sampler#steps",), folders={"output_dir": _METRICS}, fits_stage1=True),
    "inference": RunChecks(positive=("sampler#steps", "num_samples"), counts=("seed", "num_workers"), fits_stage1=True),
    "generate": RunChecks(positive=("sampler#steps",), counts=("seed", "num_workers")),
}
"""The checks of each ``maskgit_transformer`` workflow (inference and generate also check ``target_modality``)."""

# How an error names a config id, where that differs from the id.
_LABELS = {"sampler#steps": "sampler_steps"}
# Counts whose null means "off".
_NULL_MEANS_OFF = {"early_stop_patience"}


def start_stage1(workflow: str = "train") -> None:
    """The start-up of an ``autoencoder_fsq`` run (see the module docstring); ``workflow`` is a key of
    :data:`STAGE1_RUNS`."""
    parser = running_config()
    checks = _workflow_checks(STAGE1_RUNS, workflow)
    value = _Reader(parser)
    _begin(parser, value, checks, {"roi_size", "network_def"})
    check_roi_size(value("roi_size"), 2 ** (len(value("network_def#num_channels")) - 1))
    _end(value, checks)


def start_stage2(workflow: str = "train") -> None:
    """The start-up of a ``maskgit_transformer`` run (see the module docstring); ``workflow`` is a key of
    :data:`STAGE2_RUNS`.

    Raises:
        ValueError: also when ``dataset`` is not ``brats`` but the task is still BraTS's: the MedMNIST 3D task is
            the ``configs/medmnist3d.json`` overlay.
    """
    parser = running_config()
    checks = _workflow_checks(STAGE2_RUNS, workflow)
    value = _Reader(parser)
    # The task of these workflows is the validation's: val_target_modality, ...
    validating = workflow in ("train", "train_decoder", "evaluate")
    target_key = "val_target_modality" if validating else "target_modality"
    used = {"dataset", target_key, "modalities" if validating else "source_modalities"}
    _begin(parser, value, checks, used | ({"tokenizer", "network_def", "roi_size"} if checks.fits_stage1 else set()))
    if not validating:
        check_choice("target_modality", value("target_modality"), [*MODALITIES, SINGLE_IMAGE])
    dataset = value("dataset")
    if dataset != "brats" and value(target_key) != SINGLE_IMAGE:
        raise ValueError(
            f"dataset {dataset!r} with {target_key} {value(target_key)!r}: add configs/medmnist3d.json to "
            "--config_file for MedMNIST 3D (--dataset alone no longer sets the task)."
        )
    _end(value, checks)
    if checks.fits_stage1:
        modalities = value("modalities") if validating else [value("target_modality"), *value("source_modalities")]
        check_stage2_setup(
            value("tokenizer"),
            value("network_def#vocab_size"),
            value("network_def#latent_shape"),
            value("roi_size"),
            modalities,
            dataset,
        )


class _Reader:
    """``reader(id)``: the parsed value of a config id; ``reader(id, default)`` where the config may lack it."""

    def __init__(self, parser: ConfigParser) -> None:
        self.parser = parser

    def __call__(self, id: str, *default: Any) -> Any:
        if default and id not in self.parser:
            return default[0]
        return self.parser.get_parsed_content(id)


def _workflow_checks(runs: Mapping[str, RunChecks], workflow: str) -> RunChecks:
    if workflow not in runs:
        raise ValueError(f"workflow must be one of {list(runs)}, got {workflow!r}.")
    return runs[workflow]


def _begin(parser: ConfigParser, value: _Reader, checks: RunChecks, used: set[str]) -> None:
    """Steps 1 to 3 of the start-up, up to the output folders."""
    error_summary.install(value("output_dir"))
    top_level = {key.split("#")[0] for key in (*checks.keys(), *used)}
    check_config_keys(parser, used=top_level | {"output_dir", "device", "overwrite", "rank"})
    check_device(value("device"))
    check_ints(**{_LABELS.get(key, key): value(key) for key in checks.positive})
    counts = {key: value(key) for key in checks.counts}
    check_ints(minimum=0, **{key: 0 if key in _NULL_MEANS_OFF and v is None else v for key, v in counts.items()})
    check_numbers(**{_LABELS.get(key, key): value(key) for key in checks.numbers})


def _end(value: _Reader, checks: RunChecks) -> None:
    """The output folders, the datasets, then the seed (after any process group is set up: ``rank`` is read here)."""
    resume = value("resume") if checks.resumable else False
    for key, patterns in checks.folders.items():
        check_output_dir(key, value(key), list(patterns), value("overwrite"), resume=resume)
    for key in checks.datasets:
        value(f"{key}#data")  # parsed once: the datasets reuse it
    for key in checks.datasets:
        fill_disk_cache(value(key), value("num_workers"))
    set_determinism(seed=value("seed") + value("rank", 0))


def fill_disk_cache(dataset: Any, num_workers: int = 0) -> None:
    """Preprocess every case of a ``PersistentDataset`` that is not in its disk cache yet, before training starts.

    This is what ``CacheDataset`` does in memory: every case goes through the deterministic preprocessing (and its
    checks of the voxel values) once, here, so that a bad case stops the run before the trainer writes anything, and
    the first epoch reads from the cache. In a multi-process run each process fills its share. Any other dataset
    (no disk cache) is left alone.
    """
    if not isinstance(dataset, PersistentDataset) or dataset.cache_dir is None or len(dataset) == 0:
        return
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    share = Subset(dataset, range(rank, len(dataset), world))
    started = time.perf_counter()
    for _ in DataLoader(share, batch_size=1, num_workers=num_workers, collate_fn=_nothing):
        pass
    seconds = time.perf_counter() - started
    logger.info(f"{len(share)} cases preprocessed or found in the disk cache {dataset.cache_dir} in {seconds:.1f} s")


def _nothing(batch: Any) -> None:
    """A collate function that drops the batch: the cases only need to reach the cache."""
    return None


def check_ints(minimum: int = 1, **values: Any) -> None:
    """Each keyword value must be an integer ``>= minimum`` (not a bool, not a string).

    Raises:
        ValueError: naming the key and the value, e.g. ``max_epochs must be an integer >= 1, got 'abc'.``
    """
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}.")


def check_numbers(minimum: float = 0.0, **values: Any) -> None:
    """Each keyword value must be a finite number ``>= minimum`` (not a bool, not a string).

    Raises:
        ValueError: naming the key and the value.
    """
    for key, value in values.items():
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not valid or not math.isfinite(value) or value < minimum:
            raise ValueError(f"{key} must be a number >= {minimum}, got {value!r}.")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` of config key ``key`` must be one of ``choices``.

    Raises:
        ValueError: naming the key, the value and the choices.
    """
    options = list(choices)
    if value not in options:
        raise ValueError(f"{key} must be one of {options}, got {value!r}.")


def check_device(device: Any, key: str = "device") -> torch.device:
    """``device`` must name a device torch knows and this machine has: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Returns:
        the ``torch.device``.

    Raises:
        ValueError: naming the key and the value: not a device string, CUDA or MPS asked where torch cannot reach
            them, or a GPU index beyond the GPUs there are.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{key} {device!r} is not a device torch knows; use cpu, cuda, cuda:N or mps.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{key} {device!r} asks for CUDA, but torch sees no CUDA GPU here; use --{key} cpu.")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{key} {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{key} {device!r} asks for Apple's MPS, which torch cannot use here; use --{key} cpu.")
    elif parsed.type != "cpu":
        raise ValueError(f"{key} {device!r}: prod9 runs on cpu, cuda, cuda:N or mps.")
    return parsed


def check_roi_size(
    roi_size: Any, factor: int, key: str = "roi_size", factor_name: str = "the network's downsampling factor"
) -> None:
    """``roi_size`` must be 3 positive integers, each divisible by ``factor``.

    Args:
        roi_size: the value of the config key.
        factor: what each size must be a multiple of, e.g. ``2 ** (len(num_channels) - 1)`` for the autoencoder.
        key: the config key, named in the error.
        factor_name: what ``factor`` is, named in the error.

    Raises:
        ValueError: naming the key, the value and the factor, with the nearest valid size.
    """
    valid = isinstance(roi_size, (list, tuple)) and len(roi_size) == 3
    valid = valid and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in roi_size)
    if valid and all(s % factor == 0 for s in roi_size):
        return
    example = [max(1, math.ceil(s / factor)) * factor for s in roi_size] if valid else [factor * 16] * 3
    raise ValueError(
        f"{key} must be 3 integers divisible by {factor} ({factor_name}), got {roi_size!r}; e.g. {example}."
    )


def check_output_dir(
    key: str,
    directory: str | os.PathLike,
    result_patterns: Sequence[str],
    overwrite: bool | str = False,
    resume: bool | str = False,
    min_free_mb: float = 100.0,
) -> None:
    """A run may write into ``directory``: writable, enough free space, no earlier results in the way.

    Nothing is created or written: a missing folder must be creatable (its nearest existing parent a writable folder).
    Earlier results are files matching ``result_patterns`` (``fnmatch``, e.g. ``"model.pt"``, ``"*_recon.nii.gz"``);
    unless ``overwrite`` or ``resume``, finding one stops the run, so a good model or earlier outputs are never
    replaced by accident.

    Args:
        key: the config key of the folder (named in the error, e.g. ``"output_dir"``).
        directory: the folder.
        result_patterns: names of the files this run writes.
        overwrite: let the run replace earlier results (``--overwrite true``).
        resume: the run continues the results there (a resumed training run).
        min_free_mb: the least free space, in MiB, the run starts with.

    Raises:
        FileExistsError: earlier results are there and neither ``overwrite`` nor ``resume`` is true.
        OSError: the folder cannot be created or written (not a folder, no permission, read-only file system), or
            its disk has less than ``min_free_mb`` MiB free.
    """
    folder = Path(directory).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OSError(f"{key} {folder} cannot be created: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"{key} {folder} is not writable ({existing}: permission denied or read-only file system).")
    names = [p.name for p in folder.iterdir()] if existing == folder else []
    results = sorted(name for name in names if _matches(name, result_patterns))
    if results and not (str2bool(overwrite) or str2bool(resume)):
        shown = ", ".join(results[:3]) + (f" and {len(results) - 3} more" if len(results) > 3 else "")
        raise FileExistsError(
            f"{key} {folder} already holds results ({shown}); pass --overwrite true to replace them, or choose "
            f"another --{key}."
        )
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(f"{key} {folder}: only {free_mb:.0f} MiB free on its disk, the run needs {min_free_mb:g} MiB.")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def check_stage2_setup(
    tokenizer: Stage1Tokenizer,
    vocab_size: int,
    latent_shape: Sequence[int],
    roi_size: Sequence[int],
    modalities: Sequence[str],
    dataset: str = "brats",
) -> None:
    """Start-up checks that stage 2 fits its tokenizer; each failure is one line naming the key at fault.

    Raises:
        ValueError: ``vocab_size`` is not the tokenizer's codebook size, ``roi_size`` is not a multiple of the
            downsampling factor or its token grid is not ``latent_shape``, or ``modalities`` names an unknown one.
    """
    if vocab_size != tokenizer.codebook_size:
        raise ValueError(
            f"network_def#vocab_size {vocab_size} differs from the stage-1 codebook size {tokenizer.codebook_size} "
            f"({tokenizer.weights})"
        )
    factor = tokenizer.downsampling_factor
    if any(int(n) % factor for n in roi_size):
        raise ValueError(f"roi_size {list(roi_size)} must be a multiple of the stage-1 downsampling factor {factor}")
    grid = [int(n) // factor for n in roi_size]
    if grid != [int(n) for n in latent_shape]:
        raise ValueError(
            f"roi_size {list(roi_size)} / {factor} = token grid {grid} differs from network_def#latent_shape "
            f"{list(latent_shape)}"
        )
    if dataset == "brats":
        check_modalities(modalities)


def bf16_is_fast(device: str | torch.device) -> bool:
    """True where bf16 matmuls and convolutions run in hardware: a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16.

    On such CPUs (Intel Sapphire Rapids and later, AMD Zen 4 and later) oneDNN runs bf16 convolutions and matmuls about
    twice as fast as float32; elsewhere bf16 is emulated and slower, so autocast should stay off.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own feature probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bf16_is_supported(device: str | torch.device) -> bool:
    """True where bf16 autocast runs at all: every CPU (emulated where not fast), a CUDA GPU with native bf16
    (Ampere and later; older GPUs only emulate it), Apple's MPS where it has bf16 (macOS 14 and later)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "mps":
        try:
            torch.ones(1, device=device, dtype=torch.bfloat16)
        except (RuntimeError, TypeError):
            return False
        return True
    return False


def amp_enabled(amp: bool | str, device: str | torch.device) -> bool:
    """The ``amp`` a run uses: the config's value, or ``False`` with one logged line where ``device`` has no bf16.

    Args:
        amp: the config key (a bool, or a string such as ``"true"`` from the command line).
        device: where the run computes.
    """
    if not str2bool(amp):
        return False
    if bf16_is_supported(device):
        return True
    _warn_no_bf16(str(torch.device(device)))
    return False


@functools.cache
def _warn_no_bf16(device: str) -> None:
    """Log the fall-back once per device and process, however many engines ask."""
    logger.warning(f"amp: {device} has no bf16 support; running in float32.")


class Bf16Trainer(SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` that creates a ``GradScaler`` only for float16 autocast.

    MONAI creates ``torch.cuda.amp.GradScaler()`` whenever ``amp`` is on, but bf16 has float32's exponent range and
    needs no loss scaling; off CUDA the scaler only warns ("GradScaler is enabled, but CUDA is not available") and
    does nothing. Here ``engine.scaler`` is ``None`` unless ``amp_kwargs["dtype"]`` is ``torch.float16`` (MONAI's
    default when no dtype is given). Arguments are those of :class:`monai.engines.SupervisedTrainer`.
    """

    def run(self) -> None:  # type: ignore[override]
        """Train as ``SupervisedTrainer.run`` does, with a scaler only for float16."""
        dtype: Any = self.amp_kwargs.get("dtype", torch.float16)
        if self.amp and dtype == torch.float16:
            super().run()
            return
        self.scaler = None
        Workflow.run(self)
