"""Write the embedded phantom data set: multi-contrast brain MRI with tumours, in the BraTS 2021 or 2023 layout.

    python scripts/make_phantoms.py --output_dir data/phantoms --num_cases 24 --seed 0
    python scripts/make_phantoms.py --output_dir data/phantoms --num_cases 24 --seed 0 --overwrite \\
        --preview data/phantoms_preview.png
    python scripts/make_phantoms.py --output_dir data/brats_like --num_cases 4 --geometry brats --naming 2023

``--geometry brats`` writes BraTS-shaped cases: 240 x 240 x 155 int16 volumes of 1 mm with the affine of BraTS
files (LPS voxel order); ``--naming 2023`` names them ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz``, ...

See :mod:`prod9_ext.data.phantoms` for what the cases contain.
"""

from __future__ import annotations

import json
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
    spacing: float | None = None,
    overwrite: bool = False,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    preview: str | None = None,
    geometry: str = "phantom",
    naming: str = "2021",
) -> None:
    """Write ``num_cases`` phantom cases and ``dataset.json`` under ``output_dir``.

    Args:
        output_dir: folder to write into; refused if it already holds cases, unless ``--overwrite``.
        num_cases: number of cases.
        seed: seed of the data set; the same seed gives byte-identical files.
        spacing: isotropic voxel size in mm the cases are drawn at; default 2 (phantom geometry: 90 x 110 x 90
            voxels, 1: 180 x 220 x 180) or 1 (BraTS geometry, always written at 1 mm; 2 or 3 draw faster, then
            resample).
        overwrite: replace the phantom cases already in ``output_dir``.
        val_fraction: share of the cases in the validation list of ``dataset.json`` (24 cases: 4).
        test_fraction: share of the cases in the held-out test list of ``dataset.json`` (24 cases: 4; 5 cases:
            3 training, 1 validation, 1 test).
        preview: PNG file to draw the mid slices of the first case into.
        geometry: ``phantom`` (a 180 x 220 x 180 mm RAS field of view) or ``brats`` (the BraTS grid).
        naming: ``2021`` (``Phantom_00000_t1.nii.gz``, ...) or ``2023`` (``BraTS-GLI-00000-000-t1n.nii.gz``, ...).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        datalist = make_phantom_dataset(
            output_dir,
            num_cases,
            seed,
            spacing,
            overwrite,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            geometry=geometry,
            naming=str(naming),  # fire reads --naming 2023 as a number
        )
    except (FileExistsError, ValueError) as err:
        sys.exit(f"make_phantoms: error: {err}")
    logger.info("Wrote %d cases and %s in %.1f s", num_cases, datalist, time.perf_counter() - start)
    if preview is not None:
        first_case = datalist.parent / json.loads(datalist.read_text())["training"][0]["case"]
        logger.info("Preview of %s: %s", first_case.name, save_phantom_preview(first_case, preview))


if __name__ == "__main__":
    fire.Fire(main)
