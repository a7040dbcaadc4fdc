"""Training for a wall-time budget: the loop of the baselines that are given prod9's training time.

The regression peers and the segmenter of the BraSyn evaluation are not prod9 models and have no bundle; what they
share is a budget in seconds rather than in epochs, so that "the same wall time" is what the comparison holds
equal whatever the speed of the machine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = ["endless", "train_for_seconds"]

logger = logging.getLogger(__name__)


def endless(loader: Iterable[dict]) -> Iterator[dict]:
    """The batches of ``loader``, epoch after epoch (reshuffled and re-augmented each time)."""
    while True:
        yield from loader


def train_for_seconds(
    network: torch.nn.Module,
    batches: Iterator[dict],
    loss_of: Callable[[dict], torch.Tensor],
    seconds: float,
    learning_rate: float,
    name: str,
    hint: str = "",
) -> dict[str, float]:
    """Train ``network`` with Adam on ``loss_of(batch)`` until ``seconds`` are spent.

    The learning rate follows a cosine decay over the *elapsed fraction* of the budget, so the schedule ends when the
    budget does. The budget is checked between iterations; at least one iteration runs. A non-finite loss stops the
    run with ``FloatingPointError`` naming ``name`` and the iteration, followed by ``hint``.

    Returns:
        ``iterations``, ``train_seconds`` (wall time of the loop), ``loss_first`` and ``loss_last`` (mean loss of the
        first and of the last ``min(10, iterations // 2)`` iterations, at least one).
    """
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}.")
    network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    losses: list[float] = []
    start = time.perf_counter()
    for batch in batches:
        elapsed = time.perf_counter() - start
        if losses and elapsed >= seconds:
            break
        progress = min(elapsed / seconds, 1.0) if seconds > 0 else 0.0
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
        loss = loss_of(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{name}: the training loss is {float(loss.detach())} at iteration {len(losses) + 1}{hint}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if len(losses) % 50 == 0:
            logger.info("%s: iteration %d, loss %.4f, %.0f s", name, len(losses), losses[-1], elapsed)
    window = max(1, min(10, len(losses) // 2))
    return {
        "iterations": len(losses),
        "train_seconds": time.perf_counter() - start,
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
    }
