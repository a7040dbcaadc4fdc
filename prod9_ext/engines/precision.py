"""Precision of a run: whether bf16 autocast runs (and pays off) on a device, and a trainer without a GradScaler for it.

``amp`` in the bundles means bf16 autocast (``amp_kwargs: {"dtype": torch.bfloat16}``). Its neighbours:
:mod:`prod9_ext.engines.config_checks` refuses a device torch does not know or cannot reach, before this module's
:func:`amp_enabled` is asked whether the device runs bf16.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.workflow import Workflow
from monai.utils import str2bool

__all__ = ["Bf16Trainer", "amp_enabled", "bf16_is_fast", "bf16_is_supported"]

logger = logging.getLogger(__name__)


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
