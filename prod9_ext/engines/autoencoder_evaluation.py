"""Stage-1 validation pieces for MONAI's ``SupervisedEvaluator``: sliding-window tokenizing, codebook metrics, PNGs."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.utils import CommonKeys as Keys
from torch import nn

from prod9_ext.autoencoder import AutoencoderFSQ
from prod9_ext.engines.autoencoder_training import unwrap_parallel
from prod9_ext.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig

__all__ = ["AutoencoderSlidingWindowInferer", "CodebookUsage", "ReconstructionSnapshot", "autoencoder_eval_iteration"]


class AutoencoderSlidingWindowInferer(Inferer):
    """Reconstruct through :class:`AutoencoderInferenceWrapper`: blend latents, quantize once, decode by windows.

    Calling it returns the reconstruction (a drop-in MONAI ``Inferer``); :meth:`encode_decode` also returns the
    token grid, for codebook metrics.
    """

    def __init__(
        self, roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 1, mode: str = "gaussian"
    ) -> None:
        super().__init__()
        self.config = SlidingWindowConfig(roi_size, overlap, sw_batch_size, mode)

    def encode_decode(self, inputs: torch.Tensor, network: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``[B, C, *spatial]`` -> ``(reconstruction [B, C, *spatial], indices [B, *grid])``."""
        autoencoder = unwrap_parallel(network)
        if not isinstance(autoencoder, AutoencoderFSQ):
            raise TypeError(f"network must be an AutoencoderFSQ, got {type(autoencoder).__name__}.")
        wrapper = AutoencoderInferenceWrapper(autoencoder, self.config)
        codes = wrapper.encode(inputs)
        return wrapper.decode(codes, inputs.shape[2:]), autoencoder.embed(codes)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.encode_decode(inputs, network)[0]


def autoencoder_eval_iteration(
    engine: SupervisedEvaluator, batchdata: dict[str, Any]
) -> list[dict[str, Any]] | dict[str, Any]:
    """``iteration_update`` of the stage-1 evaluator: outputs ``image``, ``label``, ``pred`` and ``tokens``."""
    if not isinstance(engine.inferer, AutoencoderSlidingWindowInferer):
        raise TypeError(f"the evaluator's inferer must be AutoencoderSlidingWindowInferer, got {engine.inferer!r}.")
    batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
    inputs, targets = batch[0], batch[1]
    with engine.mode(engine.network), torch.autocast(engine.state.device.type, enabled=engine.amp, **engine.amp_kwargs):
        reconstruction, indices = engine.inferer.encode_decode(inputs, engine.network)
    output = {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: reconstruction.float(), "tokens": indices}
    engine.state.output = output
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates and post-processes on this event
    return engine.state.output  # decollated on MODEL_COMPLETED; ignite keeps what is returned


class CodebookUsage(Metric):
    """Codebook statistics over an epoch of token grids: fraction of codes used, or perplexity.

    Perplexity is ``exp(entropy)`` of the token histogram: ``codebook_size`` when all codes are equally likely.

    Args:
        codebook_size: number of codes (``prod(fsq_levels)``).
        statistic: ``"usage"`` or ``"perplexity"``.
        output_transform: maps the engine output to the token grids, e.g. ``from_engine(["tokens"])``.
    """

    def __init__(
        self,
        codebook_size: int,
        statistic: str = "usage",
        output_transform: Callable = lambda output: output,
        device: str | torch.device = "cpu",
    ) -> None:
        if statistic not in ("usage", "perplexity"):
            raise ValueError(f"statistic must be 'usage' or 'perplexity', got {statistic!r}.")
        self.codebook_size = int(codebook_size)
        self.statistic = statistic
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._counts = torch.zeros(self.codebook_size, dtype=torch.float64)

    def update(self, output: torch.Tensor | Sequence[torch.Tensor]) -> None:
        tensors = [output] if isinstance(output, torch.Tensor) else [torch.as_tensor(t) for t in output]
        grids = torch.cat([t.flatten() for t in tensors])
        self._counts += torch.bincount(grids.flatten().long().cpu(), minlength=self.codebook_size).double()

    def compute(self) -> float:
        counts = self._counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        if counts.sum() == 0:
            return math.nan
        if self.statistic == "usage":
            return float((counts > 0).double().mean())
        probabilities = counts[counts > 0] / counts.sum()
        return float(torch.exp(-(probabilities * probabilities.log()).sum()))


class ReconstructionSnapshot:
    """Evaluator handler: after each validation, a PNG with mid slices of input | reconstruction (first item).

    Files are ``<output_dir>/reconstruction_epoch<N>.png``; MONAI's ``ValidationHandler`` runs the evaluator with
    the trainer's epoch, so N is the training epoch.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        output = engine.state.output
        item = output[0] if isinstance(output, list) else output
        if not isinstance(item, dict):
            return
        image, reconstruction = (torch.as_tensor(item[key]).detach().float().cpu() for key in (Keys.IMAGE, Keys.PRED))
        image, reconstruction = (v[0] if v.ndim == 5 else v for v in (image, reconstruction))
        figure, axes = plt.subplots(2, 3, figsize=(9, 6))
        for row, (name, volume) in enumerate((("input", image[0]), ("reconstruction", reconstruction[0]))):
            for axis in range(3):
                plane = volume.select(axis, volume.shape[axis] // 2)
                axes[row, axis].imshow(plane.T.flip(0), cmap="gray", vmin=0, vmax=1)
                axes[row, axis].set_axis_off()
            axes[row, 0].set_title(name, loc="left")
        epoch = engine.state.epoch
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"reconstruction_epoch{epoch}.png"
        temporary = path.with_suffix(".tmp.png")
        figure.savefig(temporary, dpi=80, bbox_inches="tight")
        plt.close(figure)
        temporary.replace(path)
