"""VolumeSnapshot: one PNG per item, and with ``save_volumes`` the volumes themselves on the evaluation's grid."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from prod9_ext.engines import VolumeSnapshot


def test_per_item_snapshot_keeps_volumes(tmp_path: Path) -> None:
    items = [{"pred": torch.rand(1, 6, 5, 4), "label": torch.rand(1, 6, 5, 4)} for _ in range(2)]
    names = [{"filename_or_obj": "case_a"}, {"filename_or_obj": "case_b"}]
    snapshot = VolumeSnapshot(tmp_path, keys=["source", "pred", "label"], per_item=True, save_volumes=True)
    snapshot.item_names = lambda batch: names
    engine = SimpleNamespace(state=SimpleNamespace(output=items, batch={}, epoch=1))
    snapshot(engine)  # type: ignore[arg-type]
    for name, item in zip(("case_a", "case_b"), items, strict=True):
        assert (tmp_path / f"{name}.png").is_file()
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}_pred.npy"), item["pred"].numpy())
        assert not (tmp_path / f"{name}_source.npy").exists()  # a key the item lacks is skipped
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_volumes_are_not_kept_by_default(tmp_path: Path) -> None:
    snapshot = VolumeSnapshot(tmp_path, keys=["pred"], per_item=True)
    engine = SimpleNamespace(state=SimpleNamespace(output=[{"pred": torch.rand(4, 4, 4)}], batch={}, epoch=1))
    snapshot(engine)  # type: ignore[arg-type]
    assert list(tmp_path.glob("*.npy")) == []
