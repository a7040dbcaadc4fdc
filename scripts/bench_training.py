"""Training-throughput table: stage-1 and stage-2 steps per second, voxels (tokens) per second and peak memory.

Each step is the bundles' own: MONAI's ``SupervisedTrainer`` running prod9's ``AutoencoderGanIteration`` (stage 1,
the contrasts of each case stacked along the batch by ``StackModalities``; L1 + SSIM, and after the adversarial
warm-up the patch discriminator's terms and its own step) or ``MaskGiTIteration`` (stage 2: a random target among the
four token grids, the others as sources, MaskGiT masking, cross-entropy on masked tokens, gradient clipping).
The inputs are random volumes and token grids of the demo's shapes: the cost of a step does not depend on the values.

Sizes, batch sizes and networks are read from the bundles' ``configs/train.json`` with the ``configs/demo.json``
overlay (what ``scripts/quickstart.sh`` trains), so the table follows the demo; its rows name the sizes. The demo's
adversarial warm-up outlasts its run, so the row with the discriminator shows what ``train.json`` pays after its own
warm-up, at the demo's sizes.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from bench_utils import Timing, markdown_table, millions_of_parameters, peak_memory_mib
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.networks.nets import PatchDiscriminator

from prod9_ext import AutoencoderFSQ, MaskGiTScheduler, TransformerDecoder
from prod9_ext.engines import AutoencoderGanIteration, MaskGiTIteration, StackModalities

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
STAGE1_KEYS = (
    "num_channels",
    "num_res_blocks",
    "attention_levels",
    "norm_num_groups",
    "fsq_levels",
    "use_convtranspose",
)
STAGE2_KEYS = ("num_layers", "hidden_dim", "num_heads", "ffn_dim", "patch_size", "dropout")

SOURCE_FACTOR = 4  # voxels per token along each axis of the bundles' stage 1 (three levels)


def demo_settings(bundle: str) -> dict:
    """``configs/train.json`` of ``bundle`` with its ``configs/demo.json`` overlay applied (``a#b`` keys: nested)."""
    configs = BUNDLES / bundle / "configs"
    settings = json.loads((configs / "train.json").read_text())
    for key, value in json.loads((configs / "demo.json").read_text()).items():
        *parents, leaf = key.split("#")
        target = settings
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return settings


def demo_stage1_network() -> dict:
    """The keyword arguments of the CPU demo's ``AutoencoderFSQ`` that set its size and shape."""
    return {key: demo_settings("autoencoder_fsq")["network_def"][key] for key in STAGE1_KEYS}


def _demo() -> dict:
    """The demo's stage-1 and stage-2 sizes, networks and batch sizes."""
    stage1, stage2 = demo_settings("autoencoder_fsq"), demo_settings("maskgit_transformer")
    factor = 2 ** (len(stage1["network_def"]["num_channels"]) - 1)
    discriminator = {k: v for k, v in stage1["discriminator_def"].items() if k != "_target_"}
    return {
        "stage1_roi": tuple(stage1["roi_size"]),
        "stage1_batch": stage1["batch_size"],
        "stage1_network": demo_stage1_network(),
        "discriminator": discriminator,
        "modalities": stage1["modalities"],
        "stage2_grids": (tuple(n // factor for n in stage2["roi_size"]),),
        "stage2_batch": stage2["batch_size"],
        "stage2_network": {key: stage2["network_def"][key] for key in STAGE2_KEYS},
    }


def _trainer(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: Callable,
    loss_function: Callable,
    batches: list[dict],
    device: torch.device,
    amp: bool,
    prepare_batch: Callable | None = None,
) -> SupervisedTrainer:
    """A one-epoch ``SupervisedTrainer`` over ``batches`` with ``iteration`` as its step (bf16 autocast if ``amp``)."""
    extra = {} if prepare_batch is None else {"prepare_batch": prepare_batch}
    return SupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=batches,
        network=network,
        optimizer=optimizer,
        iteration_update=iteration,
        loss_function=loss_function,
        amp=amp,
        amp_kwargs={"dtype": torch.bfloat16},
        **extra,
    )


def _stage1(
    batch_size: int,
    roi: Sequence[int],
    network: dict,
    discriminator_def: dict,
    modalities: Sequence[str],
    adversarial: bool,
    device: torch.device,
    amp: bool,
    steps: int,
) -> tuple[SupervisedTrainer, torch.nn.Module]:
    """A stage-1 trainer over ``steps`` random batches; after the adversarial warm-up if ``adversarial``."""
    torch.manual_seed(0)
    autoencoder = AutoencoderFSQ(3, 1, 1, **network).to(device)
    discriminator = PatchDiscriminator(**discriminator_def).to(device)
    iteration = AutoencoderGanIteration(
        discriminator,
        torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9)),
        adv_warmup_iterations=0 if adversarial else 10**9,
    )
    batches = [{key: torch.rand(batch_size, 1, *roi) for key in modalities} for _ in range(steps)]
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=1e-4, betas=(0.5, 0.9))
    prepare = StackModalities(modalities)
    trainer = _trainer(autoencoder, optimizer, iteration, iteration.reconstruction_loss, batches, device, amp, prepare)
    return trainer, autoencoder


def _stage2(
    batch_size: int,
    grid: Sequence[int],
    network: dict,
    fsq_levels: Sequence[int],
    device: torch.device,
    amp: bool,
    steps: int,
) -> tuple[SupervisedTrainer, torch.nn.Module]:
    """A stage-2 trainer over ``steps`` random batches of four token grids (T1, T1ce, T2, FLAIR) of FSQ tokens and
    their source images (``SOURCE_FACTOR`` voxels per token along each axis, as the bundles' stage 1)."""
    torch.manual_seed(0)
    vocab = math.prod(fsq_levels)
    transformer = TransformerDecoder(
        vocab_size=vocab, latent_shape=grid, num_modalities=4, fsq_levels=fsq_levels, source_factor=SOURCE_FACTOR,
        **network,
    ).to(device)  # fmt: skip
    scheduler = MaskGiTScheduler(vocab)
    iteration = MaskGiTIteration(scheduler, slot_modalities=range(4))
    voxels = [n * SOURCE_FACTOR for n in grid]
    batches = [
        {"tokens": torch.randint(0, vocab, (batch_size, 4, *grid)), "voxels": torch.rand(batch_size, 4, *voxels)}
        for _ in range(steps)
    ]
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    return _trainer(transformer, optimizer, iteration, scheduler.loss, batches, device, amp), transformer


def _step_seconds(trainer: SupervisedTrainer, warmup: int) -> list[float]:
    """Run ``trainer``; seconds of each iteration after the first ``warmup`` ones (CUDA synchronised at each clock)."""
    seconds: list[float] = []
    start = [0.0]

    def sync() -> None:
        if trainer.state.device.type == "cuda":
            torch.cuda.synchronize()

    def started(_) -> None:
        sync()
        start[0] = time.perf_counter()

    def completed(_) -> None:
        sync()
        seconds.append(time.perf_counter() - start[0])

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)
    trainer.run()
    return seconds[warmup:]


def _timing(seconds: list[float]) -> Timing:
    return Timing(statistics.median(seconds), min(seconds), max(seconds), len(seconds))


def _size(shape: Sequence[int]) -> str:
    return f"{shape[0]}³" if len(set(shape)) == 1 else "×".join(map(str, shape))


def training_table(
    stage1_roi: Sequence[int] | None = None,
    stage1_batch: int | None = None,
    stage2_grids: Sequence[Sequence[int]] | None = None,
    stage2_batch: int | None = None,
    stage2_network: dict | None = None,
    stage1_network: dict | None = None,
    repeats: int = 5,
    device: str = "cpu",
    amp: bool | None = None,
) -> tuple[str, dict]:
    """Steps/s, voxels or tokens/s and peak memory of stage-1 (before/after the adversarial warm-up) and stage-2 steps.

    Every size, batch size and network left None is the demo's. Each workload runs ``1 + repeats`` steps (the first
    is the warm-up); its peak memory comes from a separate one-step run with a fresh network (weights, gradients,
    optimizer state and activations). ``amp``: bf16 autocast on or off; None: each workload both ways, float32 and
    bf16 autocast runs alternating (two runs each), with the bf16 speed-up.
    """
    dev = torch.device(device)
    demo = _demo()
    roi = tuple(stage1_roi or demo["stage1_roi"])
    batch1, batch2 = stage1_batch or demo["stage1_batch"], stage2_batch or demo["stage2_batch"]
    network1, network2 = stage1_network or demo["stage1_network"], stage2_network or demo["stage2_network"]
    modalities = demo["modalities"]
    precisions = [False, True] if amp is None else [amp]
    workloads: list[tuple[str, str, Callable, int]] = []  # (name, unit, builder(amp, steps), elements per step)
    for adversarial in (False, True):
        name = f"stage 1, {batch1} case{'s' if batch1 != 1 else ''} × {len(modalities)} contrasts × {_size(roi)}" + (
            ", + patch discriminator (after the adversarial warm-up)" if adversarial else ", L1 + SSIM"
        )
        build = partial(_stage1, batch1, roi, network1, demo["discriminator"], modalities, adversarial, dev)
        workloads.append((name, "voxels", build, batch1 * len(modalities) * math.prod(roi)))
    for grid in (tuple(g) for g in stage2_grids or demo["stage2_grids"]):
        name = f"stage 2, {batch2} cases × {_size(grid)} target tokens (+ 3 source grids)"
        build = partial(_stage2, batch2, grid, network2, network1["fsq_levels"], dev)
        workloads.append((name, "tokens", build, batch2 * math.prod(grid)))
    rows, results = [], []
    for name, unit, build, elements in workloads:
        seconds: dict[bool, list[float]] = {half: [] for half in precisions}
        for _ in range(2 if len(precisions) > 1 else 1):
            for half in precisions:
                trainer, network = build(half, 1 + repeats)
                seconds[half] += _step_seconds(trainer, warmup=1)
        params = millions_of_parameters(network)  # the same network at either precision
        float32 = _timing(seconds[False]) if False in seconds else None
        for half in precisions:
            timing = _timing(seconds[half])
            memory = peak_memory_mib(lambda build=build, half=half: build(half, 1)[0].run(), dev)
            per_second = elements / timing.median
            speed_up = float32.median / timing.median if half and float32 is not None else None
            rows.append(
                [
                    name + (", bf16 autocast" if half else ", float32"),
                    f"{params:.2f}M",
                    f"{1 / timing.median:.3f} [{1 / timing.max:.3f}, {1 / timing.min:.3f}]",
                    str(timing),
                    f"{per_second:,.0f} {unit}/s",
                    f"{memory:.0f}",
                    "" if speed_up is None else f"{speed_up:.2f}×",
                ]
            )
            results.append(
                {
                    "workload": name,
                    "amp": half,
                    "params_m": params,
                    "seconds_per_step": timing.__dict__,
                    "steps_per_second": 1 / timing.median,
                    f"{unit}_per_second": per_second,
                    "peak_mib": memory,
                    "bf16_speed_up": speed_up,
                }
            )
    headers = [
        "training step",
        "params",
        "steps/s median [min, max]",
        "s/step median [min, max]",
        "throughput",
        "peak MiB",
        "bf16 speed-up (float32 s/step ÷ bf16)",
    ]
    setup = {"device": device, "amp": amp, "stage1_network": network1, "stage2_network": network2}
    return markdown_table(headers, rows), {**setup, "rows": results}
