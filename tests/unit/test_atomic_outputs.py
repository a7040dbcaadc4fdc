"""Outputs are written to a temporary name and renamed: an interrupted write leaves the previous file intact."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import SaveImage

from prod9_ext.atomic import atomic_write_text
from prod9_ext.engines import AtomicMetricsSaver, AtomicNibabelWriter


def test_atomic_write_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "record.json"
    atomic_write_text(path, "first")
    assert path.read_text() == "first"

    def half_written(self: Path, text: str) -> None:
        with open(self, "w") as file:
            file.write(text[:2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_written)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "second")
    assert path.read_text() == "first"
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


def _save(tmp_path: Path, value: float) -> None:
    image = MetaTensor(torch.full((1, 6, 5, 4), value), meta={"filename_or_obj": "case.nii.gz"})
    SaveImage(output_dir=tmp_path, output_postfix="recon", separate_folder=False, writer=AtomicNibabelWriter)(image)


def test_atomic_nibabel_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, 1.0)
    path = tmp_path / "case_recon.nii.gz"
    assert np.all(np.asarray(nib.load(path).dataobj) == 1.0)

    def dies_half_way(image, filename):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2.0)
    monkeypatch.undo()
    assert np.all(np.asarray(nib.load(path).dataobj) == 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["case_recon.nii.gz"]


def _evaluate(saver: AtomicMetricsSaver, score: float) -> None:
    engine = Engine(lambda engine, batch: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_ssim=score))
    saver.attach(engine)  # after the metric, as MONAI's metric handlers come before the saver
    engine.run([0], max_epochs=1)


def test_atomic_metrics_saver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _evaluate(AtomicMetricsSaver(save_dir=str(tmp_path), metrics="*"), 0.5)
    assert (tmp_path / "metrics.csv").read_text().split() == ["val_ssim,0.5"]

    def dies_half_way(save_dir, **kwargs):
        (Path(save_dir) / "metrics.csv").write_text("val_ss")
        raise KeyboardInterrupt

    monkeypatch.setattr("monai.handlers.metrics_saver.write_metrics_reports", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(AtomicMetricsSaver(save_dir=str(tmp_path), metrics="*"), 0.9)
    assert (tmp_path / "metrics.csv").read_text().split() == ["val_ssim,0.5"]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no staging folder left behind
