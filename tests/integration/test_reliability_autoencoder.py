"""Issue 9 for autoencoder_fsq through its command line: bad input ends in one line naming it, nothing is lost,
results are never replaced by accident, and the same seed repeats a run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import AUTOENCODER_BUNDLE, TINY_AUTOENCODER, last_error_line, run_bundle, tiny_autoencoder

from prod9_ext import TransformerDecoder
from prod9_ext.engines.error_summary import LOG_NAME, SUMMARY_PREFIX, TRACEBACK_VARIABLE

SLOW = pytest.mark.slow  # the same code path as a case of the default run; the checker itself has unit tests


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``model.pt`` of the untrained tiny network: enough to show what inference refuses."""
    folder = tmp_path_factory.mktemp("untrained")
    torch.manual_seed(0)
    torch.save(tiny_autoencoder().state_dict(), folder / "model.pt")
    return folder


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good input volume, small enough for two 32^3 windows."""
    return _nifti(tmp_path_factory.mktemp("scan") / "scan.nii.gz", _head())


def _infer(models: Path, output_dir: Path, scan: Path, *extra: str, fail: bool = False) -> subprocess.CompletedProcess:
    return run_bundle(
        AUTOENCODER_BUNDLE,
        ["inference.json"],
        *TINY_AUTOENCODER,
        "--ckpt_dir", str(models),
        "--output_dir", str(output_dir),
        "--input_files", f"['{scan}']",
        *extra,
        expect_failure=fail,
    )  # fmt: skip


def _train(dataset_dir: Path, out: Path, *extra: str, fail: bool = False) -> subprocess.CompletedProcess:
    return run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json"],
        *TINY_AUTOENCODER,
        "--dataset_dir", str(dataset_dir),
        "--ckpt_dir", str(out / "models"),
        "--output_dir", str(out / "eval"),
        "--max_epochs", "1",
        *extra,
        expect_failure=fail,
    )  # fmt: skip


def _refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The run failed and its last line is prod9's one-line summary holding every fragment."""
    line = last_error_line(result)
    assert result.returncode != 0
    assert line.startswith(SUMMARY_PREFIX) and all(f in line for f in fragments), result.stderr[-3000:]


def _nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0])), path)
    return path


def _head(shape: tuple[int, ...] = (30, 36, 30), value: float | None = None) -> np.ndarray:
    """An ellipsoid of integer intensities (compressible, as scans are), or ``value`` everywhere."""
    if value is not None:
        return np.full(shape, value, dtype=np.float32)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape[:3]), indexing="ij"))
    inside = (grid**2).sum(0) < 0.8
    head = np.where(inside, np.random.default_rng(0).integers(100, 140, size=shape[:3]), 0).astype(np.float32)
    return np.broadcast_to(head[..., None], shape).copy() if len(shape) > 3 else head


def _with(value: float) -> np.ndarray:
    head = _head()
    head[15, 18, 15] = value
    return head


def _damaged(path: Path, keep: slice | None = None, zero: bool = False) -> Path:
    data = bytearray(_nifti(path, _head()).read_bytes())
    if zero:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data[keep] if keep else data))
    return path


def _text(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not an image")
    return path


BAD_VOLUMES = [
    pytest.param(lambda path: path, "no such file", id="does not exist"),
    pytest.param(_text, "not a readable NIfTI image", id="not an image"),
    pytest.param(lambda path: _damaged(path, keep=slice(0, 2000)), "truncated", id="truncated"),
    pytest.param(
        lambda path: _damaged(path, zero=True), "voxel data cannot be read, corrupt or truncated", id="corrupt"
    ),
    pytest.param(lambda path: _nifti(path, _head((30, 36, 30, 3))), "4D image with 3 volumes", id="4D"),
    pytest.param(lambda path: _nifti(path, _head((30, 36))), "2D image", id="2D", marks=SLOW),
    pytest.param(lambda path: _nifti(path, np.zeros((0, 36, 30), np.float32)), "empty image", id="empty", marks=SLOW),
    pytest.param(lambda path: _nifti(path, _head(value=5.0)), "every voxel is 5", id="constant", marks=SLOW),
    pytest.param(lambda path: _nifti(path, _with(np.nan)), "1 NaN and 0 Inf voxels", id="NaN"),
    pytest.param(lambda path: _nifti(path, _with(np.inf)), "0 NaN and 1 Inf voxels", id="Inf", marks=SLOW),
]


@pytest.mark.parametrize(("make", "message"), BAD_VOLUMES)
def test_bad_volume_is_one_line_and_loses_nothing(
    models: Path, tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "earlier_recon.nii.gz"
    earlier.write_bytes(b"an earlier result")
    bad = make(tmp_path / "in" / "scan.nii.gz")
    _refused(_infer(models, out, bad, "--overwrite", "true", fail=True), str(bad), message)
    assert earlier.read_bytes() == b"an earlier result"
    # no result, no temporary file; the run record only when the failure came after the start (voxel checks)
    assert {p.name for p in out.iterdir()} <= {earlier.name, "run_record_inference.json", LOG_NAME}


def _brats(damage: Callable[[Path], None]) -> Callable[[Path, Path], tuple[Path, list[str]]]:
    """A copy of three phantom cases (no dataset.json: a seeded split), damaged by ``damage``."""

    def prepare(phantom_dir: Path, root: Path) -> tuple[Path, list[str]]:
        for case in sorted(p for p in phantom_dir.iterdir() if p.is_dir())[:3]:
            shutil.copytree(case, root / case.name)
        damage(root)
        return root, []

    return prepare


def _missing_t2(root: Path) -> None:
    (root / "Phantom_00001" / "Phantom_00001_t2.nii.gz").unlink()


def _misnamed_t2(root: Path) -> None:
    case = root / "Phantom_00001"
    (case / "Phantom_00001_t2.nii.gz").rename(case / "Phantom_00001_T2w.nii.gz")


def _4d_t1(root: Path) -> None:
    _nifti(root / "Phantom_00000" / "Phantom_00000_t1.nii.gz", _head((30, 36, 30, 2)))


def _nan_flair(root: Path) -> None:
    path = root / "Phantom_00002" / "Phantom_00002_flair.nii.gz"
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)


MEDMNIST = ("--dataset", "medmnist3d")


def _folder(*extra: str, create: bool = True) -> Callable[[Path, Path], tuple[Path, list[str]]]:
    """An empty (or, without ``create``, absent) data folder and extra overrides."""

    def prepare(phantom_dir: Path, root: Path) -> tuple[Path, list[str]]:
        if create:
            root.mkdir()
        return root, list(extra)

    return prepare


BAD_FOLDERS = [
    pytest.param(
        _brats(_missing_t2), "Case Phantom_00001 in {root} is missing Phantom_00001_t2.nii[.gz]", id="missing"
    ),
    pytest.param(_brats(_misnamed_t2), "(files with other names there: Phantom_00001_T2w.nii.gz)", id="misnamed"),
    pytest.param(_brats(_4d_t1), "{root}/Phantom_00000/Phantom_00000_t1.nii.gz (key 't1'): 4D image with 2", id="4D"),
    pytest.param(_brats(_nan_flair), "{root}/Phantom_00002/Phantom_00002_flair.nii.gz (key 'flair'): 1 NaN", id="NaN"),
    pytest.param(_folder(), "BraTS dataset folder {root} holds no case folders", id="empty dataset_dir"),
    pytest.param(
        _folder(create=False), "BraTS dataset folder {root} does not exist", id="absent dataset_dir", marks=SLOW
    ),
    pytest.param(
        _folder(*MEDMNIST, "--medmnist_flag", "organmnist"), "flag 'organmnist'; expected", id="MedMNIST flag"
    ),
    pytest.param(
        _folder(*MEDMNIST, "--medmnist_size", "32"), "Unknown MedMNIST 3D size 32;", id="MedMNIST size", marks=SLOW
    ),
    pytest.param(_folder(*MEDMNIST), "MedMNIST file organmnist3d_64.npz not found in {root}.", id="MedMNIST file"),
]


@pytest.mark.parametrize(("prepare", "message"), BAD_FOLDERS)
def test_bad_dataset_is_one_line(
    phantom_dir: Path, tmp_path: Path, prepare: Callable[[Path, Path], tuple[Path, list[str]]], message: str
) -> None:
    root, extra = prepare(phantom_dir, tmp_path / "data")
    _refused(_train(root, tmp_path / "run", *extra, fail=True), message.format(root=root))
    # Refused at start-up, before anything was written: headers when the datalist is read, voxel values (NaN) while
    # the cases are preprocessed into the disk cache, which then holds the good cases (and the error log is beside).
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.parent.name != "cache"]
    assert [p.name for p in written] == (["prod9_error.log"] if "NaN" in message else [])
    assert "NaN" in message or not (tmp_path / "run").exists()


def _saved(make: Callable[[], object]) -> Callable[[Path, Path], None]:
    return lambda path, models: torch.save(make(), path)


def _truncated(path: Path, models: Path) -> None:
    path.write_bytes((models / "model.pt").read_bytes()[:10_000])


def _stage2_weights() -> dict:
    return TransformerDecoder(1, 32, 2, 64, vocab_size=1000, latent_shape=(4, 4, 4), num_modalities=4).state_dict()


def _weights(**changes: object) -> Callable[[], dict]:
    return lambda: tiny_autoencoder(**changes).state_dict()


BAD_CHECKPOINTS = [
    pytest.param(_saved(_stage2_weights), "keys missing: 77 (under encoder, decoder,", id="stage-2 weights"),
    pytest.param(
        _saved(_weights(num_channels=(8, 16, 24))),
        "the same network with other network_def",
        id="other layout",
        marks=SLOW,
    ),
    pytest.param(_saved(_weights(num_channels=(16, 32, 32))), "tensors differ in shape", id="other num_channels"),
    pytest.param(_saved(_weights(fsq_levels=(7, 5, 5, 5))), "fsq_levels [7, 5, 5, 5]", id="other fsq_levels"),
    pytest.param(_saved(lambda: {"network": {}, "optimizer": {}}), "(under network, optimizer)", id="training ckpt"),
    pytest.param(_truncated, "not a readable PyTorch checkpoint, truncated or corrupt", id="truncated"),
    pytest.param(lambda path, models: None, "no such checkpoint file", id="absent", marks=SLOW),
]


@pytest.mark.parametrize(("write", "message"), BAD_CHECKPOINTS)
def test_wrong_checkpoint_is_one_line(
    models: Path, scan: Path, tmp_path: Path, write: Callable[[Path, Path], None], message: str
) -> None:
    checkpoint = tmp_path / "models" / "model.pt"
    checkpoint.parent.mkdir()
    write(checkpoint, models)
    _refused(_infer(checkpoint.parent, tmp_path / "out", scan, fail=True), str(checkpoint), message)
    assert not (tmp_path / "out").exists()


def _override(config: str, override: list[str], message: str, marks: Any = ()) -> Any:
    return pytest.param(config, override, message, id=f"{config} {' '.join(override)}", marks=marks)


BAD_OVERRIDES = [
    _override("inference.json", ["--roi_size", "64"], "roi_size must be 3 integers divisible by 4", marks=SLOW),
    _override(
        "inference.json", ["--roi_size", "[30,32,32]"], "divisible by 4 (the network's downsampling factor), got [30,"
    ),
    _override(
        "inference.json", ["--network_def#num_channel", "[8]"], "network_def has no key 'num_channel'", marks=SLOW
    ),
    _override("inference.json", ["--save_token", "true"], "save_token is set but nothing in this config uses it"),
    _override("train.json", ["--max_epochs", "abc"], "max_epochs must be an integer >= 1, got 'abc'."),
    _override(
        "train.json", ["--learning_rate", "fast"], "learning_rate must be a number >= 0.0, got 'fast'.", marks=SLOW
    ),
    _override(
        "train.json",
        ["--modalities", "['t1','pd']"],
        "drawn from ['t1', 't1ce', 't2', 'flair'], got ['t1',",
        marks=SLOW,
    ),
    _override(
        "train.json", ["--dataset", "brat"], "dataset must be one of ['brats', 'medmnist3d'], got 'brat'.", marks=SLOW
    ),
]


@pytest.mark.parametrize(("config", "override", "message"), BAD_OVERRIDES)
def test_bad_override_is_one_line(
    models: Path, scan: Path, phantom_dir: Path, tmp_path: Path, config: str, override: list[str], message: str
) -> None:
    if config == "inference.json":
        result = _infer(models, tmp_path / "out", scan, *override, fail=True)
    else:
        result = _train(phantom_dir, tmp_path, *override, fail=True)
    _refused(result, message)
    assert not {"out", "models", "eval"} & {p.name for p in tmp_path.iterdir()}


def test_results_are_kept_unless_overwrite(models: Path, scan: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _infer(models, out, scan)
    recon = out / "scan_recon.nii.gz"
    before = recon.read_bytes()
    _refused(
        _infer(models, out, scan, fail=True),
        f"output_dir {out} already holds results (scan_recon.nii.gz); pass --overwrite true to replace them",
    )
    assert recon.read_bytes() == before
    _infer(models, out, scan, "--overwrite", "true")
    assert sorted(p.name for p in out.iterdir()) == [LOG_NAME, "run_record_inference.json", "scan_recon.nii.gz"]


def test_training_never_replaces_a_model(phantom_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"a good model")
    _refused(_train(phantom_dir, tmp_path, fail=True), f"ckpt_dir {model.parent} already holds results (model.pt)")
    assert model.read_bytes() == b"a good model"
    assert [p.name for p in model.parent.iterdir()] == ["model.pt"] and not (tmp_path / "eval").exists()


TRACEBACK_LINES = re.compile(r'^(Traceback \(most recent call last\)|\s+File "|\s*\^+$|The above exception)', re.M)


@pytest.mark.parametrize("output_dir_exists", [True, False], ids=["in the output folder", "in the temporary folder"])
def test_missing_input_file_is_one_line_naming_the_traceback_log(
    models: Path, tmp_path: Path, output_dir_exists: bool
) -> None:
    """A user error: one line on the terminal, naming the log file that holds the traceback; no folder made for it."""
    out, temporary, missing = tmp_path / "out", tmp_path / "tmp", tmp_path / "missing_case.nii.gz"
    temporary.mkdir()
    if output_dir_exists:
        out.mkdir()
    result = run_bundle(
        AUTOENCODER_BUNDLE,
        ["inference.json"],
        *TINY_AUTOENCODER,
        "--ckpt_dir", str(models),
        "--output_dir", str(out),
        "--input_files", f"['{missing}']",
        expect_failure=True,
        env={"TMPDIR": str(temporary)},
    )  # fmt: skip
    terminal = result.stdout + result.stderr
    assert not TRACEBACK_LINES.search(terminal), terminal[-3000:]
    line = last_error_line(result)
    assert [text for text in terminal.splitlines() if SUMMARY_PREFIX in text] == [line]
    expected = f"{SUMMARY_PREFIX}FileNotFoundError: input_files: no such file: {missing} (traceback: "
    assert line.startswith(expected) and line.endswith(")"), line
    log = Path(line[len(expected) : -1])
    if output_dir_exists:
        assert log == out / LOG_NAME
    else:
        assert log.parent == temporary and log.name.startswith("prod9_error_") and not out.exists()
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "stage1_inference.py" in text
    assert f"FileNotFoundError: input_files: no such file: {missing}" in text


def test_traceback_on_the_terminal_when_asked(models: Path, tmp_path: Path) -> None:
    missing, temporary = tmp_path / "missing_case.nii.gz", tmp_path / "tmp"
    temporary.mkdir()
    result = run_bundle(
        AUTOENCODER_BUNDLE,
        ["inference.json"],
        *TINY_AUTOENCODER,
        "--ckpt_dir", str(models),
        "--output_dir", str(tmp_path / "out"),
        "--input_files", f"['{missing}']",
        expect_failure=True,
        env={TRACEBACK_VARIABLE: "1", "TMPDIR": str(temporary)},
    )  # fmt: skip
    assert TRACEBACK_LINES.search(result.stderr) and "stage1_inference.py" in result.stderr
    assert last_error_line(result) == f"{SUMMARY_PREFIX}FileNotFoundError: input_files: no such file: {missing}"
    assert not list(temporary.glob("prod9_error_*")) and not (tmp_path / "out").exists()


def test_unwritable_output_dir_fails_at_start_up(models: Path, scan: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _refused(_infer(models, blocker / "out", scan, fail=True), f"output_dir {blocker / 'out'} cannot be created")


def _network(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)["network"]


def _validation_metrics(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stdout.splitlines() if "Epoch[1] Metrics -- " in line]
    assert len(lines) == 1, result.stdout[-2000:]
    return lines[0].split("Metrics -- ")[1]


def test_same_seed_same_weights_tokens_and_metrics(phantom_dir: Path, scan: Path, tmp_path: Path) -> None:
    """Two runs with seed 0 train the same weights, score the same metrics and write the same tokens; seed 1 differs."""
    small = ["--modalities", "['t1']", "--val_interval", "1"]
    first, second, other = (tmp_path / name for name in ("first", "second", "other"))
    metrics = [_validation_metrics(_train(phantom_dir, run, *small)) for run in (first, second)]
    _train(phantom_dir, other, *small, "--seed", "1", "--val_interval", "2")
    weights = [_network(run) for run in (first, second, other)]
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert metrics[0] == metrics[1]

    tokens = []
    for run in (first, second):
        _infer(run / "models", run / "inference", scan, "--save_tokens", "true")
        tokens.append(np.load(run / "inference" / "scan_tokens.npz")["indices"])
    assert np.array_equal(tokens[0], tokens[1])

    record = json.loads((first / "eval" / "run_record_train.json").read_text())
    assert record["config"]["modalities"] == ["t1"] and record["config"]["seed"] == 0
    assert record["versions"]["torch"] and record["versions"]["monai"]
    assert record["git"] is None or len(record["git"]["commit"]) == 40
