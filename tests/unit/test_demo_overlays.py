"""Each bundle's CPU demo overlay (``demo.json``) combines with the workflow configs the quickstart runs it with."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
COMBINATIONS = [
    ("autoencoder_fsq", ["train.json"]),
    ("autoencoder_fsq", ["train.json", "evaluate.json"]),
    ("maskgit_transformer", ["train.json"]),
    ("maskgit_transformer", ["train.json", "evaluate.json"]),
    ("maskgit_transformer", ["inference.json"]),
    ("maskgit_transformer", ["train.json", "train_decoder.json"]),
]


@pytest.mark.parametrize(("bundle", "configs"), COMBINATIONS, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_every_demo_key_exists_in_the_workflow_it_overlays(bundle: str, configs: list[str]) -> None:
    """A nested demo key (``a#b``) whose parent a workflow lacks stops that workflow while its config is read."""
    files = [BUNDLES / bundle / "configs" / name for name in [*configs[:1], "demo.json", *configs[1:]]]
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    demo = ConfigParser.load_config_file(str(BUNDLES / bundle / "configs" / "demo.json"))
    for key, value in demo.items():
        assert parser[key] == value, key
