"""What users of MONAI bundles expect of a training run: device errors before anything runs, the learning rates in
TensorBoard and the log, early stopping that a resumed run continues."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from monai.optimizers import WarmupCosineSchedule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prod9_ext.engines.error_summary import SUMMARY_PREFIX
from tests.integration.conftest import (
    AUTOENCODER_BUNDLE,
    TINY_AUTOENCODER,
    TINY_TRANSFORMER,
    TRANSFORMER_BUNDLE,
    Stage1Run,
    last_error_line,
    run_bundle,
)

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _outputs(root: Path, bundle: Path = AUTOENCODER_BUNDLE) -> list[str]:
    folders = ["--ckpt_dir", str(root / "models"), "--output_dir", str(root / "eval")]
    return folders + (["--cache_dir", str(root / "cache")] if bundle == TRANSFORMER_BUNDLE else [])


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """``{step: value}`` of ``tag`` in every TensorBoard event file under ``log_dir``."""
    values: dict[int, float] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({event.step: event.value for event in events.Scalars(tag)})
    return values


def stage2_rates(epochs: int, per_epoch: int = 2, warmup: int = 2, lr: float = 3e-4) -> dict[int, float]:
    """``{epoch: learning rate of its last iteration}`` of stage 2's ``WarmupCosineSchedule`` (TINY_TRANSFORMER)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=epochs * per_epoch)
    rates = []
    for _ in range(epochs * per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return {epoch: rates[epoch * per_epoch - 1] for epoch in range(1, epochs + 1)}


def _epochs_run(log: str) -> int:
    return max(int(n) for n in re.findall(r"Epoch\[(\d+)\] Complete", log))


@pytest.mark.parametrize(
    ("bundle", "config", "device", "message"),
    [
        (AUTOENCODER_BUNDLE, "train.json", "gpu", "device 'gpu' is not a device torch knows; use cpu, cuda, cuda:N"),
        pytest.param(AUTOENCODER_BUNDLE, "inference.json", "cuda:0", "device 'cuda:0' asks for CUDA", marks=NO_CUDA),
        pytest.param(TRANSFORMER_BUNDLE, "train.json", "cuda:1", "device 'cuda:1' asks for CUDA", marks=NO_CUDA),
        (TRANSFORMER_BUNDLE, "inference.json", "cpu:x", "device 'cpu:x' is not a device torch knows"),
    ],
    ids=["autoencoder-train", "autoencoder-inference", "transformer-train", "transformer-inference"],
)
def test_device_torch_cannot_use_is_one_line_before_anything_runs(
    tmp_path: Path, bundle: Path, config: str, device: str, message: str
) -> None:
    result = run_bundle(bundle, [config], *_outputs(tmp_path, bundle), "--device", device, expect_failure=True)
    assert last_error_line(result).startswith(f"{SUMMARY_PREFIX}ValueError: {message}"), result.stderr[-3000:]
    assert not list(tmp_path.iterdir())  # no folder made, no model loaded, no data read


@pytest.fixture(scope="module")
def stopped_early(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Tiny stage 1, at most 4 epochs, stopped when val_ssim has not improved by 1 (never) for 1 validation."""
    root = tmp_path_factory.mktemp("early_stop")
    result = run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json"],
        *TINY_AUTOENCODER,
        *_outputs(root),
        "--dataset_dir", str(phantom_dir),
        "--max_epochs", "4",
        "--val_interval", "1",
        "--early_stop_patience", "1",
        "--train#early_stop#min_delta", "1.0",
    )  # fmt: skip
    return root, result.stdout + result.stderr


def test_stage1_stops_when_the_key_metric_stalls(stopped_early: tuple[Path, str]) -> None:
    root, log = stopped_early
    assert "EarlyStopping: Stop training" in log
    assert _epochs_run(log) == 2  # validation 1 sets the best score, validation 2 does not beat it by 1
    assert sorted(p.name for p in (root / "models").iterdir()) == ["checkpoint_epoch=2.pt", "model.pt"]
    checkpoint = torch.load(root / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert checkpoint["early_stop"]["counter"] == 1


def test_stage1_learning_rates_in_tensorboard_and_log(stopped_early: tuple[Path, str]) -> None:
    root, log = stopped_early
    generator = tensorboard_scalars(root / "eval", "learning_rate")
    discriminator = tensorboard_scalars(root / "eval", "d_learning_rate")
    # once per epoch, the rate of its last iteration (2 per epoch); warm-up over all 8 iterations (100 > 8)
    assert generator == pytest.approx({1: 1e-4 / 8, 2: 3e-4 / 8})
    assert discriminator == pytest.approx({1: 1e-4, 2: 1e-4})  # no schedule
    logged = re.findall(r"State values: learning_rate: ([\d.e-]+) d_learning_rate: ([\d.e-]+)", log)
    assert [float(rate) for pair in logged for rate in pair] == pytest.approx([1e-4 / 8, 1e-4, 3e-4 / 8, 1e-4])


@pytest.mark.slow  # a third stage-1 run
def test_resumed_run_keeps_the_early_stop_count(stopped_early: tuple[Path, str], phantom_dir: Path) -> None:
    """The stopped run resumed: its count (1 validation without improvement) goes on, so epoch 3 stops it again;
    a fresh count would set a new best at epoch 3 and run to epoch 4."""
    root, _ = stopped_early
    result = run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json"],
        *TINY_AUTOENCODER,
        *_outputs(root),
        "--dataset_dir", str(phantom_dir),
        "--max_epochs", "4",
        "--val_interval", "1",
        "--early_stop_patience", "1",
        "--train#early_stop#min_delta", "1.0",
        "--resume", "true",
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "EarlyStopping: Stop training" in log
    assert _epochs_run(log) == 3
    assert sorted(p.name for p in (root / "models").iterdir()) == ["checkpoint_epoch=3.pt", "model.pt"]
    checkpoint = torch.load(root / "models" / "checkpoint_epoch=3.pt", map_location="cpu", weights_only=False)
    assert checkpoint["early_stop"]["counter"] == 2


@pytest.mark.slow  # a stage-2 run beside the one test_maskgit_bundle makes (its learning rate is tested there)
def test_stage2_stops_early_and_logs_its_learning_rate(
    stage1_run: Stage1Run, phantom_dir: Path, tmp_path: Path
) -> None:
    result = run_bundle(
        TRANSFORMER_BUNDLE,
        ["train.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER,
        *_outputs(tmp_path, TRANSFORMER_BUNDLE),
        "--max_epochs", "3",
        "--val_interval", "1",
        "--early_stop_patience", "1",
        "--train#early_stop#min_delta", "1.0",
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "EarlyStopping: Stop training" in log and _epochs_run(log) == 2
    rates = stage2_rates(epochs=3)  # the schedule spans max_epochs, the run stops after 2
    assert tensorboard_scalars(tmp_path / "eval", "learning_rate") == pytest.approx({1: rates[1], 2: rates[2]})
