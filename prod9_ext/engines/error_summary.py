"""The last line of a failed bundle run names what went wrong, not MONAI's wrapper around it.

MONAI wraps every error raised while it builds a config item, evaluates a ``$`` expression or applies a transform in
a ``RuntimeError`` ("Failed to instantiate component ...", "Failed to evaluate ...", "applying transform ..."), so the
traceback of ``python -m monai.bundle run`` ends with the wrapper and the line that names the bad file or value sits
in the middle. After :func:`install`, an uncaught exception prints its traceback as before, then one more line::

    prod9 stopped: ValueError: /data/case_t1.nii.gz (key 't1'): 4D image with 3 volumes ...

naming the outermost exception of the chain that is not such a wrapper. Errors raised in ``DataLoader`` worker
processes, which PyTorch re-raises with the worker's traceback as text, are read from that text. The process then
ends at once (exit status 1, logs and standard streams flushed): threads still busy in C++ (e.g. ``CacheDataset``'s
pool, loading the next case) would otherwise abort the interpreter's shutdown with "terminate called without an
active exception", after the summary.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from types import TracebackType

__all__ = ["install", "root_cause"]

SUMMARY_PREFIX = "prod9 stopped: "

# Messages of the RuntimeErrors MONAI raises around the real error (monai.utils.module.instantiate,
# monai.bundle.config_item.ConfigExpression.evaluate, monai.transforms.transform.apply_transform).
_WRAPPER_MESSAGES = ("Failed to instantiate component", "Failed to evaluate", "applying transform")
# torch.utils.data re-raises a worker's exception as `Caught <Type> in DataLoader worker process N.\nOriginal <tb>`.
_WORKER_MESSAGE = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal (Traceback.*)", re.DOTALL)
_CHAIN_SEPARATOR = re.compile(
    r"\n\s*(?:The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)\s*\n"
)


def root_cause(error: BaseException) -> str | None:
    """``"Type: first line of message"`` of the error under MONAI's and PyTorch's wrappers of ``error``.

    ``None`` when ``error`` itself is that error, i.e. the traceback already ends with it.
    """
    current: BaseException | None = error
    while current is not None and _is_wrapper(type(current).__name__, str(current)):
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    if current is None:
        return None
    worker = _WORKER_MESSAGE.match(str(current))
    if worker is not None:
        return _cause_in_text(worker.group(1))
    return None if current is error else _one_line(type(current).__name__, str(current))


def install(exit_at_once: bool = True) -> None:
    """Make an uncaught exception end with ``prod9 stopped: <root cause>`` after its usual traceback (idempotent).

    Args:
        exit_at_once: end the process right after the summary (see the module docstring) instead of returning to the
            interpreter's shutdown.
    """
    previous = sys.excepthook
    if getattr(previous, "_prod9_error_summary", False):
        return

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        previous(kind, error, traceback)
        cause = root_cause(error)
        if cause is not None:
            print(f"\n{SUMMARY_PREFIX}{cause}", file=sys.stderr, flush=True)
        if exit_at_once:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    hook._prod9_error_summary = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _cause_in_text(traceback_text: str) -> str | None:
    """The outermost non-wrapper exception of a formatted exception chain (innermost block first)."""
    for block in reversed(_CHAIN_SEPARATOR.split(traceback_text)):
        exception = _exception_lines(block)
        if not exception:
            continue
        kind, _, message = exception[0].partition(": ")
        message = "\n".join([message, *exception[1:]])
        if not _is_wrapper(kind.rsplit(".", 1)[-1], message):
            return _one_line(kind, message)
    return None


def _exception_lines(block: str) -> list[str]:
    """The ``Type: message`` lines that end one formatted traceback: those after the indented frame lines."""
    lines = block.strip("\n").splitlines()
    start = 1 if lines and lines[0].startswith("Traceback") else 0
    while start < len(lines) and (not lines[start] or lines[start][0].isspace()):
        start += 1
    return lines[start:]


def _is_wrapper(kind: str, message: str) -> bool:
    return kind == "RuntimeError" and message.startswith(_WRAPPER_MESSAGES)


def _one_line(kind: str, message: str) -> str:
    lines = message.strip().splitlines()
    return f"{kind}: {lines[0]}" if lines else kind
