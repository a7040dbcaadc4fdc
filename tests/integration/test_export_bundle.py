"""``scripts/export_bundle.py``: the model-zoo zip, and the zip running on its own through MONAI's tools.

The exported bundle is a copy of ``bundles/autoencoder_fsq`` with tiny random weights (nothing is trained) and the
overlay that describes them baked in. It is fetched with ``monai.bundle.download(url="file://...")``, which unzips
it. What the subprocess tests prove about isolation: they run with the current directory in the unzipped bundle
and ``PYTHONPATH`` holding only a *decoy* ``prod9_ext`` whose import raises. ``PYTHONPATH`` precedes site-packages
and every ``.pth`` entry (the editable install of this project included), so any ``prod9_ext`` but the bundle's
copy, which the current directory puts first, would have hit the decoy; a control shows the decoy does fire
outside the bundle. They do not prove that nothing else of this repository is importable (nothing else is needed).
In-process calls (``monai.bundle.load``) use this process's ``prod9_ext``: they show MONAI's API on the zip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, download, download_large_files, load, verify_metadata, verify_net_in_out
from test_bundle_metadata import SCHEMA_FILE, SCHEMA_MD5

from prod9_ext.bundle_export import export_bundle

REPO = Path(__file__).resolve().parents[2]
NAME = "autoencoder_fsq"
PACKAGE = REPO / "prod9_ext"
TIMEOUT_S = 600

# The small network the random weights are made for; a 64^3 ROI keeps verify_net_in_out to one window.
TINY_OVERLAY = {
    "pixdim": [3.0, 3.0, 3.0],
    "roi_size": [64, 64, 64],
    "sw_overlap": 0.25,
    "num_workers": 0,
    "network_def#num_channels": [8, 16, 16],
    "network_def#num_res_blocks": [1, 1, 1],
    "network_def#norm_num_groups": 8,
}
DECOY = 'raise ImportError("decoy prod9_ext imported: the bundle\'s own copy was not found first")\n'


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the autoencoder bundle with random tiny weights in ``models/model.pt``; ``tiny.json`` beside it."""
    root = tmp_path_factory.mktemp("source")
    bundle = root / NAME
    shutil.copytree(REPO / "bundles" / NAME, bundle, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval"))
    (root / "tiny.json").write_text(json.dumps(TINY_OVERLAY), encoding="utf-8")
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "inference.json"), str(root / "tiny.json")])
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle


def _version(bundle: Path) -> str:
    return json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"]


@pytest.fixture(scope="module")
def exported_zip(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zip, written by the command line as a user types it."""
    dist = tmp_path_factory.mktemp("dist")
    command = [
        sys.executable, "scripts/export_bundle.py",
        "--bundle", str(source),
        "--version", _version(source),
        "--output_dir", str(dist),
        "--overlay", str(source.parent / "tiny.json"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    return dist / f"{NAME}_v{_version(source)}.zip"


@pytest.fixture(scope="module")
def bundle_dir(exported_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zip fetched and unzipped by ``monai.bundle.download`` from a ``file://`` URL."""
    hub = tmp_path_factory.mktemp("hub")
    download(name=NAME, url=exported_zip.as_uri(), bundle_dir=str(hub), progress=False)
    return hub / NAME


@pytest.fixture(scope="module")
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """This environment with ``PYTHONPATH`` replaced by a folder holding only the decoy ``prod9_ext``."""
    decoy = tmp_path_factory.mktemp("decoy")
    (decoy / "prod9_ext").mkdir()
    (decoy / "prod9_ext" / "__init__.py").write_text(DECOY, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = str(decoy)
    return env


def _run(cwd: Path, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args[:4])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def _package_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_zip_is_laid_out_as_the_zoo_lays_it_out(exported_zip: Path, source: Path) -> None:
    with zipfile.ZipFile(exported_zip) as archive:
        names = set(archive.namelist())
        files = {name: archive.read(name) for name in names}
    assert all(name.startswith(f"{NAME}/") for name in names)
    for name in (
        "LICENSE",
        "configs/metadata.json",
        "configs/train.json",
        "configs/evaluate.json",
        "configs/inference.json",
        "configs/multi_gpu_train.json",
        "configs/logging.conf",
        "docs/README.md",
        "docs/data_license.txt",
        "models/model.pt",
    ):
        assert f"{NAME}/{name}" in names, name
    assert f"{NAME}/large_files.yml" not in names  # the weights are inside
    assert files[f"{NAME}/models/model.pt"] == (source / "models" / "model.pt").read_bytes()
    vendored = {n.removeprefix(f"{NAME}/prod9_ext/"): b for n, b in files.items() if n.startswith(f"{NAME}/prod9_ext/")}
    assert vendored == _package_files(PACKAGE)  # the whole package, byte for byte, no caches
    for name in sorted(n for n in names if n.startswith(f"{NAME}/configs/")):
        exported, original = files[name], (source / name.removeprefix(f"{NAME}/")).read_bytes()
        if not name.endswith(".json") or name.endswith("metadata.json"):
            assert exported == original, name
            continue
        parser = ConfigParser(json.loads(exported))
        baked = {key: parser[key] for key in TINY_OVERLAY if key in parser}
        assert baked == {key: TINY_OVERLAY[key] for key in baked}, name  # the overlay's values where its keys live
        if not baked:
            assert exported == original, name  # files it does not touch travel unchanged
    inference = ConfigParser(json.loads(files[f"{NAME}/configs/inference.json"]))
    assert inference["network_def#num_channels"] == [8, 16, 16]


def test_runs_where_the_projects_prod9_ext_is_not_reachable(
    bundle_dir: Path, isolated_env: dict[str, str], tmp_path: Path
) -> None:
    control = _run(tmp_path, isolated_env, "-c", "import prod9_ext", check=False)
    assert control.returncode != 0 and "decoy prod9_ext imported" in control.stderr  # the decoy is armed

    probe = _run(bundle_dir, isolated_env, "-c", "import prod9_ext; print(prod9_ext.__file__)")
    assert Path(probe.stdout.strip()) == bundle_dir / "prod9_ext" / "__init__.py"

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40.0, -44.0, -36.0]
    data = np.zeros((40, 44, 36), dtype=np.float32)
    data[8:32, 8:36, 6:30] = 50.0 + 100.0 * np.random.default_rng(0).random((24, 28, 24))
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "case.nii.gz")
    out = tmp_path / "out"
    _run(
        bundle_dir, isolated_env,
        "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--input_files", str(tmp_path / "case.nii.gz"), "--output_dir", str(out),
    )  # fmt: skip

    recon = nib.load(out / "case_recon.nii.gz")
    assert recon.shape == data.shape
    assert np.allclose(recon.affine, affine, atol=1e-5)
    assert np.isfinite(np.asarray(recon.dataobj)).all()


def test_metadata_verifies_offline(bundle_dir: Path) -> None:
    verify_metadata(
        meta_file=str(bundle_dir / "configs" / "metadata.json"), filepath=str(SCHEMA_FILE), hash_val=SCHEMA_MD5
    )


def test_network_input_output_verify(bundle_dir: Path, isolated_env: dict[str, str]) -> None:
    """As the zoo's ci/verify_bundle.py runs it, with the net_id the README's "Model zoo" section names.

    verify_net_in_out needs one output tensor; AutoencoderFSQ returns (reconstruction, codes, indices), so the check
    runs on inference.json's ``reconstruction``, the sliding-window wrapper, whose forward is the reconstruction.
    """
    result = _run(
        bundle_dir, isolated_env,
        "-m", "monai.bundle", "verify_net_in_out", "reconstruction",
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
        "--bundle_root", str(bundle_dir),
    )  # fmt: skip
    assert "data shape of network is verified with no error" in result.stdout + result.stderr
    with pytest.raises(AttributeError, match="tuple"):  # why the wrapper: network_def's output is a tuple
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(bundle_dir / "configs" / "metadata.json"),
            config_file=str(bundle_dir / "configs" / "inference.json"),
            device="cpu",
        )


def test_torchscript_trace_matches_the_eager_network(
    bundle_dir: Path, isolated_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(
        bundle_dir, isolated_env,
        "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
        "--use_trace", "true", "--input_shape", "[1,1,32,32,32]",
    )  # fmt: skip
    hub = str(bundle_dir.parent)
    monkeypatch.chdir(tmp_path)  # building network_def runs the config's "initialize"; its files land here
    traced, meta, extra = load(
        name=NAME, bundle_dir=hub, load_ts_module=True, device="cpu", config_files=("inference.json",)
    )
    eager = load(name=NAME, bundle_dir=hub, workflow_type="inference", device="cpu")
    assert isinstance(eager, torch.nn.Module)
    eager.eval()
    assert meta["version"] == json.loads((bundle_dir / "configs" / "metadata.json").read_text())["version"]
    assert json.loads(extra["inference.json"]) == json.loads((bundle_dir / "configs" / "inference.json").read_text())
    for shape in ((1, 1, 32, 32, 32), (2, 1, 48, 40, 24)):  # the traced size and another one
        x = torch.rand(shape)
        with torch.no_grad():
            expected, got = eager(x), traced(x)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_weights_hosted_elsewhere_come_through_large_files(source: Path, tmp_path: Path) -> None:
    weights = source / "models" / "model.pt"
    zip_path = export_bundle(
        source, tmp_path / "dist", overlay=str(source.parent / "tiny.json"), weights_url=weights.as_uri()
    )
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "unzipped")
    assert f"{NAME}/large_files.yml" in names and f"{NAME}/models/model.pt" not in names
    bundle = tmp_path / "unzipped" / NAME

    download_large_files(bundle_path=str(bundle))

    assert (bundle / "models" / "model.pt").read_bytes() == weights.read_bytes()


def test_a_dependency_bundle_travels_inside_the_zip(source: Path, tmp_path: Path) -> None:
    """A stage-2-like bundle whose config points at the stage-1 bundle beside it, as maskgit_transformer does."""
    stage2 = tmp_path / "toy_stage2"
    shutil.copytree(source, stage2)
    inference = stage2 / "configs" / "inference.json"
    config = json.loads(inference.read_text(encoding="utf-8"))
    config["autoencoder_bundle"] = "$@bundle_root + '/../autoencoder_fsq'"
    config["autoencoder_weights"] = "$@autoencoder_bundle + '/models/model.pt'"
    inference.write_text(json.dumps(config, indent=4), encoding="utf-8")
    overlay = str(source.parent / "tiny.json")
    with pytest.raises(ValueError, match=r"autoencoder_bundle.*points outside the bundle"):
        export_bundle(stage2, tmp_path / "refused", overlay=overlay)
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())

    zip_path = export_bundle(stage2, tmp_path / "dist", overlay=overlay, dependencies={"autoencoder_bundle": source})

    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "unzipped")
    exported = tmp_path / "unzipped" / "toy_stage2"
    dependency = exported / "dependencies" / NAME
    for name in ("configs", "docs"):
        assert _package_files(dependency / name) == _package_files(source / name)  # as the stage-1 bundle has them
    assert (dependency / "LICENSE").is_file()
    parser = ConfigParser()
    parser.read_config(str(exported / "configs" / "inference.json"))
    parser["bundle_root"] = str(exported)
    assert (
        Path(parser.get_parsed_content("autoencoder_weights")).read_bytes()
        == (source / "models" / "model.pt").read_bytes()
    )


def test_refuses_an_export_that_would_not_run(source: Path, tmp_path: Path) -> None:
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({**TINY_OVERLAY, "network_def#num_chanels": [8, 16, 16]}), encoding="utf-8")
    dist = tmp_path / "dist"
    with pytest.raises(ValueError, match="do not fit network_def"):  # the weights are tiny, the configs are not
        export_bundle(source, dist)
    with pytest.raises(ValueError, match="num_chanels"):
        export_bundle(source, dist, overlay=str(typo))
    with pytest.raises(ValueError, match=r"version 9\.9\.9"):
        export_bundle(source, dist, version="9.9.9", overlay=str(source.parent / "tiny.json"))
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        export_bundle(source, dist, overlay="missing.json")
    assert not dist.exists() or not any(dist.iterdir())


def test_the_source_decoder_weights_travel_with_the_bundle(source: Path, tmp_path: Path) -> None:
    """Stage 2's ``models/source_decoder.pt`` is shipped beside ``model.pt``, in the zip or in ``large_files.yml``."""
    stage2 = tmp_path / NAME
    shutil.copytree(source, stage2)
    decoder = stage2 / "models" / "source_decoder.pt"
    torch.save({"source_decoder": {}, "stage1_fingerprint": "abc"}, decoder)
    overlay = str(source.parent / "tiny.json")

    with zipfile.ZipFile(export_bundle(stage2, tmp_path / "dist", overlay=overlay)) as archive:
        assert archive.read(f"{NAME}/models/source_decoder.pt") == decoder.read_bytes()

    hosted = tmp_path / "hosted"
    hosted.mkdir()
    shutil.copy2(stage2 / "models" / "model.pt", hosted / "model.pt")
    shutil.copy2(decoder, hosted / "source_decoder.pt")
    zip_path = export_bundle(stage2, tmp_path / "dist_url", overlay=overlay, weights_url=(hosted / "model.pt").as_uri())
    with zipfile.ZipFile(zip_path) as archive:
        assert f"{NAME}/models/source_decoder.pt" not in archive.namelist()
        archive.extractall(tmp_path / "unzipped")
    bundle = tmp_path / "unzipped" / NAME
    download_large_files(bundle_path=str(bundle))
    assert (bundle / "models" / "source_decoder.pt").read_bytes() == decoder.read_bytes()
