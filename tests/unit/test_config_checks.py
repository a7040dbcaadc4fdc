"""Start-up checks: wrong types, a roi_size the network cannot take, output folders that cannot be used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prod9_ext.engines.startup import check_choice, check_ints, check_numbers, check_output_dir, check_roi_size


@pytest.mark.parametrize("value", ["abc", 0, 2.5, True, None, [3]])
def test_check_ints_names_key_and_value(value: object) -> None:
    with pytest.raises(ValueError) as caught:
        check_ints(max_epochs=value, batch_size=2)
    assert str(caught.value) == f"max_epochs must be an integer >= 1, got {value!r}."


def test_check_ints_minimum() -> None:
    check_ints(minimum=0, num_workers=0, seed=7)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
        check_ints(minimum=0, num_workers=-1)


@pytest.mark.parametrize("value", ["1e-4", -0.1, float("nan"), False])
def test_check_numbers_names_key_and_value(value: object) -> None:
    check_numbers(learning_rate=1e-4, adv_weight=0, cache_rate=1.0)
    with pytest.raises(ValueError, match=r"^learning_rate must be a number >= 0\.0, got "):
        check_numbers(learning_rate=value)


def test_check_choice() -> None:
    check_choice("target_modality", "t2", ("t1", "t1ce", "t2", "flair"))
    with pytest.raises(ValueError, match=r"target_modality must be one of \['t1', 't1ce', 't2', 'flair'\], got 'pd'"):
        check_choice("target_modality", "pd", ("t1", "t1ce", "t2", "flair"))


ROI_SIZES = [(64, [64, 64, 64]), ([64, 64], [64, 64, 64]), ([30, 32, 33], [32, 32, 36]), (["64", 64, 64], [64, 64, 64])]


@pytest.mark.parametrize(("roi_size", "example"), ROI_SIZES)
def test_check_roi_size_names_value_and_factor(roi_size: object, example: list[int]) -> None:
    check_roi_size([32, 64, 96], 4)
    with pytest.raises(ValueError) as caught:
        check_roi_size(roi_size, 4)
    message = str(caught.value)
    assert message.startswith("roi_size must be 3 integers divisible by 4 (the network's downsampling factor), ")
    assert f"got {roi_size!r}; e.g. {example}." in message


def test_output_dir_with_results_is_refused_unless_overwrite_or_resume(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    check_output_dir("output_dir", out / "new", ["metrics.json"])
    assert not out.exists()  # a check creates nothing
    out.mkdir()
    (out / "notes.txt").write_text("not a result")
    check_output_dir("output_dir", out, ["metrics.json"])
    (out / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError) as caught:
        check_output_dir("output_dir", out, ["metrics.json", "*.csv"])
    assert str(caught.value) == (
        f"output_dir {out} already holds results (metrics.json); pass --overwrite true to replace them, or choose "
        "another --output_dir."
    )
    check_output_dir("output_dir", out, ["metrics.json"], overwrite="true")
    check_output_dir("output_dir", out, ["metrics.json"], resume=True)
    assert (out / "metrics.json").read_text() == "{}"


def test_output_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=rf"^ckpt_dir {blocker / 'models'} cannot be created: {blocker} is a file,"):
        check_output_dir("ckpt_dir", blocker / "models", ["model.pt"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir(tmp_path: Path) -> None:
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    with pytest.raises(OSError, match=r"is not writable \(.*: permission denied or read-only file system\)"):
        check_output_dir("output_dir", read_only / "eval", ["*.csv"])


def test_output_dir_without_free_space(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=rf"^output_dir {tmp_path}: only \d+ MiB free on its disk, the run needs 1e\+12"):
        check_output_dir("output_dir", tmp_path, [], min_free_mb=1e12)
