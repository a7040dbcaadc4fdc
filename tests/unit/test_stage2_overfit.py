"""Overfit a tiny TransformerDecoder on a few pairs: proves the masked loss trains and the sources' voxels are used.

Each pair is (source image of modality 0 → target token grid of modality 1), the source random voxels on the token
grid times ``FACTOR``, the target independent random tokens, so the target can only be reproduced by reading the
source.
"""

from __future__ import annotations

import pytest
import torch

from prod9_ext import MaskGiTSampler, MaskGiTScheduler, TransformerDecoder

SOURCE, TARGET = 0, 1
FACTOR = 2  # voxels per token along each axis


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread avoids the synchronisation cost (and contention) of several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _overfit(shape: tuple[int, int, int], patch_size: int, vocab_size: int, steps: int, hidden: int) -> None:
    torch.manual_seed(0)
    pairs, repeats = 4, 4
    sources = torch.rand(pairs, 1, *(n * FACTOR for n in shape))
    targets = torch.randint(0, vocab_size, (pairs, *shape))
    model = TransformerDecoder(
        num_layers=2,
        hidden_dim=hidden,
        num_heads=4,
        ffn_dim=2 * hidden,
        vocab_size=vocab_size,
        latent_shape=shape,
        num_modalities=2,
        patch_size=patch_size,
        source_factor=FACTOR,
    )
    scheduler = MaskGiTScheduler(vocab_size, cond_drop_prob=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    batch_sources, batch_targets = sources.repeat(repeats, 1, 1, 1, 1), targets.repeat(repeats, 1, 1, 1)
    batch_modalities = torch.full((pairs * repeats, 1), SOURCE)
    target_modality = torch.full((pairs * repeats,), TARGET)

    model.train()
    for _ in range(steps):
        masked, labels = scheduler.mask(batch_targets, generator=g)
        drop = scheduler.drop_condition(pairs * repeats, generator=g)
        logits = model(masked, target_modality, batch_sources, batch_modalities, drop_condition=drop)
        loss = scheduler.loss(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    with torch.no_grad():
        masked, labels = scheduler.mask(batch_targets, generator=g)
        conditioned_loss = scheduler.loss(model(masked, target_modality, batch_sources, batch_modalities), labels)
    assert conditioned_loss.item() < 0.05

    sampler = MaskGiTSampler(steps=8)
    samples = sampler.sample(
        model, (pairs, *shape), torch.full((pairs,), TARGET), sources, torch.full((pairs, 1), SOURCE), generator=g
    )
    accuracy = (samples == targets).flatten(1).float().mean(1)
    assert torch.all(accuracy >= 0.95), accuracy.tolist()


def test_overfit_small_grid() -> None:
    _overfit(shape=(4, 4, 4), patch_size=1, vocab_size=16, steps=250, hidden=64)


@pytest.mark.slow
def test_overfit_patched_grid() -> None:
    _overfit(shape=(8, 8, 8), patch_size=2, vocab_size=64, steps=400, hidden=96)
