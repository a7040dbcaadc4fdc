"""Every bundle's ``configs/metadata.json`` passes ``python -m monai.bundle verify_metadata`` offline.

``verify_metadata`` calls ``monai.apps.download_url(url=metadata["schema"], filepath=...)`` before validating,
and ``download_url`` skips the download when ``filepath`` already exists (after an optional hash check). So the
bundles are checked against the schema vendored at ``bundles/schema/meta_schema_20240725.json`` by passing it as
``--filepath``, with ``--hash_val`` pinning its md5 to the published file. The subprocesses run with a
``sitecustomize`` that makes every socket connection and name lookup fail at once (and records the attempt), so a
test would fail, not hang, if ``verify_metadata`` ever tried the network; one test shows that the guard does catch
the download ``verify_metadata`` attempts when the schema file is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLES_DIR = REPO_ROOT / "bundles"
SCHEMA_FILE = BUNDLES_DIR / "schema" / "meta_schema_20240725.json"
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"  # md5 of the published meta_schema_20240725.json
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
SHARED_SCHEMA = REPO_ROOT.parent / "shared" / "monai_schema" / "meta_schema_20240725.json"
BUNDLE_NAMES = sorted(p.parents[1].name for p in BUNDLES_DIR.glob("*/configs/metadata.json"))
TIMEOUT_S = 300

_NO_NETWORK_SITECUSTOMIZE = '''\
"""Test guard: no network. Every name lookup and TCP/UDP connect fails at once and is recorded."""
import os
import socket

_LOG = os.environ["PROD9_NETWORK_ATTEMPTS_LOG"]
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _record(what):
    with open(_LOG, "a", encoding="utf-8") as f:
        f.write(what + "\\n")
    raise OSError("network access is disabled in this test: " + what)


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record("connect " + repr(address))
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _record("connect_ex " + repr(address))
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    _record("getaddrinfo " + repr(host))


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo
'''


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    """Environment for the subprocesses: repository importable, network guard active; returns (env, attempts log)."""
    guard_dir = tmp_path_factory.mktemp("no_network")
    (guard_dir / "sitecustomize.py").write_text(_NO_NETWORK_SITECUSTOMIZE, encoding="utf-8")
    log = guard_dir / "network_attempts.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(guard_dir), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PROD9_NETWORK_ATTEMPTS_LOG"] = str(log)
    env["PYTHONWARNINGS"] = "ignore"
    return env, log


def _verify_metadata(meta_file: Path, schema_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_metadata",
        "--meta_file",
        str(meta_file),
        "--filepath",
        str(schema_file),
        "--hash_val",
        SCHEMA_MD5,
        "--hash_type",
        "md5",
    ]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _attempts(log: Path) -> str:
    return log.read_text(encoding="utf-8") if log.exists() else ""


def test_vendored_schema_is_the_published_file() -> None:
    assert SCHEMA_FILE.is_file(), f"vendored schema missing: {SCHEMA_FILE}"
    assert hashlib.md5(SCHEMA_FILE.read_bytes(), usedforsecurity=False).hexdigest() == SCHEMA_MD5
    if SHARED_SCHEMA.is_file():
        assert SCHEMA_FILE.read_bytes() == SHARED_SCHEMA.read_bytes()


def test_some_bundle_has_metadata() -> None:
    assert "autoencoder_fsq" in BUNDLE_NAMES


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_verify_metadata_offline(bundle: str, offline_env: tuple[dict[str, str], Path]) -> None:
    env, log = offline_env
    meta_file = BUNDLES_DIR / bundle / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    assert metadata["schema"] == SCHEMA_URL
    before = _attempts(log)

    result = _verify_metadata(meta_file, SCHEMA_FILE, env)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "metadata is verified with no error" in output, output
    assert "skipped downloading" in output, output
    assert _attempts(log) == before, f"verify_metadata tried the network:\n{_attempts(log)}"


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_verify_metadata_rejects_missing_required_field(
    bundle: str, offline_env: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, log = offline_env
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    metadata = json.loads((BUNDLES_DIR / bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert "network_data_format" in schema["required"]
    del metadata["network_data_format"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata, indent=4), encoding="utf-8")
    before = _attempts(log)

    result = _verify_metadata(broken, SCHEMA_FILE, env)

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "'network_data_format' is a required property" in output, output
    assert _attempts(log) == before, f"verify_metadata tried the network:\n{_attempts(log)}"


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_every_required_field_is_checked(bundle: str, tmp_path: Path) -> None:
    """In-process (fast): removing any one of the schema's required fields makes ``verify_metadata`` raise."""
    from monai.bundle import verify_metadata

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    metadata = json.loads((BUNDLES_DIR / bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert set(schema["required"]) <= set(metadata)
    for field in schema["required"]:
        if field == "schema":
            continue  # without the URL verify_metadata stops before validating; checked below
        broken = {k: v for k, v in metadata.items() if k != field}
        meta_file = tmp_path / f"without_{field}.json"
        meta_file.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(ValueError, match=f"'{field}' is a required property"):
            verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA_FILE), hash_val=SCHEMA_MD5)
    meta_file = tmp_path / "without_schema.json"
    meta_file.write_text(json.dumps({k: v for k, v in metadata.items() if k != "schema"}), encoding="utf-8")
    with pytest.raises(ValueError, match="schema"):
        verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA_FILE), hash_val=SCHEMA_MD5)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_metadata_survives_monai_config_loading(bundle: str) -> None:
    """MONAI renames the deprecated ``optional_packages_version`` to ``required_packages_version`` on load,
    overwriting the real list; so the key must not be used."""
    from monai.bundle import ConfigParser

    meta_file = BUNDLES_DIR / bundle / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    assert "optional_packages_version" not in metadata
    parser = ConfigParser()
    parser.read_meta(str(meta_file))
    assert parser["_meta_"]["required_packages_version"] == metadata["required_packages_version"]


def test_network_guard_catches_a_download(offline_env: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    """Control: with no schema file at ``filepath`` verify_metadata does try to download, and the guard stops it."""
    env, log = offline_env
    meta_file = BUNDLES_DIR / "autoencoder_fsq" / "configs" / "metadata.json"
    missing_schema = tmp_path / "schema" / "meta_schema_20240725.json"
    before = _attempts(log)

    result = _verify_metadata(meta_file, missing_schema, env)

    assert result.returncode != 0, result.stdout + result.stderr
    assert not missing_schema.exists()
    assert _attempts(log) != before, result.stdout + result.stderr


def _declared_dependencies() -> dict[str, str]:
    """Run-time dependencies of ``pyproject.toml``: normalised name → requirement string."""
    import re

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = {}
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement)
        assert name is not None, requirement
        names[name.group(0).lower().replace("_", "-")] = requirement
    return names


def test_pyyaml_is_declared() -> None:
    """MONAI reads ``large_files.yml`` with PyYAML, an optional MONAI dependency: prod9 must declare it."""
    assert "pyyaml" in _declared_dependencies()


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_metadata_lists_every_declared_dependency(bundle: str) -> None:
    """A bundle's ``metadata.json`` names every package prod9 needs at run time, with a version."""
    metadata = json.loads((BUNDLES_DIR / bundle / "configs" / "metadata.json").read_text())
    listed = {name.lower() for name in metadata["required_packages_version"]}
    own_keys = {"monai", "torch", "numpy"}  # metadata has monai_version, pytorch_version, numpy_version
    missing = sorted(set(_declared_dependencies()) - listed - own_keys)
    assert not missing, f"{bundle}/configs/metadata.json required_packages_version lacks {missing}"


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_inference_builds_the_network_train_builds(bundle: str) -> None:
    """``inference.json`` repeats ``network_def``: it must be train.json's, or trained weights do not load."""
    configs = BUNDLES_DIR / bundle / "configs"
    trained = json.loads((configs / "train.json").read_text())["network_def"]
    inferred = json.loads((configs / "inference.json").read_text()).get("network_def", trained)
    differing = sorted(k for k in set(trained) | set(inferred) if trained.get(k) != inferred.get(k))
    assert not differing, f"{bundle}: inference.json network_def differs from train.json in {differing}"
