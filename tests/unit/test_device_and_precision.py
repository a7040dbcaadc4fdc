"""``--device`` and ``--amp``: a device torch cannot use is one line at start-up; bf16 falls back where unsupported."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from prod9_ext.engines import Bf16Trainer, amp_enabled, startup
from prod9_ext.engines.startup import check_device


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cpu_is_always_a_device(device: str | torch.device) -> None:
    assert check_device(device) == torch.device("cpu")


@pytest.mark.parametrize(("device", "message"), [
    ("gpu", "device 'gpu' is not a device torch knows; use cpu, cuda, cuda:N or mps."),
    ("cuda:x", "device 'cuda:x' is not a device torch knows"),
    ("", "device '' is not a device torch knows"),
    ("meta", "device 'meta': prod9 runs on cpu, cuda, cuda:N or mps."),
])  # fmt: skip
def test_unknown_device_is_one_line(device: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_device(device)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_one_line(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=rf"^device '{device}' asks for CUDA, but torch sees no CUDA GPU here; use"):
        check_device(device)


def test_gpu_index_beyond_the_gpus_there_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"^device 'cuda:2': this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1\.$"):
        check_device("cuda:2")


def test_mps_without_mps_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device 'mps' asks for Apple's MPS, which torch cannot use here"):
        check_device("mps")


def test_amp_follows_the_config_where_bf16_runs() -> None:
    assert amp_enabled(True, "cpu") is True
    assert amp_enabled("true", torch.device("cpu")) is True
    assert amp_enabled(False, "cpu") is False
    assert amp_enabled("false", "cpu") is False


def test_amp_without_bf16_falls_back_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(startup, "bf16_is_supported", lambda device: False)
    startup._warn_no_bf16.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert [amp_enabled(True, "cuda:0") for _ in range(3)] == [False] * 3  # trainer, evaluator, tokens
        assert amp_enabled(False, "cuda:0") is False
    assert [r.getMessage() for r in caplog.records] == ["amp: cuda:0 has no bf16 support; running in float32."]


def test_cuda_without_native_bf16_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not startup.bf16_is_supported("cuda:0")  # e.g. a V100: bf16 only emulated
    assert startup.bf16_is_supported("cpu")


def _trainer(dtype: torch.dtype) -> Bf16Trainer:
    network = torch.nn.Linear(2, 1)
    return Bf16Trainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.ones(4, 2), "label": torch.zeros(4, 1)}],
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), 0.1),
        loss_function=torch.nn.functional.mse_loss,
        amp=True,
        amp_kwargs={"dtype": dtype},
    )


def test_bf16_trains_without_a_grad_scaler() -> None:
    trainer = _trainer(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.run()
    assert trainer.scaler is None
    assert not [w for w in caught if "GradScaler" in str(w.message)]
    assert trainer.state.iteration == 1


def test_float16_keeps_monai_s_grad_scaler() -> None:
    trainer = _trainer(torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # off CUDA the scaler warns that it is disabled
        trainer.run()
    assert trainer.scaler is not None
