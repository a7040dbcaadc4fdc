"""The run record: resolved config, package versions and git commit, written atomically next to the outputs."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from prod9_ext.engines import RunRecord
from prod9_ext.engines.handlers import git_state, package_versions, run_record, write_run_record

REPO = Path(__file__).resolve().parents[2]


def test_record_taken_when_built_and_written_when_the_engine_starts(tmp_path: Path) -> None:
    """Built from a config, the handler records that config with its overrides, as written (not evaluated)."""
    parser = ConfigParser(
        {
            "output_dir": str(tmp_path / "eval"),
            "max_epochs": 300,
            "network": "$torch.nn.Identity()",
            "record": {
                "_target_": "prod9_ext.engines.RunRecord",
                "output_dir": "@output_dir",
                "workflow": "train",
            },
        }
    )
    parser.update({"max_epochs": 2})
    handler = parser.get_parsed_content("record")
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    assert not (tmp_path / "eval").exists()  # nothing is written before the engine starts
    engine.run([0], max_epochs=1)

    path = tmp_path / "eval" / "run_record_train.json"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    record = json.loads(path.read_text())
    assert record["workflow"] == "train"
    assert record["config"]["max_epochs"] == 2
    assert record["config"]["network"] == "$torch.nn.Identity()"
    assert record["command"] == sys.argv
    versions = record["versions"]
    assert versions["torch"] == importlib.metadata.version("torch") and versions["cuda"] == torch.version.cuda
    assert versions["monai"] == importlib.metadata.version("monai")
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(versions) == {"python", "prod9", "torch", "monai", "pytorch-ignite", "nibabel", "numpy", "cuda"}


def test_record_outside_a_config_needs_a_parser(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="must be called from a bundle config expression"):
        RunRecord(tmp_path, "train")
    parser = ConfigParser({"seed": 3})
    path = write_run_record(tmp_path, run_record("inference", parser))
    assert path.name == "run_record_inference.json" and json.loads(path.read_text())["config"] == {"seed": 3}


def test_git_state_of_the_checkout() -> None:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the tests do not run from a git checkout")
    state = git_state()
    assert state is not None and state["commit"] == head.stdout.strip()
    assert isinstance(state["dirty"], bool)


def test_no_git_state_outside_a_checkout(tmp_path: Path) -> None:
    assert git_state(tmp_path) is None


def test_versions_of_missing_distributions_are_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("prod9_ext.engines.handlers.PACKAGES", ("torch", "no-such-distribution-prod9"))
    versions = package_versions()
    assert versions["torch"] == importlib.metadata.version("torch") and versions["no-such-distribution-prod9"] is None
