"""configs/multi_gpu_train.json through torchrun: 2 processes, gloo on CPU, DDP generator and discriminator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from conftest import AUTOENCODER_BUNDLE, REPO, TINY_AUTOENCODER


def _overrides(**values: str) -> list[str]:
    """TINY_AUTOENCODER with some values replaced (fire keeps one value per flag)."""
    arguments = list(TINY_AUTOENCODER)
    for name, value in values.items():
        flag = f"--{name}"
        if flag in arguments:
            arguments[arguments.index(flag) + 1] = value
        else:
            arguments += [flag, value]
    return arguments


def test_two_process_gloo_training(tmp_path: Path, phantom_dir: Path) -> None:
    configs = "['configs/train.json','configs/multi_gpu_train.json']"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(AUTOENCODER_BUNDLE)]
    command += _overrides(adv_warmup_iterations="0")  # the DDP discriminator steps in the only iteration
    command += ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    command += ["--dataset_dir", str(phantom_dir), "--max_epochs", "1", "--val_interval", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=AUTOENCODER_BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]

    # validation ran on both ranks (metrics are all-reduced) but only rank 0 logs and saves
    metrics = re.findall(r"Epoch\[1\] Metrics -- (.*)", log)
    assert len(metrics) == 1, log[-6000:]
    values = {k: float(v) for k, v in re.findall(r"(\w+): ([-\d.naif]+)", metrics[0])}
    assert {"val_ssim", "val_psnr", "val_codebook_usage", "val_codebook_perplexity"} <= set(values)
    assert log.count("Saved checkpoint at epoch: 1") == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"]
    assert [p.name for p in (tmp_path / "eval").glob("*.png")] == ["reconstruction_epoch1.png"]

    # checkpoints hold the unwrapped modules (no "module." prefix), loadable without DDP
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state and not any(key.startswith("module.") for key in state)
    checkpoint = torch.load(tmp_path / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert not any(key.startswith("module.") for key in checkpoint["discriminator"])
    # 4 training cases, 2 ranks, batch 2: one iteration per rank, in which both optimizers stepped
    assert checkpoint["trainer"]["iteration"] == 1
    assert {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()} == {1}
    assert {int(s["step"]) for s in checkpoint["d_optimizer"]["state"].values()} == {1}
