"""The Triton backend: each bucket is stepped by two kernel launches over the shared layer table (three when
sharded, or when a layer is so large that re-reading its partials would cost more than a launch).

The kernels (``tvlars_fused.triton_kernels``) run one program per chunk of the table; pass 1 writes per-chunk
partial sums of squares, pass 2 reduces each layer's partials in a fixed order and applies the update (the
kernel modules say how steps and LAMB's moments are ordered between the passes). Every program of pass 2
re-reads all its layer's partials, which costs 16 * k**2 bytes for a layer of k chunks: the chunk grows with
the largest layer to keep that small, and for layers of more than about 2**26 elements a launch in between
(``layer_sums_kernel``) reduces each layer's partials once instead (``reduction_traffic`` has the byte
arithmetic). It forms the very sums pass 2 would, so either way the step has the same bits.

Nothing here reads a device value on the host, so a step is CUDA-graph safe: ``lr`` may be a device tensor,
steps, phi, bias corrections and the zero-norm branch live on the device, and ``found_inf`` is honoured
in-kernel. Layers the table cannot cover (strided views) go through the ``foreach`` backend.

Launches run under the bucket's CUDA device and on the current stream; the table and the scratch tensors
(``workspace``) are recorded on every stream they are used on, once per (table, stream), so the caching
allocator does not hand their memory to another stream while a launch may still read it. Every launch names
its num_warps (the per-layer reduction's tree, and so its bits, depends on it). The chunk size is a runtime
argument: a new model does not compile new kernels. The vector fast path is chosen per layer in the kernels
(the table's ``FLAG_ALIGNED16``); a table whose layers are all aligned (``table.aligned16``) compiles it alone.

Sharded buckets (FSDP2 / DTensor, ``bucket.reduce_sums`` set) hold each rank's shards, and the trust ratios
need whole-layer norms: the step splits around one all-reduce, in three launches: pass 1 on the local
shards, ``layer_sums_kernel`` (each layer's partials reduced in a fixed order to ``[num_layers, 2]``),
``bucket.reduce_sums`` on that, then pass 2 reading the summed sums. The all-reduce is issued even when
``found_inf`` is set (the host never reads it, and every rank must join the collective); the kernels write
nothing persistent then. Every rank's table must cover the same layers, so that each issues the same
collectives: FSDP2's local shards are contiguous, so they always are.

bfloat16 state and Kahan-compensated bfloat16 weights (docs/algorithms.md, section 9) are compile-time flags of
the kernels (the state's dtype, stochastic or nearest rounding, the compensation); the seed is a runtime argument,
and the hash's other inputs come from the device: the layer's number and first element's index from the table,
its step count from the step. A sharded layer's element offset in the table makes its shard draw the bits the
unsharded layer would.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _foreach
from ._layer_table import COL_NUM_CHUNKS, COL_NUMEL, LayerTable, prepare
from ._types import Bucket, LambHyper, LarsHyper
from .triton_kernels.common import layer_sums_kernel
from .triton_kernels.lamb import lamb_moments_kernel, lamb_update_kernel
from .triton_kernels.lars import lars_norms_kernel, lars_update_kernel

# Sharded buckets are stepped here (split around bucket.reduce_sums), not sent to foreach by the optimizer.
supports_sharded = True
# bfloat16 state and Kahan compensation are stepped by the kernels, not sent to foreach by the optimizer.
supports_bf16_storage = True

_PARAM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# This backend's device tensors in a table's workspace (which also holds other entries, host tensors among them).
_WORKSPACE_KEYS = ("partials", "new_steps", "zero", "layer_sums")
# The traffic model of the per-layer reduction (``reduction_traffic``).
PARTIAL_BYTES = 16  # a chunk's two float64 partial sums of squares
# One more launch on the same stream costs about a few microseconds of gap and tail: on the H200 (4.8 TB/s)
# about what moving this many bytes takes.
LAUNCH_BYTES = 16 << 20


@dataclass(frozen=True)
class LaunchSizes:
    chunk: int  # elements per program, a runtime kernel argument
    block: int  # elements per tile of a program's loop (compiled in)
    reduce_block: int = 1024  # partials per tile when a layer's chunks are reduced (compiled in)
    num_warps: int = 4

    def __post_init__(self):
        # Tiles start at multiples of block (what the vector path relies on), and a 16-byte vector of the
        # narrowest dtype (bfloat16) is 8 elements.
        if self.block < 8 or self.block & (self.block - 1):
            raise ValueError(f"LaunchSizes: block must be a power of two >= 8, got {self.block}")
        if self.chunk <= 0 or self.chunk % self.block:
            raise ValueError(f"LaunchSizes: chunk must be a positive multiple of block ({self.block}), "
                             f"got {self.chunk}")
        if self.reduce_block <= 0 or self.reduce_block & (self.reduce_block - 1):
            raise ValueError(f"LaunchSizes: reduce_block must be a power of two, got {self.reduce_block}")


def launch_sizes(bucket: Bucket) -> LaunchSizes:
    """Chunk and tile sizes for a bucket.

    Pass 2 re-reduces a layer's partials in each of its programs, so a layer of n elements split into chunks of
    c costs PARTIAL_BYTES * (n / c)**2 bytes of re-reads against at least 18 * n bytes of element traffic (the
    leanest step, bfloat16 LARS: ``element_bytes``). Chunks grow like sqrt(n) of the largest layer: with
    c >= 5 * sqrt(n) the re-reads stay below 16 / (25 * 18) = 3.6 % of the step (4.6 % for the 14 bytes of bfloat16
LARS with bfloat16 state) for n up to about 1.7e8, where
    c reaches its largest, 2**16 elements (larger chunks would leave too few programs to fill the GPU); long
    before that, from about 2**26 elements, ``reduction_traffic`` takes a launch in between. Only the chunk varies
    between buckets, and it is not compiled in. The interpreter runs one tile as one numpy operation, so there a
    tile covers a whole chunk.

    A bucket whose cache holds ``"triton_launch_sizes"`` uses those instead: a part of a larger bucket stepped on
    its own (the step inside backward) keeps the larger bucket's chunking, and so its bits."""
    preset = bucket.cache.get("triton_launch_sizes")
    if preset is not None:
        return preset
    largest = max(p.numel() for p in bucket.params)
    if bucket.device.type == "cuda":
        chunk = min(max(triton.next_power_of_2(5 * math.isqrt(largest)), 4096), 65536)
        return LaunchSizes(chunk=chunk, block=1024)
    chunk = min(max(triton.next_power_of_2(largest), 16), 65536)
    return LaunchSizes(chunk=chunk, block=chunk)


def element_bytes(bucket: Bucket) -> int:
    """Bytes both passes move per element, reads and writes (the master, when there is one, is the weight
    read; the parameter is then only written; with a Kahan compensation the weight is parameter + compensation,
    read and written):
    LARS: pass 1 reads w, g; pass 2 reads w, g, buf and writes buf, w (and the parameter).
    LAMB: pass 1 reads g, m, v, w and writes m, v; pass 2 reads w, m, v and writes w (and the parameter).
    float32 LARS 28, bfloat16 LARS 18, float32 LAMB 40, bfloat16 LAMB 32; with bfloat16 state float32 LARS 24,
    bfloat16 LARS 14 (20 with Kahan), float32 LAMB 28, bfloat16 LAMB 20 (26 with Kahan)."""
    param = bucket.params[0].element_size()
    state = bucket.states[0][0].element_size() if bucket.states[0] else 4
    comp = 2 if getattr(bucket, "comps", None) is not None else 0
    weight = 4 if bucket.masters is not None else param + comp
    written = 4 + param if bucket.masters is not None else param + comp
    if len(bucket.states) == 1:
        return (weight + param) + (weight + param + 2 * state + written)
    return (param + 4 * state + weight) + (weight + 2 * state + written)


@dataclass(frozen=True)
class ReductionTraffic:
    """What the per-layer reduction between the passes costs, in bytes, against the step's element traffic.

    ``rereads``: pass 2 alone, every program of a layer of k chunks reading the layer's k partials:
    PARTIAL_BYTES * sum(k**2). ``between``: a launch in between (``layer_sums_kernel``) reading each partial
    once and writing each layer's two sums, which every program of pass 2 then reads:
    LAUNCH_BYTES + PARTIAL_BYTES * (2 * sum(k) + layers). The launch is taken when the re-reads cost more than
    it does: with ``launch_sizes``' chunks, for a layer of more than 2**26 elements (1024 chunks: 16 MiB of
    re-reads). Float32 LARS: a 2**28-element layer's re-reads are 256 MiB (3.6 % of its 7.5 GB) against 16 MiB
    for the launch; at 2**31 elements they would be 16 GiB, 29 %. Below 2**26 elements the re-reads stay under
    3.6 % of the step, so the reduction adds less than 5 % at any size, and buckets of ordinary layers keep
    their two launches."""

    step: int
    rereads: int
    between: int

    @property
    def reduce_first(self) -> bool:
        return self.rereads > self.between


def reduction_traffic(numels: list[int], chunks: list[int], bytes_per_element: int) -> ReductionTraffic:
    return ReductionTraffic(step=bytes_per_element * sum(numels),
                            rereads=PARTIAL_BYTES * sum(k * k for k in chunks),
                            between=LAUNCH_BYTES + PARTIAL_BYTES * (2 * sum(chunks) + len(chunks)))


def _reduces_layers_first(bucket: Bucket, table: LayerTable) -> bool:
    """Whether pass 2 reads whole-layer sums reduced by a launch in between: always for sharded layers (the
    all-reduce needs them), else when ``reduction_traffic`` says so (decided once per table layout, from its
    host rows)."""
    if bucket.reduce_sums is not None:
        return True
    ws = table.workspace
    if "reduce_first" not in ws:
        rows = table.layers_host
        ws["reduce_first"] = reduction_traffic(rows[:, COL_NUMEL].tolist(), rows[:, COL_NUM_CHUNKS].tolist(),
                                               element_bytes(bucket)).reduce_first
    return ws["reduce_first"]


def _workspace(table: LayerTable, layer_sums: bool) -> dict:
    """Scratch allocated once per table (tables that differ only in their gradients share it): per-chunk float64
    partial sums of squares ([2, num_chunks]), each layer's step count t for this step, a zero standing in for
    an absent scalar input, and when a launch reduces them in between the passes the float64 whole-layer sums
    ([num_layers, 2], all-reduced for sharded layers)."""
    ws = table.workspace
    if "partials" not in ws:
        device = table.layers.device
        ws["partials"] = torch.empty(2 * table.num_chunks, dtype=torch.float64, device=device)
        ws["new_steps"] = torch.empty(table.num_layers, dtype=torch.float32, device=device)
        ws["zero"] = torch.zeros((), dtype=torch.float32, device=device)
    if layer_sums and "layer_sums" not in ws:
        ws["layer_sums"] = torch.empty(table.num_layers, 2, dtype=torch.float64, device=table.layers.device)
    return ws


# The streams each table's device tensors have been recorded on (a table is hashed by identity).
_recorded_streams: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _launch_context(table: LayerTable, ws: dict, device: torch.device):
    """The bucket's CUDA device made current for the launches (nothing on the CPU), after recording the
    table's device tensors on the current stream the first time they are used there: the caching allocator
    must not hand their memory to another stream while a launch on this one may still read it."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    stream = torch.cuda.current_stream(device)
    seen = _recorded_streams.setdefault(table, set())
    if stream not in seen:
        seen.add(stream)
        for t in [table.layers, table.chunk_layer] + [ws[k] for k in _WORKSPACE_KEYS if k in ws]:
            t.record_stream(stream)
    return torch.cuda.device(device)


def _pass2_sums(bucket: Bucket, table: LayerTable, ws: dict, sizes: LaunchSizes, layer_sums: bool) -> Tensor:
    """What pass 2 reads its layers' sums of squares from (its LAYER_SUMS flag is ``layer_sums``): the per-chunk
    partials, which it reduces itself; or the whole-layer sums, reduced from the partials by one launch here
    (with pass 2's reduction tiles and warps, so with the same bits) and, for sharded layers, then summed over
    the ranks by the bucket's all-reduce."""
    if not layer_sums:
        return ws["partials"]
    sums = ws["layer_sums"]
    layer_sums_kernel[(table.num_layers,)](table.layers, ws["partials"], sums, table.num_chunks,
                                           RBLOCK=sizes.reduce_block, num_warps=sizes.num_warps)
    if bucket.reduce_sums is not None:
        bucket.reduce_sums(sums)
    return sums


def _device_scalar(value: Tensor | None, device: torch.device, absent: Tensor) -> Tensor:
    """An optional scalar as a float32 tensor on ``device`` (no copy, no launch when it already is one), or
    ``absent`` in its place: a stand-in pointer the kernel never reads, since the matching flag is off."""
    return absent if value is None else value.to(device=device, dtype=torch.float32)


def _norm_clip(norm_clip: float | None) -> float:
    return math.inf if norm_clip is None else float(norm_clip)


def _storage_flags(bucket: Bucket, hp: LarsHyper | LambHyper) -> tuple[dict, dict]:
    """The kernels' storage flags for a bucket, (those of every kernel that reads the weight, those of the kernel
    that stores the state): the Kahan compensation; the state's dtype and whether its stores round
    stochastically (a float32-state bucket compiles no hash)."""
    bf16_state = bucket.state_dtype == torch.bfloat16
    return (dict(KAHAN=bucket.comps is not None),
            dict(STATE_DTYPE=tl.bfloat16 if bf16_state else tl.float32,
                 STOCHASTIC=bf16_state and hp.stochastic_rounding))


def _seed_bits(seed: int) -> int:
    """The uint32 seed as the int32 with its bits: every seed passes as the same kernel argument type (Triton
    types a Python int by its value, and would compile an int64 variant for seeds from 2**31)."""
    return seed - (1 << 32) if seed >= 1 << 31 else seed


def _trust_ratio_bounds(hp: LarsHyper | LambHyper) -> tuple[float, float]:
    """[min_trust_ratio, max_trust_ratio] as kernel floats, -inf and inf where absent."""
    return (-math.inf if hp.min_trust_ratio is None else float(hp.min_trust_ratio),
            math.inf if hp.max_trust_ratio is None else float(hp.max_trust_ratio))


# The kernels read the layer table's addresses, which traced tensors do not have: under torch.compile the
# Triton step runs eagerly, outside the graph (one graph break per bucket).
@torch.compiler.disable
def lars_step(bucket: Bucket, hp: LarsHyper, grad_scale: Tensor | None = None,
              found_inf: Tensor | None = None) -> None:
    sizes = launch_sizes(bucket)
    covered, table, rest = prepare(bucket, sizes.chunk)
    if rest is not None:
        _foreach.lars_step(rest, hp, grad_scale, found_inf)
    if covered is None:
        return
    layer_sums = _reduces_layers_first(covered, table)
    ws = _workspace(table, layer_sums)
    device, partials, new_steps, zero = covered.device, ws["partials"], ws["new_steps"], ws["zero"]
    lr_on_device = isinstance(hp.lr, Tensor)
    weight_flags, state_flags = _storage_flags(covered, hp)
    flags = dict(PARAM_DTYPE=getattr(tl, _PARAM_DTYPES[covered.dtype]), HAS_MASTER=covered.masters is not None,
                 HAS_GRAD_SCALE=grad_scale is not None, SUM_OF_NORMS=hp.sum_of_norms, ADAPT=hp.adapt,
                 ALL_ALIGNED=table.aligned16, BLOCK=sizes.block, num_warps=sizes.num_warps, **weight_flags)
    # Python floats throughout: an int hyper-parameter (weight_decay=0) would change the kernel signature.
    momentum, weight_decay, eta, eps, lmbda, alpha, delay, gamma_min = map(float, (
        hp.momentum, hp.weight_decay, hp.eta, hp.eps, hp.lmbda, hp.alpha, hp.delay, hp.gamma_min))
    grid = (table.num_chunks,)
    with _launch_context(table, ws, device):
        scale = _device_scalar(grad_scale, device, zero)
        lars_norms_kernel[grid](table.layers, table.chunk_layer, partials, new_steps, scale, table.num_chunks,
                                sizes.chunk, weight_decay, **flags)
        sums = _pass2_sums(covered, table, ws, sizes, layer_sums)
        lars_update_kernel[grid](
            table.layers, table.chunk_layer, sums, new_steps, scale, _device_scalar(found_inf, device, zero),
            _device_scalar(hp.lr if lr_on_device else None, device, zero), table.num_chunks, sizes.chunk,
            _seed_bits(hp.seed), 0.0 if lr_on_device else float(hp.lr), momentum, weight_decay, eta, eps,
            _norm_clip(hp.norm_clip), lmbda, alpha, delay, gamma_min, *_trust_ratio_bounds(hp),
            1.0 - float(hp.dampening), LR_ON_DEVICE=lr_on_device, NESTEROV=hp.nesterov, USE_PHI=hp.use_phi,
            TRUST_CLIP=hp.trust_clip, RBLOCK=sizes.reduce_block, LAYER_SUMS=layer_sums, **state_flags, **flags)


@torch.compiler.disable
def lamb_step(bucket: Bucket, hp: LambHyper, grad_scale: Tensor | None = None,
              found_inf: Tensor | None = None) -> None:
    sizes = launch_sizes(bucket)
    covered, table, rest = prepare(bucket, sizes.chunk)
    if rest is not None:
        _foreach.lamb_step(rest, hp, grad_scale, found_inf)
    if covered is None:
        return
    layer_sums = _reduces_layers_first(covered, table)
    ws = _workspace(table, layer_sums)
    device, partials, new_steps, zero = covered.device, ws["partials"], ws["new_steps"], ws["zero"]
    lr_on_device = isinstance(hp.lr, Tensor)
    log_beta1, log_beta2 = hp.log_beta1, hp.log_beta2
    beta1, beta2, eps, weight_decay = map(float, (hp.beta1, hp.beta2, hp.eps, hp.weight_decay))
    weight_flags, state_flags = _storage_flags(covered, hp)
    flags = dict(PARAM_DTYPE=getattr(tl, _PARAM_DTYPES[covered.dtype]), HAS_MASTER=covered.masters is not None,
                 BIAS_CORRECTION=hp.bias_correction, DECOUPLED_DECAY=hp.decoupled_decay, ALL_ALIGNED=table.aligned16,
                 BLOCK=sizes.block, num_warps=sizes.num_warps, **weight_flags)
    grid = (table.num_chunks,)
    with _launch_context(table, ws, device):
        found = _device_scalar(found_inf, device, zero)
        lamb_moments_kernel[grid](
            table.layers, table.chunk_layer, partials, new_steps, _device_scalar(grad_scale, device, zero), found,
            _device_scalar(hp.clip_coef, device, zero), table.num_chunks, sizes.chunk, _seed_bits(hp.seed), beta1,
            beta2, float(hp.first_moment_factor), 1.0 - beta2, log_beta1, log_beta2, eps, weight_decay,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_CLIP_COEF=hp.clip_coef is not None, **state_flags, **flags)
        sums = _pass2_sums(covered, table, ws, sizes, layer_sums)
        lamb_update_kernel[grid](
            table.layers, table.chunk_layer, sums, new_steps, found,
            _device_scalar(hp.lr if lr_on_device else None, device, zero), table.num_chunks, sizes.chunk,
            0.0 if lr_on_device else float(hp.lr), log_beta1, log_beta2, eps, weight_decay,
            _norm_clip(hp.norm_clip), *_trust_ratio_bounds(hp), LR_ON_DEVICE=lr_on_device, ADAPT=hp.adapt,
            RBLOCK=sizes.reduce_block, LAYER_SUMS=layer_sums, STATE_DTYPE=state_flags["STATE_DTYPE"], **flags)
