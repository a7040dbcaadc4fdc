"""A resumed training keeps the best metric (``model.pt`` replaced only by a better model), takes over the checkpoint
it resumed from (deleted once a newer one is written) and loads checkpoints made before an entry was added."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler

from prod9_ext.engines import AtomicCheckpointSaver, BestMetricState, CheckedCheckpointLoader, latest_checkpoint

BATCH = [{"image": torch.zeros(1, 1), "label": torch.zeros(1, 1)}]


class ScriptedScore(Metric):
    """A key metric whose value at each validation is the next of ``scores``."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)
        super().__init__()

    def reset(self) -> None:
        pass

    def update(self, output: object) -> None:
        pass

    def compute(self) -> float:
        return self.scores.pop(0)


def _train(
    ckpt_dir: Path, scores: list[float], max_epochs: int, resume: bool = False, with_best_metric: bool = True
) -> SupervisedEvaluator:
    """A tiny run wired as both train.json are: validation every epoch saving ``model.pt`` on a better score, an
    interval checkpoint per epoch (``n_saved`` 1), and, with ``resume``, the newest checkpoint loaded first."""
    torch.manual_seed(len(scores))
    network = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    model_saver = AtomicCheckpointSaver(
        save_dir=str(ckpt_dir), save_dict={"model": network}, save_key_metric=True, key_metric_filename="model.pt"
    )
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=BATCH,
        network=network,
        key_val_metric={"val_ssim": ScriptedScore(scores)},
        val_handlers=[model_saver],
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=BATCH,
        network=network,
        optimizer=optimizer,
        loss_function=torch.nn.MSELoss(),
        train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True)],
    )
    checkpoint = {"network": network, "optimizer": optimizer, "trainer": trainer}
    if with_best_metric:
        checkpoint["best_metric"] = BestMetricState(evaluator)
    handlers: list = [AtomicCheckpointSaver(str(ckpt_dir), checkpoint, save_interval=1, epoch_level=True, n_saved=1)]
    if resume:
        loader = CheckedCheckpointLoader(latest_checkpoint(ckpt_dir), checkpoint, optional=["best_metric"])
        handlers.insert(0, loader)
    for handler in handlers:
        handler.attach(trainer)
    trainer.run()
    return evaluator


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_resumed_run_keeps_the_best_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _train(tmp_path, [0.5, 0.8], max_epochs=2)
    best = (tmp_path / "model.pt").read_bytes()
    assert torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)["best_metric"] == {
        "best_metric": 0.8,
        "best_metric_epoch": 2,
    }

    caplog.clear()  # only the resumed run's records (another test may have left INFO logging on)
    with caplog.at_level(logging.INFO):
        evaluator = _train(tmp_path, [0.6], max_epochs=3, resume=True)
    assert (tmp_path / "model.pt").read_bytes() == best  # a worse model does not replace it
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.8, 2)
    assert "Got new best metric" not in caplog.text
    assert _names(tmp_path) == ["checkpoint_epoch=3.pt", "model.pt"]  # the one resumed from is gone

    evaluator = _train(tmp_path, [0.9], max_epochs=4, resume=True)
    assert (tmp_path / "model.pt").read_bytes() != best  # a better one does
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.9, 4)
    assert _names(tmp_path) == ["checkpoint_epoch=4.pt", "model.pt"]


def test_resumed_from_checkpoint_is_kept_when_the_next_save_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train(tmp_path, [0.5], max_epochs=1)
    before = (tmp_path / "checkpoint_epoch=1.pt").read_bytes()

    def dies(obj: object, f: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        _train(tmp_path, [0.6], max_epochs=2, resume=True)
    assert _names(tmp_path) == ["checkpoint_epoch=1.pt", "model.pt"]
    assert (tmp_path / "checkpoint_epoch=1.pt").read_bytes() == before


def test_checkpoint_without_the_new_entries_resumes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint made before ``best_metric`` (or ``early_stop``) was saved loads, with one line saying so."""
    _train(tmp_path, [0.5], max_epochs=1, with_best_metric=False)
    with caplog.at_level(logging.WARNING):
        evaluator = _train(tmp_path, [0.4], max_epochs=2, resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "entry" in r.getMessage()]
    assert warnings == [f"{tmp_path / 'checkpoint_epoch=1.pt'}: no 'best_metric' entry (a checkpoint of an earlier "
                        "version); starting afresh there."]  # fmt: skip
    assert evaluator.state.best_metric_epoch == 2 and _names(tmp_path) == ["checkpoint_epoch=2.pt", "model.pt"]


def test_optional_entries_must_be_loaded_entries() -> None:
    with pytest.raises(ValueError, match=r"optional names \['early_stop'\] that load_dict does not hold"):
        CheckedCheckpointLoader("checkpoint_epoch=1.pt", {"network": torch.nn.Linear(1, 1)}, optional=["early_stop"])
