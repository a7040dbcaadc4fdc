"""MONAI's latent-diffusion peers, timed in latent space: ``DiffusionModelUNet`` + ``DiffusionInferer``.

Samplers as users run them: DDIM with 50 steps (the inference setting of MONAI's ``brats_mri_generative_diffusion``
bundle), DDPM with 1000 steps (that bundle's training schedule, sampled step by step) and rectified flow with 30
steps (MAISI's ``RFlowScheduler`` setting). The UNet is the bundle's (channels ``[128, 256, 512]``, attention at the
two lower levels with 32-channel heads, 2 res blocks, SDPA attention) at a quarter of its width, which gives it
about the parameter count of prod9's transformer. It denoises a 4-channel latent (the width of prod9's FSQ latent)
and gets the three source latents concatenated to its input (``mode="concat"``), the analogue of prod9's source
tokens. ``LatentDiffusionInferer`` is ``DiffusionInferer`` plus a latent scale and the final decode; the decode is
left out here as it is on prod9's side, so both sides stop at the latent grid. The UNet halves each axis twice, so
a grid whose sides are not multiples of 4 (24×24×18) is padded up (to 24×24×20), as a user would have to; the row
says so.

DDPM's 1000 steps all cost the same (one UNet forward and one scheduler update), so DDPM is timed on its first
``prefix_steps`` steps and scaled to 1000; the row says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from bench_utils import Timing, Workload, autocast, millions_of_parameters
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler

LATENT_CHANNELS = 4
UNET = dict(
    channels=(32, 64, 128),
    attention_levels=(False, True, True),
    num_head_channels=(0, 32, 32),
    num_res_blocks=2,
    use_flash_attention=True,
)
BUNDLE_BETAS = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
SAMPLERS: dict[str, int] = {"DDIM": 50, "RFlow": 30, "DDPM": 1000}


def diffusion_unet(num_sources: int, device: torch.device) -> DiffusionModelUNet:
    """The quarter-width bundle UNet for a ``LATENT_CHANNELS`` latent plus ``num_sources`` concatenated latents."""
    torch.manual_seed(0)
    unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=LATENT_CHANNELS * (1 + num_sources),
        out_channels=LATENT_CHANNELS,
        **UNET,  # type: ignore[arg-type]
    )
    return unet.to(device).eval()


def scheduler(name: str, steps: int, grid: tuple[int, ...], device: torch.device) -> Scheduler:
    """``DDIM``/``DDPM`` with the bundle's noise schedule, or MAISI's ``RFlow``, set to ``steps`` inference steps."""
    if name == "RFlow":
        rflow = RFlowScheduler(
            num_train_timesteps=1000, use_discrete_timesteps=False, use_timestep_transform=True, spatial_dim=3
        )
        rflow.set_timesteps(steps, device=device, input_img_size_numel=math.prod(grid))
        return rflow
    cls = {"DDIM": DDIMScheduler, "DDPM": DDPMScheduler}[name]
    ddim_or_ddpm = cls(**BUNDLE_BETAS, clip_sample=False)  # type: ignore[arg-type]
    ddim_or_ddpm.set_timesteps(steps, device=device)
    return ddim_or_ddpm


def _truncated(schedule: Scheduler, steps: int) -> Scheduler:
    """``schedule`` running only its first ``steps`` timesteps (each step's update is that of the full schedule)."""
    schedule.timesteps = schedule.timesteps[:steps]
    return schedule


def _network_call(unet: DiffusionModelUNet, amp: bool) -> Callable[..., torch.Tensor]:
    """``unet`` as the inferer calls it, in bf16 autocast when ``amp`` (the scheduler's update stays in float32)."""

    def forward(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(x.device, amp):
            return unet(x, timesteps=timesteps, context=context).float()

    return forward


def diffusion_sample(unet: DiffusionModelUNet, schedule: Scheduler, sources: torch.Tensor, amp: bool) -> torch.Tensor:
    """One latent sample ``[1, LATENT_CHANNELS, *grid]`` conditioned on ``sources [1, S * LATENT_CHANNELS, *grid]``."""
    noise = torch.randn(1, LATENT_CHANNELS, *sources.shape[2:], device=sources.device)
    with torch.no_grad():
        return DiffusionInferer(schedule).sample(  # type: ignore[return-value]
            noise, _network_call(unet, amp), schedule, conditioning=sources, mode="concat", verbose=False
        )


def _sample_steps(
    unet: DiffusionModelUNet, name: str, steps: int, timed: int, sources: torch.Tensor, amp: bool
) -> None:
    """The first ``timed`` steps of sampler ``name`` set to ``steps`` steps."""
    schedule = _truncated(scheduler(name, steps, tuple(sources.shape[2:]), sources.device), timed)
    diffusion_sample(unet, schedule, sources, amp)


def _scale_to(steps: int, timed: int) -> Callable[[Timing], tuple[Timing, str, dict]]:
    """Report for a run timed on ``timed`` of its ``steps`` equally costly steps."""

    def report(measured: Timing) -> tuple[Timing, str, dict]:
        if timed == steps:
            return measured, "measured", {}
        note = f"**extrapolated**: first {timed} of {steps} steps timed ({measured.median:.2f} s), × {steps / timed:g}"
        return measured.scaled(steps / timed), note, {"timed_steps": timed, "prefix_seconds": measured.__dict__}

    return report


def diffusion_workloads(
    grid: tuple[int, int, int], num_sources: int, prefix_steps: int, device: torch.device, amp: bool = False
) -> list[Workload]:
    """One workload per sampler in ``SAMPLERS`` (DDPM timed on ``prefix_steps`` steps), all with the same UNet."""
    unet = diffusion_unet(num_sources, device)
    factor = 2 ** (len(UNET["channels"]) - 1)  # type: ignore[arg-type]
    padded = tuple(-(-n // factor) * factor for n in grid)  # the UNet halves each axis twice
    note = "" if padded == grid else f" (latent padded to {'×'.join(map(str, padded))}: the UNet needs multiples of 4)"
    sources = torch.randn(1, LATENT_CHANNELS * num_sources, *padded, device=device)
    workloads = []
    for name, steps in SAMPLERS.items():
        timed = min(steps, prefix_steps) if name == "DDPM" else steps
        workloads.append(
            Workload(
                label=f"MONAI DiffusionModelUNet + DiffusionInferer, {name}Scheduler{note}",
                params_m=millions_of_parameters(unet),
                calls=f"{steps} steps / {steps} calls",
                run=partial(_sample_steps, unet, name, steps, timed, sources, amp),
                warm=partial(_sample_steps, unet, name, steps, 2, sources, amp),
                report=_scale_to(steps, timed),
            )
        )
    return workloads
