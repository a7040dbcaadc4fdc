"""Start-up checks of a bundle run: each failure is one line naming the key and its value; and a run's precision.

A bundle calls them from its ``startup`` list, before any network, dataset or output file is made, e.g.::

    "$prod9_ext.engines.startup.check_ints(max_epochs=@max_epochs, batch_size=@batch_size)",
    "$prod9_ext.engines.startup.check_roi_size(@roi_size, 2 ** (len(@network_def#num_channels) - 1))",
    "$prod9_ext.engines.startup.check_output_dir('output_dir', @output_dir, ['*.csv'], @overwrite)",
    "$prod9_ext.engines.startup.check_device(@device)"

:func:`check_stage2_setup` checks that stage 2 fits its stage-1 tokenizer. Also here, because a run's precision is
part of its set-up: :func:`amp_enabled`, :func:`bf16_is_fast` and :class:`Bf16Trainer` (``amp`` in the bundles means
bf16 autocast). Neighbours: unknown config keys are :mod:`prod9_ext.engines.config_keys`' job, the one-line summary
of a failure :mod:`~prod9_ext.engines.error_summary`'s.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.workflow import Workflow
from monai.utils import str2bool

from prod9_ext.data.brats import check_modalities
from prod9_ext.engines.stage2_training import Stage1Tokenizer

__all__ = [
    "Bf16Trainer",
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
]

logger = logging.getLogger(__name__)


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
