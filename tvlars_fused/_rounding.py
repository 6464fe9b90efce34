"""Storing float32 values in bfloat16: stochastic rounding from a counter-based stream, round-to-nearest, and the
Kahan split of a weight into a bfloat16 parameter and its bfloat16 compensation (docs/algorithms.md, section 9).

The random bits of an element are a hash of (seed, the layer's step count, the layer's number, which state, the
element's index in the whole layer): no generator state, so every backend draws the same bits, a run is
bit-reproducible, and a CUDA graph replay or a compiled step draws new bits each step (the step count is device
data). The kernels compute the same hash (``csrc/optimizer_math.h``, ``triton_kernels/common.py``).

Here it is written with int64 torch ops, which hold every uint32 value: a 32-bit multiply is split into two 16-bit
halves so that no product leaves int64's range, and the result is taken modulo 2**32.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
# lowbias32's multipliers (Chris Wellons' hash-prospector), and the golden ratio's for the high word of an index.
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B
GOLDEN32 = 0x9E3779B9
ROUNDING_MODES = ("stochastic", "nearest")
STATE_DTYPES = (torch.float32, torch.bfloat16)


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32) (int64 tensor or int) and a 32-bit constant, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """A bijective 32-bit integer hash (lowbias32) of x in [0, 2**32), for int64 tensors and Python ints."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def layer_key(seed: int, layer_id: int, stream: int) -> int:
    """The per-(seed, layer, state) part of the hash, computed once on the host: ``mix32(seed ^ mix32(2l + s))``."""
    return mix32((seed ^ mix32((2 * layer_id + stream) & MASK32)) & MASK32)


def step_base(key: int, t: Tensor) -> Tensor:
    """The per-step part: ``mix32(key ^ t)`` with t the layer's step count (a float32 tensor, an integer value)."""
    return mix32(t.to(torch.int64) ^ key)


def element_bits(base: Tensor, index: Tensor) -> Tensor:
    """The 16 random bits of the elements ``index`` (int64, indices in the whole layer):
    ``mix32((base ^ lo32(i)) + hi32(i) * GOLDEN32 mod 2**32) >> 16``."""
    x = ((base ^ (index & MASK32)) + _mul32(index >> 32, GOLDEN32)) & MASK32
    return mix32(x) >> 16


def _bf16_from_bits(bits: Tensor) -> Tensor:
    """bfloat16 values from their 16-bit patterns (int64 in [0, 2**16))."""
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.bfloat16)


def stochastic_round(x: Tensor, random_bits: Tensor) -> Tensor:
    """float32 ``x`` rounded to bfloat16 away from or towards zero, up with probability (the dropped 16 bits) / 2**16:
    the stored value's mean is x exactly. NaN stays NaN; a value above bfloat16's largest rounds to inf with that
    probability."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    rounded = _bf16_from_bits(((bits + random_bits) >> 16) & 0xFFFF).view(x.shape)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)


def _arange(cache: dict | None, numel: int, device: torch.device) -> Tensor:
    key = ("element_index", numel, device)
    index = cache.get(key) if cache is not None else None
    if index is None:
        index = torch.arange(numel, dtype=torch.int64, device=device)
        if cache is not None:
            cache[key] = index
    return index


def in_memory_order(t: Tensor) -> Tensor:
    """A view of ``t`` whose elements, read in row-major order, are in ``t``'s memory order (channels_last included):
    the element index of the stream is the position in memory, as the kernels walk a layer."""
    if t.is_contiguous():
        return t
    return t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def store(dest: Tensor, value: Tensor, *, stochastic: bool, seed: int, layer_id: int, stream: int, step: Tensor,
          element_offset: int = 0, cache: dict | None = None) -> None:
    """``dest`` (float32 or bfloat16) = float32 ``value``, rounded as the step stores state. ``step``: the layer's step
    count this step; ``stream``: 0 for the first state tensor (momentum buffer, exp_avg), 1 for the second."""
    if dest.dtype != torch.bfloat16 or not stochastic:
        dest.copy_(value)  # exact, or round-to-nearest-even
        return
    index = _arange(cache, value.numel(), value.device)
    if element_offset:
        index = index + element_offset
    base = step_base(layer_key(seed, layer_id, stream), step)
    ordered = in_memory_order(value)
    rounded = stochastic_round(ordered.reshape(-1), element_bits(base, index)).view(ordered.shape)
    in_memory_order(dest).copy_(rounded)


def kahan_split(weight: Tensor, param: Tensor, comp: Tensor) -> None:
    """Stores the float32 ``weight`` as ``param`` = its nearest bfloat16 and ``comp`` = the nearest bfloat16 of the
    rest (weight - param is exact in float32): param + comp carries about 16 significant bits."""
    param.copy_(weight)
    comp.copy_(weight - param.to(torch.float32))


def kahan_weight(param: Tensor, comp: Tensor) -> Tensor:
    """The weight a Kahan-compensated step reads, param + comp in float32 (exact: comp is below param's half-ulp)."""
    return param.to(torch.float32) + comp.to(torch.float32)
