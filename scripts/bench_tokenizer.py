"""Tokenizer table: codebook usage, perplexity and reconstruction of prod9's FSQ against MONAI's VQ-VAE, 1000 codes.

prod9: ``AutoencoderFSQ`` (MAISI encoder/decoder, channels [16, 32, 64], one res block per level, FSQ levels
[8, 5, 5, 5]). MONAI: ``VQVAE`` with ``num_embeddings=1000`` and MONAI's defaults otherwise (64-dimensional codes,
EMA codebook updates with decay 0.5, commitment cost 0.25), channels [32, 64] with one res layer each: the same
widths at the same resolutions (MAISI adds a 16-channel full-resolution level that the VQVAE has not, so its steps
cost more). Both downsample by 4.

A phantom data set (BraTS layout, 3 mm) is written to a temporary folder. Both tokenizers train from the same seed
for the same steps on the same batches (random ``roi``³ crops of the training cases, the four contrasts in turn, one
per step), with Adam at the same learning rate and an L1 loss (plus the VQ-VAE's own quantization loss, as MONAI's
tutorials train it); the two alternate step by step, so their step times share the machine's drift. Then both
tokenize and reconstruct every contrast of every validation case whole (foreground box padded to a multiple of 4).

Usage is the share of the 1000 codes that occur at least once among the validation tokens (also measured after a
quarter and half of the steps, to show where it is heading); perplexity is ``exp(entropy)`` of the token histogram
(1000 when all codes are equally frequent).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from bench_utils import Timing, markdown_table, millions_of_parameters
from monai.data import CacheDataset, DataLoader
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.nets import VQVAE
from monai.transforms import DivisiblePad
from monai.utils import convert_to_tensor
from torch import nn

from prod9_ext import AutoencoderFSQ
from prod9_ext.data import MODALITIES, load_datalist, make_phantom_dataset, preprocessing
from prod9_ext.engines import CodebookUsage

FSQ_LEVELS = (8, 5, 5, 5)
FSQ_NETWORK = dict(num_channels=(16, 32, 64), num_res_blocks=(1, 1, 1), norm_num_groups=8)
VQVAE_NETWORK = dict(
    channels=(32, 64),
    num_res_layers=1,
    num_res_channels=(32, 64),
    downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
    upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
    num_embeddings=1000,
)
DOWNSAMPLING = 4


def _fsq_loss(model: AutoencoderFSQ, x: torch.Tensor) -> torch.Tensor:
    reconstruction, _, _ = model(x)
    return F.l1_loss(reconstruction, x)


def _vq_loss(model: VQVAE, x: torch.Tensor) -> torch.Tensor:
    reconstruction, quantization_loss = model(x)
    return F.l1_loss(reconstruction, x) + quantization_loss


TOKENIZERS: dict[str, tuple[Callable, Callable, Callable]] = {  # name: (loss, image → indices, indices → image)
    "prod9 AutoencoderFSQ, levels [8, 5, 5, 5]": (
        _fsq_loss,
        AutoencoderFSQ.encode_to_indices,
        AutoencoderFSQ.decode_indices,
    ),
    "MONAI VQVAE, 1000 embeddings": (_vq_loss, VQVAE.index_quantize, VQVAE.decode_samples),
}
CODES = 1000


def _networks(device: torch.device) -> list[nn.Module]:
    torch.manual_seed(0)
    fsq = AutoencoderFSQ(3, 1, 1, fsq_levels=FSQ_LEVELS, **FSQ_NETWORK)  # type: ignore[arg-type]
    torch.manual_seed(0)
    vq = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, **VQVAE_NETWORK)  # type: ignore[arg-type]
    return [fsq.to(device), vq.to(device)]


def _training_loader(cases: Sequence[dict], roi: int, batch_size: int, spacing: float, seed: int) -> DataLoader:
    """Random ``roi``³ crops (all contrasts) of ``cases``, loaded and cached now, cropped anew at every pass."""
    transform = preprocessing("brats", MODALITIES, roi_size=(roi,) * 3, pixdim=(spacing,) * 3, train=True)
    transform.set_random_state(seed)
    dataset = CacheDataset(cases, transform, progress=False, num_workers=0)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _contrasts_in_turn(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, 1, roi, roi, roi]`` batches, one contrast per step (T1, T1ce, T2, FLAIR, T1, ...)."""
    step = 0
    while True:
        for batch in loader:
            yield convert_to_tensor(batch[MODALITIES[step % len(MODALITIES)]], track_meta=False)
            step += 1


def _validation_volumes(cases: Sequence[dict], spacing: float) -> list[torch.Tensor]:
    """Every contrast of every case, ``[1, 1, *box]``: the foreground box, padded to a multiple of 4."""
    transform = preprocessing("brats", MODALITIES, roi_size=None, pixdim=(spacing,) * 3, train=False)
    pad = DivisiblePad(DOWNSAMPLING)
    volumes = [pad(transform(case)[key]) for case in cases for key in MODALITIES]
    return [convert_to_tensor(volume, track_meta=False)[None] for volume in volumes]


@torch.no_grad()
def _usage(network: nn.Module, encode: Callable, volumes: list[torch.Tensor], device: torch.device) -> float:
    """Share of the codes that occur among the tokens of ``volumes``."""
    network.eval()
    usage = CodebookUsage(CODES, "usage")
    for volume in volumes:
        usage.update(encode(network, volume.to(device)))
    return usage.compute()


def _train(
    networks: list[nn.Module],
    batches: Iterator[torch.Tensor],
    steps: int,
    lr: float,
    device: torch.device,
    volumes: list[torch.Tensor],
    checkpoints: Sequence[int],
) -> tuple[list[Timing], list[dict[int, float]]]:
    """``steps`` Adam steps of each network on the same batches, alternating.

    Returns each network's step times after the first, and its codebook usage on ``volumes`` after each step count in
    ``checkpoints`` (measured between steps, outside the step times).
    """
    optimizers = [torch.optim.Adam(net.parameters(), lr=lr) for net in networks]
    seconds: list[list[float]] = [[] for _ in networks]
    usage: list[dict[int, float]] = [{} for _ in networks]
    for step in range(1, steps + 1):
        x = next(batches).to(device)
        for net, optimizer, (loss_fn, _, _), samples in zip(
            networks, optimizers, TOKENIZERS.values(), seconds, strict=True
        ):
            start = time.perf_counter()
            net.train()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net, x).backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        if step in checkpoints:
            for net, (_, encode, _), history in zip(networks, TOKENIZERS.values(), usage, strict=True):
                history[step] = _usage(net, encode, volumes, device)
    timed = [s[1:] or s for s in seconds]  # the first step is the warm-up
    return [Timing(statistics.median(s), min(s), max(s), len(s)) for s in timed], usage


@torch.no_grad()
def _evaluate(
    network: nn.Module, encode: Callable, decode: Callable, volumes: list[torch.Tensor], device: torch.device
) -> dict:
    """Usage, perplexity, PSNR and SSIM over ``volumes``."""
    network.eval()
    usage, perplexity = CodebookUsage(CODES, "usage"), CodebookUsage(CODES, "perplexity")
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0)
    for volume in volumes:
        x = volume.to(device)
        indices = encode(network, x)
        for metric in (usage, perplexity):
            metric.update(indices)
        reconstruction = decode(network, indices).float().clamp(0, 1)
        psnr(reconstruction, x)
        ssim(reconstruction, x)
    return {
        "usage": usage.compute(),
        "perplexity": perplexity.compute(),
        "psnr": float(psnr.aggregate()),
        "ssim": float(ssim.aggregate()),
        "tokens": sum(v[0, 0].numel() for v in volumes) // DOWNSAMPLING**3,
    }


def tokenizer_table(
    steps: int = 300,
    roi: int = 32,
    batch_size: int = 2,
    lr: float = 1e-3,
    phantom_cases: int = 12,
    spacing: float = 3.0,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[str, dict]:
    """Train both tokenizers for ``steps`` steps on phantoms, then score them on the validation cases."""
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as folder:
        make_phantom_dataset(folder, phantom_cases, seed=seed, spacing=spacing, val_fraction=0.25)
        training = load_datalist("brats", folder, "training")
        validation = load_datalist("brats", folder, "validation")
        loader = _training_loader(training, roi, batch_size, spacing, seed)
        volumes = _validation_volumes(validation, spacing)
    networks = _networks(dev)
    checkpoints = sorted({max(1, steps // 4), max(1, steps // 2)})
    step_times, usage = _train(networks, _contrasts_in_turn(loader), steps, lr, dev, volumes, checkpoints)
    rows, results = [], []
    for (name, (_, encode, decode)), net, timing, history in zip(
        TOKENIZERS.items(), networks, step_times, usage, strict=True
    ):
        scores = _evaluate(net, encode, decode, volumes, dev)
        history[steps] = scores["usage"]
        params = millions_of_parameters(net)
        rows.append(
            [
                name,
                f"{params:.2f}M",
                str(timing),
                ", ".join(f"{100 * share:.1f}%" for share in history.values()),
                f"{scores['perplexity']:.0f}",
                f"{scores['psnr']:.2f}",
                f"{scores['ssim']:.4f}",
            ]
        )
        results.append(
            {
                "tokenizer": name,
                "params_m": params,
                "train_seconds_per_step": timing.__dict__,
                "usage_after_steps": history,
                **scores,
            }
        )
    headers = [
        f"tokenizer (1000 codes, {steps} steps of {batch_size}×{roi}³)",
        "params",
        "train s/step median [min, max]",
        f"codebook usage after {' / '.join(map(str, history))} steps",
        "perplexity",
        "PSNR dB",
        "SSIM",
    ]
    setup = {
        "steps": steps,
        "roi": roi,
        "batch_size": batch_size,
        "lr": lr,
        "phantom_cases": phantom_cases,
        "validation_cases": len(validation),
        "validation_volumes": len(volumes),
        "spacing_mm": spacing,
    }
    return markdown_table(headers, rows), {**setup, "rows": results}
