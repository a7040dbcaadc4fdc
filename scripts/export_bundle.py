"""Export a bundle of this repository as a MONAI model-zoo zip, ``<output_dir>/<name>_v<version>.zip``.

    python scripts/export_bundle.py --bundle autoencoder_fsq --version 0.1.0 --output_dir dist
    python scripts/export_bundle.py --bundle autoencoder_fsq --output_dir dist --overlay demo.json
    python scripts/export_bundle.py --bundle maskgit_transformer --output_dir dist \\
        --dependencies "{'autoencoder_bundle': 'autoencoder_fsq'}"

A bundle or dependency is a folder name under ``bundles/`` or a path to a bundle folder. See
:func:`prod9_ext.bundle_export.export_bundle` for what the zip holds.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import fire

from prod9_ext.bundle_export import export_bundle

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"

logger = logging.getLogger("export_bundle")


def _bundle_dir(name_or_path: str) -> Path:
    named = BUNDLES_DIR / str(name_or_path)
    return named if named.is_dir() else Path(name_or_path)


def main(
    bundle: str,
    output_dir: str = "dist",
    version: str | None = None,
    overlay: str | Sequence[str] = (),
    dependencies: Mapping[str, str] | None = None,
    weights_url: str | None = None,
) -> None:
    """Write the zip of ``bundle`` into ``output_dir``.

    Args:
        bundle: folder name under ``bundles/`` or path of a bundle folder with trained ``models/model.pt``.
        output_dir: folder for the zip.
        version: the bundle version, checked against ``configs/metadata.json`` (default: that version).
        overlay: config file(s) baked into the exported configs, e.g. ``demo.json`` (from the bundle's ``configs/``)
            to export the small demo model, or a path.
        dependencies: config key -> bundle copied into the zip, e.g. ``{'autoencoder_bundle': 'autoencoder_fsq'}``.
        weights_url: where ``models/model.pt`` will be hosted: the zip then has ``large_files.yml`` instead.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        zip_path = export_bundle(
            _bundle_dir(bundle),
            output_dir,
            version=None if version is None else str(version),
            overlay=overlay,
            dependencies={key: _bundle_dir(value) for key, value in (dependencies or {}).items()},
            weights_url=weights_url,
        )
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"export_bundle: error: {err}")
    logger.info("Wrote %s", zip_path)


if __name__ == "__main__":
    fire.Fire(main)
