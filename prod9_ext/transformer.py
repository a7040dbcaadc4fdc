"""Bidirectional transformer that predicts the masked tokens of a target modality's token grid.

The network follows DiT (AdaLN-Zero conditioning) and nanoGPT (attention, MLP and block kept short, weight init in
one place). Three choices are specific to 3D token grids:

- **Patches of tokens.** Attention cost decides the speed of MaskGiT in 3D, so a sequence position is a ``p³``
  patch of the token grid: it embeds its ``p³`` tokens (masked ones included) and predicts ``p³ × V`` logits.
  Masking and sampling stay per token; only the network sees patches.
- **Per-axis sin-cos positions** over the patch grid, so neighbours along any axis have similar embeddings.
- **Sources as voxels, on the token grid.** Each present source enters at voxel resolution: the ``f³`` voxels
  under each token are moved into channels (space-to-depth, lossless) or read by a small strided convolution, so the
  sources' anatomy is not squeezed into 8-10 bits per token before the network sees it. Each modality has a slot
  of its own with a present flag; absent slots (and the target's own) are zero before anything mixes channels, so
  any subset of sources (including none) is the same network and the target's voxels cannot leak in.
- **FSQ structure (optional, ``fsq_levels``).** An FSQ token is a point on a grid of levels, so neighbouring
  tokens mean similar images. With the levels given, each token is also embedded through its code vector, and
  the logits get a factorised term, one score per level of each channel: what the network learns about one token
  carries over to its neighbours instead of being learned once per token.
- **A token-resolution path (optional, ``token_dim``).** A patch position squeezes ``p³`` tokens into one
  vector and unfolds one vector into ``p³`` predictions, so fine anatomy is lost on the way and every patch is
  predicted on its own (blocks on the patch grid). With ``token_dim`` set, a small convolutional path runs on the
  full token grid around the transformer, as U-Net skips do: it embeds every token with its sources and their
  neighbours, feeds the patches to the transformer, and after it, mixes the transformer's output unfolded back to
  tokens with those features through 3×3×3 convolutions that cross patch borders, then predicts each token.

Token order: logits ``[B, N, V]`` with ``N = h * w * d`` follow the raster order of the token grid, exactly
``tokens.flatten(1)`` for ``tokens`` of shape ``[B, h, w, d]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prod9_ext.fsq import FiniteScalarQuantizer


@dataclass
class Conditioning:
    """What the conditions contribute to a ``TransformerDecoder`` call (``TransformerDecoder.condition``).

    ``c``: the AdaLN conditioning vector ``[B, D]``; ``source_patches``: the sources' features merged into the
    target's patches without the token path, ``[B, L, D]`` (``[D]`` without sources; a zero with the token path);
    ``source_tokens``: with the token path, the sources' token-resolution features ``[B, h, w, d, C]`` (``[C]``
    without sources), else None.
    """

    c: torch.Tensor
    source_patches: torch.Tensor
    source_tokens: torch.Tensor | None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer-norm modulation: ``x [B, L, D]`` scaled and shifted per sample by ``[B, D]`` vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SinCosPosEmbed(nn.Module):
    """Fixed 3D sin-cos positional embedding added to a sequence over a ``grid_shape`` grid in raster order.

    The channels are split across the three axes (as evenly as possible, an even number each): the first
    ``axis_dims[0]`` channels encode the first coordinate only, the next ``axis_dims[1]`` the second, the rest the
    third. Encoding each axis on its own (rather than the flattened index) keeps neighbours along every axis close.
    """

    def __init__(self, dim: int, grid_shape: Sequence[int]) -> None:
        super().__init__()
        if dim % 2 or dim < 6:
            raise ValueError(f"dim must be even and at least 6 to share sin-cos pairs among 3 axes, got {dim}")
        if len(grid_shape) != 3:
            raise ValueError(f"grid_shape must have 3 entries, got {tuple(grid_shape)}")
        pairs = [dim // 2 // 3 + (1 if i < (dim // 2) % 3 else 0) for i in range(3)]
        self.axis_dims = tuple(2 * n for n in pairs)
        coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid_shape), indexing="ij")
        parts = [self._encode_axis(c.flatten(), n) for c, n in zip(coords, self.axis_dims, strict=True)]
        self.register_buffer("embedding", torch.cat(parts, dim=1).float(), persistent=False)
        self.embedding: torch.Tensor

    @staticmethod
    def _encode_axis(positions: torch.Tensor, dim: int) -> torch.Tensor:
        """``[L]`` coordinates → ``[L, dim]``: sines then cosines at ``dim / 2`` geometric frequencies."""
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
        angles = positions[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, L, dim]`` with ``L = prod(grid_shape)`` → ``x + embedding``."""
        return x + self.embedding


class PatchEmbed(nn.Module):
    """Embeds each ``p³`` patch of a token grid ``[B, h, w, d]`` → ``[B, L, dim]`` with ``L = h*w*d / p³``.

    Every slot of the patch has its own table of ``vocab_size + 1`` rows (the last row is the mask id), and a
    patch's embedding is the sum over its slots: the same as one-hot encoding the ``p³`` tokens, concatenating
    and projecting linearly, without materialising the one-hots (``embedding_bag`` sums without a ``p³`` copy).

    With ``code_vectors`` (``[V, C]``, the FSQ codes of the tokens), a linear projection of the patch's code
    vectors is added, with one more input per slot that flags the mask id.
    """

    def __init__(self, vocab_size: int, dim: int, patch_size: int, code_vectors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.patch_size = patch_size
        slots = patch_size**3
        self.table = nn.Embedding(slots * (vocab_size + 1), dim)
        self.register_buffer("offsets", torch.arange(slots) * (vocab_size + 1), persistent=False)
        self.offsets: torch.Tensor
        self.code_proj: nn.Linear | None = None
        if code_vectors is not None:
            # Row v: the code of token v and a 0 flag; the last row (mask id): a zero code and a 1 flag.
            features = F.pad(code_vectors.float(), (0, 1))
            features = torch.cat([features, F.one_hot(torch.tensor([features.shape[1] - 1]), features.shape[1])])
            self.register_buffer("code_features", features.float(), persistent=False)
            self.code_features: torch.Tensor
            self.code_proj = nn.Linear(slots * features.shape[1], dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = patchify(tokens, self.patch_size)
        rows = patches + self.offsets
        x = F.embedding_bag(rows.flatten(0, 1), self.table.weight, mode="sum").unflatten(0, rows.shape[:2])
        if self.code_proj is not None:
            x = x + self.code_proj(self.code_features[patches].flatten(2))
        return x


def patchify(tokens: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, h, w, d]`` → ``[B, L, p³]``: patches in raster order of the patch grid, tokens in raster order inside."""
    b, h, w, d = tokens.shape
    x = tokens.reshape(b, h // p, p, w // p, p, d // p, p).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, (h // p) * (w // p) * (d // p), p**3)


def patchify_features(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, h, w, d]`` → ``[B, L, p³ * C]``: each patch's features, tokens in raster order, channels last."""
    b, c, h, w, d = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p, d // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (h // p) * (w // p) * (d // p), p**3 * c)


def unpatchify(x: torch.Tensor, grid_shape: Sequence[int], p: int) -> torch.Tensor:
    """``[B, L, p³ * V]`` → ``[B, h*w*d, V]`` in raster order of the token grid (the inverse of ``patchify``)."""
    h, w, d = grid_shape
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, d // p, p, p, p, -1).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, h * w * d, -1)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with ``scaled_dot_product_attention``.

    Dropout acts on the output projection, not on the attention weights: with attention dropout, PyTorch's CPU
    attention falls back to the math kernel, which holds every ``L × L`` weight matrix (hundreds of GiB at the
    BraTS grid's 10,368 positions), while the fused kernels never materialise them.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, dim)))


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AdaLNZeroBlock(nn.Module):
    """DiT block: attention and MLP, each behind a layer norm modulated by ``c`` and a gate computed from ``c``.

    The gates come out of a zero-initialised linear layer, so a fresh block is the identity: ``block(x, c) == x``.
    """

    def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden_dim, ffn_dim, dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 6 * hidden_dim))
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x [B, L, D]``, ``c [B, D]`` → ``[B, L, D]``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Modulated layer norm and a zero-initialised projection to ``p³ × V`` logits per position.

    With ``level_digits`` (``[V, C]``, the level index of each token in each FSQ channel), a second zero-initialised
    projection gives one score per level of each channel, and token ``v`` gets the sum of the scores of its levels
    on top of its own logit: a factorised prediction that every token sharing a level learns from.
    """

    def __init__(
        self, hidden_dim: int, vocab_size: int, patch_size: int, level_digits: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.slots = patch_size**3
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        self.linear = nn.Linear(hidden_dim, self.slots * vocab_size)
        self.level_linear: nn.Linear | None = None
        if level_digits is not None:
            # One-hot of every (channel, level) pair that each token has: [sum(levels), V].
            sizes = (level_digits.max(dim=0).values + 1).tolist()
            level_of_token = torch.cat([F.one_hot(level_digits[:, i], n) for i, n in enumerate(sizes)], dim=1)
            self.register_buffer("level_of_token", level_of_token.T.float(), persistent=False)
            self.level_of_token: torch.Tensor
            self.level_linear = nn.Linear(hidden_dim, self.slots * sum(sizes))
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x [B, L, D]``, ``c [B, D]`` → ``[B, L, p³ × V]``."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm(x), shift, scale)
        if self.level_linear is None:
            return self.linear(x)
        return F.linear(x, *with_level_term(self.linear, self.level_linear, self.level_of_token, self.slots))


def with_level_term(
    linear: nn.Linear, level_linear: nn.Linear, level_of_token: torch.Tensor, slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one linear layer giving ``linear(x)`` plus the factorised per-level term.

    For each of ``slots`` slots, ``linear`` gives ``V`` logits and ``level_linear`` ``S`` level scores, and token
    ``v`` gets its logit plus the scores of its levels (``level_of_token [S, V]``). Both are linear in ``x``, so
    the sum is a single layer whose weights are combined here (``slots × V × S × D`` operations, independent of the
    number of positions) instead of a ``[positions, S] @ [S, V]`` product and a sum over every position's logits.
    """
    v, d = linear.weight.shape[0] // slots, linear.weight.shape[1]
    level_weight = level_linear.weight.view(slots, -1, d)  # [slots, S, D]
    weight = linear.weight.view(slots, v, d) + torch.einsum("ksd,sv->kvd", level_weight, level_of_token)
    bias = linear.bias.view(slots, v) + level_linear.bias.view(slots, -1) @ level_of_token
    return weight.reshape(slots * v, d), bias.reshape(slots * v)


class ConvBlock(nn.Module):
    """Residual 3×3×3 convolution on the token grid: ``x + conv(gelu(norm(x)))``, zero-initialised (identity).

    The norm is per token (over channels), not a group norm over the grid: a token's prediction then depends on
    its neighbourhood only, not on statistics of the whole window.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        for param in self.conv.parameters():
            nn.init.zeros_(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w, d]`` → same shape."""
        normed = self.norm(x.movedim(1, -1)).movedim(-1, 1)
        return x + conv3d_onednn(self.conv, F.gelu(normed))


def conv3d_onednn(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; for a batch of one on CPU without autograd (sampling), through oneDNN (``torch.mkldnn_convolution``)
    under autocast as ``conv`` would.

    For a batch of one, PyTorch's CPU dispatch picks its reference kernel (parallel over the batch only) whenever
    ``N·C·D·H <= 20480``, a threshold made for 2D: on the token grids of sampling, e.g. ``[1, 32, 24, 24, 18]``, that
    kernel is about 15× slower than oneDNN on 2 cores. Training batches, gradients and other devices take ``conv``.
    """
    if x.device.type != "cpu" or x.shape[0] != 1 or torch.is_grad_enabled() or not torch.backends.mkldnn.is_available():
        return conv(x)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return conv(x)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return conv(x)
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return torch.mkldnn_convolution(
        x.to(dtype), conv.weight.to(dtype), bias, conv.padding, conv.stride, conv.dilation, conv.groups
    )


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, C, h*f, w*f, d*f]`` → ``[B, C * f³, h, w, d]``: the ``f³`` voxels under each token as channels.

    Channel ``c * f³ + k`` holds voxel ``k`` (raster order inside the token's block) of input channel ``c``; nothing
    is lost, the inverse is :func:`depth_to_space`.
    """
    b, c, *spatial = x.shape
    if any(n % factor for n in spatial):
        raise ValueError(f"voxel grid {spatial} is not divisible by the factor {factor}")
    h, w, d = (n // factor for n in spatial)
    x = x.reshape(b, c, h, factor, w, factor, d, factor).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * factor**3, h, w, d)


def depth_to_space(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, C * f³, h, w, d]`` → ``[B, C, h*f, w*f, d*f]``, the inverse of :func:`space_to_depth`."""
    b, cf, h, w, d = x.shape
    c = cf // factor**3
    x = x.reshape(b, c, factor, factor, factor, h, w, d).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, h * factor, w * factor, d * factor)


SOURCE_ENCODERS = ("space_to_depth", "conv")


class SourceEncoder(nn.Module):
    """The present sources' voxels on the token grid: ``[B, S, H, W, D]`` → features ``[B, h, w, d, C]``.

    Each source is read at voxel resolution (``H = h * factor``): ``"space_to_depth"`` moves the ``factor³`` voxels
    under each token into channels (lossless, no parameters), ``"conv"`` reads them with a small strided
    convolution shared by all modalities (3×3×3 at voxel resolution, then a ``factor``-strided one to the token
    grid, ``factor³`` channels out). Every modality has a slot of its own, ``[features, present flag]``, and an
    absent slot, the target's own included, is zero before anything mixes channels: what is not a present source
    cannot reach the output. A 3×3×3 convolution over the concatenated slots and a per-token MLP then see every
    source and its neighbours at once: what FLAIR looks like where T1 is dark *and* T2 is bright is a conjunction
    that a mean over sources cannot express. With no source present, a learned vector stands in.
    """

    def __init__(self, num_modalities: int, factor: int, channels: int, kind: str = "space_to_depth") -> None:
        super().__init__()
        if kind not in SOURCE_ENCODERS:
            raise ValueError(f"source_encoder must be one of {list(SOURCE_ENCODERS)}, got {kind!r}")
        if factor < 1 or channels < 1:
            raise ValueError(f"source_factor and the source channels must be >= 1, got {factor} and {channels}")
        self.num_modalities = num_modalities
        self.factor = factor
        self.reader: nn.Sequential | None = None
        if kind == "conv":
            width = max(8, factor**3 // 2)
            self.reader = nn.Sequential(
                nn.Conv3d(1, width, kernel_size=3, padding=1),
                nn.GELU(approximate="tanh"),
                nn.Conv3d(width, factor**3, kernel_size=factor, stride=factor),
            )
        slot_dim = factor**3 + 1  # the voxels under a token (or what the reader makes of them), present flag
        self.fuse = nn.Conv3d(num_modalities * slot_dim, channels, kernel_size=3, padding=1)
        self.fuse_mlp = nn.Sequential(
            nn.LayerNorm(channels, eps=1e-6),
            nn.Linear(channels, 4 * channels),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * channels, channels),
        )
        self.no_source = nn.Parameter(torch.zeros(channels))

    def forward(self, sources: torch.Tensor | None, source_modalities: torch.Tensor | None) -> torch.Tensor:
        """``sources [B, S, H, W, D]`` (voxels), ``source_modalities [B, S]`` (``-1``: absent) → ``[B, h, w, d, C]``;
        ``[C]`` (the learned vector) when ``sources`` is None."""
        if sources is None or source_modalities is None:
            return self.no_source
        present = source_modalities >= 0
        b, s = present.shape
        voxels = sources.float() * present[:, :, None, None, None]  # absent slots are zero before anything mixes
        voxels = voxels.flatten(0, 1)[:, None]  # [B * S, 1, H, W, D]
        features = self.reader(voxels) if self.reader is not None else space_to_depth(voxels, self.factor)
        features = features.unflatten(0, (b, s)).movedim(2, -1)  # [B, S, h, w, d, f³]
        keep = present[:, :, None, None, None, None].to(features.dtype)
        features = F.pad(features, (0, 1), value=1.0) * keep
        # Slot m holds the source of modality m: [B, S, ...] → [B, M, ...], then channels first, slots concatenated.
        modality = source_modalities.clamp(min=0)
        slots = features.new_zeros(b, self.num_modalities, *features.shape[2:])
        slots = slots.index_put(
            (torch.arange(b, device=modality.device)[:, None].expand_as(modality), modality), features, accumulate=True
        )
        x = conv3d_onednn(self.fuse, slots.permute(0, 1, 5, 2, 3, 4).flatten(1, 2)).permute(0, 2, 3, 4, 1)
        x = x + self.fuse_mlp(x)
        return torch.where(present.any(dim=1)[:, None, None, None, None], x, self.no_source)


class TokenStem(nn.Module):
    """Token-resolution features ``[B, C, h, w, d]``: each target token with the sources' features, and neighbours.

    The target token (or the mask id) is embedded by its own table, plus a linear map of its code with a mask flag
    when ``code_vectors`` (``[V, n]``, the FSQ codes) is given; the :class:`SourceEncoder`'s features are added and
    a residual convolution lets each token see its neighbourhood.
    """

    def __init__(self, vocab_size: int, channels: int, code_vectors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.target = nn.Embedding(vocab_size + 1, channels)
        self.block = ConvBlock(channels)
        self.target_code: nn.Linear | None = None
        if code_vectors is not None:
            # Row v: the code of token v and a 0 flag; the last row (mask id): a zero code and a 1 flag.
            features = torch.cat(
                [F.pad(code_vectors.float(), (0, 1)), F.one_hot(torch.tensor([code_vectors.shape[1]]))]
            )
            self.register_buffer("code_features", features.float(), persistent=False)
            self.code_features: torch.Tensor
            self.target_code = nn.Linear(features.shape[1], channels)

    def forward(self, tokens: torch.Tensor, source_features: torch.Tensor) -> torch.Tensor:
        """``tokens [B, h, w, d]`` and the :class:`SourceEncoder`'s output → ``[B, C, h, w, d]``."""
        x = self.target(tokens) + source_features
        if self.target_code is not None:
            x = x + self.target_code(self.code_features[tokens])
        return self.block(x.permute(0, 4, 1, 2, 3))


class TokenHead(nn.Module):
    """Per-token logits from the transformer's patch outputs unfolded to tokens plus the stem's features.

    ``proj`` turns each position's output into ``p³ × C`` features (one per token of the patch); the stem's
    features are added (the skip), the conditioning ``c`` shifts and scales every channel, and residual 3×3×3
    convolutions mix neighbouring tokens, across patch borders, before a per-token linear layer gives ``V`` logits
    (plus, with ``level_digits``, the factorised per-level term of :class:`FinalLayer`). The logit layers start at
    zero, so the first prediction is uniform over the vocabulary.
    """

    def __init__(
        self,
        hidden_dim: int,
        channels: int,
        vocab_size: int,
        patch_size: int,
        num_blocks: int = 1,
        level_digits: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.proj = nn.Linear(hidden_dim, patch_size**3 * channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * channels))
        self.blocks = nn.Sequential(*(ConvBlock(channels) for _ in range(num_blocks)))
        self.out_norm = nn.LayerNorm(channels, eps=1e-6)
        self.linear = nn.Linear(channels, vocab_size)
        self.level_linear: nn.Linear | None = None
        if level_digits is not None:
            sizes = (level_digits.max(dim=0).values + 1).tolist()
            level_of_token = torch.cat([F.one_hot(level_digits[:, i], n) for i, n in enumerate(sizes)], dim=1)
            self.register_buffer("level_of_token", level_of_token.T.float(), persistent=False)
            self.level_of_token: torch.Tensor
            self.level_linear = nn.Linear(channels, sum(sizes))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, skip: torch.Tensor, where: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x [B, L, D]``, ``c [B, D]``, ``skip [B, C, h, w, d]`` → ``[B, h*w*d, V]`` in raster order; with
        ``where`` (``Bool[B, h*w*d]``) only the selected tokens' logits, ``[M, V]``."""
        grid = skip.shape[2:]
        tokens = unpatchify(self.proj(self.norm(x)), grid, self.patch_size)  # [B, h*w*d, C]
        shift, scale = self.modulation(c).chunk(2, dim=1)
        features = skip + tokens.transpose(1, 2).reshape(skip.shape)
        features = features * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]
        features = self.out_norm(self.blocks(features).flatten(2).transpose(1, 2))
        if where is not None:
            features = features[where]
        if self.level_linear is None:
            return self.linear(features)
        return F.linear(features, *with_level_term(self.linear, self.level_linear, self.level_of_token, 1))


def init_weights(module: nn.Module) -> None:
    """The one place where weights are initialised; ``module.apply(init_weights)`` visits children first.

    Linear layers: Xavier-uniform with zero bias; embeddings: normal with std 0.02 (as in DiT and nanoGPT). Then
    AdaLN-Zero: every gate and the output projection start at zero, so each block starts as the identity and the
    network's first prediction is uniform over the vocabulary.
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, TokenHead):
        zeroed = [*module.modulation.parameters(), *module.linear.parameters()]
        if module.level_linear is not None:
            zeroed += module.level_linear.parameters()
        for param in zeroed:
            nn.init.zeros_(param)
    elif isinstance(module, AdaLNZeroBlock | FinalLayer):
        zeroed = [*module.adaLN_modulation.parameters()]
        if isinstance(module, FinalLayer):
            zeroed += module.linear.parameters()
            if module.level_linear is not None:
                zeroed += module.level_linear.parameters()
        for param in zeroed:
            nn.init.zeros_(param)


class TransformerDecoder(nn.Module):
    """Masked-token transformer for a ``latent_shape`` token grid, conditioned on modality, sources and class.

    Args:
        num_layers: number of AdaLN-Zero blocks.
        hidden_dim: width (even, divisible by ``num_heads``).
        num_heads: attention heads.
        ffn_dim: hidden width of each block's MLP.
        vocab_size: ``V``, the codebook size; tokens are in ``[0, V)`` and ``V`` is the mask id.
        latent_shape: ``(h, w, d)`` of the token grid, each divisible by ``patch_size``.
        num_modalities: modality ids are ``0 .. num_modalities - 1`` (BraTS: T1, T1ce, T2, FLAIR).
        num_classes: class labels ``0 .. num_classes - 1`` (0: no class conditioning); the extra index
            ``num_classes`` is the "null class" used when the label is absent or dropped.
        patch_size: ``p``; each sequence position covers ``p³`` tokens (1 for small grids, 2 at 16³ and above).
        dropout: dropout on embeddings and residual branches (not on attention weights; see ``SelfAttention``).
        fsq_levels: the FSQ levels of the tokenizer (``prod(fsq_levels) == vocab_size``), or None. Given, tokens
            are also embedded through their code vectors and the logits get a factorised per-level term (see the
            module docstring); the token order and the output shape do not change.
        token_dim: channels of the token-resolution path (0: none; see the module docstring). With it, each
            token is predicted from its patch's transformer output and from its own and its neighbours' tokens.
        token_blocks: residual 3×3×3 convolutions of that path's head (with ``token_dim``).
        source_factor: voxels per token along each axis (the stage-1 downsampling factor ``f``): the sources are
            images of ``latent_shape * f`` voxels.
        source_encoder: how a source's voxels reach the token grid, ``"space_to_depth"`` or ``"conv"`` (see
            :class:`SourceEncoder`).
        source_dim: channels of the sources' token-resolution features without the token path (with it, they are
            ``token_dim``).

    The sources have one path (:class:`SourceEncoder`): their token-resolution features join the target's token
    features in the token path (and through it the patches), or, without it, are merged patch by patch into the
    sequence. The conditioning vector ``c`` (target modality, plus class when ``num_classes > 0``) drives every block's
    AdaLN-Zero modulation, so the network is always told which modality to produce.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_dim: int,
        num_heads: int,
        ffn_dim: int,
        vocab_size: int,
        latent_shape: Sequence[int],
        num_modalities: int,
        num_classes: int = 0,
        patch_size: int = 1,
        dropout: float = 0.0,
        fsq_levels: Sequence[int] | None = None,
        token_dim: int = 0,
        token_blocks: int = 1,
        source_factor: int = 1,
        source_encoder: str = "space_to_depth",
        source_dim: int = 32,
    ) -> None:
        super().__init__()
        if token_dim < 0 or token_blocks < 0:
            raise ValueError(f"token_dim and token_blocks must be >= 0, got {token_dim} and {token_blocks}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be at least 1, got {patch_size}")
        if len(latent_shape) != 3 or any(n < 1 or n % patch_size for n in latent_shape):
            raise ValueError(f"latent_shape must be 3 sizes divisible by patch_size {patch_size}, got {latent_shape}")
        if min(vocab_size, num_modalities, num_classes + 1) < 1:
            sizes = f"vocab_size={vocab_size}, num_modalities={num_modalities}, num_classes={num_classes}"
            raise ValueError(f"vocab_size and num_modalities must be >= 1, num_classes >= 0; got {sizes}")
        code_vectors = level_digits = None
        if fsq_levels is not None:
            if math.prod(fsq_levels) != vocab_size:
                codes = math.prod(fsq_levels)
                raise ValueError(f"fsq_levels {list(fsq_levels)} give {codes} codes, not vocab_size {vocab_size}")
            quantizer = FiniteScalarQuantizer(fsq_levels)
            code_vectors = quantizer.indices_to_codes(torch.arange(vocab_size))
            level_digits = torch.round((code_vectors + 1) * quantizer.half_width).long()
        self.vocab_size = vocab_size
        self.latent_shape = tuple(int(n) for n in latent_shape)
        self.patch_size = patch_size
        self.num_modalities = num_modalities
        self.num_classes = num_classes

        self.source_factor = source_factor
        # Sequence inputs: target tokens, fixed positions; the sources' voxels on the token grid.
        self.token_embed = PatchEmbed(vocab_size, hidden_dim, patch_size, code_vectors)
        self.pos_embed = SinCosPosEmbed(hidden_dim, [n // patch_size for n in self.latent_shape])
        self.drop = nn.Dropout(dropout)
        source_channels = token_dim or source_dim
        self.source_encoder = SourceEncoder(num_modalities, source_factor, source_channels, source_encoder)
        # Token-resolution path (optional): per-token features in, merged into patches, and a skip to the head.
        # Without it, the sources' features are merged into the patches directly.
        self.token_stem = TokenStem(vocab_size, token_dim, code_vectors) if token_dim else None
        self.token_merge = nn.Linear(patch_size**3 * source_channels, hidden_dim)
        # Conditioning vector c: which modality to produce, and the class (last row: null class).
        self.target_modality_embed = nn.Embedding(num_modalities, hidden_dim)
        self.class_embed = nn.Embedding(num_classes + 1, hidden_dim) if num_classes > 0 else None
        # Trunk and head: p³ × V logits per position.
        self.blocks = nn.ModuleList(AdaLNZeroBlock(hidden_dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.final_layer: FinalLayer | TokenHead
        if token_dim:
            self.final_layer = TokenHead(hidden_dim, token_dim, vocab_size, patch_size, token_blocks, level_digits)
        else:
            self.final_layer = FinalLayer(hidden_dim, vocab_size, patch_size, level_digits)
        self.apply(init_weights)

    def forward(
        self,
        tokens: torch.Tensor,
        target_modality: torch.Tensor,
        sources: torch.Tensor | None = None,
        source_modalities: torch.Tensor | None = None,
        class_label: torch.Tensor | None = None,
        drop_condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every token of the target grid.

        Args:
            tokens: ``Long[B, h, w, d]``, target tokens with the mask id ``vocab_size`` where unknown.
            target_modality: ``Long[B]``, the modality to produce.
            sources: ``Float[B, S, h*f, w*f, d*f]``, the voxels of up to ``S`` source images on the target's grid
                (``f``: ``source_factor``), preprocessed as the tokenizer's input.
            source_modalities: ``Long[B, S]``, the modality of each slot; ``-1`` marks an absent slot, so every
                sample of a batch may have its own subset of sources.
            class_label: ``Long[B]`` or None (null class); only with ``num_classes > 0``.
            drop_condition: ``Bool[B]`` or None; True gives that sample the "no condition" state of classifier-free
                guidance: no sources and the null class. The target modality is always kept.

        Returns:
            ``[B, h*w*d, vocab_size]`` logits in the order of ``tokens.flatten(1)``.
        """
        self._check_grid(tokens)
        conditioning = self.condition(target_modality, sources, source_modalities, class_label, drop_condition)
        return self.logits(tokens, conditioning)

    def condition(
        self,
        target_modality: torch.Tensor,
        sources: torch.Tensor | None = None,
        source_modalities: torch.Tensor | None = None,
        class_label: torch.Tensor | None = None,
        drop_condition: torch.Tensor | None = None,
    ) -> Conditioning:
        """What the conditions add to a call (arguments as in ``forward``), computed once: ``MaskGiTSampler``
        reuses it over its steps, in which only the target tokens change."""
        kept = source_modalities  # sources dropped for classifier-free guidance count as absent
        if sources is not None:
            self._check_sources(sources, source_modalities)
            if kept is not None and drop_condition is not None:
                kept = kept.masked_fill(drop_condition[:, None], -1)
        source_features = self.source_encoder(sources, kept)
        c = self._embed_condition(target_modality, class_label, drop_condition)
        if self.token_stem is not None:
            return Conditioning(c, torch.zeros((), device=c.device), source_features)
        if source_features.ndim == 1:  # no source: the learned vector at every token of every patch
            source_patches = self.token_merge(source_features.repeat(self.patch_size**3))
        else:
            source_patches = self.token_merge(patchify_features(source_features.movedim(-1, 1), self.patch_size))
        return Conditioning(c, source_patches, None)

    def logits(
        self, tokens: torch.Tensor, conditioning: Conditioning, where: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``forward`` with the conditions given as ``condition``'s output: ``[B, h*w*d, vocab_size]`` logits.

        ``where`` (``Bool[B, h*w*d]``, optional): only the logits of the selected tokens, ``[M, vocab_size]`` in
        the order of ``tokens.flatten(1)[where]`` (the sampler needs the masked tokens' only; with the token path
        the vocabulary-wide layer then runs on those tokens alone)."""
        self._check_grid(tokens)
        x = self.token_embed(tokens) + conditioning.source_patches
        skip = None
        if self.token_stem is not None and conditioning.source_tokens is not None:
            skip = self.token_stem(tokens, conditioning.source_tokens)
            x = x + self.token_merge(patchify_features(skip, self.patch_size))
        x = self.drop(self.pos_embed(x))
        for block in self.blocks:
            x = block(x, conditioning.c)
        if isinstance(self.final_layer, TokenHead) and skip is not None:
            return self.final_layer(x, conditioning.c, skip, where)
        logits = unpatchify(self.final_layer(x, conditioning.c), self.latent_shape, self.patch_size)
        return logits if where is None else logits[where]

    def _check_grid(self, tokens: torch.Tensor) -> None:
        if tuple(tokens.shape[1:]) != self.latent_shape:
            raise ValueError(f"tokens grid {tuple(tokens.shape[1:])} differs from latent_shape {self.latent_shape}")

    def _check_sources(self, sources: torch.Tensor, source_modalities: torch.Tensor | None) -> None:
        if source_modalities is None or source_modalities.shape != sources.shape[:2]:
            shape = None if source_modalities is None else tuple(source_modalities.shape)
            raise ValueError(f"source_modalities must have shape {tuple(sources.shape[:2])} [B, S], got {shape}")
        voxels = tuple(n * self.source_factor for n in self.latent_shape)
        if sources.ndim != 5 or tuple(sources.shape[2:]) != voxels:
            raise ValueError(
                f"sources must be voxel grids [B, S, *{list(voxels)}] (the token grid {list(self.latent_shape)} times "
                f"source_factor {self.source_factor}), got shape {tuple(sources.shape)}"
            )

    def _embed_condition(
        self, target_modality: torch.Tensor, class_label: torch.Tensor | None, drop_condition: torch.Tensor | None
    ) -> torch.Tensor:
        """``c [B, D]``: target-modality embedding, plus the class embedding (null class if absent or dropped)."""
        c = self.target_modality_embed(target_modality)
        if self.class_embed is None:
            if class_label is not None:
                raise ValueError("class_label was given but the model has num_classes=0")
            return c
        null = torch.full_like(target_modality, self.num_classes)
        label = null if class_label is None else class_label
        if drop_condition is not None:
            label = torch.where(drop_condition, null, label)
        return c + self.class_embed(label)
