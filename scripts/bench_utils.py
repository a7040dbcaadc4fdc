"""Timing and table helpers shared by the benchmark tables (``scripts/benchmark.py``).

Every figure is the median of several repeats after a warm-up, reported with min and max, and both sides of a
ratio are measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Seconds per call: median, min and max over ``repeats`` calls after ``warmup`` untimed calls."""

    median: float
    min: float
    max: float
    repeats: int

    def __str__(self) -> str:
        return f"{self.median:.4f} s [{self.min:.4f}, {self.max:.4f}]"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> Timing:
    """Time ``fn()``; CUDA work is synchronised before each clock read."""
    for _ in range(warmup):
        fn()
    _sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        seconds.append(time.perf_counter() - start)
    return Timing(statistics.median(seconds), min(seconds), max(seconds), repeats)


def _rss_growth_in_child(fn: Callable[[], object], queue) -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Peak memory of one ``fn()`` call in MiB.

    On CUDA: the allocator's peak above what was allocated before the call. On CPU: the growth of the peak
    resident set size while ``fn`` runs in a forked child process, so each workload is measured on its own and
    earlier calls' high-water marks do not hide later ones.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_rss_growth_in_child, args=(fn, queue))
    child.start()
    growth = queue.get()
    child.join()
    return growth


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as a GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
