"""Config keys a bundle run would ignore, or fail on deep inside MONAI, refused at start-up in one line.

MONAI's runner adds any ``--key value`` it is given to the config, so a misspelt override (``--max_epoch 3``) is
silently ignored, and a misspelt argument of a component (``--network_def#num_channel``) fails only when the
component is built, inside a long traceback. The start-up of every bundle run (:mod:`prod9_ext.engines.startup`)
calls :func:`check_config_keys`, which reads the config being run from the ``ConfigParser`` evaluating the
expression (:func:`running_config`) and the overrides from the command line (:func:`bundle_command_line`).
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser
from monai.bundle.config_item import ConfigComponent
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.scripts import run as bundle_run
from monai.utils import ensure_tuple
from monai.utils.module import locate

__all__ = ["RUNNER_IDS", "BundleCommandLine", "bundle_command_line", "check_config_keys", "running_config"]

logger = logging.getLogger(__name__)

RUNNER_IDS = ("imports", "initialize", "run", "finalize", "bundle_root")
"""Top-level ids the bundle runner reads itself (``bundle_root`` is a property of every MONAI bundle workflow)."""


@dataclass(frozen=True)
class BundleCommandLine:
    """What ``python -m monai.bundle run`` was given: its config files and the config ids it overrides."""

    config_files: tuple[str, ...]
    override_keys: tuple[str, ...]

    def bundle_keys(self) -> set[str]:
        """Top-level keys of every config of the bundle (the ``*.json`` next to the first config file)."""
        if not self.config_files:
            return set()
        keys: set[str] = set()
        for path in Path(self.config_files[0]).parent.glob("*.json"):
            if path.name != "metadata.json":
                content = json.loads(path.read_text())
                keys.update(content if isinstance(content, dict) else {})
        return keys


def running_config() -> ConfigParser:
    """The ``ConfigParser`` evaluating the current config expression (the merged config files and overrides).

    Raises:
        RuntimeError: not called from inside a bundle config expression.
    """
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigParser):
            return candidate
        frame = frame.f_back
    raise RuntimeError("running_config() must be called from a bundle config expression, e.g. in 'initialize'.")


def bundle_command_line(argv: Sequence[str] | None = None) -> BundleCommandLine | None:
    """Parse ``argv`` (default ``sys.argv``) of ``python -m monai.bundle run``; ``None`` for any other program.

    Options are ``--key value``, ``--key=value`` or a bare ``--flag``, with ``-`` read as ``_`` as ``fire`` does;
    the runner's own arguments (``--config_file``, ``--meta_file``, ...) are not overrides.
    """
    argv = sys.argv if argv is None else argv
    if not argv or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py"):
        return None
    options: dict[str, str | None] = {}
    tokens = list(argv[1:])
    for index, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        name, separator, value = token[2:].partition("=")
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if not separator:
            value = following if following is not None and not following.startswith("--") else None
        options[name.replace("-", "_")] = value
    config_file = options.get("config_file")
    config_files = tuple(str(f) for f in ensure_tuple(DefaultParseValue(config_file))) if config_file else ()
    runner_arguments = set(inspect.signature(bundle_run).parameters)
    return BundleCommandLine(config_files, tuple(k for k in options if k and k not in runner_arguments))


def check_config_keys(
    parser: ConfigParser | None = None,
    command_line: BundleCommandLine | None = None,
    runner_ids: Sequence[str] = RUNNER_IDS,
    used: Iterable[str] = (),
) -> None:
    """Refuse config keys a run would otherwise ignore, or fail on deep inside MONAI.

    * an override whose top-level key nothing in the config refers to and no config of the bundle has
      (``--max_epoch 3`` for ``--max_epochs 3``); a key another config of the bundle has (``--batch_size`` given to
      inference, as in a shared ``--args_file``) is only logged as unused;
    * a key of a ``_target_`` component that its class or function does not take (``--network_def#num_channel``).

    Args:
        parser: the config; default: :func:`running_config`.
        command_line: the command line; default: :func:`bundle_command_line` (none in a ``ConfigWorkflow`` made in
            Python: then only the components are checked).
        runner_ids: top-level ids that need no reference (the runner's ``initialize``, ``run``, ...).
        used: top-level ids that Python code reads by name (the start-up's checks, :mod:`prod9_ext.engines.startup`).

    Raises:
        ValueError: naming the first such key, with the closest valid name when there is one.
    """
    parser = parser or running_config()
    command_line = command_line or bundle_command_line()
    config = parser.get()
    if not isinstance(config, Mapping):
        return
    if command_line is not None:
        _check_overrides(config, command_line, (*runner_ids, *used))
    for component_id, component in _components(config):
        _check_component_keys(parser, component_id, component)


def _check_overrides(config: Mapping, command_line: BundleCommandLine, runner_ids: Sequence[str]) -> None:
    references = (ref for value in _strings(config) for ref in ReferenceResolver.match_refs_pattern(value))
    used = {ReferenceResolver.split_id(ref)[0] for ref in references}
    unused = []
    for key in command_line.override_keys:
        top = ReferenceResolver.split_id(key)[0]
        if top not in runner_ids and top not in used:
            unused.append((key, top))
    bundle_keys = command_line.bundle_keys() if unused else set()
    for key, top in unused:
        if top not in bundle_keys:
            raise ValueError(f"{key} is set but nothing in this config uses it{_hint(top, used)}; remove or rename it.")
        logger.warning(f"{key} is not used by this workflow (another config of the bundle uses it); ignoring it.")


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a config value (nested dicts and lists)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _components(value: Any, path: str = "") -> Iterator[tuple[str, Mapping]]:
    """``(id, dict)`` of every dict with a ``_target_`` inside a config value."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            yield path, value
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        yield from _components(item, f"{path}#{key}" if path else str(key))


def _check_component_keys(parser: ConfigParser, component_id: str, component: Mapping) -> None:
    """Raise ``ValueError`` for a key of ``component`` that its ``_target_`` does not take."""
    target = component["_target_"]
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return
    name = ConfigComponent(config=dict(component), id=component_id, locator=parser.locator).resolve_module_name()
    obj = locate(str(name))
    if not callable(obj):
        return
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in component:
        if not str(key).startswith("_") and key not in accepted:
            raise ValueError(
                f"{component_id} has no key {key!r}{_hint(str(key), accepted)}; {target} takes {', '.join(accepted)}."
            )


def _hint(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
