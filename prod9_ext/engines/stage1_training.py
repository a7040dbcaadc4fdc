"""Stage-1 training: the autoencoder's GAN iteration for MONAI's ``SupervisedTrainer`` and the losses it uses.

MONAI's ``AdversarialTrainer`` has no warm-up, no adaptive weight and expects a generator that returns a tensor,
so prod9 runs the stock ``SupervisedTrainer`` (which holds the autoencoder and its optimizer) with
:class:`AutoencoderGanIteration` as ``iteration_update``; the discriminator and its optimizer live in the iteration.
Also here: :class:`StackModalities` (the ``prepare_batch`` that stacks a case's modalities along the batch),
:class:`SeparableSSIMLoss` and :func:`build_perceptual_loss`.

Neighbours: stage-1 validation and inference (sliding-window inferer, codebook metrics, token files) are in
:mod:`prod9_ext.engines.stage1_inference`; checkpoints and other handlers in :mod:`~prod9_ext.engines.checkpoints`
and :mod:`~prod9_ext.engines.handlers`; the trainer without a GradScaler for bf16 in :mod:`~prod9_ext.engines.startup`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import PatchAdversarialLoss
from monai.utils import CommonKeys as Keys
from torch import nn

__all__ = [
    "AutoencoderGanIteration",
    "SeparableSSIMLoss",
    "StackModalities",
    "build_perceptual_loss",
    "unwrap_parallel",
]


def unwrap_parallel(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    return module.module if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else module


class StackModalities:
    """``prepare_batch`` that stacks the modalities of each case along the batch axis.

    One tokenizer is shared by all contrasts: a batch ``{"t1": [B, 1, ...], "t2": [B, 1, ...]}`` becomes inputs
    ``[B * M, 1, ...]`` (modality-major), used as their own targets.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if isinstance(keys, str) or not keys:
            raise ValueError(f"keys must be a non-empty list of image keys, got {keys!r}.")
        self.keys = list(keys)

    def __call__(
        self, batchdata: dict[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [key for key in self.keys if key not in batchdata]
        if missing:
            raise KeyError(f"batch has no {missing} (keys present: {sorted(batchdata)}); check `modalities`.")
        images = torch.cat([torch.as_tensor(batchdata[key]) for key in self.keys], dim=0)
        images = images.to(device=device, non_blocking=non_blocking, **kwargs)
        return images, images

    def item_names(self, batchdata: dict[str, Any] | Sequence[dict[str, Any]]) -> list[dict[str, str]]:
        """``[{"filename_or_obj": "<case>_<key>"}, ...]`` in the stacked order, e.g. for ``MetricsSaver``."""
        items = [batchdata] if isinstance(batchdata, dict) else list(batchdata)
        if len(items) == 1 and isinstance(items[0].get("case"), (list, tuple)):  # collated, not decollated
            cases = [str(case) for case in items[0]["case"]]
        else:
            cases = [str(item.get("case", index)) for index, item in enumerate(items)]
        return [{"filename_or_obj": f"{case}_{key}"} for key in self.keys for case in cases]


class SeparableSSIMLoss(nn.Module):
    """``1 - SSIM`` exactly as MONAI's ``SSIMLoss`` with its Gaussian window, filtered separably.

    MONAI convolves the five local statistics (``x``, ``y``, ``x²``, ``y²``, ``xy``) with the full ``k×k×k``
    Gaussian kernel. That kernel is the outer product of one 1-D Gaussian per axis, so filtering along each axis in
    turn gives the same statistics with ``d·k`` instead of ``k^d`` multiply-adds per voxel (``3·7`` against ``7³`` for
    a 7-voxel window in 3D): on a CPU, the difference between an SSIM term that outweighs a small autoencoder's own
    forward and backward pass and one that does not.

    Everything else follows MONAI's ``compute_ssim_and_cs`` and ``SSIMLoss``: the window is applied without padding
    ("valid"), ``c1 = (k1·data_range)²``, ``c2 = (k2·data_range)²``, the SSIM map is averaged over channels and
    space per batch item, and the loss is the batch mean of ``1 - SSIM``; inputs are computed in float32.

    Args:
        spatial_dims: 2 or 3.
        data_range: value range of the images.
        win_size: Gaussian window size in voxels (odd or even, as MONAI allows).
        kernel_sigma: standard deviation of the Gaussian window.
        k1, k2: SSIM's stability constants.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        data_range: float = 1.0,
        win_size: int = 7,
        kernel_sigma: float = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if win_size < 1 or kernel_sigma <= 0:
            raise ValueError(f"win_size must be >= 1 and kernel_sigma > 0, got {win_size} and {kernel_sigma}.")
        self.spatial_dims = spatial_dims
        self.c1 = (k1 * data_range) ** 2
        self.c2 = (k2 * data_range) ** 2
        offsets = torch.arange(start=(1 - win_size) / 2, end=(1 + win_size) / 2, step=1)  # MONAI's gaussian_1d
        gauss = torch.exp(-((offsets / kernel_sigma) ** 2) / 2)
        self.taps: tuple[float, ...] = tuple((gauss / gauss.sum()).tolist())

    def _filter(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian-filter ``x [N, *spatial]`` along every spatial axis, without padding.

        Each axis is a weighted sum of ``k`` shifted views: elementwise work, faster on a CPU than a one-channel
        convolution with a 1-D kernel.
        """
        window = len(self.taps)
        for axis in range(1, x.ndim):
            length = x.shape[axis] - window + 1
            if length < 1:
                raise ValueError(f"each spatial size must be at least win_size {window}, got {tuple(x.shape[1:])}.")
            filtered = self.taps[0] * x.narrow(axis, 0, length)
            for i, weight in enumerate(self.taps[1:], start=1):
                filtered = filtered.add_(x.narrow(axis, i, length), alpha=weight)
            x = filtered
        return x

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``input`` and ``target`` ``[B, C, *spatial]`` -> scalar ``mean over B of (1 - SSIM)``."""
        if input.shape != target.shape or input.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"input and target must both be [B, C, *{self.spatial_dims} spatial sizes], got "
                f"{tuple(input.shape)} and {tuple(target.shape)}."
            )
        x, y = input.float(), target.float()
        statistics = torch.stack([x, y, x * x, y * y, x * y])  # [5, B, C, *spatial]
        filtered = self._filter(statistics.flatten(0, 2))
        mu_x, mu_y, mu_xx, mu_yy, mu_xy = filtered.view(5, *x.shape[:2], *filtered.shape[1:])
        sigma_x, sigma_y, sigma_xy = mu_xx - mu_x * mu_x, mu_yy - mu_y * mu_y, mu_xy - mu_x * mu_y
        contrast = (2 * sigma_xy + self.c2) / (sigma_x + sigma_y + self.c2)
        ssim_map = ((2 * mu_x * mu_y + self.c1) / (mu_x**2 + mu_y**2 + self.c1)) * contrast
        return (1 - ssim_map.flatten(1).mean(dim=1)).mean()


def build_perceptual_loss(weight: float, network_type: str = "squeeze", spatial_dims: int = 3) -> nn.Module | None:
    """MONAI ``PerceptualLoss`` when ``weight > 0``, else ``None``.

    The perceptual networks need pretrained weights from the internet; offline they cannot be fetched, so this
    fails here, at start-up, with one clear line instead of deep inside training.
    """
    if weight <= 0:
        return None
    from monai.losses import PerceptualLoss

    try:
        # MedicalNet networks are truly 3D; the 2D ones (squeeze, alex, vgg, radimagenet) run on slices ("fake 3D")
        fake_3d = spatial_dims == 3 and not network_type.startswith("medicalnet")
        return PerceptualLoss(spatial_dims=spatial_dims, network_type=network_type, is_fake_3d=fake_3d)
    except Exception as error:  # torch.hub / torchvision download failures surface as many exception types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(
            f"perceptual_weight={weight} needs the pretrained '{network_type}' network, whose weights could not be "
            f"loaded ({first_line}); set perceptual_weight 0 or make the weights available in the torch hub cache."
        ) from None


class AutoencoderGanIteration:
    """One stage-1 training step: update the autoencoder, then (after warm-up) the discriminator.

    Generator loss: ``l1_weight * L1 + ssim_weight * (1 - SSIM) + perceptual_weight * LPIPS`` plus, from
    ``adv_warmup_iterations`` on, ``adv_weight * lambda * L_adv`` with VQGAN's adaptive weight
    ``lambda = ||grad L_rec|| / (||grad L_adv|| + 1e-4)`` taken at the decoder's last layer and clamped to
    ``[0, max_adaptive_weight]``. Before the warm-up ends the discriminator neither runs nor trains. While the
    generator steps, the discriminator's parameters are frozen, so no gradient from the generator reaches them.

    Args:
        discriminator: e.g. MONAI ``PatchDiscriminator``; its output's last element is the patch logits.
        d_optimizer: optimizer of the discriminator.
        spatial_dims: for the SSIM loss.
        l1_weight, ssim_weight, perceptual_weight, adv_weight: loss weights.
        ssim_window: SSIM window size (must fit the training ROI).
        adv_warmup_iterations: global iterations before the adversarial terms switch on.
        max_adaptive_weight: clamp of the adaptive weight.
        perceptual_loss: a ``PerceptualLoss`` (see :func:`build_perceptual_loss`) or ``None``.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        spatial_dims: int = 3,
        l1_weight: float = 1.0,
        ssim_weight: float = 0.2,
        ssim_window: int = 7,
        adv_weight: float = 0.1,
        adv_warmup_iterations: int = 2000,
        max_adaptive_weight: float = 1e4,
        perceptual_loss: nn.Module | None = None,
        perceptual_weight: float = 0.0,
    ) -> None:
        if perceptual_weight > 0 and perceptual_loss is None:
            raise ValueError(f"perceptual_weight={perceptual_weight} needs a perceptual_loss network.")
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.l1_weight = l1_weight
        self.ssim_weight = ssim_weight
        self.ssim_loss = SeparableSSIMLoss(spatial_dims=spatial_dims, data_range=1.0, win_size=ssim_window)
        self.adv_weight = adv_weight
        self.adv_warmup_iterations = adv_warmup_iterations
        self.max_adaptive_weight = max_adaptive_weight
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = perceptual_weight
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")

    def reconstruction_loss(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted L1 + (1 - SSIM) (+ perceptual), in float32."""
        reconstruction, target = reconstruction.float(), target.float()
        loss = self.l1_weight * torch.nn.functional.l1_loss(reconstruction, target)
        if self.ssim_weight > 0:
            loss = loss + self.ssim_weight * self.ssim_loss(reconstruction, target)
        if self.perceptual_loss is not None and self.perceptual_weight > 0:
            loss = loss + self.perceptual_weight * self.perceptual_loss(reconstruction, target)
        return loss

    def _logits(self, network: nn.Module, image: torch.Tensor) -> torch.Tensor:
        out = network(image.float().contiguous())
        return out[-1] if isinstance(out, (list, tuple)) else out

    def adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """VQGAN's balance of reconstruction and adversarial gradients at ``last_layer`` (no gradient)."""
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = rec_grad.norm() / (adv_grad.norm() + 1e-4)
        return weight.clamp(0.0, self.max_adaptive_weight).detach()

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        adversarial = engine.state.iteration > self.adv_warmup_iterations
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        self.discriminator.requires_grad_(False)
        with torch.autocast(engine.state.device.type, enabled=engine.amp, **engine.amp_kwargs):
            reconstruction, _, indices = engine.network(inputs)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        rec_loss = self.reconstruction_loss(reconstruction, targets)
        output: dict[str, Any] = {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: reconstruction, "tokens": indices}
        loss = rec_loss
        if adversarial:
            g_loss = self.adv_loss(
                self._logits(unwrap_parallel(self.discriminator), reconstruction),
                target_is_real=True,
                for_discriminator=False,
            )
            decoder = unwrap_parallel(engine.network).get_submodule("decoder")
            last_layer = [p for p in decoder.parameters() if p.ndim > 2][-1]
            weight = self.adaptive_weight(rec_loss, g_loss, last_layer)
            loss = rec_loss + self.adv_weight * weight * g_loss
            output.update(g_adv_loss=g_loss.detach(), adaptive_weight=weight)
        self.discriminator.requires_grad_(True)
        if engine.scaler is not None:  # AMP: MONAI's trainer holds the scaler
            engine.scaler.scale(loss).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.optimizer.step()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        output.update({Keys.LOSS: loss.detach(), "rec_loss": rec_loss.detach()})

        if adversarial:
            self.discriminator.train()
            self.d_optimizer.zero_grad(set_to_none=True)
            real = self.adv_loss(self._logits(self.discriminator, targets), target_is_real=True, for_discriminator=True)
            fake = self.adv_loss(
                self._logits(self.discriminator, reconstruction.detach()), target_is_real=False, for_discriminator=True
            )
            d_loss = 0.5 * (real + fake)
            d_loss.backward()
            self.d_optimizer.step()
            output["d_loss"] = d_loss.detach()
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates and post-processes on this event
        return engine.state.output  # decollated on MODEL_COMPLETED; ignite keeps what is returned
