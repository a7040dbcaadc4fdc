"""Bad scanner files are refused with one line naming the file: header checks up front, voxel checks after loading."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged

from prod9_ext.data import CheckedNibabelReader, CheckImaged, check_datalist, check_image_file, check_volume


def _save(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _volume(shape: tuple[int, ...] = (12, 10, 8)) -> np.ndarray:
    return np.random.default_rng(0).random(shape).astype(np.float32)


def _missing(path: Path) -> Path:
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _text(path: Path) -> Path:
    path.write_text("patient notes, not an image")
    return path


def _zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _truncated_gz(path: Path) -> Path:
    data = _save(path, _volume()).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_nii(path: Path) -> Path:
    plain = _save(path.with_name("plain.nii"), _volume()).read_bytes()
    path = path.with_name("truncated.nii")
    path.write_bytes(plain[: len(plain) // 2])
    return path


def _gzip_of_truncated_nii(path: Path) -> Path:
    raw = gzip.decompress(_save(path, _volume()).read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return path


def _corrupt_gz(path: Path) -> Path:
    """A compressible (deflate-coded) volume with 64 zeroed bytes mid-stream; header and trailer intact."""
    volume = np.zeros((40, 40, 40), dtype=np.int16)
    volume[5:35, 5:35, 5:35] = np.random.default_rng(0).integers(100, 120, size=(30, 30, 30))
    data = bytearray(_save(path, volume).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return path


BAD_FILES: list[tuple[str, Callable[[Path], Path], type[Exception], str]] = [
    ("does not exist", _missing, FileNotFoundError, "no such file"),
    ("a folder", _folder, ValueError, "is a folder"),
    ("not an image", _text, ValueError, "not a readable NIfTI image"),
    ("zero bytes", _zero_bytes, ValueError, "not a readable NIfTI image"),
    ("truncated .nii.gz", _truncated_gz, ValueError, "truncated"),
    ("truncated .nii", _truncated_nii, ValueError, "truncated"),
    ("gzip of a truncated .nii", _gzip_of_truncated_nii, ValueError, "truncated (2096 of 4192 bytes)"),
    ("4D", lambda p: _save(p, _volume((12, 10, 8, 3))), ValueError, "4D image with 3 volumes"),
    ("2D", lambda p: _save(p, _volume((12, 10))), ValueError, "2D image"),
    ("one slice", lambda p: _save(p, _volume((12, 10, 1))), ValueError, "2D image"),
    ("0 voxels", lambda p: _save(p, _volume((0, 10, 8))), ValueError, "empty image"),
]


@pytest.mark.parametrize(("kind", "make", "error", "message"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_file_is_one_line_naming_it(
    tmp_path: Path, kind: str, make: Callable[[Path], Path], error: type[Exception], message: str
) -> None:
    path = make(tmp_path / "case_t1.nii.gz")
    with pytest.raises(error) as caught:
        check_image_file(path, key="t1")
    text = str(caught.value)
    assert text.startswith(f"{path} (key 't1'): ") and message in text
    assert "\n" not in text


def test_damaged_gzip_stream_is_named_when_loaded(tmp_path: Path) -> None:
    """Damage inside the deflate stream, with header and trailer intact, shows only when the voxels are read."""
    path = _corrupt_gz(tmp_path / "case_t1.nii.gz")
    check_image_file(path)
    with pytest.raises(ValueError, match=rf"^{path}: the voxel data cannot be read, corrupt or truncated \("):
        LoadImaged("t1", reader=CheckedNibabelReader, image_only=True)({"t1": str(path)})


def test_4d_error_says_how_to_pick_a_volume(tmp_path: Path) -> None:
    path = _save(tmp_path / "dwi.nii.gz", _volume((12, 10, 8, 5)))
    with pytest.raises(ValueError, match=r"5 volumes .*img\.slicer\[\.\.\., 0\]"):
        check_image_file(path)


@pytest.mark.parametrize("shape", [(12, 10, 8), (12, 10, 8, 1)], ids=["3D", "3D with a trailing 1"])
def test_good_volume_passes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    check_image_file(_save(tmp_path / "good.nii.gz", _volume(shape)))
    check_image_file(_save(tmp_path / "good.nii", _volume(shape)))


def test_complete_gzip_with_two_members_passes(tmp_path: Path) -> None:
    """A trailer that disagrees with the header (here: two gzip members) is settled by reading the stream."""
    raw = gzip.decompress(_save(tmp_path / "one.nii.gz", _volume()).read_bytes())
    path = tmp_path / "two_members.nii.gz"
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    check_image_file(path)


@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, "1 NaN and 0 Inf voxels"), (np.inf, "0 NaN and 1 Inf voxels"), (-np.inf, "0 NaN and 1 Inf voxels")],
    ids=["NaN", "Inf", "-Inf"],
)
def test_non_finite_voxels_are_refused(value: float, message: str) -> None:
    volume = _volume()
    volume[3, 4, 5] = value
    with pytest.raises(ValueError, match=message) as caught:
        check_volume(volume, "/data/case_t2.nii.gz", "t2")
    assert str(caught.value).startswith("/data/case_t2.nii.gz (key 't2'): ")


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_constant_volume_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match=f"every voxel is {value:g}"):
        check_volume(np.full((12, 10, 8), value, dtype=np.float32), "/data/blank.nii.gz")


def test_check_imaged_names_the_loaded_file(tmp_path: Path) -> None:
    volume = _volume()
    volume[0, 0, 0] = np.nan
    path = _save(tmp_path / "case_flair.nii.gz", volume)
    good = _save(tmp_path / "case_t1.nii.gz", _volume())
    data = LoadImaged(["t1", "flair"], image_only=True)({"t1": str(good), "flair": str(path)})
    CheckImaged("t1")(data)  # a good volume passes through unchanged
    with pytest.raises(ValueError, match=rf"^{path} \(key 'flair'\): 1 NaN"):
        CheckImaged(["t1", "flair"])(data)


def test_check_datalist_names_the_key(tmp_path: Path) -> None:
    good = _save(tmp_path / "a_t1.nii.gz", _volume())
    flat = _save(tmp_path / "a_t2.nii.gz", _volume((12, 10)))
    datalist = [{"case": "a", "t1": str(good), "t2": str(flat)}]
    check_datalist(datalist, ["t1", "flair"])  # keys a case does not have are skipped
    with pytest.raises(ValueError, match=rf"^{flat} \(key 't2'\): 2D"):
        check_datalist(datalist, ["t1", "t2"])
