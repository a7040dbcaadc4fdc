"""A failed run ends with the error under MONAI's wrappers, also when a DataLoader worker raised it; a user error
shows that line alone, a bug its traceback too."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, Lambdad

from prod9_ext.engines import error_summary, startup
from prod9_ext.engines.error_summary import SUMMARY_PREFIX, TRACEBACK_VARIABLE, is_user_error, root_cause

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


def _caught(action: Callable[[], object], wrap: bool = False) -> BaseException:
    """The exception ``action`` raises, optionally under MONAI's wrapper of a config expression."""
    try:
        try:
            action()
        except Exception as error:
            if wrap:
                raise RuntimeError("Failed to evaluate ConfigExpression") from error
            raise
    except Exception as error:
        return error
    raise AssertionError("nothing was raised")


USER_ERRORS = [
    pytest.param(lambda: startup.check_ints(max_epochs=0), False, id="ValueError of a prod9 check"),
    pytest.param(lambda: startup.check_ints(max_epochs=0), True, id="the same under MONAI's wrapper"),
    pytest.param(lambda: ConfigParser({"a": 1}).get_parsed_content("b"), True, id="KeyError of the config parser"),
    pytest.param(
        lambda: startup.check_output_dir("output_dir", Path(__file__) / "out", []), True, id="OSError of a check"
    ),
]
BUGS = [
    pytest.param(lambda: startup.check_ints(minimum=None, x=1), True, id="TypeError in prod9"),
    pytest.param(lambda: np.zeros(-1), True, id="ValueError outside prod9"),
    pytest.param(lambda: {}["key"], False, id="KeyError outside prod9"),
    pytest.param(lambda: _refuse(None), True, id="ValueError raised by a caller's code"),
]


@pytest.mark.parametrize(("action", "wrap"), USER_ERRORS)
def test_user_errors(action: Callable[[], object], wrap: bool) -> None:
    assert is_user_error(_caught(action, wrap))


@pytest.mark.parametrize(("action", "wrap"), BUGS)
def test_bugs(action: Callable[[], object], wrap: bool) -> None:
    assert not is_user_error(_caught(action, wrap))


@pytest.mark.parametrize("num_workers", [0, 1], ids=["main process", "worker process"])
def test_user_error_in_a_transform(num_workers: int) -> None:
    check = functools.partial(startup.check_choice, "image", choices=[1])
    loader = DataLoader(Dataset([{"image": 0}], transform=Compose([Lambdad("image", check)])), num_workers=num_workers)
    with pytest.raises(Exception) as caught:
        next(iter(loader))
    assert is_user_error(caught.value)
    assert root_cause(caught.value) == "ValueError: image must be one of [1], got 0."


def _run_failing(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``code`` after ``error_summary.install(<tmp_path>)`` in a new Python process."""
    script = f"from prod9_ext.engines import error_summary, startup\nerror_summary.install({str(tmp_path)!r})\n"
    repo = Path(__file__).resolve().parents[2]
    environment = {k: v for k, v in os.environ.items() if k != TRACEBACK_VARIABLE}
    return subprocess.run(
        [sys.executable, "-c", script + code],
        cwd=repo,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=50,
    )


USER_ERROR_CODE = (
    "try:\n"
    "    startup.check_ints(max_epochs=0)\n"
    "except ValueError as error:\n"
    "    raise RuntimeError('Failed to evaluate ConfigExpression') from error\n"
)
USER_ERROR_LINE = f"{SUMMARY_PREFIX}ValueError: max_epochs must be an integer >= 1, got 0."


def test_user_error_is_one_line_and_a_log(tmp_path: Path) -> None:
    result = _run_failing(USER_ERROR_CODE, tmp_path)
    log = tmp_path / error_summary.LOG_NAME
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"{USER_ERROR_LINE} (traceback: {log})"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "startup.py" in text
    assert text.rstrip().endswith("RuntimeError: Failed to evaluate ConfigExpression")


@pytest.mark.parametrize(
    ("code", "env"),
    [
        pytest.param(USER_ERROR_CODE, {TRACEBACK_VARIABLE: "1"}, id="user error with PROD9_TRACEBACK=1"),
        pytest.param(USER_ERROR_CODE.replace("max_epochs=0", "minimum=None, x=1"), {}, id="bug"),
    ],
)
def test_traceback_on_the_terminal(tmp_path: Path, code: str, env: dict[str, str]) -> None:
    result = _run_failing(code.replace("ValueError", "Exception"), tmp_path, **env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert 'startup.py", line' in result.stderr and lines[-2].startswith("RuntimeError: Failed to evaluate")
    assert lines[-1].startswith(SUMMARY_PREFIX) and "(traceback:" not in lines[-1]
    assert not list(tmp_path.iterdir())  # no log file
