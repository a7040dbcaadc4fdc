"""The peer a user would pick instead of prod9 for paired synthesis: a direct regression U-Net per task.

One MONAI ``BasicUNet`` per task (or, ``--design multitask``, one for every task, :class:`TaskConditioned`) maps the
source contrasts (as channels) to the target contrast, trained with L1 + 0.2 (1 - SSIM) (stage 1's weights) on
``roi_size`` crops of the training cases for a wall-time budget (``--seconds``, split equally between the tasks; the
quickstart passes the wall time of prod9's stage 1 + stage 2 training). Each case of ``--split`` is then predicted
whole: stage 2's preprocessing without the ROI crop (``prod9_ext.data.preprocessing(..., roi_size=None, train=False,
seg=True)``, the whole foreground box at ``pixdim``), in windows of the training ``roi_size`` blended by MONAI's
``SlidingWindowInferer``, so the network sees inputs of the size it was trained on whatever the size of the brain.

    python scripts/regression_peer.py --dataset_dir outputs/quickstart/data --output_dir outputs/quickstart/peer \\
        --seconds 780 --split test

Writes, per task, every prediction as ``<output_dir>/<task>/<case>_<target>_synth.nii.gz`` on the case's original
file grid (shape and affine of its files: MONAI's ``Invertd`` undoes the preprocessing, as prod9's inference does),
in the [0, 1] intensity scale of the preprocessing, so ``scripts/score_synthesis.py`` scores the peer exactly as it
scores prod9. ``<output_dir>/metrics.json`` keeps the peer's own scores (one entry per task, see :func:`main`), on the
whole preprocessed foreground box: MONAI's ``SSIMMetric(spatial_dims=3, data_range=1.0, win_size=7)``, PSNR with
``max_val=1.0`` and prod9's region SSIM (:class:`prod9_ext.engines.RegionSSIMMetric`) inside and outside the tumour.
Data preprocessing is not counted in the budget; the training loop is, and it stops at the first iteration that
ends past the task's share (at least one iteration runs).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

import fire
import torch
import torch.nn.functional as F
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.nets import BasicUNet
from monai.transforms import Compose, Invertd
from monai.utils import convert_to_tensor, set_determinism

import prod9_ext.data
from prod9_ext.atomic import atomic_write_text
from prod9_ext.engines import (
    RegionSSIMMetric,
    SaveSynthesisd,
    SeparableSSIMLoss,
    bf16_is_fast,
    endless,
    train_for_seconds,
)

__all__ = [
    "BRASYN_TASKS",
    "TASKS",
    "TaskConditioned",
    "build_network",
    "load_scoring_cases",
    "predict",
    "predict_whole",
    "save_prediction",
    "score_network",
    "train_multitask",
    "train_network",
]

logger = logging.getLogger("regression_peer")

# The quickstart's tasks: name -> (target, sources), the sources in prod9's modality order.
TASKS: dict[str, tuple[str, list[str]]] = {
    "t2_from_t1": ("t2", ["t1"]),
    "flair_from_t1_t1ce_t2": ("flair", ["t1", "t1ce", "t2"]),
}
MODALITIES = ("t1", "t1ce", "t2", "flair")
# The BraSyn task (each contrast missing in turn, from the other three) and T1 -> T2 from one source beside it.
BRASYN_TASKS: dict[str, tuple[str, list[str]]] = {
    "t1_from_t1ce_t2_flair": ("t1", ["t1ce", "t2", "flair"]),
    "t1ce_from_t1_t2_flair": ("t1ce", ["t1", "t2", "flair"]),
    "t2_from_t1_t1ce_flair": ("t2", ["t1", "t1ce", "flair"]),
    "flair_from_t1_t1ce_t2": ("flair", ["t1", "t1ce", "t2"]),
    "t2_from_t1": ("t2", ["t1"]),
}
ALL_TASKS = TASKS | BRASYN_TASKS
DESIGNS = ("per_task", "multitask")
DEFAULT_FEATURES = (16, 16, 32, 64, 128, 16)
# BasicUNet halves the grid four times: inputs are zero-padded to a multiple of this and the output cropped back.
UNET_FACTOR = 16
# Share of a window that its neighbour overlaps when a whole case is predicted (prod9's stage-2 windows use 0.5 too).
WINDOW_OVERLAP = 0.5


def build_network(num_sources: int, features: Sequence[int] = DEFAULT_FEATURES) -> BasicUNet:
    """A 3D ``BasicUNet`` with ``num_sources`` input channels and one output channel (the target contrast)."""
    if num_sources < 1:
        raise ValueError(f"num_sources must be at least 1, got {num_sources}.")
    if len(features) != 6:
        raise ValueError(f"features must hold 6 numbers (BasicUNet's), got {list(features)}.")
    return BasicUNet(spatial_dims=3, in_channels=num_sources, out_channels=1, features=tuple(features))


class TaskConditioned(torch.nn.Module):
    """One U-Net for every task (``--design multitask``): ``sources -> target`` through fixed input slots.

    The wrapped network reads ``3 * 4`` channels: each contrast in its own slot (zero when it is not a source), an
    availability plane per slot (1 for a source) and the target's one-hot planes. ``forward`` takes the sources as
    :func:`predict` gives them, ``[B, len(sources), *spatial]`` in ``sources`` order.
    """

    def __init__(self, network: torch.nn.Module, target: str, sources: Sequence[str]) -> None:
        super().__init__()
        if target in sources or not sources or any(m not in MODALITIES for m in (target, *sources)):
            raise ValueError(
                f"need sources among {list(MODALITIES)} without the target {target!r}, got {list(sources)}"
            )
        self.network = network
        self.slots = [MODALITIES.index(m) for m in sources]
        self.target = MODALITIES.index(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x.shape
        images = x.new_zeros(b, len(MODALITIES), *spatial)
        images[:, self.slots] = x
        available = x.new_zeros(b, len(MODALITIES), *spatial)
        available[:, self.slots] = 1.0
        target = x.new_zeros(b, len(MODALITIES), *spatial)
        target[:, self.target] = 1.0
        return self.network(torch.cat([images, available, target], dim=1))


def _stack(batch: dict, keys: Sequence[str], device: torch.device) -> torch.Tensor:
    """``[B, len(keys), *spatial]`` float32 from the ``[B, 1, *spatial]`` entries ``keys`` of ``batch``."""
    arrays = [convert_to_tensor(batch[key], dtype=torch.float32, track_meta=False) for key in keys]
    return torch.cat(arrays, dim=1).to(device)


def predict(network: torch.nn.Module, sources: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """The network's target ``[B, 1, *spatial]`` (float32, unclipped) for ``sources`` ``[B, S, *spatial]``, any size.

    The input is zero-padded at the far end of each axis to a multiple of 16 and the output cropped back.
    """
    spatial = sources.shape[2:]
    pad = [p for n in reversed(spatial) for p in (0, (-n) % UNET_FACTOR)]
    with torch.autocast(sources.device.type, dtype=torch.bfloat16, enabled=amp):
        output = network(F.pad(sources, pad))
    return output[(..., *[slice(0, n) for n in spatial])].float()


def predict_whole(
    network: torch.nn.Module, sources: torch.Tensor, roi_size: Sequence[int], amp: bool = False
) -> torch.Tensor:
    """:func:`predict` over a whole case ``[B, S, *spatial]`` in windows of the training ``roi_size``.

    MONAI's ``SlidingWindowInferer`` (overlap ``WINDOW_OVERLAP``, Gaussian blending) covers every voxel, padding a
    case smaller than the ROI, so each window has the size the network was trained on (its instance norms see the
    statistics of a training crop) and memory stays bounded on large volumes.
    """
    inferer = SlidingWindowInferer(roi_size=list(roi_size), overlap=WINDOW_OVERLAP, mode="gaussian")
    return inferer(sources, lambda x: predict(network, x, amp))  # type: ignore[return-value]


def _regression_loss(
    network: torch.nn.Module,
    batch: dict,
    target: str,
    sources: Sequence[str],
    device: torch.device,
    amp: bool,
    ssim_loss: SeparableSSIMLoss,
    ssim_weight: float,
) -> torch.Tensor:
    """L1 + ``ssim_weight`` (1 - SSIM) of ``network``'s prediction of ``target`` from ``sources`` on ``batch``."""
    pred = predict(network, _stack(batch, sources, device), amp)
    y = _stack(batch, [target], device)
    return F.l1_loss(pred, y) + ssim_weight * ssim_loss(pred, y)


def train_network(
    network: torch.nn.Module,
    loader: DataLoader,
    target: str,
    sources: Sequence[str],
    seconds: float,
    device: torch.device,
    amp: bool = False,
    learning_rate: float = 2e-3,
    ssim_weight: float = 0.2,
) -> dict[str, float]:
    """Train ``network`` (sources -> target) with L1 + ``ssim_weight`` (1 - SSIM) until ``seconds`` are spent.

    Adam with a cosine decay of the learning rate over the elapsed fraction of the budget
    (:func:`prod9_ext.engines.train_for_seconds`). ``ssim_weight`` is stage 1's default, 0.2: with an equal weight the
    SSIM term (whose luminance part punishes any nonzero value in the zero background) kept the FLAIR network near a
    constant for 150 s.

    Returns:
        ``iterations``, ``train_seconds``, ``loss_first`` and ``loss_last`` (see ``train_for_seconds``).
    """
    network.to(device)
    ssim_loss = SeparableSSIMLoss(spatial_dims=3, data_range=1.0, win_size=7)

    def loss_of(batch: dict) -> torch.Tensor:
        return _regression_loss(network, batch, target, sources, device, amp, ssim_loss, ssim_weight)

    hint = f" (bf16 autocast {amp}); rerun with --amp false"
    return train_for_seconds(network, endless(loader), loss_of, seconds, learning_rate, target, hint)


def train_multitask(
    network: torch.nn.Module,
    loader: DataLoader,
    tasks: Sequence[str],
    seconds: float,
    device: torch.device,
    amp: bool = False,
    learning_rate: float = 2e-3,
    ssim_weight: float = 0.2,
    seed: int = 0,
) -> dict[str, float]:
    """Train one network (:class:`TaskConditioned` inputs) on every task of ``tasks``, a task drawn per batch.

    The loss and schedule are :func:`train_network`'s; the whole budget goes to the one network.
    """
    network.to(device)
    ssim_loss = SeparableSSIMLoss(spatial_dims=3, data_range=1.0, win_size=7)
    draw = random.Random(seed)

    def loss_of(batch: dict) -> torch.Tensor:
        target, sources = ALL_TASKS[draw.choice(list(tasks))]
        conditioned = TaskConditioned(network, target, sources)
        return _regression_loss(conditioned, batch, target, sources, device, amp, ssim_loss, ssim_weight)

    hint = f" (bf16 autocast {amp}); rerun with --amp false"
    return train_for_seconds(network, endless(loader), loss_of, seconds, learning_rate, "multitask", hint)


def load_scoring_cases(dataset_dir: str | Path, split: str, pixdim: Sequence[float]) -> tuple[Compose, Dataset]:
    """The cases of ``split``, preprocessed whole, and the preprocessing (``Invertd`` needs the very object).

    Each case holds its ``case`` name and the four contrasts and ``seg`` as ``MetaTensor[1, *box]``: the whole
    foreground box at ``pixdim``, in RAS, with the operations that :func:`save_prediction` undoes. A case is loaded
    and preprocessed when it is read, so a split of 1 mm BraTS cases is never held in memory at once.
    """
    transform = prod9_ext.data.preprocessing("brats", MODALITIES, None, list(pixdim), train=False, seg=True)
    return transform, Dataset(list(prod9_ext.data.load_datalist("brats", dataset_dir, split)), transform)


def _mean(metric: SSIMMetric | PSNRMetric | RegionSSIMMetric) -> float | None:
    """The metric's mean over the cases (NaN items left out); None when no case gave a value."""
    value = float(metric.aggregate())
    return None if math.isnan(value) else value


def score_network(
    network: torch.nn.Module,
    cases: Sequence[dict],
    target: str,
    sources: Sequence[str],
    device: torch.device,
    roi_size: Sequence[int],
    amp: bool = False,
    clip: bool = True,
    save: tuple[Compose, str | Path] | None = None,
) -> dict[str, float | int | None]:
    """Score ``network`` on whole ``cases`` (from :func:`load_scoring_cases`) with stage 2's metrics.

    Each case is predicted by :func:`predict_whole` in windows of ``roi_size`` and scored on its whole preprocessed
    foreground box. ``ssim_tumour`` averages the SSIM map over the tumour (``seg > 0``), as
    :class:`RegionSSIMMetric` does for prod9; ``ssim_rest`` over the rest of the brain (voxels where any contrast is
    nonzero, minus the tumour). With ``save`` (the cases' preprocessing and a folder), each prediction is written by
    :func:`save_prediction` on the case's original grid.

    Returns:
        ``psnr``, ``ssim``, ``ssim_tumour``, ``ssim_rest`` (None where no case has the region) and ``cases``.
    """
    if not cases:
        raise ValueError("no case to score")
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0, win_size=7)
    tumour, rest = (RegionSSIMMetric(spatial_dims=3, data_range=1.0, win_size=7) for _ in range(2))
    network.to(device).eval()
    for case in cases:
        batch = {key: torch.as_tensor(case[key])[None] for key in (*MODALITIES, "seg")}
        with torch.no_grad():
            pred = predict_whole(network, _stack(batch, sources, device), roi_size, amp)
        if clip:
            pred = pred.clamp(0.0, 1.0)
        label = _stack(batch, [target], device)
        lesion = batch["seg"].to(device) > 0
        brain = (_stack(batch, MODALITIES, device) != 0).any(dim=1, keepdim=True)
        psnr(pred, label)
        ssim(pred, label)
        tumour(pred, torch.cat([label, lesion.float()], dim=1))
        rest(pred, torch.cat([label, (brain & ~lesion).float()], dim=1))
        if save is not None:
            save_prediction(pred[0], case, target, *save)
    return {
        "psnr": _mean(psnr),
        "ssim": _mean(ssim),
        "ssim_tumour": _mean(tumour),
        "ssim_rest": _mean(rest),
        "cases": len(cases),
    }


def save_prediction(
    image: torch.Tensor, case: dict, target: str, preprocessing: Compose, output_dir: str | Path
) -> None:
    """Write ``image`` ``[1, *box]`` (a prediction on ``case``'s preprocessed grid) on the case's original grid.

    MONAI's ``Invertd`` undoes ``preprocessing`` (the object that made ``case``) as it was applied to ``case[target]``
    (crop, resampling, orientation; bilinear), and :class:`prod9_ext.engines.SaveSynthesisd` writes
    ``<output_dir>/<case>_<target>_synth.nii.gz`` atomically with the target file's affine: the layout of prod9's
    inference.
    """
    item = {"pred": MetaTensor(image.detach().cpu()), target: case[target], "case": case["case"]}
    Compose(
        [
            Invertd("pred", preprocessing, orig_keys=target, nearest_interp=False, to_tensor=True),
            SaveSynthesisd("pred", output_dir, target),
        ]
    )(item)


def main(
    dataset_dir: str,
    output_dir: str,
    seconds: float = 780.0,
    split: str = "validation",
    pixdim: Sequence[float] = (3.0, 3.0, 3.0),
    roi_size: Sequence[int] = (48, 64, 48),
    features: Sequence[int] = DEFAULT_FEATURES,
    batch_size: int = 2,
    learning_rate: float = 2e-3,
    ssim_weight: float = 0.2,
    clip: bool = True,
    seed: int = 0,
    device: str = "cpu",
    tasks: Sequence[str] = tuple(TASKS),
    amp: bool | None = None,
    design: str = "per_task",
) -> None:
    """Train the regression U-Net(s) of ``tasks`` for ``seconds`` in all, score them on ``split``, write the results.

    ``design="per_task"``: one U-Net per task, ``seconds / len(tasks)`` each. ``design="multitask"``: one U-Net for
    every task (:class:`TaskConditioned`), trained on all of them for the whole ``seconds``.

    Args:
        dataset_dir: the BraTS-layout data folder (its ``dataset.json`` lists the splits).
        output_dir: where ``metrics.json`` and the predictions (``<task>/<case>_<target>_synth.nii.gz``) go (created
            when missing).
        seconds: wall-time budget of all training together (prod9's stage 1 + stage 2 training time).
        split: the cases to score (``load_datalist``'s split name); training always uses ``"training"``.
        pixdim: voxel size in mm (the stage-1 demo's 3 mm).
        roi_size: the size of the training crops and of the windows that predict whole cases (stage 2 demo's
            ``[48, 64, 48]``).
        features: ``BasicUNet`` features (6 numbers).
        batch_size: training batch size.
        learning_rate: Adam's initial learning rate (cosine decay over the budget).
        ssim_weight: weight of the ``1 - SSIM`` term of the loss (L1's is 1).
        clip: clip predictions to [0, 1] (the intensity range of the preprocessed targets) before scoring.
        seed: seed of the initialisation, the crops and the flips.
        device: torch device.
        tasks: names from ``TASKS`` (the quickstart's, the default) or ``BRASYN_TASKS``.
        amp: bf16 autocast; None: where bf16 runs in hardware (``prod9_ext.engines.bf16_is_fast``). A non-finite
            training loss stops the run with a message naming the task and iteration.
        design: ``per_task`` or ``multitask`` (above).

    ``metrics.json`` holds ``{task: {"psnr", "ssim", "ssim_tumour", "ssim_rest", "cases", "iterations",
    "train_seconds", "loss_first", "loss_last", "design"}}``, rewritten after each task (for ``multitask`` the
    training figures are the one network's).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = [task for task in tasks if task not in ALL_TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must name some of {list(ALL_TASKS)}, got {list(tasks)}.")
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {list(DESIGNS)}, got {design!r}.")
    if seconds < 0 or batch_size < 1:
        raise ValueError(f"need seconds >= 0 and batch_size >= 1, got {seconds} and {batch_size}.")
    torch_device = torch.device(device)
    amp = bf16_is_fast(torch_device) if amp is None else amp
    out = Path(output_dir)
    set_determinism(seed=seed)
    train_transform = prod9_ext.data.preprocessing("brats", MODALITIES, list(roi_size), list(pixdim), train=True)
    train_data = CacheDataset(
        prod9_ext.data.load_datalist("brats", dataset_dir, "training"), train_transform, progress=False
    )
    loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=False)
    preprocessing, cases = load_scoring_cases(dataset_dir, split, pixdim)
    logger.info("%d training cases, %d %s cases, bf16 autocast %s", len(train_data), len(cases), split, amp)
    results: dict[str, dict] = {}
    shared: tuple[torch.nn.Module, dict[str, float]] | None = None
    if design == "multitask":
        torch.manual_seed(seed)
        network = build_network(3 * len(MODALITIES), features)
        args = (learning_rate, ssim_weight, seed)
        shared = network, train_multitask(network, loader, tasks, seconds, torch_device, amp, *args)
    for task in tasks:
        target, sources = ALL_TASKS[task]
        if shared is None:
            torch.manual_seed(seed)
            network = build_network(len(sources), features)
            training = train_network(
                network, loader, target, sources, seconds / len(tasks), torch_device, amp, learning_rate, ssim_weight
            )
        else:
            network, training = TaskConditioned(shared[0], target, sources), shared[1]
        scores = score_network(
            network, cases, target, sources, torch_device, roi_size, amp, clip, (preprocessing, out / task)
        )
        results[task] = {**scores, **training, "design": design}
        logger.info("%s: %s", task, json.dumps(results[task]))
        atomic_write_text(out / "metrics.json", json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
