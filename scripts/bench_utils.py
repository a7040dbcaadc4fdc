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

    def scaled(self, factor: float) -> Timing:
        """The same statistics times ``factor`` (a run extrapolated from a prefix of equally costly steps)."""
        return Timing(self.median * factor, self.min * factor, self.max * factor, self.repeats)


def measured(timing: Timing) -> tuple[Timing, str, dict]:
    """A workload whose timed call is the whole run: reported as measured."""
    return timing, "measured", {}


@dataclass
class Workload:
    """One row of a timing table: what is timed, what warms it up, and how its timing becomes the reported figure.

    Attributes:
        label: the method, as the table names it.
        params_m: parameters of the network that runs, in millions.
        calls: the number of network calls of one reported run, in words.
        run: the timed call.
        warm: a short call of the same code path (e.g. one or two steps), run once before timing.
        report: the timing of ``run`` → (reported timing, note, details); extrapolates where ``run`` is a prefix.
    """

    label: str
    params_m: float
    calls: str
    run: Callable[[], object]
    warm: Callable[[], object]
    report: Callable[[Timing], tuple[Timing, str, dict]] = measured


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device`` (CUDA or CPU) when ``enabled``; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def millions_of_parameters(module: torch.nn.Module) -> float:
    """Parameter count in millions."""
    return sum(p.numel() for p in module.parameters()) / 1e6


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    repeats: int = 3,
    warmups: Sequence[Callable[[], object]] | None = None,
) -> list[Timing]:
    """Time several workloads round-robin (A, B, C, A, B, C, ...), so that machine drift hits every side alike.

    ``warmups`` (one per workload; default: the workloads themselves) run once each before timing starts; a short
    call of the same code path (e.g. one sampling step) warms up as well as a full one.
    """
    for warm in warmups if warmups is not None else fns:
        warm()
    seconds: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, seconds, strict=True):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            samples.append(time.perf_counter() - start)
    return [Timing(statistics.median(s), min(s), max(s), repeats) for s in seconds]


def time_alternating(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int = 5) -> tuple[Timing, Timing]:
    """Time two workloads in alternation (A, B, A, B, ...) after one warm-up call of each."""
    a, b = time_interleaved([fn_a, fn_b], repeats)
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


def _set_mmap_threshold(nbytes: int) -> None:
    """glibc ``M_MMAP_THRESHOLD``: blocks of at least ``nbytes`` are served by mmap and handed back to the OS on free
    (fixing it also turns off glibc's dynamic threshold)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)


def _trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mib(fn: Callable[[], object], device: torch.device | None = None, interval: float = 0.0005) -> float:
    """Peak memory that one ``fn()`` call adds, in MiB.

    On a CUDA ``device``: the allocator's peak above what was allocated before the call. Otherwise: the peak of the
    process's resident set size, sampled every ``interval`` seconds by a background thread, above its size before the
    call. So that the resident set follows what is in use, the heap is trimmed first and, during the call, blocks of
    64 KiB and more are served by mmap (freed ones leave at once); afterwards the threshold is 32 MiB, glibc's own
    ceiling, so that timed calls run at their normal speed (serving every large block by mmap makes them ~2× slower).
    """
    if device is not None and device.type == "cuda":
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
    _set_mmap_threshold(64 * 2**10)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
        _set_mmap_threshold(32 * 2**20)
    return (max(peak, _resident_bytes()) - base) / 2**20


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as a GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
