"""Config keys a run would ignore or fail on deep inside MONAI are refused at start-up, naming the key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from prod9_ext.engines.config_keys import BundleCommandLine, bundle_command_line, check_config_keys, running_config

CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "autoencoder_fsq" / "configs"
BUNDLE_MAIN = "/site-packages/monai/bundle/__main__.py"


def _config(name: str, **overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / name))
    parser.update(overrides)
    parser.parse(reset=True)
    return parser


def _command_line(*keys: str, config: str = "train.json") -> BundleCommandLine:
    return BundleCommandLine(config_files=(str(CONFIGS / config),), override_keys=keys)


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_shipped_configs_pass(config: str) -> None:
    check_config_keys(_config(config, roi_size=[32, 32, 32]), _command_line("roi_size", "bundle_root", config=config))


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("max_epoch", "max_epoch is set but nothing in this config uses it (did you mean 'max_epochs'?); "),
        ("network_def#num_channel", "network_def has no key 'num_channel' (did you mean 'num_channels'?); "),
        ("train#trainer#max_epoch", "train#trainer has no key 'max_epoch' (did you mean 'max_epochs'?); "),
    ],
)
def test_unknown_key_is_named(key: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_config_keys(_config("train.json", **{key: 3}), _command_line(key))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_key_of_another_workflow_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A setting of train.json given to inference (as a shared --args_file would) is unused there, not unknown."""
    parser = _config("inference.json", batch_size=2)
    with caplog.at_level(logging.WARNING):
        check_config_keys(parser, _command_line("batch_size", config="inference.json"))
    assert "batch_size is not used by this workflow" in caplog.text


def test_key_nothing_reads_any_more() -> None:
    """Overriding ckpt_dir and output_dir leaves bundle_root unread, which is fine; an override no one reads is not."""
    parser = _config("train.json", ckpt_dir="/tmp/m", output_dir="/tmp/e", inferer={"_target_": "SimpleInferer"})
    check_config_keys(parser, BundleCommandLine((), ("ckpt_dir", "output_dir", "bundle_root", "inferer")))
    with pytest.raises(ValueError, match=r"^sw_overlap is set but nothing in this config uses it"):
        check_config_keys(parser, BundleCommandLine((), ("inferer", "sw_overlap")))


def test_bundle_command_line() -> None:
    argv = [BUNDLE_MAIN, "run", "--config_file", "['a/train.json','a/evaluate.json']", "--max-epochs", "3"]
    parsed = bundle_command_line([*argv, "--network_def#norm_num_groups=8", "--meta_file", "m.json", "--resume"])
    assert parsed == BundleCommandLine(
        config_files=("a/train.json", "a/evaluate.json"),
        override_keys=("max_epochs", "network_def#norm_num_groups", "resume"),
    )
    assert bundle_command_line(["pytest", "--max_epochs", "3"]) is None


def test_running_config_is_the_parser_evaluating_the_expression() -> None:
    config = {"value": 3, "found": "$running_config().get('value')"}
    parser = ConfigParser(config, globals={"running_config": running_config})
    assert parser.get_parsed_content("found") == 3
    with pytest.raises(RuntimeError, match="must be called from a bundle config expression"):
        running_config()


TRANSFORMER_CONFIGS = CONFIGS.parents[1] / "maskgit_transformer" / "configs"


@pytest.mark.parametrize(
    ("configs", "keys"),
    [
        (["inference.json"], ("use_source_decoder", "source_decoder_weights", "decoder_channels", "num_samples")),
        (["inference.json"], ("swap_codes",)),
        (["train.json"], ("use_source_decoder", "source_decoder_weights", "decoder_channels")),
        (["train.json", "train_decoder.json"], ("decoder_epochs", "decoder_learning_rate", "decoder_channels")),
    ],
)
def test_source_decoder_keys_are_known(configs: list[str], keys: tuple[str, ...]) -> None:
    files = tuple(str(TRANSFORMER_CONFIGS / name) for name in configs)
    parser = ConfigParser()
    parser.read_config(list(files))
    parser.parse(reset=True)
    check_config_keys(parser, BundleCommandLine(config_files=files, override_keys=keys))


def test_misspelt_source_decoder_key_is_named() -> None:
    parser = ConfigParser()
    parser.read_config(str(TRANSFORMER_CONFIGS / "inference.json"))
    parser.update({"use_source_decodr": False})
    parser.parse(reset=True)
    with pytest.raises(ValueError, match=r"^use_source_decodr is set but .*did you mean 'use_source_decoder'"):
        check_config_keys(parser, BundleCommandLine((), ("use_source_decodr",)))
