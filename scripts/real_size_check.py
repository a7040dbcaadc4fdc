"""The dry run at the bundles' default sizes: every workflow of both stages on a few BraTS-shaped phantom cases.

Each workflow runs as a user types it (``python -m monai.bundle run ...``, printed first) with the bundles' default
configs; only the data folder, the number of cases, epochs and iterations are cut down (and, for stage 1, the
adversarial warm-up set to 0 so that its 2 iterations train the discriminator too):

- stage 1: 2 training iterations (batch 2, 64³ crops, adversarial loss on) and one validation of a whole case
  through the sliding window; ``evaluate.json`` and ``inference.json`` on one case; ``multi_gpu_train.json`` with 2
  processes (gloo on CPU) for one iteration;
- stage 2: tokenizing the cases into the token cache, 2 training iterations (and one validation), ``evaluate.json``
  and ``inference.json`` on one case with the default sampler, decoding by sampling and by expected codes;
  ``multi_gpu_train.json`` as for stage 1.

It prints one markdown table per stage: status, wall time per step or per case, peak resident memory of the
workflow's largest process, the activation memory a GPU needs for one training step at the configured batch size
and precision (measured with ``torch.cuda.max_memory_allocated`` on CUDA, else computed from the tensors autograd
saves for backward, see :func:`saved_tensor_bytes`), CUDA's peak allocated memory of the whole workflow (CUDA
only), and whether the written volumes have the input's grid (shape and affine). Then the time of one validation
pass over a BraTS 2021-size validation split (250 cases x 4 contrasts), extrapolated from the per-case times.
A failing workflow is a row with its status; the script then exits non-zero.

    python scripts/real_size_check.py --output_dir outputs/real_size_check          # CPU: hours, > 20 GiB
    python scripts/real_size_check.py --device cuda --amp true                        # on a GPU (gpu_check.sh)
    python scripts/real_size_check.py --output_dir /tmp/rsc --tiny true --num_cases 3 # the test's setting

``--tiny`` shrinks networks, windows and voxels (3 mm) so that the whole chain runs in a few minutes on 2 cores; it
checks the script, its numbers say nothing about the real sizes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fire
import torch

REPO = Path(__file__).resolve().parents[1]
AUTOENCODER = REPO / "bundles" / "autoencoder_fsq"
TRANSFORMER = REPO / "bundles" / "maskgit_transformer"
BRATS_2021_VALIDATION = 250  # cases of the BraTS 2021 validation split, 4 contrasts each

# --tiny: the test's setting; the real run uses the bundles' defaults.
TINY_AUTOENCODER: dict[str, Any] = {
    "pixdim": [3.0, 3.0, 3.0],
    "roi_size": [32, 32, 32],
    "network_def#num_channels": [8, 16, 16],
    "network_def#num_res_blocks": [1, 1, 1],
    "network_def#norm_num_groups": 8,
    "sw_overlap": 0.25,
    "num_workers": 0,
}
TINY_TRANSFORMER: dict[str, Any] = {
    "roi_size": [48, 64, 48],
    "network_def#num_layers": 2,
    "network_def#hidden_dim": 64,
    "network_def#num_heads": 4,
    "network_def#ffn_dim": 128,
    "num_workers": 0,
}

# Written to a folder on the workflows' PYTHONPATH on CUDA: each process reports its peak allocated CUDA memory.
_CUDA_PEAK_HOOK = '''"""real_size_check: write this process's peak CUDA memory at exit; then any other sitecustomize."""
import atexit
import importlib.machinery
import importlib.util
import os
import sys


def _write_peak():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        path = os.path.join(os.environ["PROD9_CUDA_PEAK_DIR"], f"{os.getpid()}.txt")
        with open(path, "w") as f:
            f.write(str(torch.cuda.max_memory_allocated()))


atexit.register(_write_peak)
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here]
)
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
'''

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - (?:(\S+) - )?[A-Z]+ - (.*)$")
_ITERATION = re.compile(r"Iter: (\d+)/(\d+)")
_TIME_TAKEN = re.compile(r"Epoch\[\d+\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")


@dataclass
class Workflow:
    """One bundle run of the dry run.

    ``unit`` is what ``per_unit_s`` counts: ``"step"`` (training iterations, from the log's iteration lines),
    ``"case"`` (an evaluator's epoch time over ``cases``; ``validate`` names the in-training validation) or
    ``"case*"`` (the whole run's wall time over ``cases``, start-up included). ``grids`` pairs each written volume
    with the input whose shape and affine it must have.
    """

    name: str
    command: list[str]
    cwd: Path
    unit: str = "step"
    cases: int = 1
    needs: tuple[str, ...] = ()
    activation: str | None = None  # "stage1" / "stage2": the training step whose activation memory the row gets
    grids: list[tuple[Path, Path]] = field(default_factory=list)


@dataclass
class Result:
    """What a workflow took: status, times, memory and the grid check."""

    name: str
    status: str
    wall_s: float = math.nan
    per_unit_s: float = math.nan
    unit: str = ""
    steps: int = 0
    validation_per_case_s: float = math.nan
    peak_rss_bytes: int = 0
    cuda_peak_bytes: int | None = None
    grid: str = "–"
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------------------------
# Activation memory of one training step


def saved_tensor_bytes(step: Callable[[], Any], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``step()`` runs its forward pass.

    This is the activation memory a training step holds at its peak, before backward frees it (gradients and the
    optimizer state are not included). Tensors sharing a storage (views, reshapes) count once, and storages of
    ``exclude`` (the parameters: they are in memory anyway) not at all. Works on real tensors and under
    ``FakeTensorMode``, which computes shapes without memory or arithmetic.
    """
    excluded = {t.untyped_storage()._cdata for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in excluded:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def cuda_step_bytes(step: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak CUDA memory allocated by ``step()`` (forward, returning a scalar loss) and its backward, above the start."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step().backward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


@contextlib.contextmanager
def flash_attention_as_on_cuda() -> Iterator[None]:
    """Attention counted as CUDA's flash kernel stores it: O(N) per head, dropout applied inside the kernel.

    On CPU, ``scaled_dot_product_attention`` with ``dropout_p > 0`` falls back to the math path, which saves the
    ``[B, heads, N, N]`` attention matrix twice; CUDA's flash kernel saves q, k, v, the output and the log-sum-exp
    whatever the dropout. Dropout does not change shapes, so the CPU count runs without it.
    """
    original = torch.nn.functional.scaled_dot_product_attention

    def without_dropout(*args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs["dropout_p"] = 0.0
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = without_dropout
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _parser(bundle: Path, configs: Sequence[str | Path], overrides: dict[str, Any]) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) if "/" not in str(c) else str(c) for c in configs])
    parser.update(overrides)
    parser.get_parsed_content("imports")
    return parser


def training_activation_bytes(
    stage: str,
    autoencoder_configs: Sequence[str | Path] = ("train.json",),
    transformer_configs: Sequence[str | Path] = ("train.json",),
    device: str | torch.device = "cpu",
    amp: bool = True,
) -> int:
    """Activation memory of one training step of a stage's network(s) built from the bundle configs.

    Stage 1: the autoencoder and the patch discriminator on its output (the generator step with the adversarial
    loss on) on ``[batch_size * len(modalities), 1, *roi_size]`` crops (the trainer stacks the contrasts of a case
    along the batch axis). Stage 2: the transformer on ``[batch_size, *latent_shape]`` tokens with all four source
    slots present. On CUDA: :func:`cuda_step_bytes`; elsewhere: :func:`saved_tensor_bytes` under ``FakeTensorMode``
    (no memory, no arithmetic: the full sizes can be counted on a small machine) with CPU bf16 autocast for ``amp``.

    Args:
        stage: ``"stage1"`` or ``"stage2"``.
        autoencoder_configs, transformer_configs: config files (names in the bundle's ``configs/`` or paths).
        device: where to measure.
        amp: bf16 autocast, as the trainers apply it.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device(device)
    # Counted without activation checkpointing (on in the bundles when amp is off): autograd's saved tensors do not
    # show what checkpointing recomputes; the CPU run's peak resident memory shows its effect.
    ae = _parser(AUTOENCODER, autoencoder_configs, {"network_def#use_checkpointing": False})
    levels = list(ae["network_def"]["fsq_levels"])
    if stage == "stage1":
        network = ae.get_parsed_content("network_def")
        discriminator = ae.get_parsed_content("discriminator_def")
        modules = [network.to(device), discriminator.to(device)]
        batch, roi = int(ae["batch_size"]) * len(ae["modalities"]), [int(n) for n in ae["roi_size"]]

        def make_inputs() -> tuple[torch.Tensor, ...]:
            return (torch.rand(batch, 1, *roi, device=device),)

        def forward(image: torch.Tensor) -> torch.Tensor:
            reconstruction = network(image)[0]
            logits = discriminator(reconstruction.float().contiguous())[-1]
            return (reconstruction.float() - image).abs().mean() + logits.float().square().mean()

    elif stage == "stage2":
        factor = 2 ** (len(ae["network_def"]["num_channels"]) - 1)
        tokenizer = SimpleNamespace(
            codebook_size=math.prod(levels), fsq_levels=levels, downsampling_factor=factor, pixdim=ae["pixdim"]
        )
        tr = _parser(TRANSFORMER, transformer_configs, {"tokenizer": tokenizer})
        network = tr.get_parsed_content("network_def").to(device)
        modules = [network]
        batch, grid, vocab = int(tr["batch_size"]), list(network.latent_shape), math.prod(levels)

        def make_inputs() -> tuple[torch.Tensor, ...]:
            tokens = torch.randint(0, vocab + 1, (batch, *grid), device=device)
            voxels = [n * network.source_factor for n in grid]  # the sources' images on the token grid
            sources = torch.rand(batch, 4, *voxels, device=device)
            modalities = torch.tensor([[-1, 1, 2, 3]] * batch, device=device)
            return tokens, torch.zeros(batch, dtype=torch.long, device=device), sources, modalities

        def forward(*inputs: torch.Tensor) -> torch.Tensor:
            return network(*inputs).float().logsumexp(-1).mean()

    else:
        raise ValueError(f"stage must be 'stage1' or 'stage2', got {stage!r}")
    for module in modules:
        module.train()
    parameters = [p for module in modules for p in module.parameters()]

    def step() -> torch.Tensor:
        inputs = make_inputs()
        with torch.autocast(device.type, enabled=amp, dtype=torch.bfloat16):
            return forward(*inputs)

    if device.type == "cuda":
        return cuda_step_bytes(step, device)
    with flash_attention_as_on_cuda(), FakeTensorMode(allow_non_fake_inputs=True):
        return saved_tensor_bytes(step, exclude=parameters)


# ---------------------------------------------------------------------------------------------------------------
# Running the workflows


def _bundle_command(configs: Sequence[str | Path], overrides: dict[str, Any], run_id: str | None = None) -> list[str]:
    files = "[" + ",".join(f"'{c}'" if "/" in str(c) else f"'configs/{c}'" for c in configs) + "]"
    command = ["-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", "."]
    if run_id is not None:
        command += ["--run_id", run_id]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return command


def _shell(command: Sequence[str], cwd: Path) -> str:
    """The command as a user types it in the repository: ``python`` for this interpreter, lists in double quotes."""
    words = ["python" if word == sys.executable else word for word in command]
    quoted = (
        w if re.fullmatch(r"--[\w#=-]+", w) else f'"{w}"' if "'" in w and '"' not in w else shlex.quote(w)
        for w in words
    )
    return f"(cd {shlex.quote(os.path.relpath(cwd, REPO))} && {' '.join(quoted)})"


def _log_times(log: str) -> list[tuple[float, str, str]]:
    """``(seconds, logger, message)`` of every timestamped log line."""
    lines = []
    for line in log.splitlines():
        match = _LOG_TIME.match(line)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            lines.append((stamp, match.group(2) or "", match.group(3)))
    return lines


def step_seconds(log: str) -> tuple[float, int]:
    """Seconds per training iteration and the number of iterations, from the trainer's ``Iter: k/n`` lines.

    With two or more iterations, the mean time between iteration lines after the first (the first one includes
    the data loader's start); with one, the time from the engine's start to its line.
    """
    lines = _log_times(log)
    iterations = [(t, m) for t, _, m in lines if _ITERATION.search(m) and "Epoch:" in m]
    if not iterations:
        return math.nan, 0
    if len(iterations) >= 2:
        return (iterations[-1][0] - iterations[0][0]) / (len(iterations) - 1), len(iterations)
    starts = [t for t, _, m in lines if m.startswith("Engine run") and t <= iterations[0][0]]
    return (iterations[0][0] - starts[-1] if starts else math.nan), 1


def log_span_seconds(log: str) -> float:
    """Seconds from the first timestamped log line to the last: the run without the interpreter's start and imports."""
    lines = _log_times(log)
    return lines[-1][0] - lines[0][0] if len(lines) >= 2 else math.nan


def evaluator_seconds(log: str) -> float:
    """Seconds of the last evaluator epoch in the log (ignite's ``Epoch[1] Complete. Time taken``)."""
    seconds = math.nan
    for _, logger, message in _log_times(log):
        match = _TIME_TAKEN.search(message)
        if match and "Evaluator" in logger:
            seconds = int(match.group(1)) * 3600 + int(match.group(2)) * 60 + float(match.group(3))
    return seconds


def grid_check(output: Path, reference: Path) -> str:
    """``"yes"`` when ``output`` has the shape and affine of ``reference``, else what differs."""
    import nibabel as nib
    import numpy as np

    if not output.is_file():
        return f"no {output.name}"
    written, original = nib.load(output), nib.load(reference)
    if written.shape != original.shape:
        return f"shape {written.shape} != {original.shape}"
    if not np.allclose(written.affine, original.affine, atol=1e-4):
        return "affine differs"
    return "yes"


def _process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from ``/proc``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _high_water_marks(pids: Sequence[int], peaks: dict[int, int]) -> None:
    """Update ``peaks[pid]`` with each process's peak resident memory so far (``VmHWM``, bytes)."""
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[pid] = max(peaks.get(pid, 0), int(line.split()[1]) * 1024)


def run_workflow(workflow: Workflow, log_dir: Path, env: dict[str, str], timeout_s: float | None) -> Result:
    """Run one workflow, its output in ``<log_dir>/<name>.log``.

    The peak resident memory is that of the workflow's largest process (``VmHWM``, polled from ``/proc``, since
    ``ru_maxrss`` of a child starts from its parent's peak at ``fork``; ``ru_maxrss`` where ``/proc`` is missing).
    """
    log_path = log_dir / f"{workflow.name}.log"
    print(f"\n[real_size_check] {workflow.name}:\n  {_shell(workflow.command, workflow.cwd)}", flush=True)
    peak_dir = Path(env["PROD9_CUDA_PEAK_DIR"]) / workflow.name if "PROD9_CUDA_PEAK_DIR" in env else None
    if peak_dir is not None:
        peak_dir.mkdir(parents=True, exist_ok=True)
        env = {**env, "PROD9_CUDA_PEAK_DIR": str(peak_dir)}
    start = time.perf_counter()
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            workflow.command,
            cwd=workflow.cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out, peaks = False, {}
        while True:
            if Path("/proc").is_dir():
                _high_water_marks(_process_tree(process.pid), peaks)
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                os.killpg(process.pid, signal.SIGKILL)
                timed_out = True
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.25)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    log = log_path.read_text(errors="replace")
    code = process.returncode
    status_text = "ok" if code == 0 else ("timed out" if timed_out else f"failed (exit {code})")
    result = Result(workflow.name, status_text, wall_s=wall, unit=workflow.unit, log=log_path)
    result.peak_rss_bytes = max(peaks.values()) if peaks else usage.ru_maxrss * 1024
    if peak_dir is not None:
        peaks = [int(p.read_text()) for p in peak_dir.glob("*.txt")]
        result.cuda_peak_bytes = max(peaks) if peaks else None
    if workflow.unit == "step":
        result.per_unit_s, result.steps = step_seconds(log)
        result.validation_per_case_s = evaluator_seconds(log) / workflow.cases
    elif workflow.unit == "case":
        result.per_unit_s = evaluator_seconds(log) / workflow.cases
    else:
        result.per_unit_s = log_span_seconds(log) / workflow.cases
    if result.ok and workflow.grids:
        checks = [grid_check(out, ref) for out, ref in workflow.grids]
        result.grid = "yes" if all(c == "yes" for c in checks) else "; ".join(c for c in checks if c != "yes")
        if result.grid != "yes":
            result.status = "grid differs"
    if not result.ok:
        result.per_unit_s = result.validation_per_case_s = math.nan  # a failed run's times say nothing
        print(f"[real_size_check] {workflow.name}: {result.status}; last lines of {log_path}:", flush=True)
        print("\n".join(log.splitlines()[-15:]), flush=True)
    else:
        print(f"[real_size_check] {workflow.name}: ok in {wall:.1f} s", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# The dry run


def build_workflows(
    out: Path,
    data: Path,
    device: str,
    amp: bool | None,
    nproc: int,
    ae_overlay: Path | None,
    tr_overlay: Path | None,
    iterations: int,
) -> list[Workflow]:
    """The workflows of both stages, in order, with their overrides (defaults otherwise)."""
    from prod9_ext.data import load_datalist

    train_cases = load_datalist("brats", data, "training")
    validation_cases = load_datalist("brats", data, "validation")
    test_case = load_datalist("brats", data, "test")[0]
    ae_configs: list[str | Path] = ["train.json", *([ae_overlay] if ae_overlay else [])]
    tr_configs: list[str | Path] = ["train.json", *([tr_overlay] if tr_overlay else [])]
    batch = int(_parser(AUTOENCODER, ae_configs, {})["batch_size"])
    epochs = max(1, math.ceil(iterations / math.ceil(len(train_cases) / batch)))
    common: dict[str, Any] = {"dataset_dir": str(data)}
    if device != "auto":
        common["device"] = device
    if amp is not None:
        common["amp"] = amp
    train = {**common, "max_epochs": epochs, "val_interval": epochs}
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    ddp_train = {**common, "max_epochs": 1, "val_interval": 2}  # one iteration per process, no validation
    ddp_train.pop("device", None)  # multi_gpu_train.json picks each process's device from LOCAL_RANK

    s1, s2 = out / "stage1", out / "stage2"
    t1 = data / test_case["case"] / Path(test_case["t1"]).name
    t2 = data / test_case["case"] / Path(test_case["t2"]).name
    link: dict[str, Any] = {"autoencoder_weights": str(s1 / "models" / "model.pt"), "cache_dir": str(s2 / "cache")}
    if ae_overlay is not None:
        link["autoencoder_config"] = f"['train.json','{ae_overlay}']"

    def python(configs: Sequence[str | Path], overrides: dict[str, Any], run_id: str | None = None) -> list[str]:
        return [sys.executable, *_bundle_command(configs, overrides, run_id)]

    def torchrun(configs: Sequence[str | Path], overrides: dict[str, Any]) -> list[str]:
        return [*ddp, *_bundle_command([*configs, "multi_gpu_train.json"], overrides)]

    def dirs(ckpt: Path, output: Path) -> dict[str, str]:
        return {"ckpt_dir": str(ckpt), "output_dir": str(output)}

    adversarial = {"adv_warmup_iterations": 0}  # the discriminator trains from the first iteration
    s1_models, s2_models = s1 / "models", s2 / "models"
    workflows = [
        Workflow(
            "stage1-train",
            python(ae_configs, {**train, **adversarial, **dirs(s1_models, s1 / "eval")}),
            AUTOENCODER,
            cases=len(validation_cases),
            activation="stage1",
        ),
        Workflow(
            "stage1-evaluate",
            python([*ae_configs, "evaluate.json"], {**common, "split": "test", **dirs(s1_models, s1 / "evaluate")}),
            AUTOENCODER,
            unit="case",
            needs=("stage1-train",),
        ),
        Workflow(
            "stage1-inference",
            python(
                ["inference.json", *ae_configs[1:]],
                {**common, "input_files": [str(t1)], **dirs(s1_models, s1 / "inference")},
            ),
            AUTOENCODER,
            unit="case*",
            needs=("stage1-train",),
            grids=[(s1 / "inference" / t1.name.replace(".nii.gz", "_recon.nii.gz"), t1)],
        ),
        Workflow(
            "stage1-multi_gpu_train",
            torchrun(ae_configs, {**ddp_train, **adversarial, **dirs(s1 / "ddp" / "models", s1 / "ddp" / "eval")}),
            AUTOENCODER,
            activation="stage1",
        ),
        Workflow(
            "stage2-tokenize",
            python(tr_configs, {**common, **link, **dirs(s2 / "tokenize", s2 / "tokenize")}, run_id="train#tokens"),
            TRANSFORMER,
            unit="case*",
            cases=len(train_cases),
            needs=("stage1-train",),
        ),
        Workflow(
            "stage2-train",
            python(tr_configs, {**train, **link, **dirs(s2_models, s2 / "eval")}),
            TRANSFORMER,
            cases=len(validation_cases),
            needs=("stage2-tokenize",),
            activation="stage2",
        ),
        Workflow(
            "stage2-train_decoder",
            python(
                [*tr_configs, "train_decoder.json"],
                {**common, **link, "decoder_epochs": epochs, **dirs(s2_models, s2 / "eval")},
            ),
            TRANSFORMER,
            needs=("stage2-train",),
        ),
    ]
    for mode in ("sample", "mean"):
        evaluate = {**common, **link, "split": "test", "decode_mode": mode, **dirs(s2_models, s2 / f"evaluate_{mode}")}
        workflows.append(
            Workflow(
                f"stage2-evaluate-{mode}",
                python([*tr_configs, "evaluate.json"], evaluate),
                TRANSFORMER,
                unit="case",
                needs=("stage2-train_decoder",),
            )
        )
    for mode in ("sample", "mean"):
        infer = {**common, **link, "input_files": [str(t1.parent)], "decode_mode": mode}
        infer.pop("cache_dir")  # inference.json has no token cache
        workflows.append(
            Workflow(
                f"stage2-inference-{mode}",
                python(["inference.json", *tr_configs[1:]], {**infer, **dirs(s2_models, s2 / f"inference_{mode}")}),
                TRANSFORMER,
                unit="case*",
                needs=("stage2-train_decoder",),
                grids=[(s2 / f"inference_{mode}" / f"{test_case['case']}_t2_synth.nii.gz", t2)],
            )
        )
    workflows.append(
        Workflow(
            "stage2-multi_gpu_train",
            torchrun(tr_configs, {**ddp_train, **link, **dirs(s2 / "ddp" / "models", s2 / "ddp" / "eval")}),
            TRANSFORMER,
            needs=("stage2-tokenize",),
            activation="stage2",
        )
    )
    return workflows


def _gib(value: float | None) -> str:
    return "–" if value is None or not value or math.isnan(value) else f"{value / 2**30:.2f}"


def _seconds(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"


def markdown_table(results: Sequence[Result], activations: dict[str, int | None], precision: str) -> str:
    """One row per workflow: status, times, memory, grid check."""
    lines = [
        f"| workflow | status | wall s | s per step / case | peak RSS GiB | GPU activations GiB ({precision}) "
        "| CUDA peak GiB | output grid = input |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        unit = "–" if math.isnan(r.per_unit_s) else f"{r.per_unit_s:.1f} / {r.unit}"
        if r.unit == "step" and r.steps:
            unit += f" ({r.steps} step{'s' if r.steps > 1 else ''})"
        if not math.isnan(r.validation_per_case_s):
            unit += f"; validation {r.validation_per_case_s:.1f} / case"
        activation = activations.get(r.name)
        lines.append(
            f"| {r.name} | {r.status} | {_seconds(r.wall_s)} | {unit} | {_gib(r.peak_rss_bytes)} | {_gib(activation)} "
            f"| {_gib(r.cuda_peak_bytes)} | {r.grid} |"
        )
    return "\n".join(lines)


def report(
    results: dict[str, Result],
    workflows: Sequence[Workflow],
    activations: dict[str, int | None],
    title: str,
    precision: str,
    measured: bool,
) -> str:
    """The markdown the script prints (and writes to ``<output_dir>/real_size_check.md``): tables, then notes."""
    parts = [f"## {title}", ""]
    for stage, heading in (("stage1", "Stage 1 (autoencoder_fsq)"), ("stage2", "Stage 2 (maskgit_transformer)")):
        rows = [results[w.name] for w in workflows if w.name.startswith(stage)]
        if rows:
            parts += [f"### {heading}", "", markdown_table(rows, activations, precision), ""]
    how = (
        "measured with torch.cuda.max_memory_allocated"
        if measured
        else "computed from the tensors saved for backward (FakeTensorMode; attention counted as CUDA's flash kernel)"
    )
    parts += [
        "s per step: the mean time between training iterations after the first (one iteration: from the engine's "
        "start); validation and case: the evaluator's epoch time per case; case*: from the run's first log line to "
        "its last (model and data loading included). Peak RSS: the largest process of the workflow. GPU activations: "
        f"one training step at the configured batch (stage 1: batch_size x 4 contrasts, roi_size crops, with the "
        f"discriminator; stage 2: batch_size token grids), {how}. CUDA peak: torch's peak allocated memory of the "
        "workflow's largest process.",
        "",
    ]

    def per_case(evaluate: str, train: str) -> float:
        not_run = Result("", "not run")
        return _first([results.get(evaluate, not_run).per_unit_s, results.get(train, not_run).validation_per_case_s])

    stage1_case = per_case("stage1-evaluate", "stage1-train")
    stage2_case = per_case("stage2-evaluate-sample", "stage2-train")
    parts += [
        f"One validation pass over a BraTS 2021-size validation split ({BRATS_2021_VALIDATION} cases x 4 contrasts), "
        "from the per-case times:",
        f"- stage 1 (sliding-window reconstruction of the 4 contrasts): {_hours(stage1_case)}",
        f"- stage 2 (synthesis of one target with the default sampler): {_hours(stage2_case)}",
    ]
    return "\n".join(parts)


def main(
    output_dir: str = "outputs/real_size_check",
    num_cases: int = 6,
    device: str = "auto",
    amp: bool | None = None,
    tiny: bool = False,
    naming: str = "2021",
    spacing: float | None = None,
    iterations: int = 2,
    timeout_s: float | None = None,
    budget_s: float | None = None,
    overwrite: bool = False,
    workflows: str | Sequence[str] | None = None,
) -> None:
    """Run the dry run and print its tables; exit non-zero when a workflow fails.

    Args:
        output_dir: data, models, outputs and one log per workflow (``logs/``); must be empty unless ``overwrite``.
        num_cases: BraTS-shaped phantom cases (the last two: one validation, one test case; 6 gives 4 training
            cases, i.e. 2 iterations of batch 2 in one epoch, and one per process in the 2-process runs).
        device: ``auto`` (the bundles' default: ``cuda:0`` when available), ``cpu`` or ``cuda``.
        amp: bf16 autocast of every workflow; default the bundles' (on with CUDA). The activation column assumes
            the GPU's default (bf16) unless ``amp`` is given.
        tiny: tiny networks, 32³ windows, 3 mm voxels: checks the script in minutes (for the test).
        naming: the phantoms' file names, ``2021`` or ``2023`` (BraTS-GLI-...; fire reads either as a number).
        spacing: mm the phantoms are drawn at before being written on the 1 mm BraTS grid (default 2: the same
            files, 8x faster to draw than at 1 mm; 3 with ``tiny``).
        iterations: training iterations of stage 1 and stage 2 (epochs as needed, validation after the last).
        timeout_s: per workflow; a workflow still running is stopped and reported as timed out.
        budget_s: for all the workflows together, counted from the start (phantoms included): each one gets at most
            what is left, and those that find nothing left are reported as not run. The table is printed either way
            (``gpu_check.sh`` gives the dry run a fixed share of the GPU machine's time). The ``-mean`` decoding
            and the multi-GPU workflows run last, so that a budget cuts them first.
        overwrite: empty ``output_dir`` first.
        workflows: run only these (names as in the table, e.g. ``stage1-train,stage2-train``; a workflow whose
            prerequisite is not among them is skipped): the CPU cannot run them all in one sitting.
    """
    from prod9_ext.data import make_phantom_dataset

    out = Path(output_dir).resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            sys.exit(f"real_size_check: {out} is not empty; pass --overwrite true to replace it")
        shutil.rmtree(out)
    logs = out / "logs"
    logs.mkdir(parents=True)
    if num_cases < 3:
        sys.exit(f"real_size_check: num_cases must be at least 3 (training, validation, test), got {num_cases}")
    device = {"cuda": "cuda:0"}.get(device, device)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())

    data = out / "data"
    print(f"[real_size_check] {num_cases} BraTS-shaped phantom cases in {data}", flush=True)
    started = time.perf_counter()
    make_phantom_dataset(data, num_cases, 0, spacing or (3.0 if tiny else 2.0), val_fraction=1 / num_cases,
                         test_fraction=1 / num_cases, geometry="brats", naming=str(naming))  # fmt: skip
    print(f"[real_size_check] data: {time.perf_counter() - started:.1f} s", flush=True)
    ae_overlay = tr_overlay = None
    if tiny:
        ae_overlay, tr_overlay = out / "tiny_autoencoder.json", out / "tiny_transformer.json"
        ae_overlay.write_text(json.dumps(TINY_AUTOENCODER, indent=2))
        tr_overlay.write_text(json.dumps(TINY_TRANSFORMER, indent=2))
    nproc = min(2, torch.cuda.device_count()) if use_cuda else 2
    planned = build_workflows(out, data, device, amp, nproc, ae_overlay, tr_overlay, iterations)
    if workflows is not None:
        chosen = workflows.split(",") if isinstance(workflows, str) else list(workflows)
        unknown = sorted(set(chosen) - {w.name for w in planned})
        if unknown:
            sys.exit(f"real_size_check: unknown workflows {unknown}; choose among {[w.name for w in planned]}")
        planned = [w for w in planned if w.name in chosen]
    # Stable: the stages' order, then the second decoding mode, then the multi-GPU runs (a budget cuts those first).
    planned.sort(key=lambda w: ("multi_gpu" in w.name, w.name.endswith("-mean")))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if use_cuda:
        hook = out / "cuda_peak_hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_CUDA_PEAK_HOOK)
        env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
        env["PROD9_CUDA_PEAK_DIR"] = str(out / "cuda_peaks")
    results: dict[str, Result] = {}
    for workflow in planned:
        failed = [n for n in workflow.needs if n not in results or not results[n].ok]
        if failed:
            results[workflow.name] = Result(workflow.name, f"skipped ({', '.join(failed)} not passed)")
            continue
        left = math.inf if budget_s is None else budget_s - (time.perf_counter() - started)
        if left < 1:
            results[workflow.name] = Result(workflow.name, "not run (budget_s spent)")
            continue
        limit = min(math.inf if timeout_s is None else timeout_s, left)
        results[workflow.name] = run_workflow(workflow, logs, env, None if math.isinf(limit) else limit)

    estimate_amp = True if amp is None else amp
    estimate_device = "cuda" if use_cuda else "cpu"
    ae_configs = ["train.json", *([ae_overlay] if ae_overlay else [])]
    tr_configs = ["train.json", *([tr_overlay] if tr_overlay else [])]
    by_stage: dict[str, int | None] = {}
    for stage in ("stage1", "stage2"):
        try:
            by_stage[stage] = training_activation_bytes(stage, ae_configs, tr_configs, estimate_device, estimate_amp)
        except Exception as err:  # a row without the figure, the error printed
            print(f"[real_size_check] activation memory of {stage}: {type(err).__name__}: {err}", flush=True)
            by_stage[stage] = None
    activations = {w.name: by_stage[w.activation] for w in planned if w.activation}
    precision = "bf16" if estimate_amp else "fp32"
    title = f"Dry run at the bundles' {'TINY test' if tiny else 'default'} sizes on {_machine(use_cuda)}"
    text = report(results, planned, activations, title, precision, measured=use_cuda)
    (out / "real_size_check.md").write_text(text + "\n")
    print(f"\n{text}\n\nLogs: {logs}; total {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    failed = [r.name for r in results.values() if not r.ok]
    if failed:
        sys.exit(f"real_size_check: {len(failed)} workflow(s) did not pass: {', '.join(failed)}")


def _first(values: Sequence[float]) -> float:
    return next((v for v in values if not math.isnan(v)), math.nan)


def _hours(per_case: float) -> str:
    if math.isnan(per_case):
        return "–"
    return f"{per_case * BRATS_2021_VALIDATION / 3600:.2f} h ({per_case:.1f} s per case)"


def _machine(use_cuda: bool) -> str:
    if use_cuda:
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"


if __name__ == "__main__":
    fire.Fire(main)
