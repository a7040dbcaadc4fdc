"""Write the embedded phantom data set: multi-contrast brain MRI with tumours, in the BraTS 2021 layout.

    python scripts/make_phantoms.py --output_dir data/phantoms --num_cases 24 --seed 0
    python scripts/make_phantoms.py --output_dir data/phantoms --num_cases 24 --seed 0 --overwrite \\
        --preview data/phantoms_preview.png

See :mod:`prod9_ext.data.phantoms` for what the cases contain.
"""

from __future__ import annotations

import logging
import sys
import time

import fire

from prod9_ext.data import make_phantom_dataset, save_phantom_preview

logger = logging.getLogger("make_phantoms")


def main(
    output_dir: str,
    num_cases: int = 24,
    seed: int = 0,
    spacing: float = 2.0,
    overwrite: bool = False,
    val_fraction: float = 0.2,
    preview: str | None = None,
) -> None:
    """Write ``num_cases`` phantom cases and ``dataset.json`` under ``output_dir``.

    Args:
        output_dir: folder to write into; refused if it already holds cases, unless ``--overwrite``.
        num_cases: number of cases.
        seed: seed of the data set; the same seed gives byte-identical files.
        spacing: isotropic voxel size in mm (2: 90 x 110 x 90 voxels, 1: 180 x 220 x 180).
        overwrite: replace the phantom cases already in ``output_dir``.
        val_fraction: share of the cases in the validation list of ``dataset.json``.
        preview: PNG file to draw the mid slices of the first case into.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        datalist = make_phantom_dataset(output_dir, num_cases, seed, spacing, overwrite, val_fraction)
    except (FileExistsError, ValueError) as err:
        sys.exit(f"make_phantoms: error: {err}")
    logger.info("Wrote %d cases and %s in %.1f s", num_cases, datalist, time.perf_counter() - start)
    if preview is not None:
        first_case = datalist.parent / "Phantom_00000"
        logger.info("Preview of %s: %s", first_case.name, save_phantom_preview(first_case, preview))


if __name__ == "__main__":
    fire.Fire(main)
