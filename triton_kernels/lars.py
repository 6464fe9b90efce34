"""LARS and TVLARS in two launches per bucket, whatever the number of layers (three for sharded or very large
layers).

Pass 1 (``lars_norms_kernel``), one program per chunk: writes the chunk's float64 partial sums of ||w||^2 and
of ||d||^2 (``norm_of_sum``, d = g + beta' * w) or ||g||^2 (``sum_of_norms``) to ``partials``
(``[2, num_chunks]``), and the layer's first-chunk program writes the new step count t = step + 1 to
``new_steps[layer]``. Layers without a trust ratio (``FLAG_NO_ADAPT``, or every layer when the group does not
adapt) sum nothing. It changes no state.

Pass 2 (``lars_update_kernel``), one program per chunk: re-reduces its own layer's partials in a fixed order
(every program of the layer gets the same norms; no atomics) unless ``LAYER_SUMS`` (below), reads t from
``new_steps`` (never from the state step, which the layer's first-chunk program overwrites with t in this very
pass), forms phi(t) in float32 and the trust ratio q in float64 from the float64 sums (bounded, then LARC's clip
q / lr), rounds q to float32 once, and updates momentum, master weight and parameter of its chunk in float32;
at a layer's first step (t == 1) the momentum buffer is set to u whatever it held (``torch.optim.SGD``).

``LAYER_SUMS``: ``layer_sums_kernel`` (common) has reduced each layer's partials into ``[num_layers, 2]``
between the passes, and pass 2 reads the whole-layer sums from it instead of reducing partials: for sharded
layers (pass 1 sums the local shards, the host all-reduces the sums over the ranks), and for layers so large
that every program re-reading their partials would cost more than the launch (``_triton_backend``).

bfloat16 state (``STATE_DTYPE``): pass 2 stores the new buffer rounded (stochastically with stream 0 of the layer,
t and the element's index in the whole layer, or to nearest) and steps with the stored value, as the reference
does. ``KAHAN``: both passes read the weight as parameter + compensation, and pass 2 stores the new weight split in
two (common.store_weight).

``found_inf`` non-zero empties every loop and masks every store of pass 2: nothing persistent changes.
"""

import triton
import triton.language as tl

from .common import (COL_COMP_C, COL_GRAD_C, COL_MASTER_C, COL_PARAM_C, COL_STATE0_C, COL_STEP_C, bounded,
                     chunk_span, element_offset, full_tiles_end, is_adapted, is_aligned, layer_decay, load,
                     load_weight, phi, rounded_state, rounding_base, square64, store_weight, table_pointer,
                     whole_layer_sums, widen)


@triton.jit
def lars_norms_tile(param_ptr, master_ptr, comp_ptr, grad_ptr, index, mask, inv_grad_scale, weight_decay, w_sq,
                    other_sq, HAS_MASTER: tl.constexpr, KAHAN: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                    SUM_OF_NORMS: tl.constexpr):
    w = load_weight(param_ptr, master_ptr, comp_ptr, index, mask, HAS_MASTER, KAHAN)
    g = load(grad_ptr + index, mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g * inv_grad_scale
    w_sq += square64(w, mask)
    if SUM_OF_NORMS:
        other_sq += square64(g, mask)
    else:
        other_sq += square64(g + weight_decay * w, mask)
    return w_sq, other_sq


@triton.jit
def lars_norms_chunk(row_ptr, start, end, inv_grad_scale, weight_decay, PARAM_DTYPE: tl.constexpr,
                     HAS_MASTER: tl.constexpr, KAHAN: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                     SUM_OF_NORMS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """The chunk's float64 sums of w^2 and d^2 (or g^2), with 16-byte aligned pointers when ALIGNED."""
    grad_ptr = table_pointer(row_ptr, COL_GRAD_C, PARAM_DTYPE, ALIGNED)
    param_ptr = table_pointer(row_ptr, COL_PARAM_C, PARAM_DTYPE, ALIGNED)
    master_ptr = table_pointer(row_ptr, COL_MASTER_C, tl.float32, ALIGNED)  # 0 (never read) without masters
    comp_ptr = table_pointer(row_ptr, COL_COMP_C, tl.bfloat16, ALIGNED)  # 0 (never read) without KAHAN
    w_sq = tl.zeros([BLOCK], dtype=tl.float64)
    other_sq = tl.zeros([BLOCK], dtype=tl.float64)
    tail = full_tiles_end(start, end, BLOCK)
    for offset in range(start, tail, BLOCK):
        w_sq, other_sq = lars_norms_tile(param_ptr, master_ptr, comp_ptr, grad_ptr, offset + tl.arange(0, BLOCK), None,
                                         inv_grad_scale, weight_decay, w_sq, other_sq, HAS_MASTER, KAHAN,
                                         HAS_GRAD_SCALE, SUM_OF_NORMS)
    if tail < end:
        index = tail + tl.arange(0, BLOCK)
        w_sq, other_sq = lars_norms_tile(param_ptr, master_ptr, comp_ptr, grad_ptr, index, index < end,
                                         inv_grad_scale, weight_decay, w_sq, other_sq, HAS_MASTER, KAHAN,
                                         HAS_GRAD_SCALE, SUM_OF_NORMS)
    return tl.sum(w_sq, axis=0), tl.sum(other_sq, axis=0)


@triton.jit(do_not_specialize=["num_chunks"])
def lars_norms_kernel(layers_ptr, chunk_layer_ptr, partials_ptr, new_steps_ptr, grad_scale_ptr, num_chunks,
                      chunk_size, weight_decay, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                      KAHAN: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, SUM_OF_NORMS: tl.constexpr,
                      ADAPT: tl.constexpr, ALL_ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    row_ptr, layer, start, end, first = chunk_span(layers_ptr, chunk_layer_ptr, chunk_size, BLOCK)
    step_ptr = table_pointer(row_ptr, COL_STEP_C, tl.float32, False)
    tl.store(new_steps_ptr + layer, tl.load(step_ptr) + 1.0, mask=first)

    # Layers without a trust ratio use no norm: skip their elements. A layer without weight decay that is adapted
    # still needs its sums, of d = g + 0 * w.
    end = tl.where(is_adapted(row_ptr, ADAPT), end, start)
    decay = layer_decay(row_ptr, weight_decay)
    inv_grad_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_grad_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))  # once per program, not per element
    if ALL_ALIGNED:
        w_sq, other_sq = lars_norms_chunk(row_ptr, start, end, inv_grad_scale, decay, PARAM_DTYPE, HAS_MASTER,
                                          KAHAN, HAS_GRAD_SCALE, SUM_OF_NORMS, True, BLOCK)
    elif is_aligned(row_ptr):
        w_sq, other_sq = lars_norms_chunk(row_ptr, start, end, inv_grad_scale, decay, PARAM_DTYPE, HAS_MASTER,
                                          KAHAN, HAS_GRAD_SCALE, SUM_OF_NORMS, True, BLOCK)
    else:
        w_sq, other_sq = lars_norms_chunk(row_ptr, start, end, inv_grad_scale, decay, PARAM_DTYPE, HAS_MASTER,
                                          KAHAN, HAS_GRAD_SCALE, SUM_OF_NORMS, False, BLOCK)
    chunk = tl.program_id(0)
    tl.store(partials_ptr + chunk, w_sq)
    tl.store(partials_ptr + num_chunks + chunk, other_sq)


@triton.jit
def lars_update_tile(param_ptr, grad_ptr, buf_ptr, master_ptr, comp_ptr, index, mask, q, decay, momentum,
                     one_minus_dampening, first_step, lr, inv_grad_scale, base, first_element,
                     PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, KAHAN: tl.constexpr,
                     STATE_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                     NESTEROV: tl.constexpr):
    w = load_weight(param_ptr, master_ptr, comp_ptr, index, mask, HAS_MASTER, KAHAN)
    g = load(grad_ptr + index, mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g * inv_grad_scale
    u = q * (g + decay * w)
    # The first step stores u undamped, whatever the buffer held (torch.optim.SGD); a select, not 0 * buf.
    buf = tl.where(first_step, u, momentum * widen(load(buf_ptr + index, mask)) + one_minus_dampening * u)
    # The step continues with the buffer as stored (rounded when it is bfloat16).
    stored, buf = rounded_state(buf, base, first_element + index, STATE_DTYPE, STOCHASTIC)
    tl.store(buf_ptr + index, stored, mask=mask)
    if NESTEROV:
        direction = u + momentum * buf
    else:
        direction = buf
    store_weight(param_ptr, master_ptr, comp_ptr, index, mask, w - lr * direction, PARAM_DTYPE, HAS_MASTER, KAHAN)


@triton.jit
def lars_update_chunk(row_ptr, start, end, q, decay, momentum, one_minus_dampening, first_step, lr, inv_grad_scale,
                      base, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, KAHAN: tl.constexpr,
                      STATE_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                      NESTEROV: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Updates the chunk's momentum, master and parameter (and compensation), with 16-byte aligned pointers when
    ALIGNED."""
    param_ptr = table_pointer(row_ptr, COL_PARAM_C, PARAM_DTYPE, ALIGNED)
    grad_ptr = table_pointer(row_ptr, COL_GRAD_C, PARAM_DTYPE, ALIGNED)
    buf_ptr = table_pointer(row_ptr, COL_STATE0_C, STATE_DTYPE, ALIGNED)
    master_ptr = table_pointer(row_ptr, COL_MASTER_C, tl.float32, ALIGNED)  # 0 (never read) without masters
    comp_ptr = table_pointer(row_ptr, COL_COMP_C, tl.bfloat16, ALIGNED)  # 0 (never read) without KAHAN
    first_element = element_offset(row_ptr, STOCHASTIC)
    tail = full_tiles_end(start, end, BLOCK)
    for offset in range(start, tail, BLOCK):
        lars_update_tile(param_ptr, grad_ptr, buf_ptr, master_ptr, comp_ptr, offset + tl.arange(0, BLOCK), None, q,
                         decay, momentum, one_minus_dampening, first_step, lr, inv_grad_scale, base, first_element,
                         PARAM_DTYPE, HAS_MASTER, KAHAN, STATE_DTYPE, STOCHASTIC, HAS_GRAD_SCALE, NESTEROV)
    if tail < end:
        index = tail + tl.arange(0, BLOCK)
        lars_update_tile(param_ptr, grad_ptr, buf_ptr, master_ptr, comp_ptr, index, index < end, q, decay, momentum,
                         one_minus_dampening, first_step, lr, inv_grad_scale, base, first_element, PARAM_DTYPE,
                         HAS_MASTER, KAHAN, STATE_DTYPE, STOCHASTIC, HAS_GRAD_SCALE, NESTEROV)


@triton.jit(do_not_specialize=["num_chunks", "seed"])
def lars_update_kernel(layers_ptr, chunk_layer_ptr, sums_ptr, new_steps_ptr, grad_scale_ptr, found_inf_ptr,
                       lr_ptr, num_chunks, chunk_size, seed, lr, momentum, weight_decay, eta, eps, norm_clip, lmbda,
                       alpha, delay, gamma_min, min_trust_ratio, max_trust_ratio, one_minus_dampening,
                       PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, KAHAN: tl.constexpr,
                       STATE_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                       LR_ON_DEVICE: tl.constexpr, SUM_OF_NORMS: tl.constexpr, NESTEROV: tl.constexpr,
                       USE_PHI: tl.constexpr, ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr,
                       ALL_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
                       LAYER_SUMS: tl.constexpr):
    row_ptr, layer, start, end, first = chunk_span(layers_ptr, chunk_layer_ptr, chunk_size, BLOCK)
    skip = tl.load(found_inf_ptr) != 0
    end = tl.where(skip, start, end)
    t = tl.load(new_steps_ptr + layer)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)

    # The trust ratio in float64 (hyper-parameters arrive as float32 scalars), rounded once to float32.
    adapted = is_adapted(row_ptr, ADAPT)
    decay = layer_decay(row_ptr, weight_decay)  # beta'
    w_sq, other_sq = whole_layer_sums(sums_ptr, num_chunks, row_ptr, layer, RBLOCK, LAYER_SUMS)
    w_norm = tl.minimum(tl.sqrt(w_sq), norm_clip)
    other_norm = tl.minimum(tl.sqrt(other_sq), norm_clip)
    if SUM_OF_NORMS:
        d_norm = other_norm + decay * w_norm
    else:
        d_norm = other_norm
    factor = eta
    if USE_PHI:
        factor = eta * phi(t, lmbda, alpha, delay, gamma_min).to(tl.float64)
    # Zero (or NaN) norms take q = 1, unbounded: ||w|| or ||d|| (norm_of_sum), ||w|| or ||g|| (sum_of_norms, as
    # timm). The ratio's denominator is kept away from 0 / 0 on that branch. Layers without adaptation get q = 1
    # and no clip; without decay, u = q * (g + 0 * w).
    computed = adapted & (w_norm > 0) & (other_norm > 0)
    ratio = bounded(factor * w_norm / tl.where(computed, d_norm + eps, 1.0), min_trust_ratio, max_trust_ratio)
    q = tl.where(computed, ratio, 1.0)
    if TRUST_CLIP:
        # LARC: the layer's rate q * lr never above lr, the zero-norm q = 1 included; q = 1 when lr == 0.
        lr64 = tl.cast(lr, tl.float64)  # a Python float under the interpreter
        clipped = q >= lr64
        q = tl.where(adapted, tl.where(clipped, 1.0, q / tl.where(clipped, 1.0, lr64)), q)
    q = q.to(tl.float32)
    first_step = t == 1.0
    inv_grad_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_grad_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))
    base = rounding_base(seed, row_ptr, t, 0, STOCHASTIC)  # the momentum buffer is stream 0

    if ALL_ALIGNED:
        lars_update_chunk(row_ptr, start, end, q, decay, momentum, one_minus_dampening, first_step, lr,
                          inv_grad_scale, base, PARAM_DTYPE, HAS_MASTER, KAHAN, STATE_DTYPE, STOCHASTIC,
                          HAS_GRAD_SCALE, NESTEROV, True, BLOCK)
    elif is_aligned(row_ptr):
        lars_update_chunk(row_ptr, start, end, q, decay, momentum, one_minus_dampening, first_step, lr,
                          inv_grad_scale, base, PARAM_DTYPE, HAS_MASTER, KAHAN, STATE_DTYPE, STOCHASTIC,
                          HAS_GRAD_SCALE, NESTEROV, True, BLOCK)
    else:
        lars_update_chunk(row_ptr, start, end, q, decay, momentum, one_minus_dampening, first_step, lr,
                          inv_grad_scale, base, PARAM_DTYPE, HAS_MASTER, KAHAN, STATE_DTYPE, STOCHASTIC,
                          HAS_GRAD_SCALE, NESTEROV, False, BLOCK)
    tl.store(table_pointer(row_ptr, COL_STEP_C, tl.float32, False), t, mask=first & ~skip)
