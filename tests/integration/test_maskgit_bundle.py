"""The maskgit_transformer bundle through its real command lines, chained after a tiny stage-1 run on phantoms."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.integration.conftest import (
    REPO,
    TINY_TRANSFORMER,
    TRANSFORMER_BUNDLE,
    Stage1Run,
    last_error_line,
    run_bundle,
)

HELD_OUT = "Phantom_00004"  # the validation case of the six-case phantom set
TEST_CASE = "Phantom_00005"  # its held-out test case


def _outputs(root: Path) -> list[str]:
    return ["--ckpt_dir", str(root / "models"), "--output_dir", str(root / "eval"), "--cache_dir", str(root / "cache")]


@pytest.fixture(scope="module")
def stage2_run(stage1_run: Stage1Run, phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of the tiny transformer, validated after each; then one epoch of its source-aware decoder
    (``train_decoder.json`` over ``train.json``), whose ``models/source_decoder.pt`` inference and evaluation use."""
    root = tmp_path_factory.mktemp("stage2")
    result = run_bundle(
        TRANSFORMER_BUNDLE,
        ["train.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER,
        *_outputs(root),
        "--max_epochs", "2",
        "--val_interval", "1",
    )  # fmt: skip
    (root / "train.log").write_text(result.stdout + result.stderr)
    result = run_bundle(
        TRANSFORMER_BUNDLE,
        ["train.json", "train_decoder.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER,
        *_outputs(root),
        "--decoder_epochs", "1",
    )  # fmt: skip
    (root / "train_decoder.log").write_text(result.stdout + result.stderr)
    return root


def test_train_writes_model_metrics_and_snapshots(stage2_run: Path) -> None:
    log = (stage2_run / "train.log").read_text()
    assert (stage2_run / "models" / "model.pt").is_file()
    assert (stage2_run / "models" / "checkpoint_epoch=2.pt").is_file()
    epochs = re.findall(r"Epoch\[(\d)\] Metrics -- (.*)", log)
    assert [int(e) for e, _ in epochs] == [1, 2]
    metrics = dict(re.findall(r"(\w+): (-?[\d.]+|nan)", epochs[-1][1]))
    expected = {"val_ssim", "val_psnr", "val_ssim_tumour", "val_token_accuracy", "baseline_ssim", "baseline_psnr"}
    assert expected <= set(metrics)
    assert all(math.isfinite(float(metrics[k])) for k in expected)
    assert (stage2_run / "eval" / "synthesis_epoch2.png").is_file()
    # four training cases tokenized once, four modalities each, on the 3 mm grid padded to at least the ROI
    cached = sorted((stage2_run / "cache").glob("*/*.npz"))
    assert [p.stem for p in cached] == [f"Phantom_0000{i}" for i in range(4)]
    tokens = np.load(cached[0])["tokens"]
    assert tokens.shape[0] == 4 and all(n >= g for n, g in zip(tokens.shape[1:], (12, 16, 12), strict=True))
    assert tokens.min() >= 0 and tokens.max() < 1000


def test_train_decoder_writes_its_own_weights_file(stage2_run: Path, stage1_run: Stage1Run) -> None:
    """train_decoder.json reads the stage-2 run's token cache and its voxels, trains the decoder beside the frozen
    transformer, and writes the decoder's own ``source_decoder.pt`` with the stage-1 fingerprint."""
    log = (stage2_run / "train_decoder.log").read_text()
    assert "0 cases encoded now, 4 reused" in log  # the stage-2 run's token cache, voxels included
    assert re.search(r"Epoch\[1\] Complete", log)
    saved = torch.load(stage2_run / "models" / "source_decoder.pt", map_location="cpu", weights_only=True)
    assert set(saved) == {"source_decoder", "stage1_fingerprint"}
    assert any(key.startswith("branches.") for key in saved["source_decoder"])
    branches = [value for key, value in saved["source_decoder"].items() if key.startswith("branches.")]
    assert any(value.abs().max() > 0 for value in branches)  # trained away from the zero initialisation
    assert len(saved["stage1_fingerprint"]) == 16
    assert sorted(p.name for p in (stage2_run / "cache").glob("*/*.voxels.npy")) == [
        f"Phantom_0000{i}.voxels.npy" for i in range(4)
    ]
    assert (stage2_run / "eval" / "run_record_train_decoder.json").is_file()
    assert list((stage2_run / "models" / "source_decoder").glob("checkpoint_epoch=1.pt"))


def test_second_run_reuses_token_cache_and_resumes(stage2_run: Path, stage1_run: Stage1Run, phantom_dir: Path) -> None:
    """A rerun with another stage-2 setting reuses the cached tokens; --resume continues from epoch 2."""
    result = run_bundle(
        TRANSFORMER_BUNDLE,
        ["train.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER,
        *_outputs(stage2_run),
        "--max_epochs", "3",
        "--val_interval", "5",
        "--resume", "true",
        "--learning_rate", "0.0001",
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "0 cases encoded now, 4 reused" in log
    completed = re.findall(r"\w*Trainer - INFO - Epoch\[(\d)\] Complete", log)
    assert completed == ["3"]  # epochs 1 and 2 came from the checkpoint
    assert (stage2_run / "models" / "checkpoint_epoch=3.pt").is_file()


def test_evaluate_scores_synthesis_beside_the_baseline(stage2_run: Path, stage1_run: Stage1Run, phantom_dir: Path):
    out = stage2_run / "evaluate"
    run_bundle(
        TRANSFORMER_BUNDLE,
        ["train.json", "evaluate.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER,
        "--ckpt_dir", str(stage2_run / "models"),
        "--output_dir", str(out),
    )  # fmt: skip
    summary = json.loads((out / "metrics.json").read_text())
    assert sorted(summary["per_item"]) == [HELD_OUT]
    for key in ("val_ssim", "val_psnr", "val_ssim_tumour", "val_token_accuracy", "baseline_ssim", "baseline_psnr"):
        assert math.isfinite(summary["mean"][key]), key
    assert (out / "metrics.csv").is_file() and (out / "baseline_ssim_raw.csv").is_file()
    assert (out / "cases" / f"{HELD_OUT}.png").is_file()


def test_evaluate_split_test_scores_the_held_out_test_case(
    stage2_run: Path, stage1_run: Stage1Run, phantom_dir: Path
) -> None:
    """`--split test` synthesises and scores the test list of dataset.json (Phantom_00005), not the validation case."""
    out = stage2_run / "evaluate_test"
    run_bundle(
        TRANSFORMER_BUNDLE,
        ["train.json", "evaluate.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER,
        "--ckpt_dir", str(stage2_run / "models"),
        "--output_dir", str(out),
        "--split", "test",
    )  # fmt: skip
    assert [e["case"] for e in json.loads((phantom_dir / "dataset.json").read_text())["test"]] == [TEST_CASE]
    summary = json.loads((out / "metrics.json").read_text())
    assert sorted(summary["per_item"]) == [TEST_CASE]
    assert math.isfinite(summary["mean"]["val_psnr"])
    assert (out / "cases" / f"{TEST_CASE}.png").is_file() and not (out / "cases" / f"{HELD_OUT}.png").exists()


def _infer(
    stage2_run: Path,
    stage1_run: Stage1Run,
    phantom_dir: Path,
    out: Path,
    *overrides: str,
    inputs: object = None,
    sources: tuple[str, ...] = ("t1",),
    expect_failure: bool = False,
) -> subprocess.CompletedProcess:
    """inference.json with the trained models on ``inputs`` (default: the held-out case's folder)."""
    return run_bundle(
        TRANSFORMER_BUNDLE,
        ["inference.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER[:10],  # the network and ROI; inference has no batch size or warm-up
        "--ckpt_dir", str(stage2_run / "models"),
        "--output_dir", str(out),
        "--input_files", json.dumps([inputs or str(phantom_dir / HELD_OUT)]),
        "--source_modalities", json.dumps(list(sources)),
        *overrides,
        expect_failure=expect_failure,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("target", "sources", "use_source_decoder"),
    [("t2", ["t1"], "true"), ("flair", ["t1", "t1ce", "t2"], "true"), ("t2", ["t1"], "false")],
    ids=["t1_to_t2", "three_to_flair", "t1_to_t2_stage1_decoder"],
)
def test_inference_synthesises_in_the_input_space(
    stage2_run: Path,
    stage1_run: Stage1Run,
    phantom_dir: Path,
    target: str,
    sources: list[str],
    use_source_decoder: str,
) -> None:
    out = stage2_run / f"infer_{target}_{use_source_decoder}"
    case_dir = phantom_dir / HELD_OUT
    inputs = {m: str(case_dir / f"{HELD_OUT}_{m}.nii.gz") for m in sources}
    _infer(
        stage2_run,
        stage1_run,
        phantom_dir,
        out,
        "--target_modality", target,
        "--use_source_decoder", use_source_decoder,
        inputs=inputs,
        sources=tuple(sources),
    )  # fmt: skip
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"{HELD_OUT}_{target}_synth.nii.gz", "run_record_inference.json"]
    synthesised, real = nib.load(out / written[0]), nib.load(case_dir / f"{HELD_OUT}_{target}.nii.gz")
    assert synthesised.shape == real.shape
    np.testing.assert_allclose(synthesised.affine, real.affine, atol=1e-5)
    assert np.isfinite(np.asarray(synthesised.dataobj)).all()


def test_the_source_decoder_changes_the_synthesis_and_several_samples_give_their_spread(
    stage2_run: Path, stage1_run: Stage1Run, phantom_dir: Path
) -> None:
    """Same seed, same tokens: decoding with the trained source-aware decoder differs from stage 1's decoding (its
    branches have left zero); ``--num_samples 2`` writes the mean and ``<case>_t2_synth_std.nii.gz`` beside it, and
    ``--save_samples true`` the two samples as the channels of ``<case>_t2_synth_samples.nii.gz``."""
    volumes = {}
    for use in ("true", "false"):
        out = stage2_run / f"two_samples_decoder_{use}"
        overrides = ["--use_source_decoder", use, "--seed", "5", "--num_samples", "2", "--sampler#steps", "2"]
        _infer(stage2_run, stage1_run, phantom_dir, out, *overrides, "--save_samples", use)
        written = sorted(p.name for p in out.glob("*.nii.gz"))
        names = [f"{HELD_OUT}_t2_synth.nii.gz", f"{HELD_OUT}_t2_synth_std.nii.gz"]
        if use == "true":
            names.insert(1, f"{HELD_OUT}_t2_synth_samples.nii.gz")
        assert written == names
        mean, spread = nib.load(out / names[0]), nib.load(out / names[-1])
        assert spread.shape == mean.shape == nib.load(phantom_dir / HELD_OUT / f"{HELD_OUT}_t1.nii.gz").shape
        np.testing.assert_allclose(spread.affine, mean.affine, atol=1e-5)
        std = np.asarray(spread.dataobj)
        assert np.isfinite(std).all() and std.min() >= 0 and std.max() > 0
        volumes[use] = np.asarray(mean.dataobj)
        if use == "true":
            samples = np.asarray(nib.load(out / names[1]).dataobj)
            assert samples.shape == (*mean.shape, 2)
            np.testing.assert_allclose(samples.mean(-1), volumes[use], atol=1e-4)
            np.testing.assert_allclose(samples.std(-1, ddof=1), std, atol=1e-4)
    assert not np.array_equal(volumes["true"], volumes["false"])


def test_a_missing_or_foreign_decoder_file_stops_inference_in_one_line(
    stage2_run: Path, stage1_run: Stage1Run, phantom_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "models" / "no_decoder.pt"
    result = _infer(
        stage2_run,
        stage1_run,
        phantom_dir,
        tmp_path / "out",
        "--use_source_decoder", "true",
        "--source_decoder_weights", str(missing),
        expect_failure=True,
    )  # fmt: skip
    line = last_error_line(result)
    assert str(missing) in line and "no such file" in line
    foreign = tmp_path / "foreign_decoder.pt"
    saved = torch.load(stage2_run / "models" / "source_decoder.pt", map_location="cpu", weights_only=True)
    torch.save({**saved, "stage1_fingerprint": "0123456789abcdef"}, foreign)
    result = _infer(
        stage2_run,
        stage1_run,
        phantom_dir,
        tmp_path / "out",
        "--source_decoder_weights", str(foreign),
        expect_failure=True,
    )  # fmt: skip
    line = last_error_line(result)
    assert str(foreign) in line and "another stage 1" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.nii.gz"))


def test_inference_refuses_to_overwrite(stage2_run: Path, stage1_run: Stage1Run, phantom_dir: Path) -> None:
    out = stage2_run / "infer_existing"
    out.mkdir()
    existing = out / f"{HELD_OUT}_t2_synth.nii.gz"
    existing.write_bytes(b"previous result")
    result = run_bundle(
        TRANSFORMER_BUNDLE,
        ["inference.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER[:10],
        "--ckpt_dir", str(stage2_run / "models"),
        "--output_dir", str(out),
        "--input_files", json.dumps([str(phantom_dir / HELD_OUT)]),
        "--source_modalities", "['t1']",
        expect_failure=True,
    )  # fmt: skip
    assert "--overwrite true" in result.stderr
    assert existing.read_bytes() == b"previous result"


def test_unconditional_generation(stage2_run: Path, stage1_run: Stage1Run, phantom_dir: Path) -> None:
    out = stage2_run / "generated"
    run_bundle(
        TRANSFORMER_BUNDLE,
        ["inference.json", "generate.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER[:10],
        "--ckpt_dir", str(stage2_run / "models"),
        "--output_dir", str(out),
        "--num_samples", "2",
        "--seed", "3",
    )  # fmt: skip
    samples = sorted(out.glob("sample_*.nii.gz"))
    assert [p.name for p in samples] == ["sample_000.nii.gz", "sample_001.nii.gz"]
    volumes = [np.asarray(nib.load(p).dataobj) for p in samples]
    assert volumes[0].shape == (48, 64, 48)
    assert not np.array_equal(volumes[0], volumes[1])  # seeds 3 and 4


def test_class_conditional_medmnist(stage1_run: Stage1Run, tmp_path: Path) -> None:
    """configs/medmnist3d.json: class-conditional training and generation with the same bundle."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in {"train": 4, "val": 1, "test": 1}.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(count, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 11, size=(count, 1), dtype=np.uint8)
    np.savez_compressed(tmp_path / "organmnist3d.npz", **arrays)
    medmnist = [
        *stage1_run.stage2_args(tmp_path),
        *TINY_TRANSFORMER,
        "--medmnist_size", "28",
        "--roi_size", "[28,28,28]",
        "--network_def#patch_size", "1",
        "--ckpt_dir", str(tmp_path / "models"),
    ]  # fmt: skip
    run_bundle(
        TRANSFORMER_BUNDLE,
        ["train.json", "medmnist3d.json"],
        *medmnist,
        "--output_dir", str(tmp_path / "eval"),
        "--cache_dir", str(tmp_path / "cache"),
        "--max_epochs", "1",
        "--val_interval", "1",
    )  # fmt: skip
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state["class_embed.weight"].shape[0] == 12  # OrganMNIST3D's 11 classes and the null class
    run_bundle(
        TRANSFORMER_BUNDLE,
        ["inference.json", "generate.json", "medmnist3d.json"],
        *medmnist,
        "--output_dir", str(tmp_path / "generated"),
        "--class_label", "3",
    )  # fmt: skip
    assert nib.load(tmp_path / "generated" / "sample_000.nii.gz").shape == (28, 28, 28)


def test_stage1_weights_with_other_levels_fail_at_start_up(
    stage1_run: Stage1Run, phantom_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other_levels.json"
    settings = json.loads(stage1_run.config.read_text())
    other.write_text(json.dumps({**settings, "network_def#fsq_levels": [8, 8, 8]}))
    result = run_bundle(
        TRANSFORMER_BUNDLE,
        ["train.json"],
        *stage1_run.stage2_args(phantom_dir),
        "--autoencoder_config", f"['train.json','{other}']",
        *TINY_TRANSFORMER,
        *_outputs(tmp_path),
        expect_failure=True,
    )  # fmt: skip
    assert f"autoencoder_weights {stage1_run.weights} do not fit network_def" in result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "cache").exists()


def test_two_process_gloo_training(stage1_run: Stage1Run, phantom_dir: Path, tmp_path: Path) -> None:
    """configs/multi_gpu_train.json through torchrun: 2 processes, gloo on CPU, a DDP transformer."""
    configs = "['configs/train.json','configs/multi_gpu_train.json']"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(TRANSFORMER_BUNDLE)]
    command += [*stage1_run.stage2_args(phantom_dir), *TINY_TRANSFORMER, *_outputs(tmp_path)]
    command += ["--max_epochs", "1", "--val_interval", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=TRANSFORMER_BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert len(re.findall(r"Epoch\[1\] Metrics -- .*val_ssim", log)) == 1  # all-reduced, logged by rank 0 only
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"]
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state and not any(key.startswith("module.") for key in state)
    checkpoint = torch.load(tmp_path / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 1  # 4 cases, 2 ranks, batch 2: one iteration per rank


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--sampler#steps", "0"], "sampler_steps must be an integer >= 1, got 0"),
        (["--target_modality", "t5"], "target_modality"),
        (["--roi_size", "[50,64,48]"], "roi_size [50, 64, 48] must be a multiple of the stage-1 downsampling factor 4"),
        (["--network_def#num_layer", "2"], "num_layer"),
        (["--dataset", "medmnist3d"], "add configs/medmnist3d.json to --config_file"),
    ],
    ids=["steps_0", "unknown_target", "roi_not_divisible", "unknown_network_key", "medmnist_without_overlay"],
)
def test_bad_inference_settings_are_one_line(
    stage2_run: Path, stage1_run: Stage1Run, phantom_dir: Path, tmp_path: Path, override: list[str], expected: str
) -> None:
    result = run_bundle(
        TRANSFORMER_BUNDLE,
        ["inference.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER[:10],
        "--ckpt_dir", str(stage2_run / "models"),
        "--output_dir", str(tmp_path / "out"),
        "--input_files", json.dumps([str(phantom_dir / HELD_OUT)]),
        "--source_modalities", "['t1']",
        *override,
        expect_failure=True,
    )  # fmt: skip
    assert expected in last_error_line(result)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.nii.gz"))


def test_stage1_weights_as_stage2_model_are_one_line(stage1_run: Stage1Run, phantom_dir: Path, tmp_path: Path) -> None:
    """A ckpt_dir holding the autoencoder's model.pt: the loader names the file and what does not fit."""
    result = run_bundle(
        TRANSFORMER_BUNDLE,
        ["inference.json"],
        *stage1_run.stage2_args(phantom_dir),
        *TINY_TRANSFORMER[:10],
        "--ckpt_dir", str(stage1_run.weights.parent),
        "--output_dir", str(tmp_path / "out"),
        "--input_files", json.dumps([str(phantom_dir / HELD_OUT)]),
        "--source_modalities", "['t1']",
        "--use_source_decoder", "false",  # stage 1's folder has no source_decoder.pt either
        expect_failure=True,
    )  # fmt: skip
    line = last_error_line(result)
    assert str(stage1_run.weights) in line and "another network's checkpoint" in line
    assert not any((tmp_path / "out").glob("*.nii.gz"))


def test_same_seed_same_synthesis_and_run_record(stage2_run: Path, stage1_run: Stage1Run, phantom_dir: Path) -> None:
    outputs = []
    for name in ("repeat_a", "repeat_b"):
        run_bundle(
            TRANSFORMER_BUNDLE,
            ["inference.json"],
            *stage1_run.stage2_args(phantom_dir),
            *TINY_TRANSFORMER[:10],
            "--ckpt_dir", str(stage2_run / "models"),
            "--output_dir", str(stage2_run / name),
            "--input_files", json.dumps([str(phantom_dir / HELD_OUT)]),
            "--source_modalities", "['t1']",
            "--seed", "7",
        )  # fmt: skip
        outputs.append(np.asarray(nib.load(stage2_run / name / f"{HELD_OUT}_t2_synth.nii.gz").dataobj))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    record = json.loads((stage2_run / "repeat_a" / "run_record_inference.json").read_text())
    assert record["config"]["seed"] == 7


def test_learning_rate_in_tensorboard_and_log(stage2_run: Path) -> None:
    from tests.integration.test_training_conventions import stage2_rates, tensorboard_scalars

    rates = stage2_rates(epochs=2)  # the first run's two epochs; a resumed run (another test) may add a third
    scalars = tensorboard_scalars(stage2_run / "eval", "learning_rate")
    assert {epoch: scalars[epoch] for epoch in rates} == pytest.approx(rates)
    logged = re.findall(r"State values: learning_rate: ([\d.e-]+)", (stage2_run / "train.log").read_text())
    assert [float(rate) for rate in logged[:2]] == pytest.approx([rates[1], rates[2]])
