"""Fixtures for bundle tests: a small phantom set and the tiny-network overrides every bundle run uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prod9_ext.data import make_phantom_dataset

REPO = Path(__file__).resolve().parents[2]
AUTOENCODER_BUNDLE = REPO / "bundles" / "autoencoder_fsq"

# A network and data small enough for a 2-core CPU: 3 mm phantoms (60x73x60), 32^3 windows.
TINY_AUTOENCODER = [
    "--pixdim", "[3.0,3.0,3.0]",
    "--roi_size", "[32,32,32]",
    "--network_def#num_channels", "[8,16,16]",
    "--network_def#num_res_blocks", "[1,1,1]",
    "--network_def#norm_num_groups", "8",
    "--sw_overlap", "0.25",
    "--num_workers", "0",
    "--batch_size", "2",
    "--adv_warmup_iterations", "2",
]  # fmt: skip


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five phantom cases at 3 mm (four for training, one for validation)."""
    root = tmp_path_factory.mktemp("phantoms")
    make_phantom_dataset(root, num_cases=5, seed=0, spacing=3.0)
    return root


def run_bundle(
    bundle: Path, config_files: list[str], *overrides: str, timeout: int = 600, expect_failure: bool = False
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` in ``bundle`` as a user types it.

    Fails the test with the log when the run fails, or, with ``expect_failure``, when it succeeds.
    """
    configs = "[" + ",".join(f"'{bundle / 'configs' / name}'" for name in config_files) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        command + list(overrides), cwd=bundle, env=env, capture_output=True, text=True, timeout=timeout
    )
    if expect_failure:
        if result.returncode == 0:
            pytest.fail(f"bundle run ({' '.join(config_files)}) succeeded but was expected to fail")
    elif result.returncode != 0:
        pytest.fail(f"bundle run failed ({' '.join(config_files)}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result
