"""Checkpoint files are written atomically and the newest one is found for resuming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from prod9_ext.engines import AtomicCheckpointSaver, latest_checkpoint


def test_interrupted_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    network = torch.nn.Linear(2, 2)
    engine = Engine(lambda engine, batch: None)
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": network}, save_final=True)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    final = next(tmp_path.glob("*.pt"))
    before = final.read_bytes()

    def dies_half_way(obj, f, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    engine.add_event_handler(Events.COMPLETED, lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        saver.completed(engine)
    assert final.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # no temporary left behind


def test_latest_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        latest_checkpoint(tmp_path)
    for epoch in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch={epoch}.pt").write_bytes(b"")
    (tmp_path / "model.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=10.pt")


def test_superseded_interval_checkpoint_removed_only_after_new_one_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    network = torch.nn.Linear(2, 2)
    engine = Engine(lambda engine, batch: None)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    save_dict = {"network": network, "optimizer": optimizer}  # several objects: named checkpoint_epoch=N.pt
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict=save_dict, save_interval=1, n_saved=1)
    saver.attach(engine)
    engine.run([0], max_epochs=2)
    assert [p.name for p in tmp_path.glob("*.pt")] == ["checkpoint_epoch=2.pt"]

    def dies(obj, f, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    engine.state.epoch = 3
    with pytest.raises(KeyboardInterrupt):
        saver.interval_completed(engine)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_epoch=2.pt"]
