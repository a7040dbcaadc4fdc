"""Export a bundle folder as a MONAI model-zoo zip that runs where only MONAI and the bundle's packages are installed.

``export_bundle`` writes ``<output_dir>/<name>_v<version>.zip`` holding one folder ``<name>/`` laid out as the zoo
lays a bundle out:

* ``configs/``: every config file; the JSON ones with the overlay files' values baked in, so that a bundle exported
  with e.g. ``demo.json`` runs the small demo model with a plain ``--config_file configs/inference.json``;
* ``models/model.pt`` and, when the bundle has one, the source-aware decoder's ``models/source_decoder.pt``, or
  ``large_files.yml`` naming their URLs and sha256 when the weights are hosted elsewhere (the decoder's beside
  ``model.pt``);
* ``docs/``, ``LICENSE``;
* ``prod9_ext/``: a copy of this package, which the configs name with ``_target_`` and ``$import``. Python finds it
  first when the bundle runs from its own folder (the current directory heads ``sys.path``), or with the folder on
  ``PYTHONPATH``, as the zoo's bundles with custom code are run;
* ``dependencies/<bundle>/``: other bundles a config key points at (stage 2 names the stage-1 bundle), copied with
  their configs and weights, the key rewritten to the copy, so the zip is self-contained.

The weights are loaded into the exported ``network_def`` before the zip is written: a zip whose configs do not
describe its weights is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from prod9_ext.atomic import atomic_output
from prod9_ext.engines import load_network_weights

__all__ = ["export_bundle"]

PACKAGE_DIR = Path(__file__).resolve().parent
DEPENDENCIES_DIR = "dependencies"
WEIGHTS = "models/model.pt"
DECODER_WEIGHTS = "models/source_decoder.pt"  # stage 2's source-aware decoder, a file of its own
# A config value that reaches outside its bundle folder, e.g. "$@bundle_root + '/../autoencoder_fsq'".
_OUTSIDE_BUNDLE = re.compile(r"@bundle_root\b.*\.\.")


def _json_configs(configs_dir: Path) -> list[Path]:
    return sorted(p for p in configs_dir.glob("*.json") if p.name != "metadata.json")


def _overlay_files(bundle: Path, overlay: str | Sequence[str]) -> list[Path]:
    """A bare file name is looked up in the bundle's ``configs/``; anything else is a path."""
    names = [overlay] if isinstance(overlay, str) else list(overlay)
    files = [bundle / "configs" / name if Path(name).name == name else Path(name) for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"overlay: no such config file: {', '.join(missing)}")
    return files


def _set_where_defined(configs_dir: Path, pairs: Mapping[str, Any], skip: Set[str] = frozenset()) -> None:
    """Set each ``id -> value`` in every JSON config of ``configs_dir`` (but the file names in ``skip``) that
    defines ``id``; an id defined by none of them is an error (a typo would otherwise be dropped without a word)."""
    unused = set(pairs)
    for path in _json_configs(configs_dir):
        if path.name in skip:
            continue
        parser = ConfigParser(json.loads(path.read_text(encoding="utf-8")))
        defined = [key for key in pairs if key in parser]
        for key in defined:
            parser[key] = pairs[key]
        if defined:
            path.write_text(json.dumps(parser.get(), indent=4) + "\n", encoding="utf-8")
        unused -= set(defined)
    if unused:
        raise ValueError(f"{sorted(unused)} defined by no JSON config in {configs_dir}: nothing to set.")


def _string_values(config: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every string of a nested config with its id, e.g. ``("train#handlers#0#load_path", "$@ckpt_dir + ...")``."""
    if isinstance(config, str):
        yield prefix, config
    elif isinstance(config, (dict, list)):
        items = config.items() if isinstance(config, dict) else enumerate(config)
        for key, value in items:
            yield from _string_values(value, f"{prefix}#{key}" if prefix else str(key))


def _check_self_contained(configs_dir: Path) -> None:
    """Refuse configs that still name files outside the bundle folder (a bundle beside it, as stage 2 does)."""
    for path in _json_configs(configs_dir):
        for key, value in _string_values(json.loads(path.read_text(encoding="utf-8"))):
            if _OUTSIDE_BUNDLE.search(value):
                raise ValueError(
                    f"{path.name}: {key} = {value!r} points outside the bundle folder; include that bundle with "
                    f"dependencies={{'{key}': '<bundle folder>'}}."
                )


def _copy_bundle_files(source: Path, target: Path) -> None:
    """configs/, docs/ and LICENSE of a bundle folder."""
    for name in ("configs", "docs"):
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name)
    if not (source / "LICENSE").is_file():
        raise FileNotFoundError(f"{source} has no LICENSE; a zoo bundle needs one.")
    shutil.copy2(source / "LICENSE", target / "LICENSE")


def _copy_weights(source: Path, target: Path) -> None:
    """``models/model.pt`` and, when present, ``models/source_decoder.pt``."""
    weights = source / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no weights to export: {weights} (train the bundle first).")
    (target / WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, DECODER_WEIGHTS):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _vendor_package(target: Path) -> None:
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_large_files(root: Path, source: Path, url: str) -> None:
    """``large_files.yml`` as the zoo writes it; ``python -m monai.bundle download_large_files`` reads it.

    ``url`` is ``model.pt``'s; a ``source_decoder.pt`` is listed as hosted beside it (same folder URL)."""
    files = {WEIGHTS: url}
    if (source / DECODER_WEIGHTS).is_file():
        files[DECODER_WEIGHTS] = f"{url.rsplit('/', 1)[0]}/{Path(DECODER_WEIGHTS).name}"
    lines = ["large_files:"]
    for path, address in files.items():
        entry = {"path": path, "url": address, "hash_val": _sha256(source / path), "hash_type": "sha256"}
        lines += [
            f"  {'- ' if i == 0 else '  '}{key}: {json.dumps(value)}" for i, (key, value) in enumerate(entry.items())
        ]
    (root / "large_files.yml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _check_weights(root: Path, weights: Path) -> None:
    """Load ``weights`` into ``network_def`` as the exported inference (or train) config builds it."""
    configs = [root / "configs" / name for name in ("inference.json", "train.json")]
    config = next((c for c in configs if c.is_file()), None)
    if config is None:
        raise FileNotFoundError(f"{root / 'configs'} has neither inference.json nor train.json.")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    try:
        load_network_weights(weights, network, "cpu")
    except ValueError as err:
        raise ValueError(
            f"{weights} do not fit network_def of the exported {config.name} (export with the overlay the model "
            f"was trained with): {err}"
        ) from None


def _zip(root: Path, zip_path: Path) -> None:
    """Zip ``root`` as ``<root.name>/...``, written under a temporary name and renamed."""
    with atomic_output(zip_path) as partial, zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, arcname=path.relative_to(root.parent).as_posix())


def export_bundle(
    bundle: str | os.PathLike,
    output_dir: str | os.PathLike,
    version: str | None = None,
    overlay: str | Sequence[str] = (),
    dependencies: Mapping[str, str | os.PathLike] | None = None,
    weights_url: str | None = None,
) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` from the bundle folder ``bundle`` (named ``<name>``).

    Args:
        bundle: bundle folder with ``configs/metadata.json``, ``LICENSE`` and trained ``models/model.pt``.
        output_dir: folder for the zip.
        version: must equal ``version`` in ``configs/metadata.json`` (the default), which must have a changelog entry.
        overlay: config file(s) merged into the exported JSON configs, in order: a bare name such as ``"demo.json"``
            is taken from the bundle's ``configs/``, anything else is a path. Each ``id -> value`` is written into
            every config that defines ``id``.
        dependencies: config key -> bundle folder, e.g. ``{"autoencoder_bundle": "bundles/autoencoder_fsq"}``: the
            folder's configs, docs, LICENSE and ``models/model.pt`` are copied to ``dependencies/<folder name>/`` and
            the key set to ``"$@bundle_root + '/dependencies/<folder name>'"`` wherever a config defines it.
        weights_url: where ``models/model.pt`` will be hosted; the zip then carries ``large_files.yml`` instead of
            the weights (``models/source_decoder.pt``, when the bundle has one, listed beside it).

    Returns:
        The path of the zip.

    Raises:
        FileNotFoundError: naming a missing bundle file, weights file or overlay.
        ValueError: a version that is not the metadata's, an overlay or dependency key no config defines, a config
            value that still points outside the bundle, or weights that do not fit the exported ``network_def``.
    """
    source = Path(bundle).resolve()
    meta_file = source / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{source} is not a bundle folder: no {meta_file}")
    metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    version = str(metadata["version"] if version is None else version)
    if version != metadata["version"] or version not in metadata.get("changelog", {}):
        raise ValueError(
            f"version {version} is not the version in {meta_file} ({metadata['version']}) with a changelog entry; "
            "bump the metadata first."
        )
    weights = source / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no weights to export: {weights} (train the bundle first).")
    overlays = _overlay_files(source, overlay)
    # an overlay that is one of the bundle's own configs travels unchanged
    own_overlays = {p.name for p in overlays if p.resolve().parent == source / "configs"}
    with tempfile.TemporaryDirectory() as staging:
        root = Path(staging) / source.name
        _copy_bundle_files(source, root)
        for path in overlays:
            _set_where_defined(root / "configs", ConfigParser.load_config_file(path), skip=own_overlays)
        for key, dependency in (dependencies or {}).items():
            dependency_dir = Path(dependency).resolve()
            _copy_bundle_files(dependency_dir, root / DEPENDENCIES_DIR / dependency_dir.name)
            _copy_weights(dependency_dir, root / DEPENDENCIES_DIR / dependency_dir.name)
            relative = f"{DEPENDENCIES_DIR}/{dependency_dir.name}"
            _set_where_defined(root / "configs", {key: f"$@bundle_root + '/{relative}'"})
        _check_self_contained(root / "configs")
        _vendor_package(root / PACKAGE_DIR.name)
        _check_weights(root, weights)
        if weights_url is None:
            _copy_weights(source, root)
        else:
            _write_large_files(root, source, weights_url)
        zip_path = Path(output_dir) / f"{source.name}_v{version}.zip"
        _zip(root, zip_path)
    return zip_path
