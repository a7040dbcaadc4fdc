#!/usr/bin/env bash
# The wheels a GPU machine with no package index needs to install prod9, downloaded on a machine that has the index:
#
#     bash scripts/gpu_wheels.sh [PYTHON_VERSION] [DEST]     # default: 3.12 wheelhouse
#
# Then the checkout travels to the GPU machine with DEST (an ignored folder, so name it where the transfer asks for
# ignored paths) and `bash scripts/gpu_check.sh` installs from it with `pip install --no-index --find-links DEST`.
#
# What it downloads: prod9's dependencies (pyproject.toml) and its build backend (hatchling, for the editable
# install), for CPython PYTHON_VERSION on manylinux x86_64, minus what the GPU machine already has: torch and
# torchvision, and MACHINE_PACKAGES below with everything they depend on. pip's resolver chooses the versions
# (`pip install --dry-run --report`, with constraints.txt's MONAI pin); torch and torchvision enter it as stand-ins
# of the machine's versions (MACHINE_TORCH, MACHINE_TORCHVISION), so that no torch or nvidia wheel is resolved or
# downloaded. Every wheel's tags must suit the target (cp3XX, abi3 or py3, manylinux/any). The total must stay under
# MAX_MB (40 MB: the transfer to the GPU machine carries 64 MiB with the checkout).
set -euo pipefail
PYTHON_VERSION=${1:-3.12}
DEST=${2:+$(realpath -m "$2")}  # a DEST given is relative to where the command runs; the default is in the checkout
cd "$(dirname "$0")/.."
DEST=${DEST:-wheelhouse}
export MACHINE_TORCH=${MACHINE_TORCH:-2.11.0}
export MACHINE_TORCHVISION=${MACHINE_TORCHVISION:-0.26.0}
# What the GPU machine (the `nvidia-h200` image) has besides torch and torchvision; torch's own dependencies are
# there wherever torch is.
export MACHINE_PACKAGES=${MACHINE_PACKAGES:-"numpy scipy scikit-learn scikit-image pandas pyyaml tensorboard \
matplotlib tqdm pytest einops lxml filelock typing-extensions sympy networkx jinja2 fsspec setuptools"}
export MAX_MB=${MAX_MB:-40}

if ! [[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]]; then
    echo "gpu_wheels: PYTHON_VERSION must look like 3.12, got '$PYTHON_VERSION'" >&2
    exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    if [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON=python; fi
fi

exec "$PYTHON" - "$PYTHON_VERSION" "$DEST" <<'PY'
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pip._vendor.packaging.markers import default_environment
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

version, dest = sys.argv[1], Path(sys.argv[2])
cp = "cp" + version.replace(".", "")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
PLATFORM_ARGS = [arg for p in PLATFORMS for arg in ("--platform", p)]
TARGET = ["--only-binary=:all:", "--python-version", version, "--implementation", "cp", *PLATFORM_ARGS]
LOCAL = "machine"  # the local version of the stand-ins: torch 2.11.0+machine matches nothing on an index
machine = {canonicalize_name(n) for n in os.environ["MACHINE_PACKAGES"].split()} | {"torch", "torchvision"}


def fail(message):
    sys.exit(f"gpu_wheels: {message}")


def stand_in(folder, name, version):
    """An empty wheel named like the machine's package: the resolver takes it as installed, with no dependencies."""
    info = f"{name}-{version}+{LOCAL}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}+{LOCAL}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}+{LOCAL}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: gpu_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


pyproject = tomllib.loads(Path("pyproject.toml").read_text())
pins = [line.strip() for line in Path("constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#") and canonicalize_name(Requirement(line).name) not in machine]
environment = {**default_environment(), "python_version": version, "python_full_version": f"{version}.0",
               "implementation_name": "cpython", "platform_python_implementation": "CPython",
               "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def resolve(requirements, what):
    """``{name: metadata}`` of everything pip would install for ``requirements`` on the target (a dry run)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stand_ins = tmp / "stand_ins"
        stand_ins.mkdir()
        stand_in(stand_ins, "torch", os.environ["MACHINE_TORCH"])
        stand_in(stand_ins, "torchvision", os.environ["MACHINE_TORCHVISION"])
        constraints = tmp / "constraints.txt"
        constraints.write_text("\n".join([*pins, f"torch=={os.environ['MACHINE_TORCH']}+{LOCAL}",
                                          f"torchvision=={os.environ['MACHINE_TORCHVISION']}+{LOCAL}"]) + "\n")
        report = tmp / "report.json"
        print(f"gpu_wheels: resolving {what} for CPython {version} on manylinux x86_64", flush=True)
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                   str(report), "--target", str(tmp / "target"), *TARGET, "--find-links", str(stand_ins),
                   "-c", str(constraints), *requirements]
        if subprocess.run(command).returncode:
            fail(f"pip could not resolve {what} for CPython {version} (is the package index reachable?)")
        items = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in items}


# The runtime dependencies, less the machine's packages and, transitively, what they depend on (markers evaluated
# for the target Python).
resolved = resolve(pyproject["project"]["dependencies"], "prod9's dependencies")
present, done, todo = set(), set(), [(n, "") for n in machine if n in resolved]
while todo:
    name, extra = todo.pop()
    if (name, extra) in done or name not in resolved:
        continue
    done.add((name, extra))
    present.add(name)
    for text in resolved[name].get("requires_dist") or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": extra}):
            todo += [(canonicalize_name(requirement.name), e) for e in ("", *requirement.extras)]
wanted = {f"{m['name']}=={m['version']}" for n, m in resolved.items() if n not in present}
# The build backend, for the editable install: pip builds in an isolated environment that sees none of the
# machine's packages, so all of it, with what hatchling asks for an editable build (editables).
build = resolve([*pyproject["build-system"]["requires"], "editables~=0.3"], "prod9's build backend")
wanted |= {f"{m['name']}=={m['version']}" for m in build.values()}
wanted = sorted(wanted)

dest.mkdir(parents=True, exist_ok=True)
for old in dest.glob("*.whl"):
    old.unlink()
print(f"gpu_wheels: downloading {len(wanted)} wheels into {dest}/ (the machine has {len(present)} others)", flush=True)
download = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *TARGET, *wanted]
if subprocess.run(download).returncode:
    fail("pip download failed (see above)")

minor = int(version.split(".")[1])


def suits(tag):
    """A tag pip installs on CPython ``version``, manylinux x86_64: cp3XX, abi3 (of an older CPython) or py3."""
    if tag.platform != "any" and not re.fullmatch(r"manylinux\w*_x86_64", tag.platform):
        return False
    if tag.abi == "abi3":
        return re.fullmatch(r"cp3\d+", tag.interpreter) is not None and int(tag.interpreter[3:]) <= minor
    if tag.abi == "none":
        return tag.interpreter in {"py3", f"py3{minor}", cp}
    return tag.interpreter == cp and tag.abi == cp


total, wrong = 0, []
for wheel in sorted(dest.glob("*.whl")):
    fits = any(suits(tag) for tag in parse_wheel_filename(wheel.name)[3])
    if not fits:
        wrong.append(wheel.name)
    size = wheel.stat().st_size
    total += size
    print(f"  {size / 1e6:7.2f} MB  {wheel.name}")
if wrong:
    fail(f"wheels whose tags do not suit CPython {version} on manylinux x86_64: {', '.join(wrong)}")
print(f"gpu_wheels: {len(wanted)} wheels, {total / 1e6:.1f} MB in {dest}/ (limit {os.environ['MAX_MB']} MB)")
if total > float(os.environ["MAX_MB"]) * 1e6:
    fail(f"the wheels take {total / 1e6:.1f} MB, more than {os.environ['MAX_MB']} MB")
PY
