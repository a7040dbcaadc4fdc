"""The link from stage 2 to stage 1: the tokenizer built from the autoencoder bundle's own config and weights.

The ``maskgit_transformer`` bundle never redefines the autoencoder. It reads ``network_def``, ``roi_size`` and
``sw_overlap`` from the ``autoencoder_fsq`` bundle's config files (the same list of files, overlays included, that
stage 1 was trained with), loads the weights, and checks at start-up that the two stages fit together.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from prod9_ext.autoencoder import AutoencoderFSQ
from prod9_ext.data.brats import MODALITIES
from prod9_ext.engines.checkpoints import load_network_weights
from prod9_ext.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig

__all__ = ["Stage1Tokenizer", "check_stage2_setup", "load_stage1_tokenizer"]


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


def check_stage2_setup(
    tokenizer: Stage1Tokenizer,
    vocab_size: int,
    latent_shape: Sequence[int],
    roi_size: Sequence[int],
    modalities: Sequence[str],
    dataset: str = "brats",
) -> None:
    """Start-up checks that stage 2 fits its tokenizer; each failure is one line naming the key at fault.

    Raises:
        ValueError: ``vocab_size`` is not the tokenizer's codebook size, ``roi_size`` is not a multiple of the
            downsampling factor or its token grid is not ``latent_shape``, or ``modalities`` names an unknown one.
    """
    if vocab_size != tokenizer.codebook_size:
        raise ValueError(
            f"network_def#vocab_size {vocab_size} differs from the stage-1 codebook size {tokenizer.codebook_size} "
            f"({tokenizer.weights})"
        )
    factor = tokenizer.downsampling_factor
    if any(int(n) % factor for n in roi_size):
        raise ValueError(f"roi_size {list(roi_size)} must be a multiple of the stage-1 downsampling factor {factor}")
    grid = [int(n) // factor for n in roi_size]
    if grid != [int(n) for n in latent_shape]:
        raise ValueError(
            f"roi_size {list(roi_size)} / {factor} = token grid {grid} differs from network_def#latent_shape "
            f"{list(latent_shape)}"
        )
    if dataset == "brats":
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(f"modalities {list(modalities)}: each must be one of {list(MODALITIES)}")
