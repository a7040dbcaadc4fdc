"""prod9_ext: the components the prod9 MONAI bundles name with ``_target_``.

Stage 1 turns a 3D volume into a grid of discrete FSQ tokens and back; stage 2 fills in a target modality's token
grid with a MaskGiT transformer conditioned on source modalities, a class label, or nothing.
"""

from prod9_ext.autoencoder import AutoencoderFSQ
from prod9_ext.fsq import FiniteScalarQuantizer
from prod9_ext.maskgit import MaskGiTSampler, MaskGiTScheduler
from prod9_ext.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_ext.source_decoder import SourceAwareDecoder
from prod9_ext.transformer import AdaLNZeroBlock, SinCosPosEmbed, TransformerDecoder

__all__ = [
    "AdaLNZeroBlock",
    "AutoencoderFSQ",
    "AutoencoderInferenceWrapper",
    "FiniteScalarQuantizer",
    "MaskGiTSampler",
    "MaskGiTScheduler",
    "SinCosPosEmbed",
    "SlidingWindowConfig",
    "SourceAwareDecoder",
    "TransformerDecoder",
]
