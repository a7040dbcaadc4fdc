"""Whether bf16 autocast pays off on a device."""

from __future__ import annotations

import torch


def bf16_is_fast(device: str | torch.device) -> bool:
    """True where bf16 matmuls and convolutions run in hardware: a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16.

    On such CPUs (Intel Sapphire Rapids and later, AMD Zen 4 and later) oneDNN runs bf16 convolutions and matmuls about
    twice as fast as float32; elsewhere bf16 is emulated and slower, so autocast should stay off.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own feature probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
