"""The compiled backends: ``backend="cuda"`` (one cooperative kernel launch per step) and its CPU twin
``backend="cpp"`` (OpenMP over chunks), both the ``tvlars_fused`` ops of ``csrc/``.

A bucket is split by ``prepare``: the layers the layer table covers go to one op call; strided layers (rare)
go through the ``foreach`` backend. The ops read ``lr``, ``grad_scale``, ``found_inf`` and LAMB's clip
coefficient from device scalars, so a step never synchronises with the host.

A step calls the table form of the ops (``lars_step_table``), which takes the cached layer table alone: its
tensors were checked when it was built, so a step of thousands of small layers does not pay for passing and
checking five tensor lists. (The list form, ``lars_step``, takes the tensors too: for callers without a cached
table.) Under ``torch.compile`` a bucket's step is traced as one ``tvlars_fused::bucket_lars_step`` call, which
runs this very step at run time (``_compiled_step``): traced tensors have no addresses to build a table from.

Sharded buckets (FSDP2, ``bucket.reduce_sums`` set) run fused too, in two op calls around one all-reduce: the
"sums" phase writes each layer's local sums of squares, ``reduce_sums`` adds them over the ranks, and the
"apply" phase steps with the whole-layer sums.

A cooperative launch whose grid cannot be co-resident (fewer blocks fit at once than the kernel's occupancy said,
e.g. under an MPS active-thread limit) is refused before any block runs, and would be refused at every step. The
op's error then starts with ``NOT_CO_RESIDENT``; the step catches exactly that, warns once per device, and steps
that device's buckets with the ``triton`` backend where it runs there, else ``foreach``, from then on (the failed
step included: nothing was written). A sharded bucket does not fall back: its ranks must issue matching
all-reduces, and another backend's would not match those of ranks still on the kernel. It raises instead, saying
to choose ``backend="triton"`` or ``"foreach"`` on every rank.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from . import _backends, _compiled_step, _extension, _foreach
from ._layer_table import LayerTable, prepare
from ._types import Bucket, LambHyper, LarsHyper

_extension.ops()  # loads the compiled library once, or raises why it cannot
_ops = torch.ops.tvlars_fused  # a plain attribute, which torch.compile traces without a graph break

# Elements per chunk on the CPU: the unit of one OpenMP iteration. On a GPU a chunk is one block's unit of work and
# its size follows the bucket (_chunk_size). Always a multiple of 8, for the kernel's 16-byte bfloat16 packs.
CHUNK = 16384
_CUDA_BLOCKS_PER_SM = 3  # __launch_bounds__(256, 3) of the step kernels in csrc/cuda_step.cu
_resident_blocks: dict[torch.device, int] = {}


def _chunk_size(bucket: Bucket) -> int:
    """CPU: CHUNK. CUDA: the largest power of two that gives at least 8 chunks per resident block (under 16 from
    the rounding; layers ending in partial chunks add some), within [4096, 65536], so the last wave of the
    persistent grid is a small part of the step. An H200 has 132 SMs x 3 = 396 resident blocks: ResNet-50 (25.6 M
    parameters in 161 tensors) takes chunks of 4096, 6334 of them (16 a block); BERT-large (335 M in 391 tensors)
    65536, 5353 of them (13.5 a block). Cached per bucket: its layers' sizes do not change."""
    if bucket.device.type != "cuda":
        return CHUNK
    chunk = bucket.cache.get("cuda_chunk")
    if chunk is None:
        blocks = _resident_blocks.get(bucket.device)
        if blocks is None:
            sms = torch.cuda.get_device_properties(bucket.device).multi_processor_count
            blocks = _resident_blocks[bucket.device] = sms * _CUDA_BLOCKS_PER_SM
        target = max(1, sum(p.numel() for p in bucket.params) // (8 * blocks))
        chunk = bucket.cache["cuda_chunk"] = min(65536, max(4096, 1 << (target.bit_length() - 1)))
    return chunk

# The ops' `phase` argument (StepPhase in csrc/step_inputs.h); the ordinary step leaves it at PHASE_FULL.
PHASE_FULL, PHASE_SUMS, PHASE_APPLY = 0, 1, 2
supports_sharded = True  # _optimizer._plan gives this backend sharded buckets (else they go to foreach)
# bfloat16 state and Kahan-compensated bfloat16 weights (docs/algorithms.md, section 9) are stepped by the ops (the
# state's dtype and the compensation are op arguments, the seed too; each layer's number and element offset are table
# columns), not sent to foreach by the optimizer.
supports_bf16_storage = True


def _workspace(table: LayerTable) -> Tensor:
    """The table's float64 scratch: per-chunk partial sums of squares, then per-layer results. (On CUDA the op
    records its use on the launch stream, whichever stream it was allocated on.)"""
    ws = table.workspace.get("cpp_partials")
    if ws is None:
        ws = table.workspace["cpp_partials"] = torch.empty(2 * (table.num_chunks + table.num_layers),
                                                           dtype=torch.float64, device=table.layers.device)
    return ws


def _run(op, bucket: Bucket, table: LayerTable, *args) -> None:
    """One op call, or for a sharded bucket the sums phase, one all-reduce and the apply phase. The all-reduce
    runs even when found_inf is set (the op then writes nothing), so every rank issues the same collectives."""
    if bucket.reduce_sums is None:
        op(*args)
        return
    sums = table.workspace.get("cpp_layer_sums")
    if sums is None:
        sums = table.workspace["cpp_layer_sums"] = torch.zeros(table.num_layers, 2, dtype=torch.float64,
                                                               device=table.layers.device)
    op(*args, sums, PHASE_SUMS)
    bucket.reduce_sums(sums)
    op(*args, sums, PHASE_APPLY)


# How csrc/cuda_step.cu's error starts when a cooperative launch cannot be co-resident.
NOT_CO_RESIDENT = "tvlars_fused: cooperative launch cannot be co-resident"
# Devices where that happened: the backend their buckets step with instead, for the rest of the process.
_fallbacks: dict[torch.device, str] = {}


def _fallback_backend(device: torch.device) -> str:
    return "triton" if _backends.unavailable_reason("triton", device) is None else "foreach"


def stepping_backend(device: torch.device) -> str:
    """The backend that steps this backend's (unsharded) buckets on ``device``: its own name, or its fallback."""
    return _fallbacks.get(device, "cuda" if device.type == "cuda" else "cpp")


def _fallback(bucket: Bucket):
    """The backend module that steps ``bucket`` instead of the op (its device's launches cannot be co-resident), or
    None. Sharded buckets never fall back (module docstring)."""
    name = _fallbacks.get(bucket.device) if bucket.reduce_sums is None else None
    return None if name is None else _backends.module(name)


def _launch_or_fall_back(launch: Callable[[], None], bucket: Bucket, step_name: str, *step_args) -> None:
    """``launch()``, the op calls that step ``bucket``. Where they fail because the cooperative launch cannot be
    co-resident, the fallback backend's ``step_name`` steps the bucket instead, now and for every later bucket of
    the device (warned about once); any other error propagates as it is."""
    try:
        launch()
        return
    except RuntimeError as exc:
        why = str(exc).partition("\n")[0]  # without the C++ context torch may append
        if not why.startswith(NOT_CO_RESIDENT):
            raise
        if bucket.reduce_sums is not None:
            raise RuntimeError(f"{why}. This bucket is sharded, and falling back on this rank alone would make its "
                               "all-reduces differ from those of ranks still on the cooperative kernel: pass "
                               "backend='triton' (or 'foreach') to the optimizer on every rank") from exc
        if bucket.device not in _fallbacks:
            name = _fallbacks[bucket.device] = _fallback_backend(bucket.device)
            warnings.warn(f"{why}. The cuda backend's kernel cannot run on {bucket.device} (for example under an MPS "
                          f"thread limit); its buckets step with backend='{name}' from now on", RuntimeWarning)
    getattr(_fallback(bucket), step_name)(bucket, *step_args)


def _device_scalar(value: Tensor | None, name: str, device: torch.device) -> Tensor | None:
    """A one-element float32 tensor on ``device`` (no copy when it already is one)."""
    if value is None:
        return None
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar tensor, got shape {tuple(value.shape)}")
    return value.to(device=device, dtype=torch.float32).reshape(())


def _storage(bucket: Bucket) -> tuple:
    """The table ops' storage arguments: the parameters' dtype, whether they have float32 master weights, the state's
    dtype (float32 or bfloat16) and whether they carry a Kahan compensation."""
    return bucket.dtype, bucket.masters is not None, bucket.state_dtype, bucket.comps is not None


def _lr(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    if isinstance(lr, Tensor):
        return 0.0, _device_scalar(lr, "lr", device)
    return float(lr), None


def lars_step(bucket: Bucket, hp: LarsHyper, grad_scale: Tensor | None = None,
              found_inf: Tensor | None = None) -> None:
    if torch.compiler.is_compiling():  # traced tensors have no addresses: one op call that steps at run time
        _compiled_step.lars_step(bucket, hp, grad_scale, found_inf)
        return
    if (fallback := _fallback(bucket)) is not None:
        fallback.lars_step(bucket, hp, grad_scale, found_inf)
        return
    chunk = _chunk_size(bucket)
    covered, table, rest = prepare(bucket, chunk)
    if rest is not None:
        _foreach.lars_step(rest, hp, grad_scale, found_inf)
    if covered is None:
        return
    device = covered.device
    lr, lr_tensor = _lr(hp.lr, device)
    head = [table.layers, table.layers_host, table.chunk_layer]
    scalars = [lr_tensor, _device_scalar(grad_scale, "grad_scale", device),
               _device_scalar(found_inf, "found_inf", device)]
    tail = [lr, hp.momentum, hp.weight_decay, hp.eta, hp.eps, hp.norm_clip, hp.sum_of_norms, hp.nesterov,
            hp.use_phi, hp.lmbda, hp.alpha, hp.delay, hp.gamma_min, hp.dampening, hp.trust_clip, hp.min_trust_ratio,
            hp.max_trust_ratio, hp.adapt, hp.stochastic_rounding, hp.seed, chunk]
    _launch_or_fall_back(lambda: _run(_ops.lars_step_table, covered, table, *head, _workspace(table),
                                      *_storage(covered), *scalars, *tail),
                         covered, "lars_step", hp, grad_scale, found_inf)


def lamb_step(bucket: Bucket, hp: LambHyper, grad_scale: Tensor | None = None,
              found_inf: Tensor | None = None) -> None:
    if torch.compiler.is_compiling():
        _compiled_step.lamb_step(bucket, hp, grad_scale, found_inf)
        return
    if (fallback := _fallback(bucket)) is not None:
        fallback.lamb_step(bucket, hp, grad_scale, found_inf)
        return
    chunk = _chunk_size(bucket)
    covered, table, rest = prepare(bucket, chunk)
    if rest is not None:
        _foreach.lamb_step(rest, hp, grad_scale, found_inf)
    if covered is None:
        return
    device = covered.device
    lr, lr_tensor = _lr(hp.lr, device)
    head = [table.layers, table.layers_host, table.chunk_layer]
    scalars = [lr_tensor, _device_scalar(grad_scale, "grad_scale", device),
               _device_scalar(found_inf, "found_inf", device), _device_scalar(hp.clip_coef, "clip_coef", device)]
    tail = [lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.bias_correction, hp.norm_clip, hp.grad_averaging,
            hp.decoupled_decay, hp.min_trust_ratio, hp.max_trust_ratio, hp.adapt, hp.stochastic_rounding, hp.seed,
            chunk]
    _launch_or_fall_back(lambda: _run(_ops.lamb_step_table, covered, table, *head, _workspace(table),
                                      *_storage(covered), *scalars, *tail),
                         covered, "lamb_step", hp, grad_scale, found_inf)
