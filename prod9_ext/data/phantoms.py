"""Multi-contrast brain MRI phantoms with tumours, built offline from the MNI152 2009 templates.

Each case starts from the real anatomy of the MNI152 2009 (ICBM 152 nonlinear symmetric 2009a) templates that
nilearn ships: the grey- and white-matter probability maps and the brain mask, with CSF as the part of the
mask that is neither grey nor white matter. A case then gets

- its own smooth random deformation (a small random affine plus a smooth displacement field), so no two
  cases are the same brain;
- a synthetic tumour at a random place in the brain, of random size and irregular shape, which pushes the
  surrounding tissue aside: a necrotic core (label 1) inside an enhancing rim (label 4), surrounded by
  oedema (label 2) that spreads mostly through white matter;
- four contrasts from per-tissue signal levels (T1: WM > GM > CSF; T1ce: T1 with a bright enhancing rim;
  T2: CSF bright, WM dark, oedema bright; FLAIR: T2-like with CSF suppressed, oedema bright), partial-volume
  mixing of the tissue fractions, a little tissue texture, a smooth multiplicative bias field, Rician noise
  and a random scanner gain per volume, skull-stripped (zero outside the brain) and stored as int16
  scanner-like values (hundreds to a few thousand), as BraTS volumes are.

Two geometries:

- ``"phantom"`` (default): a fixed 180 x 220 x 180 mm field of view around the brain in RAS+ world coordinates (MNI
  millimetres), stored in RAS order: 90 x 110 x 90 voxels at the default 2 mm spacing.
- ``"brats"``: the grid of BraTS files (the SRI24 atlas space): 240 x 240 x 155 voxels of 1 mm, stored in LPS order,
  affine ``diag(-1, -1, 1)`` with origin ``(0, 239, 0)`` (:data:`BRATS_AFFINE`, what nibabel reads from a BraTS
  2021 or 2023 file), qform and sform codes 1 (scanner, as ITK writes them). The brain is the template scaled by
  0.85 (the phantoms' own random scaling and warp make brains larger than the template), so that brains are about
  125-150 mm tall, as in SRI24 space, centred in the field of view. A case can be drawn at a coarser ``spacing``
  (faster) and is then resampled to the 1 mm grid.

:func:`make_phantom_dataset` writes a data set in the BraTS 2021 or 2023 layout (:data:`PHANTOM_NAMINGS`) that
:func:`prod9_ext.data.load_brats_datalist` reads; the same seed gives byte-identical files.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from prod9_ext.atomic import atomic_output, atomic_write_bytes
from prod9_ext.data.brats import MODALITIES, case_files

__all__ = [
    "BRATS_AFFINE",
    "BRATS_SHAPE",
    "PHANTOM_COMPARTMENTS",
    "PHANTOM_GEOMETRIES",
    "PHANTOM_LABELS",
    "PHANTOM_NAMINGS",
    "PhantomCase",
    "generate_phantom_case",
    "make_phantom_dataset",
    "save_phantom_preview",
]

logger = logging.getLogger(__name__)

PHANTOM_LABELS: dict[int, str] = {0: "background", 1: "necrotic core", 2: "oedema", 4: "enhancing tumour"}
"""Segmentation labels, as BraTS 2021 uses them (the 2023 naming writes the enhancing tumour as 3, as BraTS 2023)."""

PHANTOM_GEOMETRIES: tuple[str, ...] = ("phantom", "brats")
"""Grids a case can be drawn on: the phantom field of view (RAS) or the BraTS grid (240 x 240 x 155, LPS)."""

PHANTOM_NAMINGS: tuple[str, ...] = ("2021", "2023")
"""File layouts: ``Phantom_00000/Phantom_00000_t1.nii.gz`` (BraTS 2021 names) or
``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz`` (BraTS 2023 names)."""

BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
"""Voxels of a BraTS volume (SRI24 atlas space, 1 mm)."""

BRATS_AFFINE: np.ndarray = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
"""Voxel-to-world (RAS+, mm) matrix of BraTS 2021 and 2023 files: LPS voxel order, 1 mm."""

_BRATS_BRAIN_SCALE = 0.85  # brains of ~125-150 mm height with the cases' own scaling, as in SRI24 space
_FIELD_OF_VIEW_MM = np.array([180.0, 220.0, 180.0])
_CASE_NAMES = {"2021": "Phantom_{:05d}", "2023": "BraTS-GLI-{:05d}-000"}
_CASE_PATTERN = re.compile(r"^Phantom_\d{5}$")
_FILE_SUFFIXES = {
    "2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}
_ENHANCING_LABEL = {"2021": 4, "2023": 3}
_DATALIST_FILE = "dataset.json"
_DATASET_NAME = "prod9 brain MRI phantoms"

PHANTOM_COMPARTMENTS: tuple[str, ...] = ("csf", "gm", "wm", "necrosis", "oedema", "enhancing")
"""The compartments that make up a phantom, in the order of :attr:`PhantomCase.tissue`."""

# Relative signal of each compartment per contrast (WM of T1 = 1).
_RELATIVE_SIGNAL: dict[str, tuple[float, ...]] = {
    #        csf   gm    wm    necrosis oedema enhancing
    "t1": (0.22, 0.62, 1.00, 0.28, 0.55, 0.62),
    "t1ce": (0.22, 0.62, 1.00, 0.28, 0.55, 1.75),
    "t2": (1.00, 0.52, 0.36, 0.90, 0.80, 0.62),
    "flair": (0.10, 0.66, 0.48, 0.40, 1.00, 0.78),
}
_SCANNER_GAIN: dict[str, float] = {"t1": 1000.0, "t1ce": 1100.0, "t2": 1900.0, "flair": 800.0}


@dataclass(frozen=True)
class PhantomCase:
    """One phantom case in memory.

    Attributes:
        images: ``{"t1", "t1ce", "t2", "flair"}`` -> int16 array ``[X, Y, Z]``, scanner-like values, 0 outside
            the brain.
        seg: uint8 array ``[X, Y, Z]`` with the labels of :data:`PHANTOM_LABELS`.
        affine: ``[4, 4]`` voxel-to-world (RAS+, mm) matrix shared by all volumes (:data:`BRATS_AFFINE` in the
            BraTS geometry).
        tissue: float32 ``[6, X, Y, Z]``, the ground-truth volume fraction of each of
            :data:`PHANTOM_COMPARTMENTS` per voxel (not written to disk).
    """

    images: dict[str, np.ndarray]
    seg: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray


@dataclass(frozen=True)
class _Anatomy:
    """MNI152 2009 tissue maps at 1 mm and what the generator derives from them once."""

    maps: np.ndarray  # [3, I, J, K] float32: brain mask, GM, WM probabilities
    world_to_index: np.ndarray  # [4, 4]
    centre: np.ndarray  # [3] centre of the brain's bounding box, mm
    sites: np.ndarray  # [N, 3] candidate tumour centres (deep parenchyma), mm
    depths: np.ndarray  # [N] distance of each site to the brain surface, mm


@dataclass(frozen=True)
class _AffinePart:
    """The affine part of a case's deformation: ``template = linear @ (output - output_centre) + centre + shift``.

    ``centre`` is the brain's centre in the template, ``output_centre`` where that centre sits in the output grid's
    world coordinates (the same point in the phantom geometry).
    """

    linear: np.ndarray  # [3, 3]
    centre: np.ndarray  # [3] mm
    shift: np.ndarray  # [3] mm
    output_centre: np.ndarray  # [3] mm

    def to_template(self, points: np.ndarray) -> np.ndarray:
        """Template-space coordinates ``[3, N]`` of output points ``[3, N]``."""
        centre = self.centre.astype(np.float32)[:, None]
        output_centre = self.output_centre.astype(np.float32)[:, None]
        shift = self.shift.astype(np.float32)[:, None]
        return self.linear.astype(np.float32) @ (points - output_centre) + centre + shift

    def to_output(self, point: np.ndarray) -> np.ndarray:
        """Output-space coordinates ``[3]`` of a template point ``[3]``."""
        return np.linalg.solve(self.linear, point - self.centre - self.shift) + self.output_centre


@dataclass(frozen=True)
class _Tumour:
    """Where the tumour sits and how big it is, in output world coordinates (mm)."""

    centre: np.ndarray  # [3]
    core_radius: float
    rim_thickness: float
    oedema_radius: float
    mass_effect: float


def generate_phantom_case(
    seed: int | np.random.Generator, spacing: float | None = None, geometry: str = "phantom"
) -> PhantomCase:
    """Draw one phantom case: deformed MNI152 anatomy, a tumour, four contrasts and the segmentation.

    Args:
        seed: seed or generator of all the case's randomness; the same seed gives the same arrays.
        spacing: isotropic voxel size in mm the case is drawn at; default 2 (phantom geometry) or 1 (BraTS). Phantom
            geometry: the output grid (2 mm: 90 x 110 x 90 voxels; 1 mm: 180 x 220 x 180). BraTS geometry: the
            output is always the 1 mm BraTS grid, and a case drawn at another spacing is resampled to it (linear
            interpolation, nearest neighbour for the labels): coarser is faster and smoother.
        geometry: one of :data:`PHANTOM_GEOMETRIES` (see the module docstring).

    Returns:
        The case's four int16 contrasts ``[X, Y, Z]``, uint8 segmentation ``[X, Y, Z]``, affine ``[4, 4]`` and
        tissue fractions ``[6, X, Y, Z]``.
    """
    spacing = _drawing_spacing(spacing, geometry)
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}.")
    rng = np.random.default_rng(seed)
    anatomy = _mni152_anatomy()
    if geometry == "brats":
        affine, shape, output_centre = _brats_drawing_grid(spacing)
        scale = _BRATS_BRAIN_SCALE
    else:
        affine, shape = _output_grid(anatomy.centre, spacing)
        output_centre, scale = anatomy.centre, 1.0
    points = _world_points(affine, shape)
    deformation = _draw_deformation(rng, anatomy.centre, output_centre, scale)
    tumour = _draw_tumour(rng, anatomy, deformation, spacing)
    source = _to_index(anatomy.world_to_index, _deform(rng, deformation, _mass_effect(points, tumour)))
    brain, gm, wm = (ndimage.map_coordinates(m, source, order=1).reshape(shape) for m in anatomy.maps)
    fractions = _compartment_fractions(rng, points, tumour, brain, gm, wm, spacing)
    texture = 0.04 * _smooth_noise(rng, points, cell_mm=3.0, sigma_mm=4.0)
    heterogeneity = 0.12 * _smooth_noise(rng, points, cell_mm=3.0, sigma_mm=3.0)
    tissue_texture = 1.0 + texture + heterogeneity * (fractions[3] + fractions[5])
    inside = brain > 0.5
    images = {modality: _contrast(rng, modality, fractions, tissue_texture, inside) for modality in MODALITIES}
    case = PhantomCase(images=images, seg=_labels(fractions, inside), affine=affine, tissue=fractions)
    return _to_brats_grid(case, spacing) if geometry == "brats" else case


def make_phantom_dataset(
    output_dir: str | os.PathLike,
    num_cases: int,
    seed: int = 0,
    spacing: float | None = None,
    overwrite: bool = False,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    geometry: str = "phantom",
    naming: str = "2021",
) -> Path:
    """Write ``num_cases`` phantom cases in the BraTS 2021 or 2023 layout, plus a ``dataset.json`` datalist.

    Layout: ``<output_dir>/Phantom_00000/Phantom_00000_{t1,t1ce,t2,flair,seg}.nii.gz``, ... (``naming="2021"``) or
    ``<output_dir>/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``, ... (``naming="2023"``,
    the enhancing tumour labelled 3 as in BraTS 2023), and
    ``<output_dir>/dataset.json`` with ``"training"``, ``"validation"`` and ``"test"`` lists of
    ``{"case", "t1", "t1ce", "t2", "flair", "seg"}`` (paths relative to ``output_dir``) and their lengths
    ``numTraining``, ``numValidation``, ``numTest``. Case ``i`` depends on ``seed`` and ``i`` only; the cases are
    cut in order: training first, then ``round(val_fraction * num_cases)`` validation cases, then the last
    ``round(test_fraction * num_cases)`` cases as the held-out test set (the cases are independent draws, so this
    is a random split, and the same arguments give the same split). The defaults give 16 / 4 / 4 cases for 24
    and 3 / 1 / 1 for 5. Test cases are for the final scores only, never for validation or choosing settings.
    Every file is written under a temporary name and
    renamed when complete, so an interrupted run never leaves a partial ``.nii.gz``; gzip headers carry no
    time stamp, so the same arguments give byte-identical files.

    Args:
        output_dir: folder to write into (created if needed).
        num_cases: number of cases, at least 1.
        seed: seed of the whole data set.
        spacing: isotropic voxel size in mm the cases are drawn at (see :func:`generate_phantom_case`).
        overwrite: replace the phantom cases (``Phantom_*`` folders, and the folders a phantom ``dataset.json``
            lists) and ``dataset.json`` already in ``output_dir``; without it a folder that holds cases is refused.
        val_fraction: share of the cases in the validation list, in ``[0, 1)``.
        test_fraction: share of the cases in the held-out test list, in ``[0, 1)``; ``0`` writes an empty list.
        geometry: one of :data:`PHANTOM_GEOMETRIES`; ``"brats"`` writes 240 x 240 x 155 int16 volumes of 1 mm with
            the BraTS affine.
        naming: one of :data:`PHANTOM_NAMINGS`.

    Returns:
        The path of the written ``dataset.json``.

    Raises:
        ValueError: ``num_cases < 1``, ``val_fraction`` or ``test_fraction`` outside ``[0, 1)``, or fractions
            that leave no training case, or an unknown ``geometry`` or ``naming``.
        FileExistsError: ``output_dir`` already holds cases and ``overwrite`` is False.
    """
    if naming not in PHANTOM_NAMINGS:
        raise ValueError(f"naming must be one of {list(PHANTOM_NAMINGS)}, got {naming!r}.")
    spacing = _drawing_spacing(spacing, geometry)
    if num_cases < 1:
        raise ValueError(f"num_cases must be at least 1, got {num_cases}.")
    num_train, num_val, _ = _split_sizes(num_cases, val_fraction, test_fraction)
    root = Path(output_dir).expanduser().resolve()
    _prepare_output_dir(root, overwrite)
    entries = []
    for index, case_seed in enumerate(np.random.SeedSequence(seed).spawn(num_cases)):
        name = _CASE_NAMES[naming].format(index)
        case = generate_phantom_case(np.random.default_rng(case_seed), spacing, geometry)
        entries.append(_write_case(root, name, case, naming))
        logger.info("Wrote phantom case %s (%d/%d)", name, index + 1, num_cases)
    validation_end = num_train + num_val
    datalist = _datalist(
        entries[:num_train], entries[num_train:validation_end], entries[validation_end:], seed, spacing
    )
    datalist.update(_layout_description(spacing, geometry, naming))
    datalist_path = root / _DATALIST_FILE
    atomic_write_bytes(datalist_path, (json.dumps(datalist, indent=2) + "\n").encode())
    return datalist_path


def _split_sizes(num_cases: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Training, validation and test case counts: ``round(fraction * num_cases)`` each, training the rest."""
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}.")
    num_val, num_test = round(val_fraction * num_cases), round(test_fraction * num_cases)
    if num_val + num_test >= num_cases:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} of {num_cases} cases leave no training "
            f"case ({num_val} validation, {num_test} test); use more cases or smaller fractions."
        )
    return num_cases - num_val - num_test, num_val, num_test


def save_phantom_preview(case_dir: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Draw the four contrasts and the segmentation of one written case, three planes each, into a PNG.

    The slices go through the centre of the tumour (the middle of the volume when there is none). Each
    contrast is shown on its own grey scale (0 to its 99.5th percentile inside the brain).

    Args:
        case_dir: a case folder in the BraTS 2021 or 2023 layout (e.g. ``<case>/<case>_{t1,...,seg}.nii.gz``).
        png_path: the image file to write.

    Returns:
        ``png_path`` as a Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    case_dir = Path(case_dir)
    files = case_files(case_dir)
    volumes = {key: _load_volume(files[key]) for key in (*MODALITIES, "seg")}
    seg = volumes["seg"]
    centre = np.round(np.argwhere(seg > 0).mean(0)).astype(int) if seg.any() else np.array(seg.shape) // 2
    figure = Figure(figsize=(2.4 * len(volumes), 2.4 * 3), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(3, len(volumes), squeeze=False)
    for column, (key, volume) in enumerate(volumes.items()):
        top = 4.0 if key == "seg" else float(np.percentile(volume[volume > 0], 99.5))
        for row, plane in enumerate(_mid_planes(volume, centre)):
            ax = axes[row][column]
            ax.imshow(plane, cmap="viridis" if key == "seg" else "gray", vmin=0.0, vmax=top)
            ax.set_axis_off()
        axes[0][column].set_title(key)
    figure.suptitle(case_dir.name)
    png_path = Path(png_path)
    with atomic_output(png_path) as temporary:
        figure.savefig(temporary, dpi=100)
    return png_path


@functools.lru_cache(maxsize=1)
def _mni152_anatomy() -> _Anatomy:
    """Load the 1 mm MNI152 2009 brain mask, GM and WM maps from nilearn (no download) and derive the sites."""
    from nilearn import datasets

    images = (
        datasets.load_mni152_brain_mask(resolution=1),
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
    )
    maps = np.stack([np.asarray(img.get_fdata(dtype=np.float32)) for img in images])
    maps[0] = maps[0] > 0.5
    maps[1:] = np.clip(maps[1:], 0.0, 1.0) * maps[0]
    affine = np.asarray(images[0].affine, dtype=np.float64)
    index_to_world = functools.partial(_apply_affine, affine)
    brain_voxels = np.argwhere(maps[0] > 0)
    centre = index_to_world((brain_voxels.min(0) + brain_voxels.max(0)) / 2.0)
    # Sites on a 2 mm lattice are plenty, and the distance transform is 8 times cheaper there.
    coarse = maps[:, ::2, ::2, ::2]
    depth = np.asarray(ndimage.distance_transform_edt(coarse[0] > 0, sampling=2.0))
    sites = 2 * np.argwhere((depth >= 15.0) & (coarse[1] + coarse[2] > 0.9))
    return _Anatomy(
        maps=maps,
        world_to_index=np.linalg.inv(affine),
        centre=centre,
        sites=index_to_world(sites.astype(np.float64)),
        depths=depth[tuple(sites.T // 2)],
    )


def _apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points ``[..., 3]`` through a ``[4, 4]`` affine."""
    return points @ affine[:3, :3].T + affine[:3, 3]


def _output_grid(centre: np.ndarray, spacing: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine ``[4, 4]`` and shape of the isotropic ``spacing`` grid over the field of view around ``centre``."""
    shape = tuple(int(n) for n in np.round(_FIELD_OF_VIEW_MM / spacing))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - spacing * (np.array(shape) - 1) / 2.0
    return affine, (shape[0], shape[1], shape[2])


def _brats_drawing_grid(spacing: float) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """Affine, shape and centre (mm) of a RAS-ordered ``spacing`` grid that covers the BraTS field of view.

    Its first voxel is the first voxel of the BraTS grid in RAS order; it reaches at least to the last one.
    """
    ras = _ras_brats_affine()
    extent = np.array(BRATS_SHAPE, dtype=np.float64) - 1.0
    shape = tuple(int(n) + 1 for n in np.ceil(extent / spacing - 1e-6))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = ras[:3, 3]
    return affine, (shape[0], shape[1], shape[2]), ras[:3, 3] + extent / 2.0


def _ras_brats_affine() -> np.ndarray:
    """:data:`BRATS_AFFINE` with its x and y voxel axes reversed: the same grid in RAS voxel order."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(BRATS_SHAPE[:2], dtype=np.float64) - 1.0
    return BRATS_AFFINE @ flip


def _to_brats_grid(case: PhantomCase, spacing: float) -> PhantomCase:
    """A case drawn on :func:`_brats_drawing_grid` resampled to the 1 mm BraTS grid and stored in LPS voxel order.

    Images and tissue fractions are interpolated linearly, labels by nearest neighbour.
    """

    def resample(volume: np.ndarray, order: int) -> np.ndarray:
        """``volume`` ``[..., X, Y, Z]`` on the drawing grid -> on the RAS-ordered 1 mm grid, one axis at a time."""
        if spacing == 1.0:
            return volume
        for axis in (-1, -2, -3):  # the contiguous axis while the array is small
            volume = _resample_axis(volume, volume.ndim + axis, spacing, BRATS_SHAPE[axis], order)
        return volume

    def to_lps(volume: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(volume[..., ::-1, ::-1, :])

    int16_max = np.iinfo(np.int16).max
    images = {
        key: to_lps(np.clip(np.round(resample(image.astype(np.float32), 1)), 0, int16_max).astype(np.int16))
        for key, image in case.images.items()
    }
    seg = to_lps(resample(case.seg, 0))
    tissue = to_lps(resample(case.tissue, 1))
    return PhantomCase(images=images, seg=seg, affine=BRATS_AFFINE.copy(), tissue=tissue)


def _resample_axis(volume: np.ndarray, axis: int, spacing: float, size: int, order: int) -> np.ndarray:
    """Sample ``volume`` along ``axis`` at ``size`` points 1 mm apart (its own voxels ``spacing`` mm apart, both grids
    starting at the same point); linear (``order`` 1) or nearest (``order`` 0), the edge value beyond the last voxel.
    """
    position = np.minimum(np.arange(size, dtype=np.float64) / spacing, volume.shape[axis] - 1)
    if order == 0:
        return np.take(volume, np.rint(position).astype(np.intp), axis=axis)
    lower = np.floor(position).astype(np.intp)
    upper = np.minimum(lower + 1, volume.shape[axis] - 1)
    shape = [1] * volume.ndim
    shape[axis] = size
    weight = (position - lower).astype(np.float32).reshape(shape)
    result = np.take(volume, lower, axis=axis)
    step = np.take(volume, upper, axis=axis)
    step -= result
    step *= weight
    result += step
    return result


def _world_points(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World coordinates ``[3, X, Y, Z]`` (float32, mm) of the voxel centres of a grid."""
    axes = [affine[i, i] * np.arange(n, dtype=np.float32) + affine[i, 3] for i, n in enumerate(shape)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


def _to_index(world_to_index: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Voxel coordinates ``[3, N]`` of world points ``[3, N]``."""
    return (world_to_index[:3, :3] @ points + world_to_index[:3, 3:]).astype(np.float32)


def _draw_tumour(rng: np.random.Generator, anatomy: _Anatomy, deformation: _AffinePart, spacing: float) -> _Tumour:
    """Draw the tumour's size and a centre deep enough in the parenchyma to hold its core."""
    rim_thickness = max(rng.uniform(3.0, 6.0), 1.5 * spacing)
    core_radius = rim_thickness + rng.uniform(6.0, 16.0)
    fits = anatomy.depths >= 1.3 * core_radius + 2.0
    sites = anatomy.sites[fits] if fits.any() else anatomy.sites[anatomy.depths == anatomy.depths.max()]
    return _Tumour(
        centre=deformation.to_output(sites[rng.integers(len(sites))]),
        core_radius=core_radius,
        rim_thickness=rim_thickness,
        oedema_radius=core_radius * rng.uniform(1.5, 2.5),
        mass_effect=rng.uniform(0.15, 0.4),
    )


def _mass_effect(points: np.ndarray, tumour: _Tumour) -> np.ndarray:
    """Pull the sampling points ``[3, ...]`` towards the tumour centre, which pushes the anatomy outwards.

    Radial map ``r -> r (1 - a exp(-(r / R)^2))`` with ``a < 1``: monotonic, so the anatomy folds nowhere.
    """
    offset = points - tumour.centre.astype(np.float32)[:, None, None, None]
    radius_sq = np.sum(offset**2, axis=0) / np.float32(tumour.oedema_radius**2)
    return points - offset * (tumour.mass_effect * np.exp(-radius_sq))


def _draw_deformation(
    rng: np.random.Generator, centre: np.ndarray, output_centre: np.ndarray, scale: float = 1.0
) -> _AffinePart:
    """Random affine about the brain ``centre``: rotations up to 6 degrees about each axis, scaling by
    0.92-1.08 (plus up to 3 % per axis), shifts up to 4 mm; then the brain is scaled by ``scale`` and its centre
    put at ``output_centre``."""
    angles = np.deg2rad(rng.uniform(-6.0, 6.0, size=3))
    scales = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, size=3)
    linear = _rotation(angles) * scales if scale == 1.0 else _rotation(angles) * scales / scale
    shift = rng.uniform(-4.0, 4.0, size=3)
    return _AffinePart(linear=linear, centre=centre, shift=shift, output_centre=output_centre)


def _deform(rng: np.random.Generator, deformation: _AffinePart, points: np.ndarray) -> np.ndarray:
    """Template-space points ``[3, ...]`` of output points ``[3, ...]``: the affine part plus a smooth warp.

    The warp's displacement has a 3 mm standard deviation per axis and varies over about 20 mm.
    """
    warp = np.stack([3.0 * _smooth_noise(rng, points, cell_mm=5.0, sigma_mm=12.0) for _ in range(3)])
    return deformation.to_template(points.reshape(3, -1)) + warp.reshape(3, -1)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix ``[3, 3]`` from rotations about x, y and z (radians)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_noise(rng: np.random.Generator, points: np.ndarray, cell_mm: float, sigma_mm: float) -> np.ndarray:
    """A smooth random field with zero mean and unit standard deviation, sampled at world points ``[3, ...]``.

    White noise on a lattice of ``cell_mm`` cells over the points' bounding box, Gaussian-smoothed with
    ``sigma_mm``, normalised, then interpolated linearly.
    """
    low = points.reshape(3, -1).min(1)
    high = points.reshape(3, -1).max(1)
    lattice_shape = tuple(int(n) + 2 for n in np.ceil((high - low) / cell_mm))
    lattice = ndimage.gaussian_filter(
        rng.standard_normal(lattice_shape, dtype=np.float32), sigma_mm / cell_mm, mode="wrap"
    )
    lattice = (lattice - lattice.mean()) / lattice.std()
    index = (points.reshape(3, -1) - low[:, None]) / np.float32(cell_mm)
    return ndimage.map_coordinates(lattice, index, order=1, mode="nearest").reshape(points.shape[1:])


def _compartment_fractions(
    rng: np.random.Generator,
    points: np.ndarray,
    tumour: _Tumour,
    brain: np.ndarray,
    gm: np.ndarray,
    wm: np.ndarray,
    spacing: float,
) -> np.ndarray:
    """Volume fractions ``[6, X, Y, Z]`` of csf, gm, wm, necrosis, oedema and enhancing tumour per voxel.

    The tumour's boundaries are spheres whose radius varies smoothly with position (irregular shapes), with
    soft edges: partial volume for the core, a diffuse 2.5 mm wide fall-off for the oedema. The core
    replaces all tissue; oedema replaces a share of the remaining parenchyma, more of white matter than of
    grey matter.
    """
    gm = np.minimum(gm, brain)
    wm = np.minimum(wm, brain - gm)
    csf = brain - gm - wm
    distance = np.sqrt(np.sum((points - tumour.centre.astype(np.float32)[:, None, None, None]) ** 2, axis=0))
    core_edge = tumour.core_radius * (1.0 + 0.25 * _smooth_noise(rng, points, cell_mm=4.0, sigma_mm=6.0))
    oedema_edge = tumour.oedema_radius * (1.0 + 0.3 * _smooth_noise(rng, points, cell_mm=4.0, sigma_mm=6.0))
    width = np.float32(0.4 * spacing)
    core = _soft_inside(core_edge - distance, width)
    necrosis = _soft_inside(core_edge - tumour.rim_thickness - distance, width)
    oedema_share = _soft_inside(oedema_edge - distance, max(width, np.float32(2.5))) * (1.0 - core)
    healthy = 1.0 - core
    gm, wm, csf = gm * healthy, wm * healthy, csf * healthy
    oedema_gm, oedema_wm = 0.6 * oedema_share * gm, oedema_share * wm
    return np.stack(
        [
            csf,
            gm - oedema_gm,
            wm - oedema_wm,
            necrosis * brain,
            oedema_gm + oedema_wm,
            (core - necrosis) * brain,
        ]
    ).astype(np.float32)


def _soft_inside(signed_distance: np.ndarray, width: np.float32) -> np.ndarray:
    """Logistic membership: 1 well inside (positive distance), 0 well outside, 1/2 on the edge."""
    return 0.5 * (1.0 + np.tanh(signed_distance / (2.0 * width)))


def _labels(fractions: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """BraTS labels ``[X, Y, Z]`` uint8: the compartment with the largest fraction, healthy tissue as 0."""
    healthy = fractions[:3].sum(0)
    dominant = np.argmax(np.stack([healthy, fractions[3], fractions[4], fractions[5]]), axis=0)
    labels = np.array([0, 1, 2, 4], dtype=np.uint8)[dominant]
    labels[~inside] = 0
    return labels


def _contrast(
    rng: np.random.Generator,
    modality: str,
    fractions: np.ndarray,
    texture: np.ndarray,
    inside: np.ndarray,
) -> np.ndarray:
    """One int16 volume ``[X, Y, Z]``: tissue signal x texture x bias field x gain, Rician noise, skull-stripped."""
    signal = np.tensordot(np.asarray(_RELATIVE_SIGNAL[modality], dtype=np.float32), fractions, axes=1)
    gain = _SCANNER_GAIN[modality] * rng.uniform(0.8, 1.25)
    clean = signal * texture * _bias_field(rng, signal.shape) * np.float32(gain)
    sigma = np.float32(rng.uniform(0.015, 0.03) * gain)
    real = clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    magnitude = np.sqrt(real**2 + imaginary**2)
    magnitude[~inside] = 0.0
    return np.clip(np.round(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16)


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth multiplicative bias ``[X, Y, Z]``: exp of a random quadratic over the grid (about +-15 %).

    The quadratic in the voxel coordinates (scaled to [-1, 1]) is summed from 1D and 2D parts that broadcast.
    """
    x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    c = rng.normal(0.0, 0.06, size=9).astype(np.float32)
    exponent = (
        (c[0] * x + c[1] * (x * x - 1 / 3) + c[2] * x * y)
        + (c[3] * y + c[4] * (y * y - 1 / 3) + c[5] * y * z)
        + (c[6] * z + c[7] * (z * z - 1 / 3) + c[8] * x * z)
    )
    return np.exp(exponent, dtype=np.float32)


def _prepare_output_dir(root: Path, overwrite: bool) -> None:
    """Create ``root``; refuse it if it holds cases, or clear its phantom cases when ``overwrite``."""
    root.mkdir(parents=True, exist_ok=True)
    listed = _phantom_cases_listed(root / _DATALIST_FILE)
    phantom_dirs = [p for p in root.iterdir() if p.is_dir() and (_CASE_PATTERN.match(p.name) or p.name in listed)]
    other_cases = [p for p in root.iterdir() if p.is_dir() and p not in phantom_dirs and any(p.glob("*.nii*"))]
    datalist = root / _DATALIST_FILE
    if not (phantom_dirs or other_cases or datalist.exists()):
        return
    if not overwrite:
        raise FileExistsError(f"{root} already holds cases; pass overwrite=True (--overwrite) to replace them.")
    if other_cases:
        raise FileExistsError(
            f"{root} holds case folders that are not phantoms ({other_cases[0].name}, ...); "
            "choose another output folder."
        )
    for path in phantom_dirs:
        shutil.rmtree(path)
    datalist.unlink(missing_ok=True)


def _phantom_cases_listed(datalist: Path) -> set[str]:
    """The case names a phantom ``dataset.json`` lists (none when the file is absent or not a phantom datalist).

    Phantom cases in the BraTS 2023 naming are told from real BraTS cases this way, never by their folder names.
    """
    try:
        content = json.loads(datalist.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(content, dict) or content.get("name") != _DATASET_NAME:
        return set()
    lists = [entries for entries in content.values() if isinstance(entries, list)]
    return {str(e["case"]) for entries in lists for e in entries if isinstance(e, dict) and "case" in e}


def _write_case(root: Path, name: str, case: PhantomCase, naming: str = "2021") -> dict[str, str]:
    """Write one case's five volumes in ``naming``; return its datalist entry (paths relative to ``root``)."""
    case_dir = root / name
    case_dir.mkdir()
    seg = case.seg
    if _ENHANCING_LABEL[naming] != 4:
        seg = np.where(seg == 4, np.uint8(_ENHANCING_LABEL[naming]), seg)
    volumes: Mapping[str, np.ndarray] = {**case.images, "seg": seg}
    entry = {"case": name}
    for key, volume in volumes.items():
        path = case_dir / f"{name}{_FILE_SUFFIXES[naming][key]}.nii.gz"
        atomic_write_bytes(path, _nifti_gz_bytes(volume, case.affine))
        entry[key] = path.relative_to(root).as_posix()
    return entry


def _nifti_gz_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 bytes of ``volume`` with qform and sform ``affine``; no time stamp, so deterministic."""
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def _datalist(
    training: list[dict[str, str]],
    validation: list[dict[str, str]],
    test: list[dict[str, str]],
    seed: int,
    spacing: float,
) -> dict[str, object]:
    """The ``dataset.json`` content: MONAI datalist with a description of the data set."""
    return {
        "name": "prod9 brain MRI phantoms",
        "description": "Synthetic multi-contrast brain MRI with tumours, deformed from the MNI152 2009 templates.",
        "reference": "MNI152 2009 (ICBM 152 nonlinear symmetric 2009a) templates, as shipped by nilearn",
        "tensorImageSize": "3D",
        "modality": {str(i): key for i, key in enumerate(MODALITIES)},
        "labels": {str(label): name for label, name in PHANTOM_LABELS.items()},
        "seed": seed,
        "spacing_mm": spacing,
        "numTraining": len(training),
        "numValidation": len(validation),
        "numTest": len(test),
        "training": training,
        "validation": validation,
        "test": test,
    }


def _load_volume(path: str | os.PathLike) -> np.ndarray:
    """The array of a NIfTI file, reordered to RAS (BraTS files are stored LPS)."""
    image = nib.as_closest_canonical(nib.Nifti1Image.from_filename(path))
    return np.asarray(image.dataobj)


def _drawing_spacing(spacing: float | None, geometry: str) -> float:
    """``spacing``, or its default for ``geometry`` (2 mm phantoms, 1 mm BraTS); checks ``geometry``."""
    if geometry not in PHANTOM_GEOMETRIES:
        raise ValueError(f"geometry must be one of {list(PHANTOM_GEOMETRIES)}, got {geometry!r}.")
    if spacing is None:
        return 1.0 if geometry == "brats" else 2.0
    return float(spacing)


def _layout_description(spacing: float, geometry: str, naming: str) -> dict[str, object]:
    """The ``dataset.json`` keys that say how the cases are laid out: grid, voxel size, names and labels."""
    enhancing = _ENHANCING_LABEL[naming]
    labels = {str(enhancing if label == 4 else label): name for label, name in PHANTOM_LABELS.items()}
    description: dict[str, object] = {"geometry": geometry, "naming": naming, "labels": labels}
    if geometry == "brats":
        description["spacing_mm"] = 1.0
        description["drawn_at_spacing_mm"] = spacing
        description["shape"] = list(BRATS_SHAPE)
        description["affine"] = BRATS_AFFINE.tolist()
    return description


def _mid_planes(volume: np.ndarray, centre: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through ``centre`` of a RAS volume, oriented for display."""
    x, y, z = centre
    return [np.rot90(volume[:, :, z]), np.rot90(volume[:, y, :]), np.rot90(volume[x, :, :])]
