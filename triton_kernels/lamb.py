"""LAMB in two launches per bucket, whatever the number of layers (three for sharded or very large layers).

The trust ratio needs ||u|| over the whole layer, and u needs the layer's new moments, so the work is split:

Pass 1 (``lamb_moments_kernel``), one program per chunk: reads the state step and uses t = step + 1 (no
program writes the state step in this pass; the layer's first-chunk program records t in ``new_steps``).
It computes the new m and v of its own chunk's elements and stores them (no other program reads them in
this pass, and pass 2 always follows on the same stream), forms u from them, and writes the chunk's float64
partial sums of ||w||^2 and ||u||^2 to ``partials`` (``[2, num_chunks]``). Weights and gradients are not
written.

Pass 2 (``lamb_update_kernel``), one program per chunk: re-reduces its own layer's partials in a fixed order
(deterministic, no atomics) unless ``LAYER_SUMS`` (below), reads t from ``new_steps``, recomputes u from the
stored new moments with the same code as pass 1, and applies w -= lr * q * u, with q = ||w|| / ||u|| formed in
float64 (bounded) and rounded once to float32; the layer's first-chunk program stores t in the state step.

``DECOUPLED_DECAY`` (timm's ``Lamb(decoupled_decay=True)``): u has no beta' * w, pass 2 applies
w = (1 - lr * beta') * w - lr * q * u, and the ratio's ||w|| is that of the decayed weight,
|1 - lr * beta'| * ||w||, formed in float64 from pass 1's sums of the weight as read (lr is known in pass 2 only).

``LAYER_SUMS``: ``layer_sums_kernel`` (common) has reduced each layer's partials into ``[num_layers, 2]``
between the passes, and pass 2 reads the whole-layer sums from it instead of reducing partials: for sharded
layers (pass 1 works on the local shards, the host all-reduces the sums over the ranks), and for layers so
large that every program re-reading their partials would cost more than the launch (``_triton_backend``).

bfloat16 state (``STATE_DTYPE``): pass 1 stores the new moments rounded (stochastically with streams 0 and 1 of the
layer, t and the element's index in the whole layer, or to nearest) and forms u, and so ||u||, from the stored
values, which pass 2 reads back: u's norm and the update come from the same stored moments, as in the reference.
``KAHAN``: both passes read the weight as parameter + compensation, and pass 2 stores the new weight split in two
(common.store_weight).

``found_inf`` non-zero empties every loop and masks every persistent store of both passes.
"""

import triton
import triton.language as tl

from .common import (COL_COMP_C, COL_GRAD_C, COL_MASTER_C, COL_PARAM_C, COL_STATE0_C, COL_STATE1_C, COL_STEP_C,
                     bounded, chunk_span, element_offset, full_tiles_end, is_adapted, is_aligned, layer_decay, load,
                     load_weight, one_minus_pow, rounded_state, rounding_base, square64, store_weight, table_pointer,
                     whole_layer_sums, widen)


@triton.jit
def inverse_bias_corrections(t, log_beta1, log_beta2, BIAS_CORRECTION: tl.constexpr):
    """1 / (1 - beta1**t) and 1 / (1 - beta2**t), once per program rather than a division per element."""
    if BIAS_CORRECTION:
        return tl.div_rn(1.0, one_minus_pow(log_beta1, t)), tl.div_rn(1.0, one_minus_pow(log_beta2, t))
    else:
        return 1.0, 1.0


@triton.jit
def lamb_update_direction(m, v, w, inv_correction1, inv_correction2, eps, decay, DECOUPLED_DECAY: tl.constexpr):
    """u = m_hat / (sqrt(v_hat) + eps) + decay * w (no decay term when DECOUPLED_DECAY), shared by both passes so
    they compute the same u. The square root and the division are correctly rounded: the default square root
    flushes v_hat below 2**-126 to 0 on a GPU, and ``/`` is the approximate ``div.full.f32``."""
    u = tl.div_rn(m * inv_correction1, tl.sqrt_rn(v * inv_correction2) + eps)
    if not DECOUPLED_DECAY:
        u = u + decay * w
    return u


@triton.jit
def lamb_moments_tile(grad_ptr, m_ptr, v_ptr, param_ptr, master_ptr, comp_ptr, index, mask, inv_grad_scale,
                      clip_coef, beta1, beta2, first_moment_factor, one_minus_beta2, inv_correction1, inv_correction2,
                      eps, decay, base1, base2, first_element, w_sq, u_sq, HAS_MASTER: tl.constexpr,
                      KAHAN: tl.constexpr, STATE_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
                      HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP_COEF: tl.constexpr, DECOUPLED_DECAY: tl.constexpr):
    g = load(grad_ptr + index, mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g * inv_grad_scale
    if HAS_CLIP_COEF:
        g = g * clip_coef
    m = beta1 * widen(load(m_ptr + index, mask)) + first_moment_factor * g
    v = beta2 * widen(load(v_ptr + index, mask)) + one_minus_beta2 * g * g
    # u (and so ||u||) is formed from the moments as stored, which pass 2 reads back.
    stored_m, m = rounded_state(m, base1, first_element + index, STATE_DTYPE, STOCHASTIC)
    stored_v, v = rounded_state(v, base2, first_element + index, STATE_DTYPE, STOCHASTIC)
    tl.store(m_ptr + index, stored_m, mask=mask)
    tl.store(v_ptr + index, stored_v, mask=mask)
    w = load_weight(param_ptr, master_ptr, comp_ptr, index, mask, HAS_MASTER, KAHAN)
    u = lamb_update_direction(m, v, w, inv_correction1, inv_correction2, eps, decay, DECOUPLED_DECAY)
    return w_sq + square64(w, mask), u_sq + square64(u, mask)


@triton.jit
def lamb_moments_chunk(row_ptr, start, end, inv_grad_scale, clip_coef, beta1, beta2, first_moment_factor,
                       one_minus_beta2, inv_correction1, inv_correction2, eps, decay, base1, base2,
                       PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, KAHAN: tl.constexpr,
                       STATE_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                       HAS_CLIP_COEF: tl.constexpr, DECOUPLED_DECAY: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Stores the chunk's new moments and returns its float64 sums of w^2 and u^2, with 16-byte aligned
    pointers when ALIGNED."""
    grad_ptr = table_pointer(row_ptr, COL_GRAD_C, PARAM_DTYPE, ALIGNED)
    m_ptr = table_pointer(row_ptr, COL_STATE0_C, STATE_DTYPE, ALIGNED)
    v_ptr = table_pointer(row_ptr, COL_STATE1_C, STATE_DTYPE, ALIGNED)
    param_ptr = table_pointer(row_ptr, COL_PARAM_C, PARAM_DTYPE, ALIGNED)
    master_ptr = table_pointer(row_ptr, COL_MASTER_C, tl.float32, ALIGNED)  # 0 (never read) without masters
    comp_ptr = table_pointer(row_ptr, COL_COMP_C, tl.bfloat16, ALIGNED)  # 0 (never read) without KAHAN
    first_element = element_offset(row_ptr, STOCHASTIC)
    w_sq = tl.zeros([BLOCK], dtype=tl.float64)
    u_sq = tl.zeros([BLOCK], dtype=tl.float64)
    tail = full_tiles_end(start, end, BLOCK)
    for offset in range(start, tail, BLOCK):
        w_sq, u_sq = lamb_moments_tile(grad_ptr, m_ptr, v_ptr, param_ptr, master_ptr, comp_ptr,
                                       offset + tl.arange(0, BLOCK), None, inv_grad_scale, clip_coef, beta1, beta2,
                                       first_moment_factor, one_minus_beta2, inv_correction1, inv_correction2, eps,
                                       decay, base1, base2, first_element, w_sq, u_sq, HAS_MASTER, KAHAN,
                                       STATE_DTYPE, STOCHASTIC, HAS_GRAD_SCALE, HAS_CLIP_COEF, DECOUPLED_DECAY)
    if tail < end:
        index = tail + tl.arange(0, BLOCK)
        w_sq, u_sq = lamb_moments_tile(grad_ptr, m_ptr, v_ptr, param_ptr, master_ptr, comp_ptr, index,
                                       index < end, inv_grad_scale, clip_coef, beta1, beta2, first_moment_factor,
                                       one_minus_beta2, inv_correction1, inv_correction2, eps, decay, base1, base2,
                                       first_element, w_sq, u_sq, HAS_MASTER, KAHAN, STATE_DTYPE, STOCHASTIC,
                                       HAS_GRAD_SCALE, HAS_CLIP_COEF, DECOUPLED_DECAY)
    return tl.sum(w_sq, axis=0), tl.sum(u_sq, axis=0)


@triton.jit(do_not_specialize=["num_chunks", "seed"])
def lamb_moments_kernel(layers_ptr, chunk_layer_ptr, partials_ptr, new_steps_ptr, grad_scale_ptr, found_inf_ptr,
                        clip_coef_ptr, num_chunks, chunk_size, seed, beta1, beta2, first_moment_factor,
                        one_minus_beta2, log_beta1, log_beta2, eps, weight_decay,
                        PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, KAHAN: tl.constexpr,
                        STATE_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                        HAS_CLIP_COEF: tl.constexpr, BIAS_CORRECTION: tl.constexpr, DECOUPLED_DECAY: tl.constexpr,
                        ALL_ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # 1 - beta (and first_moment_factor, 1 - beta1 or 1 without grad averaging) come from float64 on the host: in
    # float32, 1 - 0.999 is off by 1e-5 relative.
    row_ptr, layer, start, end, first = chunk_span(layers_ptr, chunk_layer_ptr, chunk_size, BLOCK)
    skip = tl.load(found_inf_ptr) != 0
    end = tl.where(skip, start, end)
    t = tl.load(table_pointer(row_ptr, COL_STEP_C, tl.float32, False)) + 1.0
    tl.store(new_steps_ptr + layer, t, mask=first)
    inv_correction1, inv_correction2 = inverse_bias_corrections(t, log_beta1, log_beta2, BIAS_CORRECTION)
    decay = layer_decay(row_ptr, weight_decay)
    inv_grad_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_grad_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr))
    clip_coef = 1.0
    if HAS_CLIP_COEF:
        clip_coef = tl.load(clip_coef_ptr)
    base1 = rounding_base(seed, row_ptr, t, 0, STOCHASTIC)  # exp_avg is stream 0, exp_avg_sq stream 1
    base2 = rounding_base(seed, row_ptr, t, 1, STOCHASTIC)

    if ALL_ALIGNED:
        w_sq, u_sq = lamb_moments_chunk(row_ptr, start, end, inv_grad_scale, clip_coef, beta1, beta2,
                                        first_moment_factor, one_minus_beta2, inv_correction1, inv_correction2, eps,
                                        decay, base1, base2, PARAM_DTYPE, HAS_MASTER, KAHAN, STATE_DTYPE,
                                        STOCHASTIC, HAS_GRAD_SCALE, HAS_CLIP_COEF, DECOUPLED_DECAY, True, BLOCK)
    elif is_aligned(row_ptr):
        w_sq, u_sq = lamb_moments_chunk(row_ptr, start, end, inv_grad_scale, clip_coef, beta1, beta2,
                                        first_moment_factor, one_minus_beta2, inv_correction1, inv_correction2, eps,
                                        decay, base1, base2, PARAM_DTYPE, HAS_MASTER, KAHAN, STATE_DTYPE,
                                        STOCHASTIC, HAS_GRAD_SCALE, HAS_CLIP_COEF, DECOUPLED_DECAY, True, BLOCK)
    else:
        w_sq, u_sq = lamb_moments_chunk(row_ptr, start, end, inv_grad_scale, clip_coef, beta1, beta2,
                                        first_moment_factor, one_minus_beta2, inv_correction1, inv_correction2, eps,
                                        decay, base1, base2, PARAM_DTYPE, HAS_MASTER, KAHAN, STATE_DTYPE,
                                        STOCHASTIC, HAS_GRAD_SCALE, HAS_CLIP_COEF, DECOUPLED_DECAY, False, BLOCK)
    chunk = tl.program_id(0)
    tl.store(partials_ptr + chunk, w_sq)
    tl.store(partials_ptr + num_chunks + chunk, u_sq)


@triton.jit
def lamb_update_tile(param_ptr, m_ptr, v_ptr, master_ptr, comp_ptr, index, mask, scale, shrink, inv_correction1,
                     inv_correction2, eps, decay, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                     KAHAN: tl.constexpr, DECOUPLED_DECAY: tl.constexpr):
    w = load_weight(param_ptr, master_ptr, comp_ptr, index, mask, HAS_MASTER, KAHAN)
    m = widen(load(m_ptr + index, mask))
    v = widen(load(v_ptr + index, mask))
    u = lamb_update_direction(m, v, w, inv_correction1, inv_correction2, eps, decay, DECOUPLED_DECAY)
    if DECOUPLED_DECAY:
        w = shrink * w  # (1 - lr * beta') * w first, as timm
    store_weight(param_ptr, master_ptr, comp_ptr, index, mask, w - scale * u, PARAM_DTYPE, HAS_MASTER, KAHAN)


@triton.jit
def lamb_update_chunk(row_ptr, start, end, scale, shrink, inv_correction1, inv_correction2, eps, decay,
                      PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, KAHAN: tl.constexpr,
                      STATE_DTYPE: tl.constexpr, DECOUPLED_DECAY: tl.constexpr, ALIGNED: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Applies the step to the chunk's master and parameter (and compensation), with 16-byte aligned pointers
    when ALIGNED."""
    param_ptr = table_pointer(row_ptr, COL_PARAM_C, PARAM_DTYPE, ALIGNED)
    m_ptr = table_pointer(row_ptr, COL_STATE0_C, STATE_DTYPE, ALIGNED)
    v_ptr = table_pointer(row_ptr, COL_STATE1_C, STATE_DTYPE, ALIGNED)
    master_ptr = table_pointer(row_ptr, COL_MASTER_C, tl.float32, ALIGNED)  # 0 (never read) without masters
    comp_ptr = table_pointer(row_ptr, COL_COMP_C, tl.bfloat16, ALIGNED)  # 0 (never read) without KAHAN
    tail = full_tiles_end(start, end, BLOCK)
    for offset in range(start, tail, BLOCK):
        lamb_update_tile(param_ptr, m_ptr, v_ptr, master_ptr, comp_ptr, offset + tl.arange(0, BLOCK), None, scale,
                         shrink, inv_correction1, inv_correction2, eps, decay, PARAM_DTYPE, HAS_MASTER, KAHAN,
                         DECOUPLED_DECAY)
    if tail < end:
        index = tail + tl.arange(0, BLOCK)
        lamb_update_tile(param_ptr, m_ptr, v_ptr, master_ptr, comp_ptr, index, index < end, scale, shrink,
                         inv_correction1, inv_correction2, eps, decay, PARAM_DTYPE, HAS_MASTER, KAHAN,
                         DECOUPLED_DECAY)


@triton.jit(do_not_specialize=["num_chunks"])
def lamb_update_kernel(layers_ptr, chunk_layer_ptr, sums_ptr, new_steps_ptr, found_inf_ptr, lr_ptr,
                       num_chunks, chunk_size, lr, log_beta1, log_beta2, eps, weight_decay, norm_clip,
                       min_trust_ratio, max_trust_ratio, PARAM_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                       KAHAN: tl.constexpr, STATE_DTYPE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, BIAS_CORRECTION: tl.constexpr, DECOUPLED_DECAY: tl.constexpr,
                       ADAPT: tl.constexpr, ALL_ALIGNED: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
                       LAYER_SUMS: tl.constexpr):
    row_ptr, layer, start, end, first = chunk_span(layers_ptr, chunk_layer_ptr, chunk_size, BLOCK)
    skip = tl.load(found_inf_ptr) != 0
    end = tl.where(skip, start, end)
    t = tl.load(new_steps_ptr + layer)
    inv_correction1, inv_correction2 = inverse_bias_corrections(t, log_beta1, log_beta2, BIAS_CORRECTION)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)

    # q = ||w|| / ||u|| in float64 from the float64 sums, bounded, rounded once to float32.
    adapted = is_adapted(row_ptr, ADAPT)
    decay = layer_decay(row_ptr, weight_decay)  # beta'
    w_sq, u_sq = whole_layer_sums(sums_ptr, num_chunks, row_ptr, layer, RBLOCK, LAYER_SUMS)
    w_norm = tl.sqrt(w_sq)
    shrink = 1.0
    if DECOUPLED_DECAY:
        # The norm of the decayed weight (1 - lr * beta') * w, from the sums of w.
        shrink64 = 1.0 - tl.cast(lr, tl.float64) * decay.to(tl.float64)
        w_norm = tl.abs(shrink64) * w_norm
        shrink = shrink64.to(tl.float32)
    w_norm = tl.minimum(w_norm, norm_clip)
    u_norm = tl.sqrt(u_sq)
    computed = adapted & (w_norm > 0) & (u_norm > 0)
    # no 0 / 0 when q = 1; a zero-norm q = 1 is not bounded
    ratio = bounded(w_norm / tl.where(computed, u_norm, 1.0), min_trust_ratio, max_trust_ratio)
    q = tl.where(computed, ratio, 1.0).to(tl.float32)
    scale = lr * q

    if ALL_ALIGNED:
        lamb_update_chunk(row_ptr, start, end, scale, shrink, inv_correction1, inv_correction2, eps, decay,
                          PARAM_DTYPE, HAS_MASTER, KAHAN, STATE_DTYPE, DECOUPLED_DECAY, True, BLOCK)
    elif is_aligned(row_ptr):
        lamb_update_chunk(row_ptr, start, end, scale, shrink, inv_correction1, inv_correction2, eps, decay,
                          PARAM_DTYPE, HAS_MASTER, KAHAN, STATE_DTYPE, DECOUPLED_DECAY, True, BLOCK)
    else:
        lamb_update_chunk(row_ptr, start, end, scale, shrink, inv_correction1, inv_correction2, eps, decay,
                          PARAM_DTYPE, HAS_MASTER, KAHAN, STATE_DTYPE, DECOUPLED_DECAY, False, BLOCK)
    tl.store(table_pointer(row_ptr, COL_STEP_C, tl.float32, False), t, mask=first & ~skip)
