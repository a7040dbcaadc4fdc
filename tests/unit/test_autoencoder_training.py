"""Stage-1 training pieces: perceptual loss opt-in, modality stacking."""

from __future__ import annotations

import urllib.error

import monai.losses
import pytest
import torch

from prod9_ext.engines import StackModalities, build_perceptual_loss


def test_perceptual_loss_is_opt_in() -> None:
    assert build_perceptual_loss(0.0) is None


def test_unavailable_perceptual_weights_fail_at_start_up_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(**kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(monai.losses, "PerceptualLoss", offline)
    with pytest.raises(RuntimeError, match=r"perceptual_weight=0\.1 needs the pretrained 'squeeze'") as error:
        build_perceptual_loss(0.1, "squeeze")
    assert "\n" not in str(error.value)
    assert "Name or service not known" in str(error.value)


def test_medicalnet_is_built_as_true_3d(monkeypatch: pytest.MonkeyPatch) -> None:
    built = {}
    monkeypatch.setattr(monai.losses, "PerceptualLoss", lambda **kwargs: built.update(kwargs) or torch.nn.Identity())
    build_perceptual_loss(0.1, "medicalnet_resnet10_23datasets")
    assert built["is_fake_3d"] is False
    build_perceptual_loss(0.1, "squeeze")
    assert built["is_fake_3d"] is True


def test_stack_modalities_and_item_names() -> None:
    batch = {"case": ["a", "b"], "t1": torch.zeros(2, 1, 4, 4, 4), "t2": torch.ones(2, 1, 4, 4, 4)}
    stack = StackModalities(["t1", "t2"])
    inputs, targets = stack(batch)
    assert inputs.shape == (4, 1, 4, 4, 4) and inputs is targets
    assert inputs[:2].sum() == 0 and inputs[2:].min() == 1  # modality-major
    assert [m["filename_or_obj"] for m in stack.item_names(batch)] == ["a_t1", "b_t1", "a_t2", "b_t2"]
    with pytest.raises(KeyError, match="flair"):
        StackModalities(["flair"])(batch)
