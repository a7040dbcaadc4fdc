"""Stage-2 training: the stage-1 tokenizer, the token cache, and the MaskGiT iteration for ``SupervisedTrainer``.

How stage 2 trains, in order:

1. :func:`load_stage1_tokenizer` builds the tokenizer from the ``autoencoder_fsq`` bundle's own config files and
   weights. The ``maskgit_transformer`` bundle never redefines the autoencoder: it reads ``network_def``,
   ``roi_size`` and ``sw_overlap`` from the same list of files (overlays included) that stage 1 was trained with.
   :func:`~prod9_ext.engines.startup.check_stage2_setup` checks at start-up that the two stages fit together.
2. :func:`pretokenize` encodes every training case once and caches the token grids on disk, with the preprocessed
   voxels beside them (the sources reach stage 2 and the source-aware decoder at voxel resolution).
3. :class:`TokenVoxelCropd` crops the same random window from both, read from memory-mapped files.
4. :class:`MaskGiTIteration` (``iteration_update``) draws a target and its sources per sample, masks the target's
   tokens and steps the transformer.

Neighbours: validation, ``evaluate.json``, ``inference.json`` and ``generate.json`` synthesise volumes with
:mod:`prod9_ext.engines.synthesis` and :mod:`~prod9_ext.engines.synthesis_io`; the masking itself is
:class:`prod9_ext.MaskGiTScheduler`.

Token cache
-----------
Each case is preprocessed once (no random crop: the whole foreground box, zero-padded to at least the stage-2
ROI), all its modalities from the same crop, and encoded through the sliding-window tokenizer into *quantized*
token grids. The cache lives in ``<cache_dir>/<fingerprint>/<case>.npz``; the fingerprint hashes the stage-1
weights with the settings that make the tokens, so a new stage-1 model (or another pixdim, ROI, modality list)
writes a new folder instead of reusing stale tokens, and a stage-2 change reuses them. Beside each case's tokens,
``<case>.voxels.npy`` holds its preprocessed images (float16, ``[M, h*f, w*f, d*f]``, zero-padded to the token grid);
training memory-maps it, so a split of any size stays on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.transforms import MapTransform, Randomizable
from monai.utils import CommonKeys as Keys

from prod9_ext.atomic import atomic_output, atomic_save_npz
from prod9_ext.autoencoder import AutoencoderFSQ
from prod9_ext.data.brats import check_modalities, modality_id
from prod9_ext.engines.checkpoints import load_network_weights
from prod9_ext.maskgit import MaskGiTScheduler
from prod9_ext.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig

__all__ = [
    "MaskGiTIteration",
    "Stage1Tokenizer",
    "TokenVoxelCropd",
    "load_stage1_tokenizer",
    "modality_ids",
    "num_classes",
    "pretokenize",
]

logger = logging.getLogger(__name__)


@dataclass
class Stage1Tokenizer:
    """A trained stage-1 autoencoder behind the sliding-window wrapper, and what identifies its tokens.

    Attributes:
        wrapper: encodes any volume to a token grid and decodes token grids (``AutoencoderInferenceWrapper``).
        codebook_size: number of codes, the stage-2 vocabulary.
        downsampling_factor: image voxels per token along each axis.
        fingerprint: hash of the weights file and of the settings that make the tokens (network, window, overlap,
            blending mode);
            two tokenizers with the same fingerprint produce the same tokens.
        weights: path of the weights file.
        pixdim: the voxel size (mm) stage 1 was trained at, or None when it kept the files' voxel size; stage 2
            preprocesses at the same voxel size, so its tokens mean what they meant to the autoencoder.
    """

    wrapper: AutoencoderInferenceWrapper
    codebook_size: int
    downsampling_factor: int
    fingerprint: str
    weights: str
    pixdim: list[float] | None

    @property
    def fsq_levels(self) -> list[int]:
        """The FSQ levels of the tokens (``prod(fsq_levels) == codebook_size``)."""
        return [int(n) for n in self.wrapper.autoencoder.quantizer.levels]

    def grid_shape(self, roi_size: Sequence[int]) -> tuple[int, ...]:
        """Token grid of an image of ``roi_size`` voxels."""
        return self.wrapper.grid_shape(roi_size)


def _config_files(autoencoder_bundle: Path, autoencoder_config: str | Sequence[str]) -> list[str]:
    names = [autoencoder_config] if isinstance(autoencoder_config, str) else list(autoencoder_config)
    files = [Path(name) if os.path.isabs(name) else autoencoder_bundle / "configs" / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"autoencoder_config: no such stage-1 config file: {', '.join(missing)}")
    return [str(f) for f in files]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_stage1_tokenizer(
    autoencoder_bundle: str | os.PathLike,
    autoencoder_weights: str | os.PathLike,
    autoencoder_config: str | Sequence[str] = "train.json",
    device: str | torch.device = "cpu",
    sw_batch_size: int = 1,
    overlap: float | None = None,
    mode: str = "gaussian",
) -> Stage1Tokenizer:
    """Build the stage-1 tokenizer from the autoencoder bundle's config files and load its weights.

    Args:
        autoencoder_bundle: the ``autoencoder_fsq`` bundle folder.
        autoencoder_weights: its trained weights (``models/model.pt``: a state dict, or ``{"model": state dict}``).
        autoencoder_config: config file name(s) under ``<autoencoder_bundle>/configs`` (or absolute paths), merged
            in order as ``monai.bundle run`` merges them: pass the list stage 1 was trained with, e.g.
            ``["train.json", "demo.json"]``.
        device: where the autoencoder runs.
        sw_batch_size: windows per network call (memory against speed; the tokens stay the same).
        overlap: fraction of a window shared with its neighbour; None: the stage-1 config's ``sw_overlap``.
        mode: blending of overlapping windows, ``"gaussian"`` or ``"constant"``.

    A stage-2 bundle passes its ``sliding_window`` section (``--sliding_window#sw_batch_size 4``). ``overlap`` and
    ``mode`` change the tokens, so they are part of the :attr:`Stage1Tokenizer.fingerprint` that names the token cache.

    Raises:
        FileNotFoundError: naming the missing bundle folder, config file or weights file.
        ValueError: naming the weights file when it does not fit the network the config describes.
    """
    bundle = Path(autoencoder_bundle)
    if not bundle.is_dir():
        raise FileNotFoundError(f"autoencoder_bundle: no such folder {bundle}")
    parser = ConfigParser()
    config_files = _config_files(bundle, autoencoder_config)
    parser.read_config(config_files)
    network_def = parser.get("network_def")
    roi_size = [int(n) for n in parser.get_parsed_content("roi_size")]
    overlap = float(parser.get_parsed_content("sw_overlap") if overlap is None else overlap)
    try:
        config = SlidingWindowConfig(roi_size=roi_size, overlap=overlap, sw_batch_size=sw_batch_size, mode=mode)
    except ValueError as err:
        raise ValueError(f"sliding_window: {err}") from None
    pixdim = parser.get_parsed_content("pixdim", default=None)
    autoencoder = parser.get_parsed_content("network_def", instantiate=True)
    if not isinstance(autoencoder, AutoencoderFSQ):
        built = type(autoencoder).__name__
        raise ValueError(f"autoencoder_bundle {bundle}: network_def builds {built}, not AutoencoderFSQ")

    weights = Path(autoencoder_weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"autoencoder_weights: no such file {weights}; train stage 1 first (bundles/autoencoder_fsq, train.json)"
        )
    try:
        load_network_weights(weights, autoencoder, "cpu")
    except ValueError as err:
        raise ValueError(
            f"autoencoder_weights {weights} do not fit network_def of {', '.join(config_files)} (pass the config "
            f"files stage 1 was trained with as autoencoder_config): {err}"
        ) from None
    autoencoder = autoencoder.to(device).eval().requires_grad_(False)

    window = {"roi_size": roi_size, "overlap": overlap}
    if mode != "gaussian":  # the default stays out of the fingerprint: token caches made before the option stay valid
        window["mode"] = mode
    settings = json.dumps({"network_def": network_def, **window}, sort_keys=True)
    fingerprint = hashlib.sha256((_file_sha256(weights) + settings).encode()).hexdigest()[:16]
    return Stage1Tokenizer(
        wrapper=AutoencoderInferenceWrapper(autoencoder, config),
        codebook_size=autoencoder.codebook_size,
        downsampling_factor=autoencoder.downsampling_factor,
        fingerprint=fingerprint,
        weights=str(weights),
        pixdim=None if pixdim is None else [float(p) for p in pixdim],
    )


def _case_name(item: dict, index: int, prefix: str) -> str:
    name = item.get("case")
    return str(name) if name is not None else f"{prefix}{index:05d}"


@torch.no_grad()
def pretokenize(
    datalist: Sequence[dict],
    preprocessing: Callable[[dict], dict],
    tokenizer: Stage1Tokenizer,
    image_keys: Sequence[str],
    cache_dir: str | os.PathLike,
    settings: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
    name_prefix: str = "item",
) -> list[dict[str, Any]]:
    """Token grids of every case, from the cache when present, else encoded now and cached.

    Args:
        datalist: the cases (``load_datalist`` entries; BraTS entries are named by their ``case`` key, others by
            ``name_prefix`` and their position).
        preprocessing: the evaluation preprocessing (deterministic), ending with a pad to at least the stage-2 ROI.
        tokenizer: the stage-1 tokenizer.
        image_keys: the images of a case, stacked in this order (BraTS modalities, or ``["image"]``).
        cache_dir: root of the cache.
        settings: everything else that changes the tokens (pixdim, ROI, data set...), part of the fingerprint.
        device, amp: where and how the autoencoder runs (bf16 autocast with ``amp``; part of the fingerprint).
        name_prefix: names of cases without a ``case`` key.

    Returns:
        One dict per case: ``case`` (name), ``tokens`` (``int16 [M, h, w, d]``, int32 above 32768 codes;
        M = ``len(image_keys)``), ``voxels`` (the preprocessed images, ``float16 [M, h*f, w*f, d*f]``, memory-mapped)
        and ``label`` when the case has one (MedMNIST class).
    """
    recipe = json.dumps({"keys": list(image_keys), "amp": amp, **(settings or {})}, sort_keys=True, default=str)
    folder = Path(cache_dir) / f"{tokenizer.fingerprint}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    entries, encoded = [], 0
    for index, item in enumerate(datalist):
        name = _case_name(dict(item), index, name_prefix)
        path, voxel_path = folder / f"{name}.npz", folder / f"{name}.voxels.npy"
        if not path.is_file() or not voxel_path.is_file():
            data = preprocessing(dict(item))
            images = torch.stack([torch.as_tensor(data[key]).float() for key in image_keys]).to(device)
            if not path.is_file():
                with torch.autocast(device.type, enabled=amp, dtype=torch.bfloat16):
                    indices = tokenizer.wrapper.encode_to_indices(images)  # [M, h, w, d]
                dtype = np.int16 if tokenizer.codebook_size <= 1 << 15 else np.int32
                arrays: dict[str, np.ndarray] = {"tokens": indices.cpu().numpy().astype(dtype)}
                if "label" in data:
                    arrays["label"] = np.asarray(data["label"]).reshape(-1)[:1].astype(np.int64)
                atomic_save_npz(path, arrays)
                encoded += 1
            padding = [(0, 0)] + [
                (0, n * tokenizer.downsampling_factor - s)
                for n, s in zip(tokenizer.grid_shape(images.shape[2:]), images.shape[2:], strict=True)
            ]
            voxels = np.pad(images[:, 0].cpu().numpy().astype(np.float16), padding)
            with atomic_output(voxel_path) as temporary, open(temporary, "wb") as file:
                np.save(file, voxels)
        with np.load(path) as cached:
            entry: dict[str, Any] = {"case": name, "tokens": cached["tokens"]}
            if "label" in cached:
                entry["label"] = int(cached["label"][0])
        entry["voxels"] = np.load(voxel_path, mmap_mode="r")
        entries.append(entry)
    logger.info("Token cache %s: %d cases encoded now, %d reused.", folder, encoded, len(entries) - encoded)
    return entries


class TokenVoxelCropd(Randomizable, MapTransform):
    """The same random window of a case's token grids and of its voxels: ``tokens`` ``[M, h, w, d]`` cropped to
    ``roi_size`` tokens, ``voxels`` ``[M, h*f, w*f, d*f]`` to the ``factor`` times larger box at the same place.

    The voxels may be a memory-mapped array (the token cache's): only the window is read, as float32.

    Args:
        roi_size: the window, in tokens (the stage-2 ``latent_shape``).
        factor: voxels per token along each axis (stage 1's downsampling factor).
        tokens_key, voxels_key: the keys of the two arrays.
    """

    def __init__(
        self, roi_size: Sequence[int], factor: int, tokens_key: str = "tokens", voxels_key: str = "voxels"
    ) -> None:
        MapTransform.__init__(self, [tokens_key, voxels_key])
        self.roi_size = [int(n) for n in roi_size]
        self.factor = int(factor)
        self.tokens_key, self.voxels_key = tokens_key, voxels_key
        self._start: list[int] = []

    def randomize(self, grid: Sequence[int]) -> None:
        self._start = [int(self.R.randint(0, n - r + 1)) for n, r in zip(grid, self.roi_size, strict=True)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        tokens, voxels = d[self.tokens_key], d[self.voxels_key]
        grid = tuple(tokens.shape[1:])
        if tuple(voxels.shape[1:]) != tuple(n * self.factor for n in grid):
            raise ValueError(
                f"voxels {tuple(voxels.shape)} do not cover tokens {tuple(tokens.shape)} at factor {self.factor}"
            )
        if any(n < r for n, r in zip(grid, self.roi_size, strict=True)):
            raise ValueError(f"token grid {list(grid)} is smaller than the crop {self.roi_size}")
        self.randomize(grid)
        token_box = tuple(slice(s, s + r) for s, r in zip(self._start, self.roi_size, strict=True))
        voxel_box = tuple(
            slice(s * self.factor, (s + r) * self.factor) for s, r in zip(self._start, self.roi_size, strict=True)
        )
        d[self.tokens_key] = torch.as_tensor(np.ascontiguousarray(tokens[(slice(None), *token_box)]))
        # np.array copies: a float32 memory map would otherwise come back as a view of the read-only file.
        d[self.voxels_key] = torch.from_numpy(np.array(voxels[(slice(None), *voxel_box)], dtype=np.float32))
        return d


def num_classes(dataset: str, medmnist_flag: str) -> int:
    """Class labels stage 2 conditions on: none for BraTS, the MedMNIST 3D set's labels otherwise."""
    if dataset == "brats":
        return 0
    import medmnist

    if medmnist_flag not in medmnist.INFO:
        raise ValueError(f"medmnist_flag {medmnist_flag!r} is not a MedMNIST data set")
    return len(medmnist.INFO[medmnist_flag]["label"])


def modality_ids(dataset: str, modalities: Sequence[str]) -> list[int]:
    """Stage-2 modality id of each image slot: the BraTS order T1, T1ce, T2, FLAIR, or ``[0]`` for MedMNIST 3D."""
    if dataset != "brats":
        return [0]
    return [modality_id(m, "modalities") for m in check_modalities(modalities)]


class MaskGiTIteration:
    """``iteration_update`` of the stage-2 trainer.

    The batch holds ``tokens`` ``[B, M, h, w, d]`` (one token grid per image slot, all from the same crop),
    ``voxels`` ``[B, M, h*f, w*f, d*f]`` (the same crop's images: the sources the model reads) and, for
    class-conditional data, ``label``. Per sample, one slot is drawn as the target (among
    ``target_modalities``); the other slots are its sources, each dropped independently by the scheduler, so
    every subset of sources is trained; the target's tokens are masked through the schedule and the loss is the
    cross-entropy on masked tokens. With probability ``cond_drop_prob`` a sample also loses its sources and class
    (the "no condition" state of classifier-free guidance). Gradients are clipped to ``max_grad_norm``.

    Args:
        scheduler: masking, condition dropping and loss.
        slot_modalities: the modality id of each slot (``modality_ids``).
        target_modalities: the ids that may be drawn as targets; default: every slot.
        max_grad_norm: gradient clipping (0: off).
    """

    def __init__(
        self,
        scheduler: MaskGiTScheduler,
        slot_modalities: Sequence[int],
        target_modalities: Sequence[int] | None = None,
        max_grad_norm: float = 1.0,
    ) -> None:
        self.scheduler = scheduler
        self.slot_modalities = torch.as_tensor(list(slot_modalities), dtype=torch.long)
        targets = list(slot_modalities) if target_modalities is None else list(target_modalities)
        missing = [t for t in targets if t not in slot_modalities]
        if missing or not targets:
            raise ValueError(f"target_modalities {targets} must be a non-empty subset of {list(slot_modalities)}")
        self.target_slots = torch.as_tensor([list(slot_modalities).index(t) for t in targets], dtype=torch.long)
        self.max_grad_norm = max_grad_norm

    def conditions(
        self, tokens: torch.Tensor, voxels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Draw a target slot per sample: ``(target_tokens, target_modality, sources, source_modalities)``.

        ``tokens`` is ``Long[B, M, h, w, d]`` and ``voxels`` ``[B, M, h*f, w*f, d*f]``; the sources are all M voxel
        slots with the target's and the dropped ones marked absent (-1; the model zeroes absent slots before reading
        them), or None when there is a single slot.
        """
        b, m = tokens.shape[:2]
        device = tokens.device
        pick = torch.randint(len(self.target_slots), (b,), generator=generator, device=device)
        target_slot = self.target_slots.to(device)[pick]
        slot_modalities = self.slot_modalities.to(device)
        target_tokens = tokens[torch.arange(b, device=device), target_slot]
        if m == 1:
            return target_tokens, slot_modalities[target_slot], None, None
        source_modalities = slot_modalities.expand(b, m).clone()
        source_modalities[torch.arange(b, device=device), target_slot] = -1
        source_modalities = self.scheduler.drop_sources(source_modalities, generator=generator)
        return target_tokens, slot_modalities[target_slot], voxels, source_modalities

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        device = engine.state.device
        tokens = torch.as_tensor(batchdata["tokens"]).to(device, non_blocking=engine.non_blocking).long()
        voxels = torch.as_tensor(batchdata["voxels"]).to(device, non_blocking=engine.non_blocking).float()
        label = batchdata.get("label")
        class_label = None if label is None else torch.as_tensor(label).to(device).long().reshape(-1)
        target_tokens, target_modality, sources, source_modalities = self.conditions(tokens, voxels)
        masked, targets = self.scheduler.mask(target_tokens)
        drop = self.scheduler.drop_condition(tokens.shape[0], device=device)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device.type, enabled=engine.amp, **engine.amp_kwargs):
            logits = engine.network(masked, target_modality, sources, source_modalities, class_label, drop)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = self.scheduler.loss(logits, targets)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.unscale_(engine.optimizer)
        else:
            loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_grad_norm)
        if engine.scaler is not None:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

        is_masked = targets >= 0
        predicted = logits.detach().argmax(-1).view_as(targets)
        accuracy = (predicted == targets)[is_masked].float().mean()
        output = {Keys.LOSS: loss.detach(), "masked_accuracy": accuracy, Keys.PRED: predicted, Keys.LABEL: targets}
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output  # decollated on MODEL_COMPLETED; ignite keeps what is returned
