"""Stage 1's references: the best linear code that keeps as many numbers per latent position as the autoencoder.

An FSQ autoencoder with downsampling factor ``f`` and ``C`` latent channels describes every ``f×f×f`` block of
voxels with ``C`` numbers, each rounded to a few levels. Principal component analysis (PCA) of the blocks gives the
best linear code of the same size: every block keeps its top ``C`` principal components.

* Unrounded and fitted to the very volumes it is scored on, no linear block code with ``C`` numbers does better on
  them: its PSNR tells how much of a reconstruction goal the bottleneck's size allows a linear code (a non-linear
  decoder that also sees the neighbouring blocks can go further).
* Rounded like the tokens, each kept component to as many evenly spaced values as its FSQ channel has levels
  (between the component's 0.1 and 99.9 % quantiles), it is an untrained linear tokenizer with the autoencoder's
  token budget: the baseline a trained stage 1 has to beat (fitted to the volumes it scores, it is favoured).

    python scripts/linear_reference.py --dataset_dir outputs/quickstart/data --pixdim "[3.0,3.0,3.0]" --factor 2
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import fire
import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric

import prod9_ext.data

__all__ = ["BlockCode", "BlockPCA", "held_out_volumes", "score_block_codes"]

# At most this many numbers (f³ per block) are kept to estimate the quantiles of the components.
SAMPLE_NUMBERS = 1 << 22

# A block code: the number of principal components kept, and the levels each is rounded to (None: unrounded).
BlockCode = tuple[int, Sequence[int] | None]


def _blocks(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """``[1, X, Y, Z]`` -> ``[N, f³]`` float64 blocks (zero-padded at the far end of each axis to a multiple of f)."""
    pad = [p for n in reversed(volume.shape[1:]) for p in (0, (-n) % factor)]
    x = F.pad(volume[0].double(), pad)
    a, b, c = (n // factor for n in x.shape)
    x = x.reshape(a, factor, b, factor, c, factor).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(a * b * c, factor**3)


def _unblock(blocks: torch.Tensor, shape: Sequence[int], factor: int) -> torch.Tensor:
    """The inverse of :func:`_blocks`: ``[N, f³]`` -> ``[1, *shape]`` float32, the padding cropped off."""
    a, b, c = (-(-n // factor) for n in shape)
    x = blocks.reshape(a, b, c, factor, factor, factor).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(a * factor, b * factor, c * factor)
    return x[: shape[0], : shape[1], : shape[2]].float().unsqueeze(0)


class BlockPCA:
    """Principal components of the ``f×f×f`` voxel blocks of a set of volumes, accumulated one volume at a time.

    Args:
        factor: block side ``f`` (the autoencoder's downsampling factor).
    """

    def __init__(self, factor: int) -> None:
        if factor < 1:
            raise ValueError(f"factor must be at least 1, got {factor}.")
        self.factor = factor
        dim = factor**3
        self._count = 0
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64)
        self._sample: list[torch.Tensor] = []  # every `_stride`-th block seen, for the quantiles
        self._stride = 1
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.components = torch.eye(dim, dtype=torch.float64)  # columns by decreasing variance once fitted
        self.low = torch.zeros(dim, dtype=torch.float64)  # 0.1 % quantile of each component's coefficients
        self.high = torch.ones(dim, dtype=torch.float64)  # 99.9 % quantile
        self.fitted = False

    def update(self, volume: torch.Tensor) -> None:
        """Add the blocks of one volume ``[1, X, Y, Z]``."""
        blocks = _blocks(volume, self.factor)
        self._sample.append(blocks[(-self._count) % self._stride :: self._stride])
        self._count += blocks.shape[0]
        self._sum += blocks.sum(dim=0)
        self._outer += blocks.T @ blocks
        if sum(b.numel() for b in self._sample) > SAMPLE_NUMBERS:  # keep every other sampled block from now on
            self._sample = [torch.cat(self._sample)[::2]]
            self._stride *= 2

    def fit(self) -> BlockPCA:
        """Compute the mean block, the principal directions and their coefficients' quantiles."""
        if self._count < 2:
            raise ValueError("BlockPCA needs at least two blocks; add volumes with update() first.")
        self.mean = self._sum / self._count
        covariance = self._outer / self._count - torch.outer(self.mean, self.mean)
        self.components = torch.linalg.eigh(covariance).eigenvectors.flip(dims=(1,))  # eigh sorts ascending
        coefficients = (torch.cat(self._sample) - self.mean) @ self.components
        self.low, self.high = coefficients.quantile(0.001, dim=0), coefficients.quantile(0.999, dim=0)
        self.fitted = True
        return self

    def reconstruct(self, volume: torch.Tensor, code: BlockCode) -> torch.Tensor:
        """``volume [1, X, Y, Z]`` through the block ``code``, clipped to [0, 1] (float32).

        ``code = (k, levels)`` keeps the top ``k`` components of every block; with ``levels`` (one per kept
        component), component ``i`` is rounded to ``levels[i]`` evenly spaced values between its 0.1 and 99.9 %
        quantiles, as FSQ rounds each latent channel.
        """
        if not self.fitted:
            raise RuntimeError("call fit() before reconstruct().")
        channels, levels = code
        if not 0 <= channels <= self.factor**3:
            raise ValueError(f"the code keeps {channels} components; it must keep 0 to {self.factor**3}.")
        if levels is not None and (len(levels) != channels or min(levels, default=2) < 2):
            raise ValueError(f"levels must give {channels} values, each >= 2, got {list(levels)}.")
        kept = self.components[:, :channels]
        coefficients = (_blocks(volume, self.factor) - self.mean) @ kept
        if levels is not None:
            low, high = self.low[:channels], self.high[:channels]
            steps = torch.tensor(levels, dtype=torch.float64) - 1
            unit = ((coefficients - low) / (high - low)).clamp(0.0, 1.0)
            coefficients = torch.round(unit * steps) / steps * (high - low) + low
        return _unblock(coefficients @ kept.T + self.mean, volume.shape[1:], self.factor).clamp(0.0, 1.0)


def score_block_codes(
    volumes: Callable[[], Iterable[torch.Tensor]], factor: int, codes: Sequence[BlockCode]
) -> list[tuple[float, float]]:
    """Fit a :class:`BlockPCA` to ``volumes()`` and score each block code's reconstructions of the same volumes.

    ``volumes`` is called twice (fit, then score), so that a large set is never held in memory. PSNR and SSIM are
    those of the stage-1 evaluation (data range 1, 7-voxel Gaussian SSIM window), averaged over the volumes.

    Returns:
        ``(mean PSNR in dB, mean SSIM)`` of each code, in the order of ``codes``.
    """
    pca = BlockPCA(factor)
    for volume in volumes():
        pca.update(volume)
    pca.fit()
    psnr = [PSNRMetric(max_val=1.0) for _ in codes]
    ssim = [SSIMMetric(spatial_dims=3, data_range=1.0, win_size=7) for _ in codes]
    for volume in volumes():
        target = volume.float().unsqueeze(0)
        for code, psnr_metric, ssim_metric in zip(codes, psnr, ssim, strict=True):
            prediction = pca.reconstruct(volume, code).unsqueeze(0)
            psnr_metric(prediction, target)
            ssim_metric(prediction, target)
    return [(float(p.aggregate().item()), float(s.aggregate().item())) for p, s in zip(psnr, ssim, strict=True)]


def held_out_volumes(
    dataset: str,
    dataset_dir: str,
    pixdim: Sequence[float] | None,
    modalities: Sequence[str] = prod9_ext.data.MODALITIES,
    medmnist_flag: str = "organmnist3d",
    medmnist_size: int = 64,
    split: str = "validation",
) -> Callable[[], Iterator[torch.Tensor]]:
    """The volumes ``[1, X, Y, Z]`` of ``split`` as stage 1's evaluation preprocesses them, one contrast at a time."""
    datalist = prod9_ext.data.load_datalist(dataset, dataset_dir, split, medmnist_flag, medmnist_size)
    transform = prod9_ext.data.preprocessing(dataset, modalities, None, pixdim, train=False)
    keys = prod9_ext.data.image_keys(dataset, modalities)

    def volumes() -> Iterator[torch.Tensor]:
        for item in datalist:
            data = transform(item)
            for key in keys:
                yield torch.as_tensor(data[key]).float()

    return volumes


def main(
    dataset_dir: str,
    dataset: str = "brats",
    pixdim: Sequence[float] | None = (3.0, 3.0, 3.0),
    factor: int = 2,
    levels: Sequence[int] | None = None,
) -> None:
    """Print the unrounded block-PCA code for every number of kept components (and ``levels`` rounded), held out.

    Args:
        dataset_dir: the data set's folder (e.g. the quickstart's phantoms, ``outputs/quickstart/data``).
        dataset: ``brats`` or ``medmnist3d``.
        pixdim: voxel size the volumes are resampled to (the stage-1 config's ``pixdim``).
        factor: the autoencoder's downsampling factor (``2 ** (len(num_channels) - 1)``).
        levels: FSQ levels, e.g. ``[5,5,5]``: adds the code that keeps ``len(levels)`` components rounded to them.
    """
    codes: list[BlockCode] = [(k, None) for k in range(1, factor**3 + 1)]
    codes += [(len(levels), list(levels))] if levels else []
    scores = score_block_codes(held_out_volumes(dataset, dataset_dir, pixdim), factor, codes)
    print("| block PCA code | PSNR (dB) | SSIM |\n|---|---|---|")
    for (k, rounded), (psnr, ssim) in zip(codes, scores, strict=True):
        rounding = f", rounded to {list(rounded)} levels" if rounded else ""
        print(f"| {k} of {factor**3} components{rounding} | {psnr:.2f} | {ssim:.3f} |")


if __name__ == "__main__":
    fire.Fire(main)
