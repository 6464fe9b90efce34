"""The multi-tensor layer table that the fused backends (Triton, CUDA, C++ CPU twin) all read.

One table describes one bucket (layers of one device and dtype). It is built on the host, copied to the
bucket's device once, and cached: it is rebuilt only when a tensor behind it changes (a new gradient
allocation, ``load_state_dict``, a parameter re-assigned), which is detected by comparing data pointers.
Because the table lives in device memory, one kernel launch covers any number of layers (no 4 KB kernel
argument limit) and all sizes and offsets are 64-bit.

``layers`` is an int64 tensor of shape ``[num_layers, NUM_COLS]``; the columns are named below and the C++
header ``csrc/layer_table.h`` mirrors them. Layer ``i`` owns the chunks ``first_chunk .. first_chunk +
num_chunks - 1``; chunk ``c`` covers elements ``[(c - first_chunk) * chunk_size, min(numel, ...))`` of it.
``chunk_layer`` (int32, ``[num_chunks]``) maps each chunk back to its layer. A layer of 0 elements owns one
empty chunk, so every layer has a "first chunk" whose program can do the layer's once-per-step work
(advancing its step count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._types import Bucket

COL_PARAM, COL_GRAD, COL_STATE0, COL_STATE1, COL_MASTER, COL_STEP = range(6)
COL_NUMEL, COL_FIRST_CHUNK, COL_NUM_CHUNKS, COL_FLAGS = range(6, 10)
NUM_COLS = 10
FLAG_EXCLUDED = 1


@dataclass
class LayerTable:
    layers: Tensor  # int64 [num_layers, NUM_COLS] on the bucket's device
    chunk_layer: Tensor  # int32 [num_chunks] on the bucket's device
    chunk_size: int
    num_layers: int
    num_chunks: int
    max_layer_chunks: int  # chunks of the largest layer
    key: tuple
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


def table_fits(bucket: Bucket) -> list[bool]:
    """Which layers a pointer-table kernel can update in place.

    The kernels walk a flat range of ``numel`` elements, so parameter, gradient, state and master tensors
    must each be dense (non-overlapping, no gaps) and share one memory layout. channels_last weights qualify;
    strided views (``w[:, ::2]``) do not and are left to the ``foreach`` path, never copied and written back.
    """
    fits = []
    for i, p in enumerate(bucket.params):
        tensors = [p, bucket.grads[i]] + [s[i] for s in bucket.states]
        if bucket.masters is not None:
            tensors.append(bucket.masters[i])
        ok = all(_dense(t) and t.stride() == p.stride() for t in tensors)
        fits.append(ok or p.numel() <= 1)
    return fits


def prepare(bucket: Bucket, chunk_size: int) -> tuple[Bucket | None, LayerTable | None, Bucket | None]:
    """Split a bucket for a fused backend: ``(covered, table, rest)``.

    ``covered`` holds the layers the pointer table can update in place (usually the whole bucket) and
    ``table`` is their layer table; ``rest`` (or None) holds the strided layers that must go through the
    ``foreach`` backend instead; ``covered`` and ``table`` are None when no layer fits. Cached like the
    table itself.

    Under ``torch.compile`` the tensors being traced have no addresses: the table then holds sizes only
    (pointer columns 0) and is not cached. Only the compiled ops can use such a table, because they check
    the table's pointers against their tensor arguments and fill in the real ones; the Triton backend, which
    cannot, runs outside the compiled graph."""
    tracing = torch.compiler.is_compiling()
    key = None if tracing else _pointer_key(bucket)
    cached = None if tracing else bucket.cache.get(("fits", chunk_size))
    if cached is not None and cached[0] == key:
        fits = cached[1]
    else:
        fits = table_fits(bucket)
        if not tracing:
            # Only which layers fit is kept, never this step's tensors: holding on to last step's gradients
            # would keep their memory alive, so new ones would get new addresses and a new table every step.
            bucket.cache[("fits", chunk_size)] = (key, fits)
    if all(fits):
        covered, rest = bucket, None
    else:
        inside = [i for i, ok in enumerate(fits) if ok]
        outside = [i for i, ok in enumerate(fits) if not ok]
        covered = bucket.subset(inside, bucket.cache.setdefault(("covered", chunk_size), {})) if inside else None
        rest = bucket.subset(outside, bucket.cache.setdefault(("rest", chunk_size), {}))
    if covered is None:
        return None, None, rest
    table = _build(covered, chunk_size, None) if tracing else layer_table(
        covered, chunk_size, key if covered is bucket else None)
    return covered, table, rest


def _pointer_key(bucket: Bucket) -> tuple:
    key = [t.data_ptr() for t in bucket.params]
    key += [t.data_ptr() for t in bucket.grads]
    for state in bucket.states:
        key += [t.data_ptr() for t in state]
    if bucket.masters is not None:
        key += [t.data_ptr() for t in bucket.masters]
    key += [t.data_ptr() for t in bucket.steps]
    key += [t.numel() for t in bucket.params]
    key += bucket.excluded
    return tuple(key)


def layer_table(bucket: Bucket, chunk_size: int, key: tuple | None = None) -> LayerTable:
    """The bucket's table for ``chunk_size``, from the cache when no tensor behind it has changed."""
    if key is None:
        key = _pointer_key(bucket)
    cached = bucket.cache.get(("layer_table", chunk_size))
    if cached is None or cached.key != key:
        cached = bucket.cache[("layer_table", chunk_size)] = _build(bucket, chunk_size, key)
    return cached


def _build(bucket: Bucket, chunk_size: int, key: tuple | None) -> LayerTable:
    """A new table; without a key (under torch.compile) its pointer columns are left 0."""
    address = (lambda t: t.data_ptr()) if key is not None else (lambda t: 0)
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
            FLAG_EXCLUDED if bucket.excluded[i] else 0,
        ])
        chunk_layer.extend([i] * num_chunks)
        first_chunk += num_chunks
        max_layer_chunks = max(max_layer_chunks, num_chunks)

    device = bucket.device
    return LayerTable(
        layers=torch.tensor(rows, dtype=torch.int64).reshape(-1, NUM_COLS).to(device),
        chunk_layer=torch.tensor(chunk_layer, dtype=torch.int32).to(device),
        chunk_size=chunk_size,
        num_layers=len(rows),
        num_chunks=first_chunk,
        max_layer_chunks=max_layer_chunks,
        key=key,
    )
