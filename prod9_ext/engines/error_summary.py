"""A failed bundle run ends in one line naming what went wrong; a bad input, key or file shows that line alone.

MONAI wraps every error raised while it builds a config item, evaluates a ``$`` expression or applies a transform in
a ``RuntimeError`` ("Failed to instantiate component ...", "Failed to evaluate ...", "applying transform ..."), so the
traceback of ``python -m monai.bundle run`` ends with the wrapper and the line that names the bad file or value sits
in the middle. After :func:`install`, an uncaught exception ends with one line::

    prod9 stopped: ValueError: /data/case_t1.nii.gz (key 't1'): 4D image with 3 volumes ...

naming the outermost exception of the chain that is not such a wrapper (its *root cause*). Errors raised in
``DataLoader`` worker processes, which PyTorch re-raises with the worker's traceback as text, are read from that text.

When the root cause is a *user error* (:func:`is_user_error`: a ``ValueError``, ``KeyError`` or ``OSError`` such as
``FileNotFoundError``, raised by prod9's own checks or by MONAI's config parser), the terminal shows only that line,
ending ``(traceback: <file>)``; the full traceback goes to ``prod9_error.log`` in the run's output folder when that
folder exists, else to a new file in the temporary folder (a refused run creates no folder). Any other error is a bug
and keeps its traceback on the terminal, before the line; so does every error when the environment variable
``PROD9_TRACEBACK=1`` is set.

The process then ends at once (exit status 1, logs and standard streams flushed): threads still busy in C++ (e.g.
``CacheDataset``'s pool, loading the next case) would otherwise abort the interpreter's shutdown with "terminate called
without an active exception", after the summary.

Each bundle run installs it first thing, in its start-up call (:mod:`prod9_ext.engines.startup`).
"""

from __future__ import annotations

import builtins
import datetime
import logging
import os
import re
import sys
import tempfile
import traceback as tb_module
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import monai.bundle

__all__ = [
    "LOG_NAME",
    "SUMMARY_PREFIX",
    "TRACEBACK_VARIABLE",
    "USER_ERROR_TYPES",
    "install",
    "is_user_error",
    "one_line_errors",
    "root_cause",
]

SUMMARY_PREFIX = "prod9 stopped: "
TRACEBACK_VARIABLE = "PROD9_TRACEBACK"
"""Set to ``1`` to print the traceback of user errors on the terminal too."""
LOG_NAME = "prod9_error.log"
"""The file in the output folder that holds the traceback of a user error."""
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError)
"""What prod9's checks raise for a bad value, key or file (``OSError`` covers ``FileNotFoundError``,
``FileExistsError``, ``PermissionError``)."""

# Code whose ValueError, KeyError or OSError is about the user's input: prod9's checks and MONAI's config parser.
_INPUT_CHECKING_CODE = (Path(__file__).resolve().parents[1], Path(monai.bundle.__file__).resolve().parent)
_USER_ERROR_NAMES = frozenset(
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, USER_ERROR_TYPES)
)
# Messages of the RuntimeErrors MONAI raises around the real error (monai.utils.module.instantiate,
# monai.bundle.config_item.ConfigExpression.evaluate, monai.transforms.transform.apply_transform).
_WRAPPER_MESSAGES = ("Failed to instantiate component", "Failed to evaluate", "applying transform")
# torch.utils.data re-raises a worker's exception as `Caught <Type> in DataLoader worker process N.\nOriginal <tb>`.
_WORKER_MESSAGE = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal (Traceback.*)", re.DOTALL)
_CHAIN_SEPARATOR = re.compile(
    r"\n\s*(?:The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)\s*\n"
)
_FRAME_LINE = re.compile(r'^\s*File "(.+?)", line \d+')


@dataclass(frozen=True)
class _Cause:
    """The root cause of a failure: its type's name, its message, the file of the frame that raised it, and the
    exception itself unless it was read from a DataLoader worker's traceback text."""

    kind: str
    message: str
    origin: str | None
    exception: BaseException | None = None

    @property
    def line(self) -> str:
        return _one_line(self.kind, self.message)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """For scripts: a ``ValueError`` or ``OSError`` (a bad argument or file) ends the run with the one line that names
    it, ``prod9 stopped: <Type>: <message>``, and no traceback unless ``PROD9_TRACEBACK=1``."""
    try:
        yield
    except (ValueError, OSError) as error:
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        raise SystemExit(f"{SUMMARY_PREFIX}{type(error).__name__}: {error}") from None


def root_cause(error: BaseException) -> str | None:
    """``"Type: first line of message"`` of the error under MONAI's and PyTorch's wrappers of ``error``.

    ``None`` when ``error`` itself is that error, i.e. the traceback already ends with it.
    """
    cause = _root(error)
    if cause is None or cause.exception is error:
        return None
    return cause.line


def is_user_error(error: BaseException) -> bool:
    """Whether the root cause of ``error`` is about the user's input rather than a bug.

    That is: a :data:`USER_ERROR_TYPES` exception raised in prod9's own code (its checks of values, keys and files)
    or in MONAI's config parser (e.g. a reference to a key that does not exist). The same types raised deeper (in
    torch, numpy ...) and every other type are treated as bugs.
    """
    cause = _root(error)
    return cause is not None and _is_user_cause(cause)


def install(log_dir: str | os.PathLike | None = None, exit_at_once: bool = True) -> None:
    """Make an uncaught exception end with ``prod9 stopped: <root cause>``; user errors show that line alone.

    Calling it again only changes ``log_dir``.

    Args:
        log_dir: the run's output folder, where ``prod9_error.log`` is written if the folder exists when the run
            fails; else the traceback goes to a new file in the temporary folder.
        exit_at_once: end the process right after the summary (see the module docstring) instead of returning to the
            interpreter's shutdown.
    """
    current = sys.excepthook
    if getattr(current, "_prod9_error_summary", False):
        current._prod9_log_dir = log_dir  # type: ignore[attr-defined]
        return
    previous = current

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        cause = _root(error)
        log = None
        if cause is not None and _is_user_cause(cause) and os.environ.get(TRACEBACK_VARIABLE, "") in ("", "0"):
            log = _write_log(hook._prod9_log_dir, kind, error, traceback)  # type: ignore[attr-defined]
        if cause is not None and log is not None:
            print(f"{SUMMARY_PREFIX}{cause.line} (traceback: {log})", file=sys.stderr, flush=True)
        else:
            previous(kind, error, traceback)
            summary = root_cause(error)
            if summary is not None:
                print(f"\n{SUMMARY_PREFIX}{summary}", file=sys.stderr, flush=True)
        if exit_at_once:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    hook._prod9_error_summary = True  # type: ignore[attr-defined]
    hook._prod9_log_dir = log_dir  # type: ignore[attr-defined]
    sys.excepthook = hook


def _write_log(
    log_dir: str | os.PathLike | None, kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> str | None:
    """Write the command line and the traceback to the log file; its path, or ``None`` when it cannot be written."""
    text = f"{datetime.datetime.now().isoformat(timespec='seconds')} {' '.join(sys.argv)}\n\n" + "".join(
        tb_module.format_exception(kind, error, traceback)
    )
    rank = os.environ.get("RANK", "0")
    try:
        if log_dir is not None and Path(log_dir).is_dir():
            path = Path(log_dir) / (LOG_NAME if rank == "0" else LOG_NAME.replace(".log", f"_rank{rank}.log"))
            path.write_text(text)
            return str(path)
        handle, name = tempfile.mkstemp(prefix="prod9_error_", suffix=".log")
        with os.fdopen(handle, "w") as file:
            file.write(text)
        return name
    except OSError:
        return None


def _root(error: BaseException) -> _Cause | None:
    """The outermost exception of ``error``'s chain that is not a MONAI wrapper, looking into DataLoader workers."""
    current: BaseException | None = error
    while current is not None and _is_wrapper(type(current).__name__, str(current)):
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    if current is None:
        return None
    worker = _WORKER_MESSAGE.match(str(current))
    if worker is not None:
        return _cause_in_text(worker.group(1))
    frames = tb_module.extract_tb(current.__traceback__) if current.__traceback__ is not None else []
    return _Cause(type(current).__name__, str(current), frames[-1].filename if frames else None, current)


def _is_user_cause(cause: _Cause) -> bool:
    if cause.kind.rsplit(".", 1)[-1] not in _USER_ERROR_NAMES or cause.origin is None:
        return False
    origin = Path(cause.origin).resolve()
    return any(origin.is_relative_to(folder) for folder in _INPUT_CHECKING_CODE)


def _cause_in_text(traceback_text: str) -> _Cause | None:
    """The outermost non-wrapper exception of a formatted exception chain (innermost block first)."""
    for block in reversed(_CHAIN_SEPARATOR.split(traceback_text)):
        exception, origin = _exception_lines(block)
        if not exception:
            continue
        kind, _, message = exception[0].partition(": ")
        message = "\n".join([message, *exception[1:]])
        if not _is_wrapper(kind.rsplit(".", 1)[-1], message):
            return _Cause(kind, message, origin)
    return None


def _exception_lines(block: str) -> tuple[list[str], str | None]:
    """The ``Type: message`` lines that end one formatted traceback (those after the indented frame lines), and the
    file of its last frame."""
    lines = block.strip("\n").splitlines()
    start = 1 if lines and lines[0].startswith("Traceback") else 0
    origin = None
    while start < len(lines) and (not lines[start] or lines[start][0].isspace()):
        frame = _FRAME_LINE.match(lines[start])
        origin = frame.group(1) if frame else origin
        start += 1
    return lines[start:], origin


def _is_wrapper(kind: str, message: str) -> bool:
    return kind == "RuntimeError" and message.startswith(_WRAPPER_MESSAGES)


def _one_line(kind: str, message: str) -> str:
    lines = message.strip().splitlines()
    return f"{kind}: {lines[0]}" if lines else kind
