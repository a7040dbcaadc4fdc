"""Stage 2's tokenizer: the stage-1 bundle's window, with ``sw_batch_size``, ``overlap`` and ``mode`` from stage 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from prod9_ext import AutoencoderFSQ
from prod9_ext.engines import load_stage1_tokenizer

REPO = Path(__file__).resolve().parents[2]
AUTOENCODER_BUNDLE = REPO / "bundles" / "autoencoder_fsq"
TRANSFORMER_BUNDLE = REPO / "bundles" / "maskgit_transformer"
TINY = {
    "roi_size": [16, 16, 16],
    "sw_overlap": 0.25,
    "network_def#num_channels": [8, 8],
    "network_def#num_res_blocks": [1, 1],
    "network_def#attention_levels": [False, False],
    "network_def#norm_num_groups": 4,
}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """``(autoencoder_config, weights)`` of an untrained tiny stage-1 network."""
    folder = tmp_path_factory.mktemp("stage1")
    overlay = folder / "tiny.json"
    overlay.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    network = AutoencoderFSQ(
        num_channels=(8, 8), num_res_blocks=(1, 1), attention_levels=(False, False), norm_num_groups=4
    )
    torch.save(network.state_dict(), folder / "model.pt")
    return ["train.json", str(overlay)], folder / "model.pt"


def test_window_defaults_to_the_stage1_config(stage1: tuple[list[str], Path]) -> None:
    config, weights = stage1
    tokenizer = load_stage1_tokenizer(AUTOENCODER_BUNDLE, weights, config)
    window = tokenizer.wrapper.config
    assert (window.roi_size, window.overlap, window.sw_batch_size, window.mode) == ((16, 16, 16), 0.25, 1, "gaussian")
    same = load_stage1_tokenizer(AUTOENCODER_BUNDLE, weights, config, overlap=0.25, sw_batch_size=4)
    assert same.fingerprint == tokenizer.fingerprint  # the same tokens: the same token cache


def test_overlap_and_mode_change_the_window_and_the_fingerprint(stage1: tuple[list[str], Path]) -> None:
    config, weights = stage1
    default = load_stage1_tokenizer(AUTOENCODER_BUNDLE, weights, config).fingerprint
    tokenizer = load_stage1_tokenizer(
        AUTOENCODER_BUNDLE, weights, config, sw_batch_size=3, overlap=0.5, mode="constant"
    )
    window = tokenizer.wrapper.config
    assert (window.overlap, window.sw_batch_size, window.mode) == (0.5, 3, "constant")
    overlap_only = load_stage1_tokenizer(AUTOENCODER_BUNDLE, weights, config, overlap=0.5).fingerprint
    assert len({default, overlap_only, tokenizer.fingerprint}) == 3


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"overlap": 1.0}, "sliding_window: overlap must lie in [0, 1), got 1.0."),
        ({"mode": "mean"}, "sliding_window: mode must be 'gaussian' or 'constant', got 'mean'."),
        ({"sw_batch_size": 0}, "sliding_window: sw_batch_size must be >= 1, got 0."),
    ],
)
def test_bad_window_names_the_section(stage1: tuple[list[str], Path], setting: dict, message: str) -> None:
    config, weights = stage1
    with pytest.raises(ValueError) as caught:
        load_stage1_tokenizer(AUTOENCODER_BUNDLE, weights, config, **setting)
    assert str(caught.value) == message


@pytest.mark.parametrize("config_file", ["train.json", "inference.json"])
def test_stage2_command_line_reaches_the_tokenizer(stage1: tuple[list[str], Path], config_file: str) -> None:
    """``--sliding_window#sw_batch_size 4 --sliding_window#overlap 0.5 --sliding_window#mode constant``."""
    config, weights = stage1
    parser = ConfigParser()
    parser.read_config(str(TRANSFORMER_BUNDLE / "configs" / config_file))
    overrides = {
        "bundle_root": str(TRANSFORMER_BUNDLE),
        "autoencoder_config": config,
        "autoencoder_weights": str(weights),
    }
    overrides.update({"device": "cpu", "sliding_window#sw_batch_size": 4, "sliding_window#overlap": 0.5})
    overrides["sliding_window#mode"] = "constant"
    parser.update(overrides)
    window = parser.get_parsed_content("tokenizer").wrapper.config
    assert (window.sw_batch_size, window.overlap, window.mode) == (4, 0.5, "constant")
