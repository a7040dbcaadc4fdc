"""TransformerDecoder, AdaLNZeroBlock, SinCosPosEmbed and SourceEncoder: shapes, init, token order and conditioning.

The sources are voxel images on the target's token grid times ``FACTOR`` (the stage-1 downsampling factor).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from prod9_ext.transformer import (
    AdaLNZeroBlock,
    SinCosPosEmbed,
    SourceEncoder,
    TransformerDecoder,
    conv3d_onednn,
    depth_to_space,
    patchify,
    space_to_depth,
    unpatchify,
    with_level_term,
)

V = 12
FACTOR = 2  # voxels per token along each axis
ENCODERS = ["space_to_depth", "conv"]


def _model(
    shape=(4, 4, 4),
    patch_size: int = 1,
    num_classes: int = 0,
    randomize: bool = True,
    fsq_levels=None,
    token_dim: int = 0,
    source_encoder: str = "space_to_depth",
) -> TransformerDecoder:
    """A tiny model; ``randomize`` replaces the zero-initialised gates and head so that every input matters."""
    torch.manual_seed(0)
    model = TransformerDecoder(
        num_layers=2,
        hidden_dim=32,
        num_heads=4,
        ffn_dim=64,
        vocab_size=V,
        latent_shape=shape,
        num_modalities=4,
        num_classes=num_classes,
        patch_size=patch_size,
        fsq_levels=fsq_levels,
        token_dim=token_dim,
        source_factor=FACTOR,
        source_encoder=source_encoder,
    ).eval()
    if randomize:
        with torch.no_grad():
            for param in model.parameters():
                if torch.all(param == 0):
                    param.normal_(std=0.1)
    return model


def _tokens(batch: int, shape=(4, 4, 4), masked: bool = True) -> torch.Tensor:
    return torch.randint(0, V + int(masked), (batch, *shape))


def _voxels(batch: int, shape=(4, 4, 4), slots: int = 1) -> torch.Tensor:
    """Source images ``[batch, slots, *shape * FACTOR]`` in [0, 1], as the preprocessing gives them."""
    return torch.rand(batch, slots, *(n * FACTOR for n in shape))


@pytest.mark.parametrize("token_dim", [0, 8])
@pytest.mark.parametrize(("shape", "patch_size"), [((4, 4, 4), 1), ((8, 8, 8), 2), ((4, 6, 4), 2), ((3, 5, 2), 1)])
def test_output_shape(shape: tuple[int, int, int], patch_size: int, token_dim: int) -> None:
    model = _model(shape, patch_size, randomize=False, token_dim=token_dim)
    sources = _voxels(2, shape)
    logits = model(_tokens(2, shape), torch.tensor([1, 3]), sources, torch.tensor([[0], [2]]))
    assert logits.shape == (2, math.prod(shape), V)
    assert torch.all(logits == 0)  # zero-initialised head: the first prediction is uniform


def test_block_starts_as_identity() -> None:
    block = AdaLNZeroBlock(hidden_dim=32, num_heads=4, ffn_dim=64)
    x, c = torch.randn(2, 10, 32), torch.randn(2, 32)
    assert torch.equal(block(x, c), x)


def test_sincos_embedding_is_per_axis() -> None:
    grid = (3, 4, 5)
    pos = SinCosPosEmbed(dim=32, grid_shape=grid)
    assert sum(pos.axis_dims) == 32 and all(n % 2 == 0 for n in pos.axis_dims)
    table = pos.embedding.view(*grid, 32)
    splits = torch.split(table, list(pos.axis_dims), dim=-1)
    for axis, part in enumerate(splits):
        # Every channel group depends on its own axis only: constant along the other two.
        other_axes = [a for a in range(3) if a != axis]
        for a in other_axes:
            assert torch.allclose(part, part.select(a, 0).unsqueeze(a).expand_as(part))
        # ... and differs between coordinates along its own axis.
        assert not torch.allclose(part.select(axis, 0), part.select(axis, 1))
    x = torch.zeros(2, math.prod(grid), 32)
    assert torch.equal(pos(x)[1], pos.embedding)


def test_sincos_rejects_odd_dim() -> None:
    with pytest.raises(ValueError, match="31"):
        SinCosPosEmbed(dim=31, grid_shape=(2, 2, 2))


@pytest.mark.parametrize(("shape", "p"), [((4, 6, 4), 2), ((2, 3, 4), 1)])
def test_patchify_unpatchify_round_trip_in_flatten_order(shape: tuple[int, int, int], p: int) -> None:
    tokens = torch.arange(2 * math.prod(shape)).view(2, *shape)
    patches = patchify(tokens, p)
    assert patches.shape == (2, math.prod(shape) // p**3, p**3)
    assert torch.equal(unpatchify(patches, shape, p).squeeze(-1), tokens.flatten(1))


@pytest.mark.parametrize(("shape", "p", "voxel"), [((4, 6, 4), 2, (1, 4, 2)), ((4, 4, 4), 1, (2, 1, 3))])
def test_logits_follow_token_order(shape: tuple[int, int, int], p: int, voxel: tuple[int, int, int]) -> None:
    """With identity blocks each position only sees its own patch: changing one token changes its patch's logits."""
    model = _model(shape, p, randomize=False)
    with torch.no_grad():
        for param in model.final_layer.parameters():
            param.normal_(std=0.1)
    tokens = _tokens(1, shape)
    changed = tokens.clone()
    changed[(0, *voxel)] = (tokens[(0, *voxel)] + 1) % (V + 1)
    target = torch.zeros(1, dtype=torch.long)
    differs = (model(tokens, target) - model(changed, target)).abs().amax(-1)[0] > 0
    patch = torch.zeros(shape, dtype=torch.bool)
    i, j, k = (c // p * p for c in voxel)
    patch[i : i + p, j : j + p, k : k + p] = True
    assert torch.equal(differs, patch.flatten())


@pytest.mark.parametrize("token_dim", [0, 8])
def test_target_modality_changes_logits(token_dim: int) -> None:
    model = _model(token_dim=token_dim)
    tokens = _tokens(1)
    assert not torch.allclose(model(tokens, torch.tensor([0])), model(tokens, torch.tensor([3])))


@pytest.mark.parametrize("source_encoder", ENCODERS)
@pytest.mark.parametrize("token_dim", [0, 8])
def test_sources_and_class_change_logits(token_dim: int, source_encoder: str) -> None:
    model = _model(num_classes=3, token_dim=token_dim, source_encoder=source_encoder)
    tokens, target = _tokens(1), torch.tensor([1])
    sources = _voxels(1)
    plain = model(tokens, target)
    assert not torch.allclose(plain, model(tokens, target, sources, torch.tensor([[0]])))
    assert not torch.allclose(plain, model(tokens, target, class_label=torch.tensor([2])))


@pytest.mark.parametrize("source_encoder", ENCODERS)
@pytest.mark.parametrize("token_dim", [0, 8])
def test_missing_source_slot_equals_not_passing_it(token_dim: int, source_encoder: str) -> None:
    model = _model(token_dim=token_dim, source_encoder=source_encoder)
    tokens, target = _tokens(2), torch.tensor([3, 3])
    t1, t2, junk = (_voxels(2)[:, 0] for _ in range(3))
    both = torch.stack([t1, t2], dim=1)
    with_gap = model(tokens, target, torch.stack([t1, junk, t2], dim=1), torch.tensor([[0, -1, 2], [0, -1, 2]]))
    torch.testing.assert_close(with_gap, model(tokens, target, both, torch.tensor([[0, 2], [0, 2]])))
    all_absent = model(tokens, target, both, torch.full((2, 2), -1))
    torch.testing.assert_close(all_absent, model(tokens, target))
    # Each sample may have its own subset: sample 0 has T1 only, sample 1 nothing.
    mixed = model(tokens, target, both, torch.tensor([[0, -1], [-1, -1]]))
    torch.testing.assert_close(mixed[0], model(tokens[:1], target[:1], t1[:1, None], torch.tensor([[0]]))[0])
    torch.testing.assert_close(mixed[1], model(tokens[1:], target[1:])[0])


@pytest.mark.parametrize("source_encoder", ENCODERS)
@pytest.mark.parametrize("token_dim", [0, 8])
def test_any_subset_of_three_sources_equals_passing_only_that_subset(token_dim: int, source_encoder: str) -> None:
    """All 2³ subsets of {T1, T1ce, T2} → FLAIR run; an absent slot (junk voxels, -1) is the same as leaving it out."""
    model = _model(token_dim=token_dim, source_encoder=source_encoder)
    tokens, target = _tokens(1), torch.tensor([3])
    voxels = _voxels(1, slots=3)
    junk = 10 * torch.randn_like(voxels)  # what an absent slot holds must not matter
    outputs = []
    for subset in itertools.product([False, True], repeat=3):
        keep = torch.tensor(subset)
        modalities = torch.where(keep, torch.arange(3), -1)[None]
        full = model(tokens, target, torch.where(keep[None, :, None, None, None], voxels, junk), modalities)
        if keep.any():
            only = model(tokens, target, voxels[:, keep], torch.arange(3)[keep][None])
        else:
            only = model(tokens, target)
        assert full.shape == (1, 64, V) and torch.isfinite(full).all()
        torch.testing.assert_close(full, only)
        outputs.append(full)
    for a, b in itertools.combinations(outputs, 2):  # every subset is its own condition
        assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("source_encoder", ENCODERS)
@pytest.mark.parametrize("token_dim", [0, 8])
def test_the_targets_own_voxels_cannot_reach_the_logits(token_dim: int, source_encoder: str) -> None:
    """No leak: the target's slot marked absent (-1), or all conditions dropped, its voxels change nothing; the same
    change to a present source's voxels does change the logits (the model is sensitive to what it may see)."""
    model = _model(token_dim=token_dim, source_encoder=source_encoder)
    tokens, target = _tokens(2), torch.tensor([3, 3])
    voxels = _voxels(2, slots=3)  # slots: T1, T2, and FLAIR (the target)
    modalities = torch.tensor([[0, 2, -1], [0, 2, -1]])
    perturbed = voxels.clone()
    perturbed[:, 2] = torch.rand_like(perturbed[:, 2]) * 5 - 2  # the target's own voxels, changed everywhere
    reference = model(tokens, target, voxels, modalities)
    assert torch.equal(model(tokens, target, perturbed, modalities), reference)
    present_changed = voxels.clone()
    present_changed[:, 0] = perturbed[:, 2]
    assert not torch.allclose(model(tokens, target, present_changed, modalities), reference, atol=1e-4)
    # Conditions dropped (classifier-free guidance): no slot reaches the logits, present or not.
    drop = torch.tensor([True, True])
    dropped = model(tokens, target, voxels, modalities, drop_condition=drop)
    assert torch.equal(model(tokens, target, present_changed, modalities, drop_condition=drop), dropped)
    torch.testing.assert_close(dropped, model(tokens, target))


@pytest.mark.parametrize("token_dim", [0, 8])
def test_drop_condition_gives_the_no_condition_state(token_dim: int) -> None:
    model = _model(num_classes=3, token_dim=token_dim)
    tokens, target = _tokens(2), torch.tensor([1, 2])
    sources = _voxels(2)
    dropped = model(
        tokens,
        target,
        sources,
        torch.tensor([[0], [0]]),
        torch.tensor([1, 2]),
        drop_condition=torch.tensor([True, False]),
    )
    torch.testing.assert_close(dropped[0], model(tokens[:1], target[:1])[0])
    torch.testing.assert_close(
        dropped[1], model(tokens[1:], target[1:], sources[1:], torch.tensor([[0]]), torch.tensor([2]))[0]
    )


def test_token_path_sees_neighbours_across_patch_borders() -> None:
    """Changing one source voxel changes the token-path logits of its token's 3×3×3 neighbours in the next patch too.

    The transformer is cut out (identity blocks and a zero projection from its output), so only the token path
    carries the change: a patch head would change the logits of the token's own patch only. With space-to-depth the
    voxel (2, 2, 2) lies under token (1, 1, 1) alone.
    """
    shape, p = (6, 6, 6), 2
    model = _model(shape, p, token_dim=8)
    with torch.no_grad():
        for block in model.blocks:
            for param in block.adaLN_modulation.parameters():
                param.zero_()
        model.final_layer.proj.weight.zero_()
        model.final_layer.proj.bias.zero_()
    tokens, target = _tokens(1, shape), torch.tensor([2])
    sources = _voxels(1, shape)
    changed = sources.clone()
    changed[0, 0, 2, 2, 2] += 0.5
    modality = torch.tensor([[0]])
    differs = (model(tokens, target, sources, modality) - model(tokens, target, changed, modality)).abs().amax(-1)
    differs = differs.view(shape)
    assert differs[2, 1, 1] > 0  # a neighbour in the next patch along the first axis
    assert differs[4, 4, 4] > 0  # three 3x3x3 convolutions (source fusion, stem, head) reach 3 tokens away
    assert differs[5, 5, 5] == 0  # ... and no further
    assert differs[1, 5, 1] == 0


def _encoder(kind: str, num_modalities: int = 4, channels: int = 8) -> SourceEncoder:
    torch.manual_seed(0)
    encoder = SourceEncoder(num_modalities, FACTOR, channels, kind).eval()
    with torch.no_grad():
        encoder.no_source.normal_()
    return encoder


@pytest.mark.parametrize("kind", ENCODERS)
def test_source_encoder_reads_voxels_onto_the_token_grid(kind: str) -> None:
    """Both encoders: ``[B, S, h*f, w*f, d*f]`` → ``[B, h, w, d, C]``; a voxel reaches the tokens around its own
    (a 3×3×3 fusion on the token grid; the convolutional reader's 3×3×3 voxel kernel adds at most one more token)."""
    encoder = _encoder(kind)
    assert (encoder.reader is None) == (kind == "space_to_depth")
    sources = _voxels(2, (4, 6, 4), slots=2)
    features = encoder(sources, torch.tensor([[0, 1], [2, -1]]))
    assert features.shape == (2, 4, 6, 4, 8)
    changed = sources.clone()
    changed[0, 0, 2, 2, 2] += 1.0  # under token (1, 1, 1)
    differs = (encoder(changed, torch.tensor([[0, 1], [2, -1]])) - features).abs().amax(-1)
    assert differs[0, 1, 1, 1] > 0 and differs[0, 3, 5, 3] == 0
    assert differs[1].amax() == 0  # the other sample
    assert torch.equal(encoder(None, None), encoder.no_source)
    with pytest.raises(ValueError, match="'wavelet'"):
        SourceEncoder(4, FACTOR, 8, "wavelet")


@pytest.mark.parametrize("kind", ENCODERS)
def test_source_encoder_puts_each_source_in_its_modality_slot(kind: str) -> None:
    """The fused source features depend on which modality each source is, not on the order of the slots."""
    encoder = _encoder(kind)
    sources = _voxels(1, slots=2)
    features = encoder(sources, torch.tensor([[0, 2]]))
    swapped = encoder(sources.flip(1), torch.tensor([[2, 0]]))
    torch.testing.assert_close(features, swapped)
    assert not torch.allclose(features, encoder(sources, torch.tensor([[2, 0]])), atol=1e-3)


@pytest.mark.parametrize("kind", ENCODERS)
def test_source_encoder_fuses_sources_beyond_a_sum(kind: str) -> None:
    """What two sources say together is not the sum of what each says: with sources (a, b) for T1 and T2,
    f(a, b) - f(a, b') - f(a', b) + f(a', b') differs from zero (a mean of per-source embeddings gives zero)."""
    encoder = _encoder(kind)
    a, a2, b, b2 = (_voxels(1)[:, 0] for _ in range(4))
    modalities = torch.tensor([[0, 2]])

    def fused(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        return encoder(torch.stack([t1, t2], dim=1), modalities)

    interaction = fused(a, b) - fused(a, b2) - fused(a2, b) + fused(a2, b2)
    assert interaction.abs().amax() > 1e-2


@pytest.mark.parametrize(("shape", "factor"), [((2, 3, 8, 6, 4), 2), ((1, 1, 12, 4, 8), 4), ((1, 2, 3, 3, 3), 1)])
def test_space_to_depth_and_depth_to_space_are_exact_inverses(shape: tuple[int, ...], factor: int) -> None:
    x = torch.randn(shape)
    moved = space_to_depth(x, factor)
    b, c, *spatial = shape
    assert moved.shape == (b, c * factor**3, *(n // factor for n in spatial))
    assert torch.equal(depth_to_space(moved, factor), x)
    y = torch.randn(moved.shape)
    assert torch.equal(space_to_depth(depth_to_space(y, factor), factor), y)
    # Channel c * f³ + k holds voxel k (raster order inside the token's block) of channel c.
    i, j, k = (n // factor - 1 for n in spatial)
    for a, bb, cc in itertools.product(range(factor), repeat=3):
        slot = (c - 1) * factor**3 + (a * factor + bb) * factor + cc
        voxel = x[b - 1, c - 1, i * factor + a, j * factor + bb, k * factor + cc]
        assert moved[b - 1, slot, i, j, k] == voxel


def test_space_to_depth_needs_whole_tokens() -> None:
    with pytest.raises(ValueError, match=r"\[8, 7, 4\] is not divisible by the factor 2"):
        space_to_depth(torch.zeros(1, 1, 8, 7, 4), 2)


def test_token_path_needs_non_negative_sizes() -> None:
    with pytest.raises(ValueError, match="-4"):
        TransformerDecoder(1, 32, 4, 64, V, (4, 4, 4), 4, token_dim=-4)


@pytest.mark.parametrize("token_dim", [0, 8])
def test_autocast_bf16_on_cpu(token_dim: int) -> None:
    model = _model(shape=(4, 4, 4), patch_size=2, token_dim=token_dim)
    tokens, target = _tokens(2), torch.tensor([0, 1])
    sources = _voxels(2)
    reference = model(tokens, target, sources, torch.tensor([[2], [3]]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens, target, sources, torch.tensor([[2], [3]]))
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    assert torch.allclose(logits.float(), reference, atol=0.1 * reference.abs().max().item())


def test_bad_arguments() -> None:
    model = _model()
    tokens, target = _tokens(1), torch.tensor([0])
    voxel_grid = r"sources must be voxel grids \[B, S, \*\[8, 8, 8\]\] .* source_factor 2\), got shape "
    with pytest.raises(ValueError, match=voxel_grid + r"\(1, 1, 8, 8, 4\)"):
        model(tokens, target, _voxels(1, (4, 4, 2)), torch.tensor([[1]]))
    with pytest.raises(ValueError, match=voxel_grid + r"\(1, 1, 4, 4, 4\)"):  # token grids are no sources
        model(tokens, target, _tokens(1, masked=False)[:, None].float(), torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"source_modalities must have shape \(1, 1\) \[B, S\], got \(1, 2\)"):
        model(tokens, target, _voxels(1), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"\(4, 4, 2\)"):
        model(_tokens(1, (4, 4, 2)), target)
    with pytest.raises(ValueError, match="num_classes=0"):
        model(tokens, target, class_label=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(4, 6, 3\)"):
        TransformerDecoder(1, 32, 4, 64, V, (4, 6, 3), 4, patch_size=2)


@pytest.mark.parametrize("token_dim", [0, 8])
@pytest.mark.parametrize("patch_size", [1, 2])
def test_fsq_structure_keeps_shape_and_uniform_start(patch_size: int, token_dim: int) -> None:
    model = _model((4, 4, 4), patch_size, randomize=False, fsq_levels=[3, 4], token_dim=token_dim)
    sources = _voxels(2)
    logits = model(_tokens(2), torch.tensor([1, 3]), sources, torch.tensor([[0], [2]]))
    assert logits.shape == (2, 64, V)
    assert torch.all(logits == 0)


@pytest.mark.parametrize("token_dim", [0, 8])
def test_fsq_level_scores_are_shared_by_tokens_with_the_same_level(token_dim: int) -> None:
    """With only the factorised term active, a token's logit is the sum of its channels' level scores."""
    model = _model(fsq_levels=[3, 4], token_dim=token_dim)
    with torch.no_grad():
        model.final_layer.linear.weight.zero_()
        model.final_layer.linear.bias.zero_()
    logits = model(_tokens(1), torch.tensor([0]))[0]
    # Token v has digits (v % 3, v // 3). A factorised score: logit(x, y) - logit(x', y) does not depend on y.
    grid = logits.view(-1, 4, 3)  # [N, second digit, first digit]
    first_channel_step = grid[:, :, 1] - grid[:, :, 0]
    assert torch.allclose(first_channel_step, first_channel_step[:, :1].expand_as(first_channel_step), atol=1e-5)
    assert first_channel_step.abs().max() > 0


def test_fsq_code_embedding_makes_neighbouring_tokens_close() -> None:
    """Before training, the code-vector path alone embeds token v closer to its grid neighbour than to a far code."""
    model = _model(fsq_levels=[3, 4], randomize=False)
    embed = model.token_embed
    with torch.no_grad():
        embed.table.weight.zero_()
    grid = lambda v: torch.full((1, 4, 4, 4), v)  # noqa: E731
    centre, neighbour, far = embed(grid(4)), embed(grid(5)), embed(grid(11))  # digits (1,1), (2,1), (2,3)
    assert (centre - neighbour).norm() < (centre - far).norm()
    masked = embed(grid(V))
    assert not torch.allclose(masked, embed(grid(0)))


def test_fsq_levels_must_match_vocab() -> None:
    with pytest.raises(ValueError, match=r"fsq_levels \[5, 5\] give 25 codes, not vocab_size 12"):
        TransformerDecoder(1, 32, 4, 64, V, (4, 4, 4), 4, fsq_levels=[5, 5])


def _gpu_pair() -> tuple[TransformerDecoder, TransformerDecoder, dict]:
    cpu = _model((8, 8, 8), patch_size=2)
    gpu = _model((8, 8, 8), patch_size=2).cuda()
    inputs = {
        "tokens": _tokens(2, (8, 8, 8)),
        "target_modality": torch.tensor([0, 1]),
        "sources": _voxels(2, (8, 8, 8)),
        "source_modalities": torch.tensor([[2], [-1]]),
    }
    return cpu, gpu, inputs


@pytest.mark.gpu
def test_cpu_and_cuda_logits_agree() -> None:
    cpu, gpu, inputs = _gpu_pair()
    expected = cpu(**inputs)
    actual = gpu(**{k: v.cuda() for k, v in inputs.items()}).cpu()
    assert torch.allclose(actual, expected, atol=1e-3 * expected.abs().max().item() + 1e-4)


@pytest.mark.gpu
def test_autocast_on_cuda() -> None:
    _, gpu, inputs = _gpu_pair()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    reference = gpu(**inputs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = gpu(**inputs)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits.float(), reference, atol=0.1 * reference.abs().max().item())


def test_training_attention_keeps_the_fused_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention-weight dropout would send CPU attention to the math kernel (every L×L matrix held): none is asked."""
    import prod9_ext.transformer as transformer_module

    calls: list[dict] = []
    original = transformer_module.F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer_module.F, "scaled_dot_product_attention", recording)
    model = TransformerDecoder(2, 32, 4, 64, V, (4, 4, 4), 4, dropout=0.5).train()
    model(_tokens(2), torch.tensor([0, 1]))
    assert len(calls) == 2 and all(call.get("dropout_p", 0.0) == 0.0 and "attn_mask" not in call for call in calls)


@pytest.mark.parametrize(("patch_size", "token_dim"), [(1, 0), (2, 0), (2, 8)])
def test_level_term_folded_into_one_layer_equals_the_sum(patch_size: int, token_dim: int) -> None:
    """``with_level_term``: one linear layer gives each token's logit plus the scores of its levels."""
    model = _model((4, 4, 4), patch_size, fsq_levels=[3, 4], token_dim=token_dim)
    head = model.final_layer
    assert head.level_linear is not None
    x = torch.randn(2, 5, head.linear.in_features)
    slots = head.linear.out_features // V
    expected = head.linear(x) + (head.level_linear(x).unflatten(-1, (slots, -1)) @ head.level_of_token).flatten(-2)
    assert torch.allclose(
        F.linear(x, *with_level_term(head.linear, head.level_linear, head.level_of_token, slots)), expected, atol=1e-5
    )


@pytest.mark.parametrize("token_dim", [0, 8])
def test_condition_then_logits_equals_forward(token_dim: int) -> None:
    """The conditions' part computed once (``condition``) and reused gives the logits of a full call."""
    model = _model(num_classes=3, fsq_levels=[3, 4], token_dim=token_dim)
    sources, modalities = (
        _voxels(3, slots=2),
        torch.tensor([[0, 1], [-1, 2], [0, -1]]),
    )
    label, drop = torch.tensor([0, 2, 1]), torch.tensor([False, False, True])
    conditioning = model.condition(torch.tensor([3, 1, 2]), sources, modalities, label, drop)
    for _ in range(2):  # reused: the same conditioning for other target tokens
        tokens = _tokens(3)
        full = model(tokens, torch.tensor([3, 1, 2]), sources, modalities, label, drop)
        assert torch.allclose(model.logits(tokens, conditioning), full, atol=1e-6)
    unconditioned = model.condition(torch.tensor([1]))
    tokens = _tokens(1)
    assert torch.allclose(model.logits(tokens, unconditioned), model(tokens, torch.tensor([1])), atol=1e-6)


@pytest.mark.parametrize(("patch_size", "token_dim"), [(1, 0), (2, 0), (2, 8)])
def test_logits_of_selected_tokens_are_the_rows_of_the_full_logits(patch_size: int, token_dim: int) -> None:
    """``logits(..., where)`` returns the selected tokens' rows of the full logits, batch-major."""
    model = _model((4, 4, 4), patch_size, fsq_levels=[3, 4], token_dim=token_dim)
    tokens = _tokens(2)
    conditioning = model.condition(torch.tensor([1, 2]))
    where = torch.rand(2, 64, generator=torch.Generator().manual_seed(3)) < 0.4
    full = model.logits(tokens, conditioning)
    assert torch.allclose(model.logits(tokens, conditioning, where), full[where], atol=1e-6)


def test_onednn_convolution_equals_the_module_and_serves_batches_of_one_without_autograd() -> None:
    """``conv3d_onednn`` gives ``conv(x)``, in bf16 under CPU autocast as ``conv`` does; it calls oneDNN itself for a
    batch of one without autograd (where PyTorch picks its reference kernel), and leaves autograd to ``conv``."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(8, 8, kernel_size=3, padding=1)
    x = torch.randn(1, 8, 6, 5, 4)

    def kernels(fn) -> set[str]:
        with torch.profiler.profile() as prof:
            fn()
        return {event.name for event in prof.events() if "conv" in event.name}

    with torch.no_grad():
        assert torch.allclose(conv3d_onednn(conv, x), conv(x), atol=1e-5)
        assert "aten::mkldnn_convolution" in kernels(lambda: conv3d_onednn(conv, x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, reference = conv3d_onednn(conv, x), conv(x)
        assert ours.dtype == reference.dtype == torch.bfloat16
        assert torch.allclose(ours.float(), reference.float(), atol=0.05)
    x.requires_grad_(True)
    (ours_grad,) = torch.autograd.grad(conv3d_onednn(conv, x).square().sum(), x)  # with autograd: conv itself
    (reference_grad,) = torch.autograd.grad(conv(x).square().sum(), x)
    assert torch.equal(ours_grad, reference_grad)
