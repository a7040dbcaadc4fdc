"""The GPU machine's install path, proven on a CPU machine: wheels from ``scripts/gpu_wheels.sh``, no package index.

The GPU machine has Python 3.12, a torch with CUDA and a few scientific packages, and no package index; this machine
has Python 3.11. So the test builds the wheelhouse for this machine's Python with the same script, and stands in for
the GPU machine with a fresh virtual environment that already has torch and the other packages the GPU machine has
(``MACHINE``, as in ``gpu_wheels.sh``): a ``.pth`` file exposes them from this test's own environment through a
folder of symbolic links, package by package, instead of installing torch again (a copy of ~5.5 GB). Nothing else of
this environment is visible there. prod9 is then installed as ``gpu_check.sh`` installs it (``pip install --no-index
--find-links <wheelhouse> -c <torch pin> -e .``, no pip configuration), and the GPU tests are collected and
``real_size_check.py --help`` runs in that environment. The wheels for Python 3.12 differ only in their tags, which
the second test checks by the file names. Both download from PyPI (~18 MB each).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path, PurePosixPath

import torch

REPO = Path(__file__).resolve().parents[2]
# What gpu_wheels.sh counts as already on the GPU machine (its MACHINE_PACKAGES, plus torch and torchvision).
MACHINE = [
    *("torch", "torchvision", "numpy", "scipy", "scikit-learn", "scikit-image", "pandas", "pyyaml", "tensorboard"),
    *("matplotlib", "tqdm", "pytest", "einops", "lxml", "filelock", "typing-extensions", "sympy", "networkx"),
    *("jinja2", "fsspec", "setuptools"),
]


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command[:4]}... failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _public(version: str) -> str:
    return version.split("+")[0]


def _machine_distributions() -> list[metadata.Distribution]:
    """The distributions of ``MACHINE`` installed here and, transitively, those they require (for this Python)."""
    from packaging.requirements import Requirement

    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(name, "") for name in MACHINE]  # (distribution, extra asked for it: torch wants cuda-toolkit[cudart])
    while todo:
        name, extra = todo.pop()
        name = name.lower().replace("_", "-")
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            dist = found.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not needed here (lxml: nothing prod9 installs requires it)
        found[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                todo += [(requirement.name, e) for e in ("", *requirement.extras)]
    return list(found.values())


def _link_machine_site(folder: Path) -> list[str]:
    """Symbolic links in ``folder`` to the top-level files of each machine distribution; returns their names."""
    folder.mkdir()
    names = []
    for dist in _machine_distributions():
        assert dist.files is not None, f"{dist.metadata['Name']} has no RECORD: cannot tell its files"
        names.append(dist.metadata["Name"])
        site = Path(str(dist.locate_file("")))
        for top in {PurePosixPath(str(f)).parts[0] for f in dist.files}:
            if top in ("..", "__pycache__") or (folder / top).exists():
                continue
            if (site / top).exists():
                (folder / top).symlink_to(site / top)
    return names


def test_offline_install_from_the_wheelhouse_runs_the_gpu_checks_entry_points(tmp_path: Path) -> None:
    started = time.perf_counter()
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheelhouse = tmp_path / "wheelhouse"
    import torchvision

    versions = {"MACHINE_TORCH": _public(torch.__version__), "MACHINE_TORCHVISION": _public(torchvision.__version__)}
    built = _run(["bash", "scripts/gpu_wheels.sh", python_version, str(wheelhouse)], 600, cwd=REPO,
                 env={**os.environ, **versions, "PYTHON": sys.executable})  # fmt: skip
    wheels = sorted(p.name for p in wheelhouse.glob("*.whl"))
    assert any(w.startswith("monai-") for w in wheels) and any(w.startswith("hatchling-") for w in wheels), wheels
    assert not [w for w in wheels if re.match(r"(torch|torchvision|triton|nvidia_|numpy|scipy)-", w)], wheels
    assert re.search(r"gpu_wheels: \d+ wheels, [\d.]+ MB", built.stdout), built.stdout[-2000:]

    # The stand-in GPU machine: a fresh environment seeing only the machine's packages.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 300)
    python = str(venv / "bin" / "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).stdout.strip()
    machine_names = _link_machine_site(tmp_path / "machine_site")
    Path(purelib, "gpu_machine.pth").write_text(str(tmp_path / "machine_site") + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, find-links or constraints from a pip configuration
    # The venv's own setuptools (ensurepip's, older than torch wants) would hide the machine's.
    _run([python, "-m", "pip", "uninstall", "--yes", "--quiet", "setuptools"], 120, env=env)
    probe = "import importlib.util as u; print(u.find_spec('torch') is not None, u.find_spec('monai') is None)"
    assert _run([python, "-c", probe], 120, env=env).stdout.split() == ["True", "True"]  # torch there, MONAI not

    pins = tmp_path / "keep.txt"
    pins.write_text(f"torch=={metadata.version('torch')}\ntorchvision=={metadata.version('torchvision')}\n")
    offline = ["--no-index", "--find-links", str(wheelhouse), "-c", str(pins)]
    _run([python, "-m", "pip", "install", *offline, "-e", "."], 600, cwd=REPO, env=env)
    where = "import torch, monai, prod9_ext; print(torch.__version__, torch.__file__, prod9_ext.__file__)"
    version, torch_file, prod9_file = _run([python, "-c", where], 120, cwd=tmp_path, env=env).stdout.split()
    assert version == torch.__version__ and str(tmp_path / "machine_site") in torch_file  # the torch found stays
    assert Path(prod9_file).resolve().is_relative_to(REPO)  # the checkout, installed editable

    collected = _run([python, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"], 600,
                     cwd=REPO, env=env).stdout  # fmt: skip
    assert "tests/gpu/test_stage1_cuda.py::" in collected and "tests/gpu/test_stage2_cuda.py::" in collected
    assert re.search(r"\b\d+/\d+ tests collected \(\d+ deselected\)", collected), collected[-2000:]
    helped = _run([python, "scripts/real_size_check.py", "--help"], 300, cwd=REPO, env={**env, "PAGER": "cat"})
    usage = helped.stdout + helped.stderr  # fire prints its help on stderr
    assert "--budget_s" in usage and "--device" in usage, usage[-2000:]
    print(f"offline install test: {len(wheels)} wheels, {len(machine_names)} machine packages linked, "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip


def test_wheelhouse_for_python_312_has_only_cp312_abi3_or_py3_wheels(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse312"
    _run(["bash", "scripts/gpu_wheels.sh", "3.12", str(wheelhouse)], 600, cwd=REPO,
         env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    wheels = sorted(p.name for p in wheelhouse.glob("*.whl"))
    assert any(w.startswith("monai-") for w in wheels), wheels
    for wheel in wheels:
        python_tag, abi_tag, platform_tag = wheel[: -len(".whl")].split("-")[-3:]
        assert (python_tag, abi_tag) in {("cp312", "cp312"), ("py3", "none")} or abi_tag == "abi3", wheel
        assert platform_tag == "any" or all(
            re.fullmatch(r"manylinux\w*_x86_64", tag) for tag in platform_tag.split(".")
        ), wheel
    binary = [w for w in wheels if not w.endswith("-none-any.whl")]
    assert binary and all("cp312" in w or "abi3" in w for w in binary), binary  # rpds-py at least is compiled
