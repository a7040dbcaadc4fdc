"""Fixtures for bundle tests: a small phantom set and the tiny-network overrides every bundle run uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from prod9_ext import AutoencoderFSQ
from prod9_ext.data import make_phantom_dataset

REPO = Path(__file__).resolve().parents[2]
AUTOENCODER_BUNDLE = REPO / "bundles" / "autoencoder_fsq"
TRANSFORMER_BUNDLE = REPO / "bundles" / "maskgit_transformer"

# A network and data small enough for a 2-core CPU: 3 mm phantoms (60x73x60), 32^3 windows.
TINY_AUTOENCODER_SETTINGS = {
    "pixdim": [3.0, 3.0, 3.0],
    "roi_size": [32, 32, 32],
    "network_def#num_channels": [8, 16, 16],
    "network_def#num_res_blocks": [1, 1, 1],
    "network_def#norm_num_groups": 8,
    "sw_overlap": 0.25,
    "num_workers": 0,
    "batch_size": 2,
    "adv_warmup_iterations": 2,
}
TINY_AUTOENCODER = [arg for key, value in TINY_AUTOENCODER_SETTINGS.items() for arg in (f"--{key}", json.dumps(value))]

# Stage 2 on the tiny tokenizer: a 48x64x48 ROI (token grid 12x16x12, 6x8x6 positions at patch size 2).
TINY_TRANSFORMER = [
    "--roi_size", "[48,64,48]",
    "--network_def#num_layers", "2",
    "--network_def#hidden_dim", "64",
    "--network_def#num_heads", "4",
    "--network_def#ffn_dim", "128",
    "--num_workers", "0",
    "--batch_size", "2",
    "--warmup_iterations", "2",
    "--sampler#steps", "4",
]  # fmt: skip


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six phantom cases at 3 mm: Phantom_00000-3 for training, 00004 for validation, 00005 the held-out test case."""
    root = tmp_path_factory.mktemp("phantoms")
    make_phantom_dataset(root, num_cases=6, seed=0, spacing=3.0)
    return root


def run_bundle(
    bundle: Path,
    config_files: list[str],
    *overrides: str,
    timeout: int = 600,
    expect_failure: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` in ``bundle`` as a user types it, with ``env`` added to the environment.

    Fails the test with the log when the run fails, or, with ``expect_failure``, when it succeeds.
    """
    configs = "[" + ",".join(f"'{bundle / 'configs' / name}'" for name in config_files) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle)]
    inherited = {key: value for key, value in os.environ.items() if key != "PROD9_TRACEBACK"}  # tests ask for it
    env = {**inherited, "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run(
        command + list(overrides), cwd=bundle, env=env, capture_output=True, text=True, timeout=timeout
    )
    if expect_failure:
        if result.returncode == 0:
            pytest.fail(f"bundle run ({' '.join(config_files)}) succeeded but was expected to fail")
    elif result.returncode != 0:
        pytest.fail(f"bundle run failed ({' '.join(config_files)}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@dataclass(frozen=True)
class Stage1Run:
    """A tiny stage-1 model trained through its bundle: the overlay config it was trained with and its weights."""

    config: Path
    weights: Path

    def stage2_args(self, dataset_dir: Path) -> list[str]:
        """The overrides that point a stage-2 run at this model and at ``dataset_dir``."""
        return [
            "--autoencoder_config", f"['train.json','{self.config}']",
            "--autoencoder_weights", str(self.weights),
            "--dataset_dir", str(dataset_dir),
        ]  # fmt: skip


@pytest.fixture(scope="session")
def stage1_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Stage1Run:
    """One epoch of the tiny autoencoder on the phantoms, trained with an overlay config file, as a user would."""
    root = tmp_path_factory.mktemp("stage1")
    config = root / "tiny_autoencoder.json"
    config.write_text(json.dumps(TINY_AUTOENCODER_SETTINGS, indent=2))
    run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json", str(config)],
        "--dataset_dir", str(phantom_dir),
        "--ckpt_dir", str(root / "models"),
        "--output_dir", str(root / "eval"),
        "--max_epochs", "1",
        "--val_interval", "1",
    )  # fmt: skip
    return Stage1Run(config=config, weights=root / "models" / "model.pt")


def last_error_line(result: subprocess.CompletedProcess) -> str:
    """The last non-empty line of a run's stderr: where a failed bundle run says what went wrong."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def tiny_autoencoder(**changes: object) -> AutoencoderFSQ:
    """The network TINY_AUTOENCODER builds (with ``changes`` to its arguments), e.g. to write a model.pt directly."""
    arguments: dict = {"num_channels": (8, 16, 16), "num_res_blocks": (1, 1, 1), "norm_num_groups": 8, **changes}
    return AutoencoderFSQ(**arguments)
