"""LARS and TVLARS in two launches per bucket, whatever the number of layers.

Pass 1 (``lars_norms_kernel``), one program per chunk: writes the chunk's partial sums of ||w||^2 and of
||d||^2 (``norm_of_sum``) or ||g||^2 (``sum_of_norms``) to ``partials`` (``[2, num_chunks]``), and the layer's
first-chunk program writes the new step count t = step + 1 to ``new_steps[layer]``. It changes no state.

Pass 2 (``lars_update_kernel``), one program per chunk: re-reduces its own layer's partials in a fixed order
(every program of the layer gets the same norms; no atomics), reads t from ``new_steps`` (never from the
state step, which the layer's first-chunk program overwrites with t in this very pass), forms phi(t) and the
trust ratio q, and updates momentum, master weight and parameter of its chunk.

Sharded layers (``LAYER_SUMS``): pass 1 sums the local shards; ``layer_sums_kernel`` (common) reduces each
layer's partials into ``[num_layers, 2]``, the host all-reduces that over the ranks, and pass 2 reads the
whole-layer sums from it instead of reducing partials.

``found_inf`` non-zero empties every loop and masks every store of pass 2: nothing persistent changes.
"""

import triton
import triton.language as tl

from .common import (COL_GRAD_C, COL_MASTER_C, COL_PARAM_C, COL_STATE0_C, COL_STEP_C, chunk_span, is_excluded,
                     phi, table_pointer, to_param_dtype, whole_layer_sums)


@triton.jit
def lars_norms_kernel(layers_ptr, chunk_layer_ptr, partials_ptr, new_steps_ptr, grad_scale_ptr, num_chunks,
                      weight_decay, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                      HAS_GRAD_SCALE: tl.constexpr, SUM_OF_NORMS: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK: tl.constexpr):
    row_ptr, layer, start, end, first = chunk_span(layers_ptr, chunk_layer_ptr, CHUNK)
    step_ptr = table_pointer(row_ptr, COL_STEP_C, tl.float32)
    tl.store(new_steps_ptr + layer, tl.load(step_ptr) + 1.0, mask=first)

    # Excluded layers use no norm: skip their elements.
    end = tl.where(is_excluded(row_ptr), start, end)
    grad_ptr = table_pointer(row_ptr, COL_GRAD_C, PARAM_DTYPE)
    if HAS_MASTER:
        weight_ptr = table_pointer(row_ptr, COL_MASTER_C, tl.float32)
    else:
        weight_ptr = table_pointer(row_ptr, COL_PARAM_C, PARAM_DTYPE)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
    w_sq = tl.zeros([BLOCK], dtype=tl.float32)
    other_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(start, end, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        mask = index < end
        w = tl.load(weight_ptr + index, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + index, mask=mask, other=0.0).to(tl.float32)
        if HAS_GRAD_SCALE:
            g = g / grad_scale
        w_sq += w * w
        if SUM_OF_NORMS:
            other_sq += g * g
        else:
            d = g + weight_decay * w
            other_sq += d * d
    chunk = tl.program_id(0)
    tl.store(partials_ptr + chunk, tl.sum(w_sq, axis=0))
    tl.store(partials_ptr + num_chunks + chunk, tl.sum(other_sq, axis=0))


@triton.jit
def lars_update_kernel(layers_ptr, chunk_layer_ptr, sums_ptr, new_steps_ptr, grad_scale_ptr, found_inf_ptr,
                       lr_ptr, num_chunks, lr, momentum, weight_decay, eta, eps, norm_clip, lmbda, alpha, delay,
                       gamma_min, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                       HAS_GRAD_SCALE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, SUM_OF_NORMS: tl.constexpr,
                       NESTEROV: tl.constexpr, USE_PHI: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                       RBLOCK: tl.constexpr, LAYER_SUMS: tl.constexpr):
    row_ptr, layer, start, end, first = chunk_span(layers_ptr, chunk_layer_ptr, CHUNK)
    skip = tl.load(found_inf_ptr) != 0
    end = tl.where(skip, start, end)
    t = tl.load(new_steps_ptr + layer)

    adapted = ~is_excluded(row_ptr)
    w_sq, other_sq = whole_layer_sums(sums_ptr, num_chunks, row_ptr, layer, RBLOCK, LAYER_SUMS)
    w_norm = tl.minimum(tl.sqrt(w_sq), norm_clip)
    other_norm = tl.minimum(tl.sqrt(other_sq), norm_clip)
    if SUM_OF_NORMS:
        d_norm = other_norm + weight_decay * w_norm
    else:
        d_norm = other_norm
    factor = eta
    if USE_PHI:
        factor = eta * phi(t, lmbda, alpha, delay, gamma_min)
    # Zero (or NaN) norms take q = 1 (the ratio's denominator is kept away from 0 / 0 on that branch);
    # excluded layers get q = 1 and no decay, so u = 1 * (g + 0 * w) = g.
    trusted = adapted & (w_norm > 0) & (d_norm > 0)
    q = tl.where(trusted, factor * w_norm / tl.where(trusted, d_norm + eps, 1.0), 1.0)
    decay = tl.where(adapted, weight_decay, 0.0)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)

    param_ptr = table_pointer(row_ptr, COL_PARAM_C, PARAM_DTYPE)
    grad_ptr = table_pointer(row_ptr, COL_GRAD_C, PARAM_DTYPE)
    buf_ptr = table_pointer(row_ptr, COL_STATE0_C, tl.float32)
    if HAS_MASTER:
        master_ptr = table_pointer(row_ptr, COL_MASTER_C, tl.float32)
    for offset in range(start, end, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        mask = index < end
        if HAS_MASTER:
            w = tl.load(master_ptr + index, mask=mask, other=0.0)
        else:
            w = tl.load(param_ptr + index, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + index, mask=mask, other=0.0).to(tl.float32)
        if HAS_GRAD_SCALE:
            g = g / grad_scale
        u = q * (g + decay * w)
        buf = momentum * tl.load(buf_ptr + index, mask=mask, other=0.0) + u
        if NESTEROV:
            direction = u + momentum * buf
        else:
            direction = buf
        w = w - lr * direction
        tl.store(buf_ptr + index, buf, mask=mask)
        if HAS_MASTER:
            tl.store(master_ptr + index, w, mask=mask)
        tl.store(param_ptr + index, to_param_dtype(w, PARAM_DTYPE), mask=mask)  # the one rounding
    tl.store(table_pointer(row_ptr, COL_STEP_C, tl.float32), t, mask=first & ~skip)
