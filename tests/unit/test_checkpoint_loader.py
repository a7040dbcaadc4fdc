"""Loading the wrong checkpoint is one line naming the file and what does not fit; the right one loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from prod9_ext import AutoencoderFSQ, TransformerDecoder
from prod9_ext.engines import CheckedCheckpointLoader


def _autoencoder(num_channels: tuple[int, ...] = (8, 16), fsq_levels: tuple[int, ...] = (8, 5, 5, 5)) -> AutoencoderFSQ:
    levels = len(num_channels)
    return AutoencoderFSQ(
        num_channels=num_channels,
        num_res_blocks=(1,) * levels,
        attention_levels=(False,) * levels,
        norm_num_groups=8,
        fsq_levels=fsq_levels,
    )


def _transformer() -> TransformerDecoder:
    return TransformerDecoder(1, 32, 2, 64, vocab_size=1000, latent_shape=(4, 4, 4), num_modalities=4)


def _load(path: Path, load_dict: dict) -> None:
    engine = Engine(lambda engine, batch: None)
    CheckedCheckpointLoader(load_path=str(path), load_dict=load_dict).attach(engine)
    engine.run([0], max_epochs=1)


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def test_matching_weights_load(tmp_path: Path) -> None:
    saved = _autoencoder()
    network = _autoencoder()
    _load(_save(tmp_path / "model.pt", saved.state_dict()), {"model": network})
    for key, value in saved.state_dict().items():
        assert torch.equal(network.state_dict()[key], value)


BAD_CHECKPOINTS = [
    pytest.param(
        lambda: _autoencoder(num_channels=(8, 24)).state_dict(),
        r": does not fit 'model' \(AutoencoderFSQ\): \d+ tensors differ in shape, e.g. \S+ is \[\d+(, \d+)*\] in the "
        r"checkpoint and \[\d+(, \d+)*\] in the network",
        id="other num_channels",
    ),
    pytest.param(
        lambda: _autoencoder(num_channels=(8, 16, 16)).state_dict(),
        r": does not fit 'model' \(AutoencoderFSQ\): keys missing: 10 \(e.g. encoder\.\S+\), unexpected: 30 \(e.g. "
        r"encoder\.\S+\); the same network with other network_def settings\.$",
        id="other number of levels",
    ),
    pytest.param(
        lambda: _autoencoder(fsq_levels=(5, 5, 5)).state_dict(),
        r"tensors differ in shape, e.g. encoder\.\S+ is \[3, 16, 3, 3, 3\] in the checkpoint and \[4, 16, 3, 3, 3\]",
        id="other number of fsq_levels",
    ),
    pytest.param(
        lambda: _autoencoder(fsq_levels=(7, 5, 5, 5)).state_dict(),
        r": cannot be loaded \(checkpoint was trained with fsq_levels \[7, 5, 5, 5\], this model has \[8, 5, 5, 5\]",
        id="other fsq_levels",
    ),
    pytest.param(
        lambda: _transformer().state_dict(),
        r": does not fit 'model' \(AutoencoderFSQ\): keys missing: 57 \(under encoder, decoder, .*quantizer\), "
        r"unexpected: 27 \(under .*token_embed.*source_encoder.*\); another network's checkpoint\.$",
        id="stage-2 weights",
    ),
    pytest.param(
        lambda: {"network": _autoencoder().state_dict(), "optimizer": {}, "trainer": {"epoch": 1}},
        r"unexpected: 3 \(under network, optimizer, trainer\); another network's checkpoint\.$",
        id="a training checkpoint",
    ),
]


@pytest.mark.parametrize(("make", "message"), BAD_CHECKPOINTS)
def test_checkpoint_that_does_not_fit(tmp_path: Path, make: Callable[[], object], message: str) -> None:
    path = _save(tmp_path / "model.pt", make())
    with pytest.raises(ValueError, match=message) as caught:
        _load(path, {"model": _autoencoder()})
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.pt", _autoencoder().state_dict())
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=rf"^{path}: not a readable PyTorch checkpoint, truncated or corrupt \("):
        _load(path, {"model": _autoencoder()})


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'model.pt'}: no such checkpoint file"):
        _load(tmp_path / "model.pt", {"model": _autoencoder()})


def test_resume_checkpoint_without_an_entry(tmp_path: Path) -> None:
    network = _autoencoder()
    optimizer = torch.optim.Adam(network.parameters())
    path = _save(tmp_path / "checkpoint_epoch=1.pt", {"network": network.state_dict()})
    with pytest.raises(ValueError, match=r": has no 'optimizer' entry \(it holds network\)\.$"):
        _load(path, {"network": network, "optimizer": optimizer})
