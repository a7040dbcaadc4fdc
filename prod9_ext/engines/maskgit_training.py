"""Stage-2 training step for MONAI's ``SupervisedTrainer``: random target, random sources, MaskGiT masking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from prod9_ext.data.brats import MODALITIES
from prod9_ext.maskgit import MaskGiTScheduler

__all__ = ["MaskGiTIteration", "modality_ids", "num_classes"]


def num_classes(dataset: str, medmnist_flag: str) -> int:
    """Class labels stage 2 conditions on: none for BraTS, the MedMNIST 3D set's labels otherwise."""
    if dataset == "brats":
        return 0
    import medmnist

    if medmnist_flag not in medmnist.INFO:
        raise ValueError(f"medmnist_flag {medmnist_flag!r} is not a MedMNIST data set")
    return len(medmnist.INFO[medmnist_flag]["label"])


def modality_ids(dataset: str, modalities: Sequence[str]) -> list[int]:
    """Stage-2 modality id of each image slot: the BraTS order T1, T1ce, T2, FLAIR, or ``[0]`` for MedMNIST 3D."""
    if dataset != "brats":
        return [0]
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"modalities: {unknown} not among {list(MODALITIES)}")
    return [MODALITIES.index(m) for m in modalities]


class MaskGiTIteration:
    """``iteration_update`` of the stage-2 trainer.

    The batch holds ``tokens`` ``[B, M, h, w, d]`` (one token grid per image slot, all from the same crop) and,
    for class-conditional data, ``label``. Per sample, one slot is drawn as the target (among
    ``target_modalities``); the other slots are its sources, each dropped independently by the scheduler, so
    every subset of sources is trained; the target's tokens are masked through the schedule and the loss is the
    cross-entropy on masked tokens. With probability ``cond_drop_prob`` a sample also loses its sources and class
    (the "no condition" state of classifier-free guidance). Gradients are clipped to ``max_grad_norm``.

    Args:
        scheduler: masking, condition dropping and loss.
        slot_modalities: the modality id of each slot (``modality_ids``).
        target_modalities: the ids that may be drawn as targets; default: every slot.
        max_grad_norm: gradient clipping (0: off).
    """

    def __init__(
        self,
        scheduler: MaskGiTScheduler,
        slot_modalities: Sequence[int],
        target_modalities: Sequence[int] | None = None,
        max_grad_norm: float = 1.0,
    ) -> None:
        self.scheduler = scheduler
        self.slot_modalities = torch.as_tensor(list(slot_modalities), dtype=torch.long)
        targets = list(slot_modalities) if target_modalities is None else list(target_modalities)
        missing = [t for t in targets if t not in slot_modalities]
        if missing or not targets:
            raise ValueError(f"target_modalities {targets} must be a non-empty subset of {list(slot_modalities)}")
        self.target_slots = torch.as_tensor([list(slot_modalities).index(t) for t in targets], dtype=torch.long)
        self.max_grad_norm = max_grad_norm

    def conditions(
        self, tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Draw a target slot per sample: ``(target_tokens, target_modality, sources, source_modalities)``.

        ``tokens`` is ``Long[B, M, h, w, d]``; sources are all M slots with the target's and the dropped ones
        marked absent (-1), or None when there is a single slot.
        """
        b, m = tokens.shape[:2]
        device = tokens.device
        pick = torch.randint(len(self.target_slots), (b,), generator=generator, device=device)
        target_slot = self.target_slots.to(device)[pick]
        slot_modalities = self.slot_modalities.to(device)
        target_tokens = tokens[torch.arange(b, device=device), target_slot]
        if m == 1:
            return target_tokens, slot_modalities[target_slot], None, None
        source_modalities = slot_modalities.expand(b, m).clone()
        source_modalities[torch.arange(b, device=device), target_slot] = -1
        source_modalities = self.scheduler.drop_sources(source_modalities, generator=generator)
        return target_tokens, slot_modalities[target_slot], tokens, source_modalities

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        device = engine.state.device
        tokens = torch.as_tensor(batchdata["tokens"]).to(device, non_blocking=engine.non_blocking).long()
        label = batchdata.get("label")
        class_label = None if label is None else torch.as_tensor(label).to(device).long().reshape(-1)
        target_tokens, target_modality, sources, source_modalities = self.conditions(tokens)
        masked, targets = self.scheduler.mask(target_tokens)
        drop = self.scheduler.drop_condition(tokens.shape[0], device=device)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device.type, enabled=engine.amp, **engine.amp_kwargs):
            logits = engine.network(masked, target_modality, sources, source_modalities, class_label, drop)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = self.scheduler.loss(logits, targets)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.unscale_(engine.optimizer)
        else:
            loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_grad_norm)
        if engine.scaler is not None:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)

        is_masked = targets >= 0
        predicted = logits.detach().argmax(-1).view_as(targets)
        accuracy = (predicted == targets)[is_masked].float().mean()
        output = {Keys.LOSS: loss.detach(), "masked_accuracy": accuracy, Keys.PRED: predicted, Keys.LABEL: targets}
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output  # decollated on MODEL_COMPLETED; ignite keeps what is returned
