"""Synthesis for MONAI's ``SupervisedEvaluator``: encode the sources, sample the target's tokens, decode.

One path serves stage-2 validation, ``evaluate.json`` and ``inference.json``: :class:`SynthesisInferer` holds the
stage-1 tokenizer, the sampler and the task (target and source modalities), and :func:`synthesis_iteration` is the
evaluator's ``iteration_update``. Images come from the same preprocessing as training (pad/crop to the stage-2
ROI, whose token grid is the transformer's ``latent_shape``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.utils import CommonKeys as Keys
from torch import nn

from prod9_ext.data.brats import MODALITIES
from prod9_ext.engines.autoencoder_training import unwrap_parallel
from prod9_ext.engines.stage1_link import Stage1Tokenizer
from prod9_ext.maskgit import MaskGiTSampler
from prod9_ext.transformer import TransformerDecoder

__all__ = ["DECODE_MODES", "SynthesisInferer", "synthesis_iteration"]

DECODE_MODES = ("sample", "mean")


class SynthesisInferer(Inferer):
    """Synthesise a target image from source images (or from a class label, or from nothing).

    Args:
        tokenizer: the stage-1 tokenizer (encodes the sources, decodes the sampled tokens).
        sampler: the MaskGiT sampler.
        target_modality: the modality to produce (``t1``, ``t1ce``, ``t2``, ``flair``; ``image`` for MedMNIST 3D).
        source_modalities: the batch keys of the sources, e.g. ``["t1"]``; empty or None: unconditional (or
            class-conditional, with a ``label`` in the batch).
        seed: sampling seed; item ``i`` of a run uses ``seed + i``, so results do not depend on batch order
            elsewhere in the run.
        decode: how the target's token grid becomes an image. ``"sample"``: MaskGiT's iterative parallel decoding
            (``sampler.sample``), one draw from the model: sharp and varied, and a guess wherever the model is
            unsure. ``"mean"``: one model call on the all-masked grid (``sampler.predict``); each position gets its
            expected FSQ code under the predicted distribution, and the decoder reads these continuous codes: the
            least-squares estimate of each position's code, smooth where the model is unsure, deterministic, and
            ``sampler.steps`` times cheaper. The mean of FSQ codes lies in the box of the level grid, between codes
            the decoder was trained on. For synthesis scored against a real image; not for generation.

    Output of :meth:`synthesize`: ``pred`` (synthesised image, ``[B, 1, *roi]`` in [0, 1]), ``tokens`` (the sampled
    grid; with ``decode="mean"`` the index of the code nearest to each expected code) and, when the batch holds the
    real target: ``label`` (real image), ``target_tokens`` (its tokens) and, with sources, ``source`` (the
    copy-the-source baseline: the source image closest to the target in mean squared error).
    """

    def __init__(
        self,
        tokenizer: Stage1Tokenizer,
        sampler: MaskGiTSampler,
        target_modality: str,
        source_modalities: Sequence[str] | None = None,
        seed: int = 0,
        decode: str = "sample",
    ) -> None:
        super().__init__()
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {list(DECODE_MODES)}, got {decode!r}")
        sources = list(source_modalities or [])
        known = (*MODALITIES, "image")
        for key, names in (("target_modality", [target_modality]), ("source_modalities", sources)):
            unknown = [name for name in names if name not in known]
            if unknown:
                raise ValueError(f"{key}: {unknown[0]!r} is not one of {list(MODALITIES)}")
        if target_modality in sources:
            raise ValueError(f"target_modality {target_modality!r} is also among source_modalities {sources}")
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.target_modality = target_modality
        self.source_modalities = sources
        self.seed = seed
        self.decode = decode
        self._item = 0

    @staticmethod
    def _modality_id(name: str) -> int:
        return MODALITIES.index(name) if name in MODALITIES else 0

    def reset(self) -> None:
        """Start a run: the next item samples with ``seed`` again."""
        self._item = 0

    @torch.no_grad()
    def synthesize(self, batch: dict[str, Any], network: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """Synthesise the target of every item of ``batch`` (see the class docstring for the outputs)."""
        model = unwrap_parallel(network)
        if not isinstance(model, TransformerDecoder):
            raise TypeError(f"network must be a TransformerDecoder, got {type(model).__name__}")
        reference = batch[self.source_modalities[0]] if self.source_modalities else batch.get(self.target_modality)
        if reference is None:
            raise ValueError(f"the batch holds neither the sources {self.source_modalities} nor the target")
        label = batch.get("label")
        use_class = label is not None and model.num_classes > 0
        class_label = torch.as_tensor(label).to(device).long().reshape(-1) if use_class else None
        spatial = tuple(reference.shape[2:])
        grid = self.tokenizer.grid_shape(spatial)
        if tuple(grid) != tuple(model.latent_shape):
            raise ValueError(
                f"an image of {list(spatial)} voxels gives a token grid {list(grid)}, but the transformer's "
                f"latent_shape is {list(model.latent_shape)}: set roi_size to latent_shape x downsampling factor"
            )
        b = reference.shape[0]
        sources, source_ids = None, None
        if self.source_modalities:
            images = [torch.as_tensor(batch[key]).float().to(device) for key in self.source_modalities]
            sources = torch.stack([self.tokenizer.wrapper.encode_to_indices(image) for image in images], dim=1)
            ids = [self._modality_id(key) for key in self.source_modalities]
            source_ids = torch.as_tensor(ids, device=device).expand(b, -1)
        target_ids = torch.full((b,), self._modality_id(self.target_modality), device=device)
        quantizer = self.tokenizer.wrapper.autoencoder.quantizer
        codebook = quantizer.indices_to_codes(torch.arange(model.vocab_size, device=device))  # [V, C]
        codes = []
        for i in range(b):  # one generator per item: reproducible whatever the batch size
            conditions = (
                target_ids[i : i + 1],
                None if sources is None else sources[i : i + 1],
                None if source_ids is None else source_ids[i : i + 1],
                None if class_label is None else class_label[i : i + 1],
            )
            seed = self.seed + self._item
            self._item += 1
            if self.decode == "mean":
                probs = self.sampler.predict(model, (1, *grid), *conditions)  # [1, N, V]
                codes.append((probs @ codebook).transpose(1, 2).reshape(1, -1, *grid))
            else:
                generator = torch.Generator(device).manual_seed(seed)
                tokens = self.sampler.sample(model, (1, *grid), *conditions, generator=generator)
                codes.append(quantizer.indices_to_codes(tokens))
        target_codes = torch.cat(codes)
        tokens = quantizer.codes_to_indices(target_codes)
        # A MetaTensor, so that Invertd maps it back to the input's grid with the sources' recorded transforms.
        pred = MetaTensor(self.tokenizer.wrapper.decode(target_codes, spatial).float())
        output: dict[str, torch.Tensor] = {Keys.PRED: pred}
        output["tokens"] = tokens
        target = batch.get(self.target_modality)
        if isinstance(target, torch.Tensor):  # inference lists the target's file (when any) but does not load it
            target = target.float().to(device)
            output[Keys.LABEL] = target
            output["target_tokens"] = self.tokenizer.wrapper.encode_to_indices(target)
            if self.source_modalities:
                errors = torch.stack([((image - target) ** 2).flatten(1).mean(1) for image in images], dim=1)
                closest = errors.argmin(dim=1)
                output["source"] = torch.stack([images[int(k)][i] for i, k in enumerate(closest)])
        return output

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("SynthesisInferer works on whole batches: use synthesis_iteration")


def synthesis_iteration(
    engine: SupervisedEvaluator, batchdata: dict[str, Any]
) -> list[dict[str, Any]] | dict[str, Any]:
    """``iteration_update`` of the stage-2 evaluators: the inferer's outputs, plus ``seg`` when the batch has it."""
    inferer = engine.inferer
    if not isinstance(inferer, SynthesisInferer):
        raise TypeError(f"the evaluator's inferer must be SynthesisInferer, got {inferer!r}")
    if engine.state.iteration == 1:
        inferer.reset()
    device = engine.state.device
    with engine.mode(engine.network), torch.autocast(device.type, enabled=engine.amp, **engine.amp_kwargs):
        output: dict[str, Any] = inferer.synthesize(batchdata, engine.network, device)
    if "seg" in batchdata and Keys.LABEL in output:
        output["seg"] = torch.as_tensor(batchdata["seg"]).to(device)
    engine.state.output = output
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates and post-processes on this event
    return engine.state.output  # decollated on MODEL_COMPLETED; ignite keeps what is returned
