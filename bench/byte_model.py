"""The byte model: how many bytes an optimizer step must move at the least, defined here and only here.

A fused step cannot finish in less time than it takes the memory system to move these bytes, so
``bytes / step time`` against the bandwidth of the yardstick (an in-place streaming add over arrays well past
the last-level cache) says how close a backend is to the memory system's limit. Per-layer scalars (norms, step
counts, trust ratios) are a few bytes per tensor and are left out.

With ``p`` = bytes per element of the parameter dtype (= of its gradient) and ``s`` = bytes per state element
(4 with the default float32 state, 2 with ``state_dtype=torch.bfloat16``), per parameter element:

LARS / TVLARS, two passes (the trust ratio needs the layer's norms before any element is updated):
    pass 1, norms:  read w, g                       2p
    pass 2, update: read w, g, buf (2p + s); write w, buf (p + s)    3p + 2s
    total 5p + 2s  ->  float32 state: float32 28 B/param, bfloat16/float16 18 B/param
                       bfloat16 state: float32 24 B/param, bfloat16/float16 14 B/param

LAMB, two passes (the trust ratio needs ||u||, and u needs the new moments of the whole layer):
    pass 1, moments and norms: read w, g, m, v (2p + 2s); write m, v (2s)    2p + 4s
    pass 2, update:            read w, m, v (p + 2s); write w (p)            2p + 2s
    total 4p + 6s  ->  float32 state: float32 40 B/param, bfloat16/float16 32 B/param
                       bfloat16 state: float32 28 B/param, bfloat16/float16 20 B/param

The weight "w" above is what the step reads as the weight and writes back; for low-precision parameters there
are two ways to keep more than their bits (docs/algorithms.md, sections 6 and 9):
    master weights (``master_weights=True``): the weight read is the float32 master (4 bytes, not p), and the
        update writes the master (4) and the rounded parameter (p): w's reads cost 4 each, its write 4 + p;
    Kahan compensation (``kahan=True``, bfloat16 only): the weight is parameter + compensation, both read and
        both written: w's reads and its write cost p + 2 each.
So LARS with bfloat16 parameters: 18 B/param plain, 26 with masters, 24 with Kahan (float32 state); 14, 22 and
20 with bfloat16 state. LAMB: 32, 40 and 38; 20, 28 and 26. (The same model as the Triton backend's
``element_bytes``.)

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

STATE_BYTES = 4  # float32 momentum / moments of our optimizers (the default state_dtype)
MASTER_BYTES = 4  # a float32 master weight
COMP_BYTES = 2  # a bfloat16 Kahan compensation
YARDSTICK_BYTES_PER_ELEMENT = 12  # a.add_(b) in float32: read 4 + 4, write 4
OURS = ("lars", "tvlars", "lamb")
FLOORS = ("sgd", "adamw")


def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check(optimizer: str, dtype: torch.dtype, state_dtype: torch.dtype, kahan: bool, master: bool) -> None:
    if optimizer not in OURS + FLOORS:
        raise ValueError(f"no byte model for optimizer {optimizer!r}")
    if (state_dtype != torch.float32 or kahan or master) and optimizer in FLOORS:
        raise ValueError(f"optimizer {optimizer!r}: torch's state is in the parameter dtype, with neither masters "
                         "nor a compensation (state_dtype, kahan and master are ours)")
    if state_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"state_dtype {state_dtype}: our state is float32 or bfloat16")
    if kahan and master:
        raise ValueError("kahan and master: a weight has one or the other")
    if kahan and dtype != torch.bfloat16:
        raise ValueError(f"kahan needs bfloat16 parameters, not {dtype}")
    if master and _element(dtype) >= MASTER_BYTES:
        raise ValueError(f"master weights are for bfloat16/float16 parameters, not {dtype}")


def bytes_per_param(optimizer: str, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32, *,
                    kahan: bool = False, master: bool = False) -> int:
    """Bytes moved per parameter element by one step of ``optimizer`` (tvlars, lars, lamb, sgd, adamw) on
    parameters of ``dtype``, with our state in ``state_dtype`` and, for low-precision parameters, float32 master
    weights (``master``) or a bfloat16 Kahan compensation (``kahan``); the module docstring derives them."""
    _check(optimizer, dtype, state_dtype, kahan, master)
    p = _element(dtype)
    s = _element(state_dtype)
    if optimizer == "sgd":
        return 5 * p
    if optimizer == "adamw":
        return 7 * p
    if master:
        weight_read, weight_written = MASTER_BYTES, MASTER_BYTES + p
    elif kahan:
        weight_read = weight_written = p + COMP_BYTES
    else:
        weight_read = weight_written = p
    if optimizer in ("lars", "tvlars"):  # pass 1: w, g; pass 2: w, g, buf in; w, buf out
        return (weight_read + p) + (weight_read + p + s + weight_written + s)
    return (weight_read + p + 4 * s) + (weight_read + 2 * s + weight_written)  # LAMB


def bytes_per_step(optimizer: str, dtype: torch.dtype, numel: int, state_dtype: torch.dtype = torch.float32, *,
                   kahan: bool = False, master: bool = False) -> int:
    return bytes_per_param(optimizer, dtype, state_dtype, kahan=kahan, master=master) * numel


def footprint_bytes(optimizer: str, dtype: torch.dtype, numel: int, state_dtype: torch.dtype = torch.float32, *,
                    kahan: bool = False, master: bool = False) -> int:
    """Distinct bytes one step touches: weights (and masters or compensations) and gradients, and the state."""
    _check(optimizer, dtype, state_dtype, kahan, master)
    p = _element(dtype)
    s = _element(state_dtype)
    state = {"lars": s, "tvlars": s, "lamb": 2 * s, "sgd": p, "adamw": 2 * p}[optimizer]
    extra = MASTER_BYTES if master else COMP_BYTES if kahan else 0
    return (2 * p + extra + state) * numel


def configurations() -> list[dict]:
    """Every configuration the byte model covers, for the bytes-per-parameter table: for each parameter dtype
    (float32, bfloat16, float16), our optimizers with each state dtype and each way of keeping the weight (plain;
    masters and, for bfloat16, Kahan, on low-precision parameters), and torch's floors (state in the parameter
    dtype). Each: {param_dtype, state_dtype, weights, optimizer, bytes_per_param, footprint_per_param}."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        weights = ["plain"] if dtype == torch.float32 else ["plain", "master"] + (["kahan"] if dtype == torch.bfloat16
                                                                                   else [])
        for state_dtype in (torch.float32, torch.bfloat16):
            for kept in weights:
                flags = dict(kahan=kept == "kahan", master=kept == "master")
                for optimizer in ("lars", "lamb"):
                    rows.append(dict(param_dtype=name, state_dtype=str(state_dtype).removeprefix("torch."),
                                     weights=kept, optimizer=optimizer,
                                     bytes_per_param=bytes_per_param(optimizer, dtype, state_dtype, **flags),
                                     footprint_per_param=footprint_bytes(optimizer, dtype, 1, state_dtype, **flags)))
        for optimizer in FLOORS:
            rows.append(dict(param_dtype=name, state_dtype=name, weights="plain", optimizer=optimizer,
                             bytes_per_param=bytes_per_param(optimizer, dtype),
                             footprint_per_param=footprint_bytes(optimizer, dtype, 1)))
    return rows


def yardstick_bytes(numel: int) -> int:
    """Bytes one ``a.add_(b)`` of ``numel`` float32 elements moves."""
    return YARDSTICK_BYTES_PER_ELEMENT * numel
