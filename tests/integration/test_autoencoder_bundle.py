"""The autoencoder_fsq bundle through its real command line: train, resume, properties."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AUTOENCODER_BUNDLE, REPO, TINY_AUTOENCODER, last_error_line, run_bundle
from monai.bundle import ConfigWorkflow

from prod9_ext import AutoencoderFSQ
from prod9_ext.engines import latest_checkpoint


def _outputs(tmp_path: Path) -> list[str]:
    return ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]


def _epoch_metrics(log: str) -> dict[int, dict[str, float]]:
    found = {}
    for epoch, metrics in re.findall(r"Epoch\[(\d+)\] Metrics -- (.*)", log):
        found[int(epoch)] = {k: float(v) for k, v in re.findall(r"(\w+): ([-\d.naif]+)", metrics)}
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, phantom_dir: Path) -> tuple[Path, str]:
    """Two epochs of tiny stage-1 training on the phantoms, validating after each."""
    out = tmp_path_factory.mktemp("autoencoder_run")
    result = run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json"],
        *TINY_AUTOENCODER,
        *_outputs(out),
        "--dataset_dir", str(phantom_dir),
        "--max_epochs", "2",
        "--val_interval", "1",
    )  # fmt: skip
    return out, result.stdout + result.stderr


def test_train_writes_model_checkpoint_metrics_and_pictures(trained: tuple[Path, str]) -> None:
    out, log = trained
    assert (out / "models" / "model.pt").is_file()
    assert (out / "models" / "checkpoint_epoch=2.pt").is_file()
    assert not (out / "models" / "checkpoint_epoch=1.pt").exists()  # n_saved=1: only the newest is kept
    assert sorted(p.name for p in (out / "eval").glob("reconstruction_epoch*.png")) == [
        "reconstruction_epoch1.png",
        "reconstruction_epoch2.png",
    ]
    assert list((out / "eval").glob("events.out.tfevents*"))
    metrics = _epoch_metrics(log)
    assert set(metrics) == {1, 2}
    for values in metrics.values():
        assert {"val_ssim", "val_psnr", "val_codebook_usage", "val_codebook_perplexity"} <= set(values)
        assert 0 < values["val_codebook_usage"] <= 1
        assert 1 <= values["val_codebook_perplexity"] <= 1000


def test_model_pt_is_a_plain_state_dict_of_the_network(trained: tuple[Path, str]) -> None:
    out, _ = trained
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    model = AutoencoderFSQ(num_channels=(8, 16, 16), num_res_blocks=(1, 1, 1), norm_num_groups=8)
    model.load_state_dict(state)
    checkpoint = torch.load(out / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert {"network", "optimizer", "discriminator", "d_optimizer", "trainer"} <= set(checkpoint)
    assert checkpoint["trainer"]["iteration"] == 4  # 2 epochs of 2 iterations


def test_discriminator_trained_after_warm_up(trained: tuple[Path, str]) -> None:
    out, _ = trained
    checkpoint = torch.load(out / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    # 4 training cases, batch 2 -> 2 iterations per epoch; warm-up 2 -> the discriminator stepped twice
    steps = {int(s["step"]) for s in checkpoint["d_optimizer"]["state"].values()}
    assert steps == {2}
    assert {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()} == {4}


def _losses(log: str) -> list[tuple[int, int, float]]:
    """``(epoch, iteration in epoch, train_loss)`` of every StatsHandler iteration line, in order."""
    pattern = r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- train_loss: ([\d.]+)"
    return [(int(e), int(i), float(loss)) for e, i, loss in re.findall(pattern, log)]


def test_resume_after_kill_mid_training(tmp_path: Path, phantom_dir: Path) -> None:
    """SIGKILL a run after its first epoch's checkpoint; --resume true finishes from there, the loss curve going on.

    With the adversarial term weighted 0 the loss is the reconstruction loss, and a run with the same seed draws the
    same first batch: resumed, the network sees it with its trained weights, so the first loss is lower than the
    killed run's first loss, which a restart from scratch would repeat exactly.
    """
    configs = f"['{AUTOENCODER_BUNDLE / 'configs' / 'train.json'}']"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs]
    common = [
        "--bundle_root", str(AUTOENCODER_BUNDLE), *TINY_AUTOENCODER, *_outputs(tmp_path),
        "--dataset_dir", str(phantom_dir), "--max_epochs", "4", "--val_interval", "2", "--adv_weight", "0.0",
    ]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    killed_log = tmp_path / "killed.log"
    with open(killed_log, "w") as log_file:
        process = subprocess.Popen(
            command + common, cwd=AUTOENCODER_BUNDLE, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        first = tmp_path / "models" / "checkpoint_epoch=1.pt"
        deadline = time.monotonic() + 300
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.exists(), "the first epoch never finished"
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "models" / "checkpoint_epoch=4.pt").exists()
    resumed_from = int(re.findall(r"epoch=(\d+)", latest_checkpoint(tmp_path / "models"))[0])
    before = _losses(killed_log.read_text())

    result = run_bundle(AUTOENCODER_BUNDLE, ["train.json"], *common[2:], "--resume", "true")
    log = result.stdout + result.stderr
    assert (tmp_path / "models" / "checkpoint_epoch=4.pt").is_file()
    restored = torch.load(tmp_path / "models" / "checkpoint_epoch=4.pt", map_location="cpu", weights_only=False)
    assert restored["trainer"]["iteration"] == 8  # 2 iterations per epoch, no epoch run twice or skipped
    assert {int(s["step"]) for s in restored["optimizer"]["state"].values()} == {8}  # Adam's state went on too
    assert restored["best_metric"]["best_metric_epoch"] in (2, 4)  # the evaluator's best, kept for the next resume
    # the checkpoint resumed from counts towards n_saved = 1: deleted once a newer one is written
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["checkpoint_epoch=4.pt", "model.pt"]
    assert set(_epoch_metrics(log)) <= {2, 4}

    after = _losses(log)
    assert [(epoch, iteration) for epoch, iteration, _ in before[:2]] == [(1, 1), (1, 2)]
    assert after[0][:2] == (resumed_from + 1, 1) and {epoch for epoch, _, _ in after} == set(range(resumed_from + 1, 5))
    assert after[0][2] < before[0][2]  # the same first batch, seen by the trained network


def test_resume_without_checkpoint_is_one_clear_error(tmp_path: Path, phantom_dir: Path) -> None:
    result = run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json"],
        *TINY_AUTOENCODER,
        *_outputs(tmp_path),
        "--dataset_dir", str(phantom_dir),
        "--resume", "true",
        expect_failure=True,
    )  # fmt: skip
    assert "holds no checkpoint_epoch=N.pt checkpoint" in result.stderr


def test_train_properties(tmp_path: Path, phantom_dir: Path) -> None:
    workflow = ConfigWorkflow(
        config_file=str(AUTOENCODER_BUNDLE / "configs" / "train.json"),
        workflow_type="train",
        bundle_root=str(AUTOENCODER_BUNDLE),
        dataset_dir=str(phantom_dir),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"),
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])


def test_evaluate_writes_per_case_and_mean_metrics(
    trained: tuple[Path, str], phantom_dir: Path, tmp_path: Path
) -> None:
    out, _ = trained
    run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json", "evaluate.json"],
        *TINY_AUTOENCODER,
        "--ckpt_dir", str(out / "models"),
        "--output_dir", str(tmp_path),
        "--dataset_dir", str(phantom_dir),
    )  # fmt: skip
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val_ssim", "val_psnr", "val_codebook_usage", "val_codebook_perplexity"} <= set(summary["mean"])
    # one validation case, four modalities, each scored on its own
    assert sorted(summary["per_item"]) == [f"Phantom_00004_{m}" for m in ("flair", "t1", "t1ce", "t2")]
    psnr = [item["val_psnr"] for item in summary["per_item"].values()]
    assert abs(sum(psnr) / len(psnr) - summary["mean"]["val_psnr"]) < 1e-3
    assert (tmp_path / "metrics.csv").is_file()
    raw = (tmp_path / "val_psnr_raw.csv").read_text()
    assert "Phantom_00004_t2" in raw


def test_evaluate_split_test_scores_the_held_out_test_cases(
    trained: tuple[Path, str], phantom_dir: Path, tmp_path: Path
) -> None:
    """`--split test` scores the test list of dataset.json (Phantom_00005), not the validation case."""
    out, _ = trained
    run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json", "evaluate.json"],
        *TINY_AUTOENCODER,
        "--ckpt_dir", str(out / "models"),
        "--output_dir", str(tmp_path),
        "--dataset_dir", str(phantom_dir),
        "--split", "test",
    )  # fmt: skip
    test_cases = [e["case"] for e in json.loads((phantom_dir / "dataset.json").read_text())["test"]]
    assert test_cases == ["Phantom_00005"]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(summary["per_item"]) == [f"Phantom_00005_{m}" for m in ("flair", "t1", "t1ce", "t2")]
    assert "Phantom_00005_t2" in (tmp_path / "val_psnr_raw.csv").read_text()


def test_evaluate_split_test_without_a_test_list_is_one_line(
    trained: tuple[Path, str], phantom_dir: Path, tmp_path: Path
) -> None:
    out, _ = trained
    data = tmp_path / "data"
    data.mkdir()
    datalist = json.loads((phantom_dir / "dataset.json").read_text())
    for entry in datalist["training"] + datalist["validation"]:
        (data / entry["case"]).symlink_to(phantom_dir / entry["case"])
    del datalist["test"]
    (data / "dataset.json").write_text(json.dumps(datalist))
    result = run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json", "evaluate.json"],
        *TINY_AUTOENCODER,
        "--ckpt_dir", str(out / "models"),
        "--output_dir", str(tmp_path / "eval"),
        "--dataset_dir", str(data),
        "--split", "test",
        expect_failure=True,
    )  # fmt: skip
    line = last_error_line(result)
    assert str(data / "dataset.json") in line and "'test'" in line, result.stderr[-3000:]


def test_train_on_medmnist3d(tmp_path: Path) -> None:
    """`--dataset medmnist3d` trains the same bundle on MedMNIST 3D volumes (a small file in its exact format)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in {"train": 4, "val": 2, "test": 2}.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(count, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 11, size=(count, 1), dtype=np.uint8)
    np.savez_compressed(tmp_path / "organmnist3d.npz", **arrays)
    result = run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json"],
        *TINY_AUTOENCODER,
        *_outputs(tmp_path),
        "--dataset", "medmnist3d",
        "--medmnist_size", "28",
        "--dataset_dir", str(tmp_path),
        "--max_epochs", "1",
        "--val_interval", "1",
    )  # fmt: skip
    assert (tmp_path / "models" / "model.pt").is_file()
    assert set(_epoch_metrics(result.stdout + result.stderr)) == {1}
