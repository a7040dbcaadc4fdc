"""What a run was: its resolved config, the package versions and the git commit, written next to its outputs.

A bundle attaches a :class:`RunRecord` handler to its engine, last among the handlers that load anything::

    {"_target_": "prod9_ext.engines.run_record.RunRecord", "output_dir": "@output_dir", "workflow": "train"}

It takes the config when the bundle builds it and writes ``<output_dir>/run_record_train.json`` when the engine
starts, i.e. after the inputs and the checkpoint were checked, so a run refused at start-up writes nothing::

    {"workflow": "train", "created": "2025-01-31T12:00:00+00:00", "command": [...sys.argv],
     "config": {... the config files merged, with the command-line overrides, before evaluation ...},
     "versions": {"python": "3.11.7", "prod9": "0.1.0", "torch": ..., "monai": ..., ..., "cuda": "12.8"},
     "git": {"commit": "9ca098b...", "dirty": false}}

``config`` is what MONAI's ``ConfigParser`` holds for the run: ``$`` expressions and ``@`` references as written,
command-line values in place, ``_meta_`` from metadata.json. ``git`` is ``null`` outside a git checkout or without
git; ``dirty`` says whether tracked files differ from the commit.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from prod9_ext.engines.atomic_outputs import atomic_write_text
from prod9_ext.engines.config_keys import running_config

__all__ = ["PACKAGES", "RunRecord", "git_state", "package_versions", "run_record", "write_run_record"]

PACKAGES = ("prod9", "torch", "monai", "pytorch-ignite", "nibabel", "numpy")
"""Distributions whose versions a run record holds (besides Python)."""

_SOURCE_DIR = Path(__file__).resolve().parents[1]


class RunRecord:
    """Ignite handler: the record of this run (:func:`run_record`, taken when built), written when the engine starts.

    Args:
        output_dir: the run's output folder (created when missing).
        workflow: the kind of run, e.g. ``"train"``, ``"evaluate"``, ``"inference"``; names the file.
        parser: the run's config; default: the ``ConfigParser`` building this handler.
    """

    def __init__(self, output_dir: str | os.PathLike, workflow: str, parser: ConfigParser | None = None) -> None:
        self.output_dir = output_dir
        self.record = run_record(workflow, parser)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        write_run_record(self.output_dir, self.record)


def write_run_record(output_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``<output_dir>/run_record_<workflow>.json`` (temporary name, then renamed)."""
    path = Path(output_dir) / f"run_record_{record['workflow']}.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=repr) + "\n")
    return path


def run_record(workflow: str, parser: ConfigParser | None = None) -> dict[str, Any]:
    """The record of this run: workflow, time, command line, config, package versions, git state.

    ``parser`` defaults to the ``ConfigParser`` evaluating the calling config expression (:func:`running_config`).
    """
    parser = parser or running_config()
    return {
        "workflow": workflow,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "config": copy.deepcopy(parser.get()),
        "versions": package_versions(),
        "git": git_state(),
    }


def package_versions() -> dict[str, str | None]:
    """``{"python": ..., "<distribution>": version or None when not installed, "cuda": torch's CUDA or None}``."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def git_state(directory: str | os.PathLike = _SOURCE_DIR) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": uncommitted changes to tracked files}`` of the checkout holding ``directory``.

    ``directory`` defaults to the prod9_ext source. ``None`` when it is not in a git checkout or git is missing.
    """
    try:
        commit = _git(directory, "rev-parse", "HEAD")
        dirty = bool(_git(directory, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _git(directory: str | os.PathLike, *arguments: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(directory), *arguments], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.strip()
