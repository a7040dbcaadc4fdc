"""prod9's main job: phantoms (or your BraTS folder) -> stage 1 -> stage 2 -> synthesised volumes and a report.

The report puts prod9 beside the peer a user would pick for paired synthesis: a regression U-Net
(``scripts/regression_peer.py``) trained on the same cases for the same wall time as prod9's two stages.

    python scripts/quickstart.py                          # embedded phantoms, CPU demo settings
    python scripts/quickstart.py --dataset_dir /data/BraTS2021   # the same on your BraTS folder (or BRATS_DATA_DIR)

The report gives the wall time of every step. The demo trains in bf16 autocast where the CPU runs it in hardware
(AMX or AVX512-BF16), in float32 elsewhere.

Every step is a command line of the bundles (``python -m monai.bundle run ...``), printed before it runs, so the
report ends with the exact commands to rerun any step. Each finished step leaves a record in
``<output_dir>/steps/``; run the script again after an interruption and finished steps are skipped, an interrupted
training resumes from its last checkpoint. ``--smoke`` runs the smallest setting (a handful of cases, tiny
networks, one epoch each) to check the whole chain in a few minutes; its numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
AUTOENCODER = REPO / "bundles" / "autoencoder_fsq"
TRANSFORMER = REPO / "bundles" / "maskgit_transformer"

HELD_OUT = "<scored case folders>"
PROD9_SECONDS = "<prod9 training seconds>"  # the peer's budget: stage 1 + stage 2 training, once they have run
PROD9_TRAINING = ("stage1_train", "stage2_train", "stage2_train_decoder")
TASKS = {"t2_from_t1": ("t2", ["t1"]), "flair_from_t1_t1ce_t2": ("flair", ["t1", "t1ce", "t2"])}
# The synthesis rows of the report, each an inference run: name -> inference.json overrides. ``token_swap`` decodes
# each case with another case's codes (its input list starts with the last case again, named "donor").
ROWS = {
    "mean": ["--decode_mode", "mean"],
    "sample": ["--decode_mode", "sample", "--num_samples", "1"],
    "mean_of_4_samples": ["--decode_mode", "sample", "--num_samples", "4"],
    "mean_stage1_decoder": ["--decode_mode", "mean", "--use_source_decoder", "false"],
    "token_swap": ["--decode_mode", "mean", "--swap_codes", "true"],
}
DONOR_FIRST = "<scored case folders, last one first>"

# --smoke: every network and run as small as the chain allows (a few minutes on 2 cores).
SMOKE_AUTOENCODER = [
    "--roi_size", "[32,32,32]",
    "--network_def#num_channels", "[8,16]",
    "--max_epochs", "1",
    "--val_interval", "1",
]  # fmt: skip
SMOKE_TRANSFORMER = [
    "--network_def#num_layers", "2",
    "--network_def#hidden_dim", "64",
    "--network_def#num_heads", "4",
    "--network_def#ffn_dim", "128",
    "--max_epochs", "2",
    "--val_interval", "2",
    "--sampler#steps", "4",
]  # fmt: skip
SMOKE_DECODER = ["--decoder_epochs", "1", "--decoder_channels", "4"]


@dataclass
class Step:
    """One command of the chain, skipped when its record exists."""

    name: str
    command: list[str]
    cwd: Path = REPO
    resume_dir: Path | None = None  # training: resume from a checkpoint here after an interruption


class Runner:
    """Runs steps, prints their commands, records wall times in ``<output_dir>/steps/<name>.json``."""

    def __init__(self, output_dir: Path, tag: str = "quickstart") -> None:
        self.records = output_dir / "steps"
        self.records.mkdir(parents=True, exist_ok=True)
        self.tag = tag

    def record(self, name: str) -> dict | None:
        path = self.records / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, step: Step) -> None:
        if self.record(step.name) is not None:
            print(f"[{self.tag}] {step.name}: done before, skipped", flush=True)
            return
        command = list(step.command)
        if step.resume_dir is not None and any(step.resume_dir.glob("checkpoint_epoch=*.pt")):
            command += ["--resume", "true"]
        shown = f"(cd {shlex.quote(os.path.relpath(step.cwd, REPO))} && {_shell(command)})"
        print(f"\n[{self.tag}] {step.name}:\n  {shown}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl when other jobs share the cores
        result = subprocess.run(command, cwd=step.cwd, env=env)
        if result.returncode != 0:
            raise SystemExit(f"[{self.tag}] {step.name} failed (exit {result.returncode}); fix it and rerun: {shown}")
        seconds = time.perf_counter() - start
        record = {"seconds": seconds, "command": shown}
        from prod9_ext.atomic import atomic_write_text

        atomic_write_text(self.records / f"{step.name}.json", json.dumps(record, indent=2))
        print(f"[{self.tag}] {step.name}: {seconds / 60:.1f} min", flush=True)


def _list(values: list[str]) -> str:
    """A list as the bundles' command lines take it: ``['t1','t2']``."""
    return "[" + ",".join(f"'{value}'" for value in values) + "]"


def _shell(command: list[str]) -> str:
    """The command as a user would type it: ``python`` for this interpreter, lists in double quotes."""
    words = ["python" if word == sys.executable else word for word in command]
    return " ".join(_word(w) for w in words)


def _word(word: str) -> str:
    if re.fullmatch(r"--[\w#]+", word):
        return word
    return f'"{word}"' if "'" in word and '"' not in word and "$" not in word else shlex.quote(word)


def _bundle_run(bundle: Path, configs: list[str], *overrides: str) -> list[str]:
    files = _list([f"configs/{name}" for name in configs])
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", ".", *overrides]


def build_steps(
    out: Path, dataset_dir: Path, make_data: bool, num_cases: int, smoke: bool, split: str = "test"
) -> list[Step]:
    """The chain: data, stage 1 (train, evaluate), stage 2 (train, then evaluate and synthesise per task).

    The evaluations and the synthesis score the ``split`` cases, which no training or choice of settings saw.
    """
    ae, tr = out / "autoencoder", out / "transformer"
    data = ["--dataset_dir", str(dataset_dir)]
    ae_extra = SMOKE_AUTOENCODER if smoke else []
    tr_extra = SMOKE_TRANSFORMER if smoke else []
    stage1 = ["--autoencoder_weights", str(ae / "models" / "model.pt")]
    steps = []
    if make_data:
        phantoms = [sys.executable, "scripts/make_phantoms.py", str(dataset_dir), "--num_cases", str(num_cases)]
        phantoms += ["--spacing", "3.0", "--preview", str(out / "phantoms.png"), "--overwrite"]  # ours to redo
        steps.append(Step("phantoms", phantoms))
    ae_dirs = ["--ckpt_dir", str(ae / "models"), "--output_dir", str(ae / "eval")]
    steps.append(
        Step(
            "stage1_train",
            _bundle_run(AUTOENCODER, ["train.json", "demo.json"], *data, *ae_dirs, *ae_extra),
            AUTOENCODER,
            resume_dir=ae / "models",
        )
    )
    ae_eval = ["--ckpt_dir", str(ae / "models"), "--output_dir", str(ae / "evaluate"), "--split", split]
    steps.append(
        Step(
            "stage1_evaluate",
            _bundle_run(AUTOENCODER, ["train.json", "demo.json", "evaluate.json"], *data, *ae_eval, *ae_extra),
            AUTOENCODER,
        )
    )
    if smoke:  # the transformer bundle reads the stage-1 network from config files: give it the smoke overlay
        smoke_overlay = out / "smoke_autoencoder.json"
        overlay = {
            SMOKE_AUTOENCODER[i].removeprefix("--"): json.loads(SMOKE_AUTOENCODER[i + 1])
            for i in range(0, len(SMOKE_AUTOENCODER), 2)
        }
        smoke_overlay.write_text(json.dumps(overlay))
        stage1 += ["--autoencoder_config", _list(["train.json", "demo.json", str(smoke_overlay)])]
    tr_dirs = ["--ckpt_dir", str(tr / "models"), "--output_dir", str(tr / "eval"), "--cache_dir", str(tr / "cache")]
    steps.append(
        Step(
            "stage2_train",
            _bundle_run(TRANSFORMER, ["train.json", "demo.json"], *data, *stage1, *tr_dirs, *tr_extra),
            TRANSFORMER,
            resume_dir=tr / "models",
        )
    )
    decoder_extra = SMOKE_DECODER if smoke else []
    steps.append(
        Step(
            "stage2_train_decoder",
            _bundle_run(
                TRANSFORMER, ["train.json", "demo.json", "train_decoder.json"], *data, *stage1, *tr_dirs, *tr_extra,
                *decoder_extra,
            ),
            TRANSFORMER,
            resume_dir=tr / "models" / "source_decoder",
        )
    )  # fmt: skip
    decoder_args = ["--decoder_channels", SMOKE_DECODER[-1]] if smoke else []
    for task, (target, sources) in TASKS.items():
        task_args = ["--val_target_modality", target, "--val_source_modalities", _list(sources)]
        evaluate = ["--ckpt_dir", str(tr / "models"), "--output_dir", str(tr / f"evaluate_{task}"), *task_args]
        evaluate += ["--split", split, *decoder_args]
        evaluate += tr_extra
        steps.append(
            Step(
                f"stage2_evaluate_{task}",
                _bundle_run(TRANSFORMER, ["train.json", "demo.json", "evaluate.json"], *data, *stage1, *evaluate),
                TRANSFORMER,
            )
        )
        for row, row_args in ROWS.items():
            infer = ["--ckpt_dir", str(tr / "models"), "--output_dir", str(out / "synthesis" / task / row)]
            infer += ["--target_modality", target, "--source_modalities", _list(sources), "--overwrite", "true"]
            infer += ["--input_files", DONOR_FIRST if row == "token_swap" else HELD_OUT, *row_args, *decoder_args]
            steps.append(
                Step(
                    f"stage2_synthesise_{task}_{row}",
                    _bundle_run(TRANSFORMER, ["inference.json", "demo.json"], *data, *stage1, *infer, *tr_extra),
                    TRANSFORMER,
                )
            )
    peer = [sys.executable, "scripts/regression_peer.py", "--dataset_dir", str(dataset_dir)]
    peer += ["--output_dir", str(out / "peer"), "--seconds", PROD9_SECONDS, "--split", split]
    steps.append(Step("peer_regression", peer))
    for task, (target, sources) in TASKS.items():
        score = [sys.executable, "scripts/score_synthesis.py", "--dataset_dir", str(dataset_dir), "--split", split]
        score += ["--target", target, "--sources", _list(sources)]
        folders = {row: out / "synthesis" / task / row for row in ROWS} | {"peer": out / "peer" / task}
        for row, folder in folders.items():
            output = ["--output", str(out / "scores" / task / f"{row}.json")]
            steps.append(Step(f"score_{task}_{row}", [*score, "--pred_dir", str(folder), *output]))
        output = ["--output", str(out / "scores" / task / "copy_the_source.json")]
        steps.append(Step(f"score_{task}_copy_the_source", [*score, "--copy_source", "true", *output]))
    return steps


def scored_split(dataset_dir: Path, make_data: bool) -> str:
    """``test`` for the phantoms and for a BraTS folder whose ``dataset.json`` has a test list, else ``validation``."""
    if make_data:
        return "test"
    listing = dataset_dir / "dataset.json"
    if listing.is_file() and json.loads(listing.read_text()).get("test"):
        return "test"
    print(f"[quickstart] {listing} has no 'test' list: the report scores the validation cases", flush=True)
    return "validation"


def _scored_folders(step: Step, dataset_dir: Path, split: str) -> Step:
    """The step with the placeholder ``HELD_OUT`` (or ``DONOR_FIRST``) replaced by the folders of the ``split`` cases
    (for ``DONOR_FIRST``, the last case once more at the front, named ``donor``)."""
    from prod9_ext.data import load_datalist

    datalist = load_datalist("brats", dataset_dir, split)
    folders = [str(dataset_dir / case["case"]) for case in datalist]
    donor = {"case": "donor", **{key: str(datalist[-1][key]) for key in ("t1", "t1ce", "t2", "flair")}}
    lists = {HELD_OUT: _list(folders), DONOR_FIRST: repr([donor, *folders])}
    return Step(step.name, [lists.get(arg, arg) for arg in step.command], step.cwd, step.resume_dir)


def _with_prod9_seconds(step: Step, runner: Runner) -> Step:
    """The step with the placeholder ``PROD9_SECONDS`` replaced by the wall time of prod9's two trainings."""
    records = [runner.record(name) for name in PROD9_TRAINING]
    seconds = sum(record["seconds"] for record in records if record is not None)
    command = [f"{seconds:.0f}" if arg == PROD9_SECONDS else arg for arg in step.command]
    return Step(step.name, command, step.cwd, step.resume_dir)


def main(
    output_dir: str = "outputs/quickstart",
    dataset_dir: str | None = None,
    num_cases: int = 27,
    smoke: bool = False,
) -> None:
    """Run the chain and write ``<output_dir>/report.md``.

    Args:
        output_dir: where everything goes (data, models, metrics, synthesised volumes, report).
        dataset_dir: a BraTS folder (default: ``BRATS_DATA_DIR``; without either, phantoms are built under
            ``<output_dir>/data``).
        num_cases: phantom cases to build (15 % validation, 15 % test; 27 gives 19 / 4 / 4).
        smoke: the smallest setting, to check the chain end to end (its numbers mean nothing).
    """
    from report import write_report

    out = Path(output_dir).resolve()
    given = dataset_dir or os.environ.get("BRATS_DATA_DIR")
    data = Path(given).resolve() if given else out / "data"
    make_data = not given and not (data / "dataset.json").is_file()
    runner = Runner(out)
    split = scored_split(data, make_data)
    steps = build_steps(out, data, make_data, 5 if smoke else num_cases, smoke, split)
    started = time.perf_counter()
    for step in steps:
        if HELD_OUT in step.command or DONOR_FIRST in step.command:
            step = _scored_folders(step, data, split)
        if PROD9_SECONDS in step.command:
            step = _with_prod9_seconds(step, runner)
        runner.run(step)
    report = write_report(out, TASKS, runner.records, smoke=smoke, split=split)
    print(f"\n[quickstart] finished in {(time.perf_counter() - started) / 60:.1f} min: {report}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    fire.Fire(main)
