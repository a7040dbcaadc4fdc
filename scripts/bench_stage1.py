"""Stage-1 benchmark tables: FSQ against MAISI's KL autoencoder, the SSIM loss, the upsampling, sliding windows."""

from __future__ import annotations

import torch
from bench_training import demo_stage1_network
from bench_utils import autocast, markdown_table, peak_memory_mib, time_alternating, time_call
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.losses import SSIMLoss

from prod9_ext import AutoencoderFSQ, AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_ext.engines import SeparableSSIMLoss

# The same encoder/decoder for both sides of every ratio.
NETWORK = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=1,
    num_channels=(16, 32, 32),
    num_res_blocks=(1, 1, 1),
    attention_levels=(False, False, False),
    norm_num_groups=8,
    num_splits=1,
    save_mem=False,
)
FSQ_LEVELS = (8, 5, 5, 5)


def _networks(device: torch.device, fused_group_norm: bool = False) -> tuple[AutoencoderFSQ, AutoencoderKlMaisi]:
    """FSQ and KL autoencoders; ``fused_group_norm=False`` keeps MAISI's group norm on both sides."""
    torch.manual_seed(0)
    fsq = AutoencoderFSQ(**NETWORK, fsq_levels=FSQ_LEVELS, fused_group_norm=fused_group_norm)  # type: ignore[arg-type]
    kl = AutoencoderKlMaisi(**NETWORK, latent_channels=len(FSQ_LEVELS)).to(device)  # type: ignore[arg-type]
    return fsq.to(device), kl


def _fsq_step(model: AutoencoderFSQ, x: torch.Tensor, amp: bool) -> None:
    model.zero_grad(set_to_none=True)
    with autocast(x.device, amp):
        reconstruction, _, _ = model(x)
    torch.nn.functional.l1_loss(reconstruction.float(), x).backward()


def _kl_step(model: AutoencoderKlMaisi, x: torch.Tensor, amp: bool) -> None:
    model.zero_grad(set_to_none=True)
    with autocast(x.device, amp):
        reconstruction, z_mu, z_sigma = model(x)
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-8) - 1).mean()
    (torch.nn.functional.l1_loss(reconstruction.float(), x) + 1e-6 * kl).backward()


def autoencoder_overhead(
    size: int = 64, batch_size: int = 1, repeats: int = 7, device: str = "cpu", amp: bool = False
) -> tuple[str, dict]:
    """Forward+backward time and peak memory: AutoencoderFSQ against AutoencoderKlMaisi, same encoder/decoder.

    The ratio that measures FSQ's cost keeps MAISI's group norm on both sides; a third row times prod9's
    default, torch's fused ``nn.GroupNorm``. ``amp``: bf16 autocast on every side.
    """
    dev = torch.device(device)
    fsq, kl = _networks(dev)
    fused, _ = _networks(dev, fused_group_norm=True)
    x = torch.rand(batch_size, 1, size, size, size, device=dev)
    kl_time, fsq_time = time_alternating(lambda: _kl_step(kl, x, amp), lambda: _fsq_step(fsq, x, amp), repeats)
    fused_time = time_call(lambda: _fsq_step(fused, x, amp), repeats=repeats)
    kl_mem = peak_memory_mib(lambda: _kl_step(kl, x, amp), dev)
    fsq_mem = peak_memory_mib(lambda: _fsq_step(fsq, x, amp), dev)
    fused_mem = peak_memory_mib(lambda: _fsq_step(fused, x, amp), dev)
    rows = [
        ["MONAI AutoencoderKlMaisi (KL)", str(kl_time), f"{kl_mem:.0f}", "1.00", "1.00"],
        [
            "prod9 AutoencoderFSQ",
            str(fsq_time),
            f"{fsq_mem:.0f}",
            f"{fsq_time.median / kl_time.median:.3f}",
            f"{fsq_mem / kl_mem:.3f}",
        ],
        [
            "prod9 AutoencoderFSQ, fused GroupNorm (default)",
            str(fused_time),
            f"{fused_mem:.0f}",
            f"{fused_time.median / kl_time.median:.3f}",
            f"{fused_mem / kl_mem:.3f}",
        ],
    ]
    table = markdown_table(
        [
            f"fwd+bwd, batch {batch_size}×1×{size}³" + (", bf16 autocast" if amp else ""),
            "seconds median [min, max]",
            "peak MiB",
            "time ratio",
            "mem ratio",
        ],
        rows,
    )
    results = {
        "input": [batch_size, 1, size, size, size],
        "amp": amp,
        "kl": {"seconds": kl_time.__dict__, "peak_mib": kl_mem},
        "fsq": {"seconds": fsq_time.__dict__, "peak_mib": fsq_mem},
        "time_ratio": fsq_time.median / kl_time.median,
        "memory_ratio": fsq_mem / kl_mem,
        "fused": {"seconds": fused_time.__dict__, "peak_mib": fused_mem},
        "fused_time_ratio": fused_time.median / kl_time.median,
    }
    return table, results


def ssim_loss_table(
    inputs: tuple[tuple[int, ...], ...] = ((4, 1, 32, 32, 32), (8, 1, 64, 64, 64)),
    repeats: int = 5,
    device: str = "cpu",
) -> tuple[str, dict]:
    """Forward+backward time of the SSIM loss (7-voxel Gaussian window): MONAI's ``SSIMLoss`` against prod9's.

    The default sizes are the stage-1 training batches: the CPU demo's (one case's 4 contrasts, 32³ crops) and the
    bundle's (2 cases × 4 contrasts, 64³ crops).
    """
    dev = torch.device(device)
    monai_loss = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=7)
    prod9_loss = SeparableSSIMLoss(spatial_dims=3, data_range=1.0, win_size=7)
    rows, results = [], []
    for shape in inputs:
        generator = torch.Generator(device=dev).manual_seed(0)
        target = torch.rand(shape, device=dev, generator=generator)
        prediction = (target + 0.1 * torch.randn(shape, device=dev, generator=generator)).requires_grad_()

        def step(loss: torch.nn.Module, prediction: torch.Tensor = prediction, target: torch.Tensor = target) -> None:
            prediction.grad = None
            loss(prediction, target).backward()

        monai_time, prod9_time = time_alternating(lambda: step(monai_loss), lambda: step(prod9_loss), repeats)
        speed_up = monai_time.median / prod9_time.median
        label = "×".join(map(str, shape))
        rows.append([label, str(monai_time), str(prod9_time), f"{speed_up:.1f}"])
        results.append(
            {"input": shape, "monai": monai_time.__dict__, "prod9": prod9_time.__dict__, "speed_up": speed_up}
        )
    headers = ["fwd+bwd, input", "MONAI SSIMLoss s [min, max]", "prod9 SeparableSSIMLoss s [min, max]", "speed-up"]
    return markdown_table(headers, rows), {"rows": results}


def upsampling_table(
    batch_size: int = 4,
    size: int = 32,
    repeats: int = 7,
    device: str = "cpu",
    precisions: tuple[bool, ...] = (False, True),
) -> tuple[str, dict]:
    """Forward+backward time of the demo's stage-1 network with MAISI's two ways to upsample in the decoder.

    Trilinear interpolation then a 3×3×3 convolution at the finer resolution (MAISI's default, the bundle's
    ``train.json``) against one stride-2 transposed convolution (``use_convtranspose``, the CPU demo). The default
    input is the demo's training batch (one case's 4 contrasts, 32³ crops); ``precisions``: False for float32,
    True for bf16 autocast, one pair of rows each.
    """
    dev = torch.device(device)
    x = torch.rand(batch_size, 1, size, size, size, device=dev)
    demo_network, networks = demo_stage1_network(), []
    for transposed in (False, True):
        torch.manual_seed(0)
        network = AutoencoderFSQ(**{**demo_network, "use_convtranspose": transposed})  # type: ignore[arg-type]
        networks.append(network.to(dev))
    rows, results = [], []
    for amp in precisions:
        interpolated, transposed = time_alternating(
            lambda amp=amp: _fsq_step(networks[0], x, amp), lambda amp=amp: _fsq_step(networks[1], x, amp), repeats
        )
        ratio = transposed.median / interpolated.median
        precision = "bf16 autocast" if amp else "float32"
        rows.append([f"interpolation + convolution (MAISI's default), {precision}", str(interpolated), "1.00"])
        rows.append([f"transposed convolution (the demo), {precision}", str(transposed), f"{ratio:.2f}"])
        results.append(
            {"amp": amp, "interpolation": interpolated.__dict__, "transposed": transposed.__dict__, "ratio": ratio}
        )
    headers = [f"fwd+bwd, demo network, batch {batch_size}×1×{size}³", "seconds median [min, max]", "time ratio"]
    return markdown_table(headers, rows), {"input": [batch_size, 1, size, size, size], "rows": results}


def _num_windows(shape: tuple[int, ...], roi: int, overlap: float, factor: int) -> int:
    step = int(roi * (1 - overlap))
    count = 1
    for size in shape:
        padded = -(-size // factor) * factor
        count *= 1 if padded <= roi else -(-(padded - roi) // step) + 1
    return count


def sliding_window_scaling(
    roi: int = 64,
    overlap: float = 0.25,
    shapes: tuple[tuple[int, int, int], ...] = ((64, 64, 64), (128, 128, 128), (240, 240, 155)),
    repeats: int = 1,
    device: str = "cpu",
) -> tuple[str, dict]:
    """Sliding-window encode+decode time and peak memory against volume size; ratios to one ROI window."""
    dev = torch.device(device)
    fsq, _ = _networks(dev, fused_group_norm=True)
    wrapper = AutoencoderInferenceWrapper(fsq.eval(), SlidingWindowConfig((roi,) * 3, overlap=overlap))

    def run(shape: tuple[int, ...]) -> None:
        with torch.no_grad():
            wrapper.reconstruct(torch.rand(1, 1, *shape, device=dev))

    run(shapes[0])  # warm-up; each shape's memory run then warms up its own timed calls
    rows, results = [], []
    base_time = base_mem = None
    for shape in shapes:
        memory = peak_memory_mib(lambda shape=shape: run(shape), dev)
        seconds = time_call(lambda shape=shape: run(shape), repeats=repeats, warmup=0)
        windows = _num_windows(shape, roi, overlap, fsq.downsampling_factor)
        if base_time is None:
            base_time, base_mem = seconds.median, memory
        assert base_mem is not None
        rows.append(
            [
                "×".join(map(str, shape)),
                windows,
                str(seconds),
                f"{seconds.median / base_time:.1f}",
                f"{memory:.0f}",
                f"{memory / base_mem:.2f}",
            ]
        )
        results.append({"shape": shape, "windows": windows, "seconds": seconds.__dict__, "peak_mib": memory})
    table = markdown_table(
        [
            f"volume (roi {roi}³, overlap {overlap})",
            "windows",
            "encode+decode s median [min, max]",
            "time / one window",
            "peak MiB",
            "mem / one window",
        ],
        rows,
    )
    return table, {"roi": roi, "overlap": overlap, "rows": results}
