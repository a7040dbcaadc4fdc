"""Pre-encoding for stage 2: every case tokenized once by stage 1, cached on disk, reused by later runs.

Each case is preprocessed once (no random crop: the whole foreground box, zero-padded to at least the stage-2
ROI), all its modalities from the same crop, and encoded through the sliding-window tokenizer into *quantized*
token grids. The cache lives in ``<cache_dir>/<fingerprint>/<case>.npz``; the fingerprint hashes the stage-1
weights with the settings that make the tokens, so a new stage-1 model (or another pixdim, ROI, modality list)
writes a new folder instead of reusing stale tokens, and a stage-2 change reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prod9_ext.engines.atomic_outputs import atomic_save_npz
from prod9_ext.engines.stage1_link import Stage1Tokenizer

__all__ = ["pretokenize"]

logger = logging.getLogger(__name__)


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
        M = ``len(image_keys)``) and ``label`` when the case has one (MedMNIST class).
    """
    recipe = json.dumps({"keys": list(image_keys), "amp": amp, **(settings or {})}, sort_keys=True, default=str)
    folder = Path(cache_dir) / f"{tokenizer.fingerprint}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    entries, encoded = [], 0
    for index, item in enumerate(datalist):
        name = _case_name(dict(item), index, name_prefix)
        path = folder / f"{name}.npz"
        if not path.is_file():
            data = preprocessing(dict(item))
            images = torch.stack([torch.as_tensor(data[key]).float() for key in image_keys]).to(device)
            with torch.autocast(device.type, enabled=amp, dtype=torch.bfloat16):
                indices = tokenizer.wrapper.encode_to_indices(images)  # [M, h, w, d]
            dtype = np.int16 if tokenizer.codebook_size <= 1 << 15 else np.int32
            arrays: dict[str, np.ndarray] = {"tokens": indices.cpu().numpy().astype(dtype)}
            if "label" in data:
                arrays["label"] = np.asarray(data["label"]).reshape(-1)[:1].astype(np.int64)
            atomic_save_npz(path, arrays)
            encoded += 1
        with np.load(path) as cached:
            entry: dict[str, Any] = {"case": name, "tokens": cached["tokens"]}
            if "label" in cached:
                entry["label"] = int(cached["label"][0])
        entries.append(entry)
    logger.info("Token cache %s: %d cases encoded now, %d reused.", folder, encoded, len(entries) - encoded)
    return entries
