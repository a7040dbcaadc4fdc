"""Timing and table helpers shared by the benchmark tables (``scripts/benchmark.py``).

Every figure is the median of several repeats after a warm-up, reported with min and max, and both sides of a
ratio are measured in the same run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import threading
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


def time_alternating(
    fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int = 5, warmup: int = 1
) -> tuple[Timing, Timing]:
    """Time two workloads in alternation (A, B, A, B, ...), so that machine drift hits both sides of a ratio alike."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    seconds: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, samples in ((fn_a, seconds[0]), (fn_b, seconds[1])):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            samples.append(time.perf_counter() - start)
    a, b = (Timing(statistics.median(s), min(s), max(s), repeats) for s in seconds)
    return a, b


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


def _use_mmap_for_large_allocations() -> None:
    """Make glibc serve large blocks (>= 64 KiB) by mmap, handed back to the OS on free, so RSS follows what is in
    use; done at import, before the benchmarks allocate anything, so no freed heap memory hides later peaks."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD; fixing it also turns off glibc's dynamic threshold
    except (OSError, AttributeError):
        pass


def _trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_use_mmap_for_large_allocations()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mib(fn: Callable[[], object], interval: float = 0.0005) -> float:
    """Peak memory that one ``fn()`` call adds, in MiB.

    On CUDA: the allocator's peak above what was allocated before the call. On CPU: the peak of the process's
    resident set size, sampled every ``interval`` seconds by a background thread, above its size before the call
    (large allocations are served by mmap and the heap is trimmed first, so freed memory leaves the resident set).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    gc.collect()
    _trim_heap()
    base = peak = _resident_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _resident_bytes())
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return (max(peak, _resident_bytes()) - base) / 2**20


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as a GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
