"""A failed run ends with the error under MONAI's wrappers, also when a DataLoader worker raised it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, Lambdad

from prod9_ext.engines import error_summary
from prod9_ext.engines.error_summary import SUMMARY_PREFIX, root_cause

MESSAGE = "/data/case_t1.nii.gz (key 'image'): 4D image with 3 volumes"


def _refuse(_: object) -> None:
    raise ValueError(MESSAGE)


@pytest.mark.parametrize("num_workers", [0, 1], ids=["main process", "worker process"])
def test_transform_error_under_monai_and_worker_wrappers(num_workers: int) -> None:
    dataset = Dataset([{"image": 0}], transform=Compose([Lambdad("image", _refuse)]))
    loader = DataLoader(dataset, num_workers=num_workers)
    with pytest.raises(Exception) as caught:
        next(iter(loader))
    assert root_cause(caught.value) == f"ValueError: {MESSAGE}"


def test_component_error_under_config_wrappers() -> None:
    parser = ConfigParser({"net": {"_target_": "prod9_ext.AutoencoderFSQ", "num_channel": [8]}, "run": "$@net"})
    with pytest.raises(RuntimeError) as caught:
        parser.get_parsed_content("run")
    expected = "TypeError: AutoencoderFSQ.__init__() got an unexpected keyword argument 'num_channel'"
    assert root_cause(caught.value) == expected


def test_unwrapped_error_needs_no_summary() -> None:
    try:
        raise ValueError(MESSAGE) from KeyError("detail")
    except ValueError as error:
        assert root_cause(error) is None


def test_installed_hook_prints_the_cause_last(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    error_summary.install(exit_at_once=False)
    error_summary.install(exit_at_once=False)  # a second call adds nothing
    try:
        try:
            raise ValueError(MESSAGE)
        except ValueError as inner:
            raise RuntimeError("applying transform <LoadImaged>") from inner
    except RuntimeError as error:
        sys.excepthook(type(error), error, error.__traceback__)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1] == f"{SUMMARY_PREFIX}ValueError: {MESSAGE}"
    assert lines[-2] == "RuntimeError: applying transform <LoadImaged>"
    assert sum(line.startswith(SUMMARY_PREFIX) for line in lines) == 1


def test_a_failed_run_ends_at_once_after_the_summary() -> None:
    """Work still running in other threads neither delays the exit nor prints after the summary."""
    script = (
        "import threading, time\n"
        "from prod9_ext.engines import error_summary\n"
        "error_summary.install()\n"
        "threading.Thread(target=time.sleep, args=(60,)).start()\n"
        "try:\n"
        "    raise ValueError('/data/scan.nii.gz: 2D image')\n"
        "except ValueError as error:\n"
        "    raise RuntimeError('Failed to evaluate ConfigExpression') from error\n"
    )
    started = time.monotonic()
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=50)
    assert result.returncode == 1 and time.monotonic() - started < 40
    assert result.stderr.rstrip().splitlines()[-1] == f"{SUMMARY_PREFIX}ValueError: /data/scan.nii.gz: 2D image"
