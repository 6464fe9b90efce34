"""The byte model: how many bytes an optimizer step must move at the least, defined here and only here.

A fused step cannot finish in less time than it takes the memory system to move these bytes, so
``bytes / step time`` against the bandwidth of the yardstick (an in-place streaming add over arrays well past
the last-level cache) says how close a backend is to the memory system's limit. Per-layer scalars (norms, step
counts, trust ratios) are a few bytes per tensor and are left out.

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

The torch floors keep their state in the parameter dtype, one pass each:
    SGD with momentum (torch.optim.SGD):  read w, g, buf; write w, buf          5p  ->  float32: 20 B/param
    AdamW (torch.optim.AdamW):            read w, g, m, v; write w, m, v        7p  ->  float32: 28 B/param

The yardstick ``a.add_(b)`` of n float32 elements moves 12n bytes (read a and b, write a in place: the
read-modify-write pattern of an optimizer step, with no write-allocate traffic of a separate destination).

The footprint (distinct bytes a step touches: weights, gradients, state) decides whether a set can stay in the
last-level cache between steps, which is how a step can appear faster than the out-of-cache yardstick.
"""

from __future__ import annotations

import torch

STATE_BYTES = 4  # float32 momentum / moments of our optimizers
YARDSTICK_BYTES_PER_ELEMENT = 12  # a.add_(b) in float32: read 4 + 4, write 4


def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_param(optimizer: str, dtype: torch.dtype) -> int:
    """Bytes moved per parameter element by one step of ``optimizer`` (tvlars, lars, lamb, sgd, adamw)."""
    p = _element(dtype)
    if optimizer in ("lars", "tvlars"):
        return 5 * p + 2 * STATE_BYTES
    if optimizer == "lamb":
        return 4 * p + 6 * STATE_BYTES
    if optimizer == "sgd":
        return 5 * p
    if optimizer == "adamw":
        return 7 * p
    raise ValueError(f"no byte model for optimizer {optimizer!r}")


def bytes_per_step(optimizer: str, dtype: torch.dtype, numel: int) -> int:
    return bytes_per_param(optimizer, dtype) * numel


def footprint_bytes(optimizer: str, dtype: torch.dtype, numel: int) -> int:
    """Distinct bytes one step touches: weights and gradients, and the optimizer's state."""
    p = _element(dtype)
    state = {"lars": STATE_BYTES, "tvlars": STATE_BYTES, "lamb": 2 * STATE_BYTES, "sgd": p, "adamw": 2 * p}
    if optimizer not in state:
        raise ValueError(f"no byte model for optimizer {optimizer!r}")
    return (2 * p + state[optimizer]) * numel


def yardstick_bytes(numel: int) -> int:
    """Bytes one ``a.add_(b)`` of ``numel`` float32 elements moves."""
    return YARDSTICK_BYTES_PER_ELEMENT * numel
