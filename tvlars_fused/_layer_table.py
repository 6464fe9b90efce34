"""The multi-tensor layer table that the fused backends (Triton, CUDA, C++ CPU twin) all read.

One table describes one bucket (layers of one device and dtype). It is built on the host and cached; the tensors
behind it are validated once, when it is built (dtype, device, size, dense, one memory layout), so a step does not
check them again. Because the table lives in device memory, one kernel launch covers any number of layers (no 4 KB
kernel argument limit) and all sizes and offsets are 64-bit.

``layers`` is an int64 tensor of shape ``[num_layers, NUM_COLS]``; the columns are named below and the C++ header
``csrc/layer_table.h`` mirrors them. Layer ``i`` owns the chunks ``first_chunk .. first_chunk + num_chunks - 1``;
chunk ``c`` covers elements ``[(c - first_chunk) * chunk_size, min(numel, ...))`` of it. ``chunk_layer`` (int32,
``[num_chunks]``) maps each chunk back to its layer. A layer of 0 elements owns one empty chunk, so every layer has a
"first chunk" whose program can do the layer's once-per-step work (advancing its step count).

A step's host work is one identity pass: the parameters' and gradients' data pointers compared with the table's.
When only the gradients moved (``zero_grad(set_to_none=True)`` hands out new ones), only that column is rewritten.

CUDA graphs. Nothing here synchronises with the device: rows are written into pinned host memory and uploaded with a
``non_blocking`` copy, and the host copy is kept (``layers_host``) rather than read back, so a table can be (re)built
while a stream is being captured (the standard recipe captures backward, whose gradients come from the graph's own
pool, so the table is rebuilt inside the capture). A captured launch bakes in the addresses of the table, its chunk
map and its workspace, and its upload re-reads the pinned rows at every replay: a table used while capturing is never
modified again and is kept alive by ``bucket.keep_alive`` (the optimizer's, for its whole life).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._types import Bucket, math_dtype

COL_PARAM, COL_GRAD, COL_STATE0, COL_STATE1, COL_MASTER, COL_STEP = range(6)
COL_NUMEL, COL_FIRST_CHUNK, COL_NUM_CHUNKS, COL_FLAGS = range(6, 10)
# Kahan compensation (0 when none); the layer's number in the stochastic-rounding stream and the index of its first
# element in the whole layer (a shard's offset), docs/algorithms.md section 9.
COL_COMP, COL_LAYER_ID, COL_ELEMENT_OFFSET = range(10, 13)
NUM_COLS = 14  # column 13 is 0: the CUDA kernel reads a row in 16-byte pairs
# The columns holding tensor addresses that the vector paths load and store through (the step count is a scalar).
ADDRESS_COLS = (COL_PARAM, COL_GRAD, COL_STATE0, COL_STATE1, COL_MASTER, COL_COMP)
# Per-layer flags (csrc/layer_table.h): no weight decay (beta' = 0), no trust ratio (q = 1).
FLAG_NO_DECAY = 1
FLAG_NO_ADAPT = 4
# Every tensor address of the layer is a multiple of 16 bytes: the Triton kernels take their vector path for it
# (decided per layer, so one misaligned view does not slow its whole bucket down).
FLAG_ALIGNED16 = 2
_data_ptr = Tensor.data_ptr
_generations = itertools.count()


@dataclass(eq=False)
class LayerTable:
    layers: Tensor  # int64 [num_layers, NUM_COLS] on the bucket's device
    layers_host: Tensor  # the same rows on the host (pinned for CUDA; the very same tensor on the CPU)
    chunk_layer: Tensor  # int32 [num_chunks] on the bucket's device
    chunk_size: int
    num_layers: int
    num_chunks: int
    max_layer_chunks: int  # chunks of the largest layer
    aligned16: bool  # every address in the table is a multiple of 16 bytes (vector loads and stores are safe)
    stream: object = None  # CUDA: the stream current when the table was built (a backend on another records it)
    captured: bool = False  # used while a CUDA graph was being captured: never modified or freed afterwards
    # Scratch buffers a backend allocates once per table (partial sums, per-layer results).
    workspace: dict = field(default_factory=dict)


def _dense(t: Tensor) -> bool:
    """Non-overlapping with no gaps: the elements fill ``numel`` consecutive slots in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_layer(bucket: Bucket, i: int) -> None:
    """What the kernels assume of layer i's tensors beyond their layout, checked once per table build: a wrong
    dtype, device or size here would be a silent out-of-bounds access in a kernel."""
    p = bucket.params[i]
    state_dtype = bucket.state_dtype
    if state_dtype not in (math_dtype(p.dtype), torch.bfloat16):
        raise RuntimeError(f"a {p.dtype} bucket on {p.device} with {state_dtype} state (float32 or bfloat16 only)")
    expected = [("gradient", bucket.grads[i], p.dtype)]
    expected += [(f"state {k}", s[i], state_dtype) for k, s in enumerate(bucket.states)]
    if bucket.masters is not None:
        expected.append(("master weight", bucket.masters[i], torch.float32))
    if bucket.comps is not None:
        if bucket.masters is not None or p.dtype != torch.bfloat16:
            raise RuntimeError(f"layer {i}: Kahan compensation is for bfloat16 parameters without master weights")
        expected.append(("Kahan compensation", bucket.comps[i], torch.bfloat16))
    for name, t, dtype in expected:
        if t.dtype != dtype or t.device != p.device or t.shape != p.shape:
            raise RuntimeError(f"layer {i} of a {p.dtype} bucket on {p.device}: its {name} has dtype {t.dtype}, "
                               f"shape {tuple(t.shape)} on {t.device}; expected {dtype}, {tuple(p.shape)} "
                               f"on {p.device}")
    step = bucket.steps[i]
    if step.dtype != torch.float32 or step.numel() != 1 or step.device != p.device:
        raise RuntimeError(f"layer {i}: its step count must be a float32 scalar on {p.device}")


def table_fits(bucket: Bucket) -> list[bool]:
    """Which layers a pointer-table kernel can update in place.

    The kernels walk a flat range of ``numel`` elements, so parameter, gradient, state and master tensors must each
    be dense (non-overlapping, no gaps) and share one memory layout. channels_last weights qualify; strided views
    (``w[:, ::2]``) do not and are left to the ``foreach`` path, never copied and written back.
    """
    fits = []
    for i, p in enumerate(bucket.params):
        _check_layer(bucket, i)
        tensors = [p, bucket.grads[i]] + [s[i] for s in bucket.states]
        if bucket.masters is not None:
            tensors.append(bucket.masters[i])
        if bucket.comps is not None:
            tensors.append(bucket.comps[i])
        ok = all(_dense(t) and t.stride() == p.stride() for t in tensors)
        fits.append(ok or p.numel() <= 1)
    return fits


@dataclass(eq=False)
class _Split:
    """How a bucket was last split for a fused backend, and the addresses that split was made for."""

    generation: int  # the Bucket object it was made for (new buckets compare the whole key first)
    fixed_key: tuple  # parameter, state, master and step addresses, sizes, exclusion
    param_ptrs: list[int]
    grad_ptrs: list[int]
    grad_strides: list[tuple]
    fits: list[bool]
    table_grads: list[int] | None = None  # the gradient column of the cached table


def _fixed_key(bucket: Bucket, param_ptrs: list[int]) -> tuple:
    key = list(param_ptrs)
    for state in bucket.states:
        key += [t.data_ptr() for t in state]
    if bucket.masters is not None:
        key += [t.data_ptr() for t in bucket.masters]
    if bucket.comps is not None:
        key += [t.data_ptr() for t in bucket.comps]
    key += [t.data_ptr() for t in bucket.steps]
    key += [t.numel() for t in bucket.params]
    key += bucket.no_decay
    key += bucket.no_adapt
    key += bucket.layer_ids
    key += bucket.element_offsets
    key.append(bucket.state_dtype)
    return tuple(key)


def prepare(bucket: Bucket, chunk_size: int) -> tuple[Bucket | None, LayerTable | None, Bucket | None]:
    """Split a bucket for a fused backend: ``(covered, table, rest)``.

    ``covered`` holds the layers the pointer table can update in place (usually the whole bucket) and ``table`` is
    their layer table; ``rest`` (or None) holds the strided layers that must go through the ``foreach`` backend
    instead; ``covered`` and ``table`` are None when no layer fits.

    A bucket object the optimizer steps again (its cached plan) is trusted for everything but its parameters' and
    gradients' addresses; any other bucket is compared in full. Only addresses and which layers fit are kept between
    steps, never this step's tensors: holding on to last step's gradients would keep their memory alive, so new ones
    would get new addresses and a new table every step.

    Never called while tracing (traced tensors have no addresses): a compiled step calls it at run time
    (``_compiled_step``)."""
    if bucket.generation is None:
        bucket.generation = next(_generations)
    param_ptrs = list(map(_data_ptr, bucket.params))
    grad_ptrs = bucket.grad_ptrs if bucket.grad_ptrs is not None else list(map(_data_ptr, bucket.grads))
    slot, table_slot = ("split", chunk_size), ("layer_table", chunk_size)
    split = bucket.cache.get(slot)
    fixed_key = None
    if split is not None and split.generation != bucket.generation:
        fixed_key = _fixed_key(bucket, param_ptrs)
        if split.fixed_key == fixed_key:
            split.generation = bucket.generation  # a new bucket object over the very same tensors
    if split is None or split.generation != bucket.generation or split.param_ptrs != param_ptrs:
        # New state, a checkpoint loaded or a parameter moved: check and lay out everything again.
        split = bucket.cache[slot] = _Split(bucket.generation, fixed_key or _fixed_key(bucket, param_ptrs),
                                            param_ptrs, grad_ptrs, [g.stride() for g in bucket.grads],
                                            table_fits(bucket))
        bucket.cache.pop(table_slot, None)
    elif split.grad_ptrs != grad_ptrs:
        strides = [g.stride() for g in bucket.grads]
        if strides != split.grad_strides:  # a gradient of another layout: the layers that fit may differ
            split.fits = table_fits(bucket)
            split.grad_strides = strides
            bucket.cache.pop(table_slot, None)
        split.grad_ptrs = grad_ptrs
    covered, rest = _split(bucket, split.fits)
    if covered is None:
        return None, None, rest
    table = bucket.cache.get(table_slot)
    covered_grads = grad_ptrs if rest is None else list(map(_data_ptr, covered.grads))
    if table is None:
        table = _build(covered, chunk_size)
    elif split.table_grads != covered_grads:
        table = _with_grads(table, covered_grads)
    split.table_grads = covered_grads
    bucket.cache[table_slot] = table
    _note_capture(covered, table)
    return covered, table, rest


def _split(bucket: Bucket, fits: list[bool]) -> tuple[Bucket | None, Bucket | None]:
    if all(fits):
        return bucket, None
    inside = [i for i, ok in enumerate(fits) if ok]
    outside = [i for i, ok in enumerate(fits) if not ok]
    covered = bucket.subset(inside, bucket.cache.setdefault("covered", {})) if inside else None
    return covered, bucket.subset(outside, bucket.cache.setdefault("rest", {}))


def capturing(device: torch.device) -> bool:
    """Whether work for ``device`` is being captured into a CUDA graph now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _note_capture(bucket: Bucket, table: LayerTable) -> None:
    """A table read by a launch being captured into a CUDA graph must outlive the graph and never change."""
    if table.captured or not capturing(table.layers.device):
        return
    table.captured = True
    if bucket.keep_alive is not None:
        bucket.keep_alive.append(table)


# torch's pinned-memory allocator keeps a block that a graph capture used out of reuse (so a replay re-reads the rows
# the capture uploaded) since torch 2.10; 2.11 is the first release whose wheel we checked for it.
def pinned_upload_capturable(version: str) -> bool:
    return torch.torch_version.TorchVersion(version) >= (2, 11)


PINNED_UPLOAD_CAPTURABLE = pinned_upload_capturable(torch.__version__)


def _upload(host: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """(the rows on ``device``, the host tensor to keep) without synchronising: pinned memory and a non_blocking copy
    for CUDA (legal while a stream is captured, on the torch releases that keep pinned blocks a capture used); on the
    CPU the host tensor is the table."""
    if device.type == "cpu":
        return host, host
    if device.type == "cuda":
        if not PINNED_UPLOAD_CAPTURABLE and capturing(device):
            raise RuntimeError(
                f"tvlars_fused: a layer table is being built inside a CUDA graph capture, which needs torch >= 2.11 "
                f"(torch {torch.__version__} may reuse the pinned memory a replay reads). Keep the gradients' "
                "addresses across the capture (zero_grad(set_to_none=False) before it) or upgrade torch")
        host = host.pin_memory()
    return host.to(device, non_blocking=True), host


def _current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _aligned(addresses) -> bool:
    return all(a % 16 == 0 for a in addresses)


def _build(bucket: Bucket, chunk_size: int) -> LayerTable:
    """A new table."""
    address = _data_ptr
    rows = []
    chunk_layer = []
    first_chunk = 0
    max_layer_chunks = 0
    two_states = len(bucket.states) > 1
    for i, p in enumerate(bucket.params):
        numel = p.numel()
        num_chunks = max(1, -(-numel // chunk_size))  # an empty layer still owns one (empty) chunk
        rows.append([
            address(p),
            address(bucket.grads[i]),
            address(bucket.states[0][i]),
            address(bucket.states[1][i]) if two_states else 0,
            address(bucket.masters[i]) if bucket.masters is not None else 0,
            address(bucket.steps[i]),
            numel,
            first_chunk,
            num_chunks,
            (FLAG_NO_DECAY if bucket.no_decay[i] else 0) | (FLAG_NO_ADAPT if bucket.no_adapt[i] else 0),
            address(bucket.comps[i]) if bucket.comps is not None else 0,
            bucket.layer_ids[i],
            bucket.element_offsets[i],
            0,
        ])
        if _aligned(rows[-1][c] for c in ADDRESS_COLS):
            rows[-1][COL_FLAGS] |= FLAG_ALIGNED16
        chunk_layer.extend([i] * num_chunks)
        first_chunk += num_chunks
        max_layer_chunks = max(max_layer_chunks, num_chunks)

    device = bucket.device
    layers, layers_host = _upload(torch.tensor(rows, dtype=torch.int64).reshape(-1, NUM_COLS), device)
    chunk_map, chunk_map_host = _upload(torch.tensor(chunk_layer, dtype=torch.int32), device)
    table = LayerTable(
        layers=layers,
        layers_host=layers_host,
        chunk_layer=chunk_map,
        chunk_size=chunk_size,
        num_layers=len(rows),
        num_chunks=first_chunk,
        max_layer_chunks=max_layer_chunks,
        aligned16=_aligned(row[c] for row in rows for c in ADDRESS_COLS),
        stream=_current_stream(device),
    )
    table.workspace["_chunk_layer_host"] = chunk_map_host  # a captured upload re-reads it at every replay
    return table


def _with_grads(table: LayerTable, grad_ptrs: list[int]) -> LayerTable:
    """The table with a new gradient column. A new table, never an in-place change: a launch still queued, or a
    captured graph, may read the old rows. The chunk map is shared; the workspace too unless the old table was
    captured (a graph replay and an eager step must not share scratch)."""
    host = table.layers_host.clone()
    host[:, COL_GRAD] = torch.tensor(grad_ptrs, dtype=torch.int64)
    device = table.layers.device
    aligned = (host[:, list(ADDRESS_COLS)] % 16 == 0).all(dim=1)
    host[:, COL_FLAGS] = host[:, COL_FLAGS] & ~FLAG_ALIGNED16 | aligned.long() * FLAG_ALIGNED16
    layers, layers_host = _upload(host, device)
    new = LayerTable(
        layers=layers, layers_host=layers_host, chunk_layer=table.chunk_layer, chunk_size=table.chunk_size,
        num_layers=table.num_layers, num_chunks=table.num_chunks, max_layer_chunks=table.max_layer_chunks,
        aligned16=bool(aligned.all()), stream=_current_stream(device))
    if table.captured:
        new.workspace["_chunk_layer_host"] = table.workspace.get("_chunk_layer_host")
    else:
        new.workspace = table.workspace
    return new
