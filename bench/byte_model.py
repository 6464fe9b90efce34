"""The byte model: how many bytes an optimizer step must move at the least, defined here and only here.

A fused step cannot finish in less time than it takes the memory system to move these bytes, so
``bytes / step time`` against the bandwidth of a plain large copy says how close a backend is to the floor.
Per-layer scalars (norms, step counts, trust ratios) are a few bytes per tensor and are left out.

With ``p`` = bytes per element of the parameter dtype (= of its gradient), state in float32 (4 bytes, as
the package keeps it whatever the parameter dtype), per parameter element:

LARS / TVLARS, two passes (the trust ratio needs the layer's norms before any element is updated):
    pass 1, norms:  read w, g                       2p
    pass 2, update: read w, g, buf (2p + 4); write w, buf (p + 4)    3p + 8
    total 5p + 8  ->  float32: 28 B/param, bfloat16/float16: 18 B/param

LAMB, two passes (the trust ratio needs ||u||, and u needs the new moments of the whole layer):
    pass 1, moments and norms: read w, g, m, v (2p + 8); write m, v (8)    2p + 16
    pass 2, update:            read w, m, v (p + 8); write w (p)          2p + 8
    total 4p + 24  ->  float32: 40 B/param, bfloat16/float16: 32 B/param

SGD with momentum (torch.optim.SGD; its buffer has the parameter dtype), one pass:
    read w, g, buf; write w, buf                    5p  ->  float32: 20 B/param

A copy of n elements of float32 moves 8n bytes (read n*4, write n*4): that is the bandwidth yardstick.
"""

from __future__ import annotations

import torch

STATE_BYTES = 4  # float32 momentum / moments


def bytes_per_param(optimizer: str, dtype: torch.dtype) -> int:
    p = torch.empty((), dtype=dtype).element_size()
    if optimizer in ("lars", "tvlars"):
        return 5 * p + 2 * STATE_BYTES
    if optimizer == "lamb":
        return 4 * p + 6 * STATE_BYTES
    if optimizer == "sgd":
        return 5 * p
    raise ValueError(f"no byte model for optimizer {optimizer!r}")


def bytes_per_step(optimizer: str, dtype: torch.dtype, numel: int) -> int:
    return bytes_per_param(optimizer, dtype) * numel


def copy_bytes(numel: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a ``dst.copy_(src)`` of ``numel`` elements moves: every element read once and written once."""
    return 2 * numel * torch.empty((), dtype=dtype).element_size()
