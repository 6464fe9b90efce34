"""Device helpers shared by the LARS-family and LAMB kernels: reading the layer table, the element tiles,
float64 sums of squares reduced per layer in a fixed order, phi and the bias correction in float32; and
``layer_sums_kernel``, the launch between the two passes that sharded and very large layers take.

Every kernel runs one program per chunk of the layer table (``tvlars_fused/_layer_table.py``); a program
finds its layer through ``chunk_layer`` and walks the elements ``[start, end)`` of its chunk with 64-bit
offsets: unmasked full tiles of ``BLOCK``, then one masked tail tile. The chunk size is a runtime argument
and ``num_chunks`` is not specialized on (Triton would compile variants for 1 and for multiples of 16), so a
new model compiles nothing new; the host keeps the chunk size a multiple of BLOCK, so every tile starts
BLOCK-aligned.
Alignment is decided per layer, as the CUDA kernel does: a layer whose tensors are all 16-byte aligned
(``FLAG_ALIGNED16`` in its row) walks its chunk with pointers that carry that hint, so the full tiles compile to
16-byte vector loads and stores; any other layer takes the same code without the hint (scalar accesses,
correct at any alignment). ``ALL_ALIGNED`` (every layer of the table aligned, the usual case) compiles the
vector path alone, without the per-layer branch.

Arithmetic that feeds the update is correctly rounded, as in the CUDA kernel (csrc/optimizer_math.h): float32
divisions are ``tl.div_rn`` (``/`` compiles to the approximate ``div.full.f32``), exponentials go through
float64 (``exp_rn``), square roots are ``sqrt_rn`` or float64.

Squares are summed in float64: a float32 square overflows for |x| > 1.8e19 and is flushed to zero below
1e-19 on a GPU (whose float32 sqrt also flushes sums below 2**-126); float64 sqrt rounds correctly.

bfloat16 state and Kahan-compensated bfloat16 weights (docs/algorithms.md, section 9): the state's dtype
(``STATE_DTYPE``), its rounding (``STOCHASTIC``) and the compensation (``KAHAN``) are compile-time flags, the seed
a runtime scalar. The stochastic rounding's random bits are the counter-based hash of the contract, in uint32
arithmetic (``mix32``, ``rounding_key``, ``rounding_base``, ``rounding_bits``: the functions of
``csrc/optimizer_math.h`` and ``tvlars_fused/_rounding.py``); a bfloat16 store returns the value stored, which
the step continues with. Every float32 -> bfloat16 rounding is done on the bits (``to_param_dtype`` says why).
"""

import triton
import triton.language as tl

from .._layer_table import (COL_COMP, COL_ELEMENT_OFFSET, COL_FIRST_CHUNK, COL_FLAGS, COL_GRAD, COL_LAYER_ID,
                            COL_MASTER, COL_NUM_CHUNKS, COL_NUMEL, COL_PARAM, COL_STATE0, COL_STATE1, COL_STEP,
                            FLAG_ALIGNED16, FLAG_NO_ADAPT, FLAG_NO_DECAY, NUM_COLS)

# Globals a @triton.jit function reads must be constexpr.
NUM_COLS_C = tl.constexpr(NUM_COLS)
COL_PARAM_C = tl.constexpr(COL_PARAM)
COL_GRAD_C = tl.constexpr(COL_GRAD)
COL_STATE0_C = tl.constexpr(COL_STATE0)
COL_STATE1_C = tl.constexpr(COL_STATE1)
COL_MASTER_C = tl.constexpr(COL_MASTER)
COL_STEP_C = tl.constexpr(COL_STEP)
COL_NUMEL_C = tl.constexpr(COL_NUMEL)
COL_FIRST_CHUNK_C = tl.constexpr(COL_FIRST_CHUNK)
COL_NUM_CHUNKS_C = tl.constexpr(COL_NUM_CHUNKS)
COL_FLAGS_C = tl.constexpr(COL_FLAGS)
COL_COMP_C = tl.constexpr(COL_COMP)
COL_LAYER_ID_C = tl.constexpr(COL_LAYER_ID)
COL_ELEMENT_OFFSET_C = tl.constexpr(COL_ELEMENT_OFFSET)
FLAG_NO_DECAY_C = tl.constexpr(FLAG_NO_DECAY)
FLAG_NO_ADAPT_C = tl.constexpr(FLAG_NO_ADAPT)
FLAG_ALIGNED16_C = tl.constexpr(FLAG_ALIGNED16)

# expm1(x) by its Taylor series to x**EXPM1_SERIES_DEGREE for |x| below the limit (truncation under 4e-9
# relative), exp(x) - 1 above it, where |exp(x) - 1| >= 0.63 keeps the cancellation within a few float32 ulps.
EXPM1_SERIES_LIMIT = tl.constexpr(1.0)
EXPM1_SERIES_DEGREE = tl.constexpr(11)

# The hash's constants (tvlars_fused/_rounding.py): lowbias32's multipliers and the golden ratio's, for an index's
# high word; bfloat16's quiet NaN, as torch and csrc/optimizer_math.h store a NaN.
MIX1_C = tl.constexpr(0x7FEB352D)
MIX2_C = tl.constexpr(0x846CA68B)
GOLDEN32_C = tl.constexpr(0x9E3779B9)
BF16_NAN_C = tl.constexpr(0x7FC0)


@triton.jit
def table_pointer(row_ptr, col: tl.constexpr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor address stored in column ``col`` of a layer's row, as a pointer to ``dtype``; ALIGNED tells
    the compiler it is 16-byte aligned (the hint must sit on the pointer: one on the integer is lost)."""
    ptr = tl.load(row_ptr + col).to(tl.pointer_type(dtype))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def chunk_span(layers_ptr, chunk_layer_ptr, chunk_size, BLOCK: tl.constexpr):
    """This program's chunk: (its layer's row pointer, layer index, first element, end element, whether it is
    the layer's first chunk). Offsets are int64, so layers beyond 2**31 elements work. ``start`` is a multiple
    of BLOCK (the host checks that ``chunk_size`` is), which the vector path needs to know."""
    chunk = tl.program_id(0)
    layer = tl.load(chunk_layer_ptr + chunk).to(tl.int64)
    row_ptr = layers_ptr + layer * NUM_COLS_C
    numel = tl.load(row_ptr + COL_NUMEL_C)
    first_chunk = tl.load(row_ptr + COL_FIRST_CHUNK_C)
    index_in_layer = chunk.to(tl.int64) - first_chunk
    start = tl.multiple_of(index_in_layer * chunk_size, BLOCK)
    end = tl.minimum(start + chunk_size, numel)
    return row_ptr, layer, start, end, index_in_layer == 0


@triton.jit
def full_tiles_end(start, end, BLOCK: tl.constexpr):
    """Where the chunk's full tiles [start, start + k * BLOCK) end and its masked tail tile begins."""
    return start + (end - start) // BLOCK * BLOCK


@triton.jit
def load(ptr, mask):
    """A tile's load: unmasked in a full tile (``mask`` None), zeros beyond the end in the tail tile."""
    if mask is None:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def square64(x, mask):
    """x * x in float64, zero beyond the end of a tail tile (where x may be NaN, as LAMB's 0 / 0)."""
    x = x.to(tl.float64)
    if mask is None:
        return x * x
    else:
        return tl.where(mask, x * x, 0.0)


@triton.jit
def layer_decay(row_ptr, weight_decay):
    """The layer's beta': the group's weight decay, or 0 when its row has FLAG_NO_DECAY."""
    return tl.where((tl.load(row_ptr + COL_FLAGS_C) & FLAG_NO_DECAY_C) != 0, 0.0, weight_decay)


@triton.jit
def is_adapted(row_ptr, ADAPT: tl.constexpr):
    """Whether the layer takes a trust ratio: its group adapts (ADAPT False: timm's groups without weight decay,
    every q = 1) and its row has no FLAG_NO_ADAPT."""
    adapted = (tl.load(row_ptr + COL_FLAGS_C) & FLAG_NO_ADAPT_C) == 0
    if not ADAPT:
        adapted = tl.zeros_like(adapted)
    return adapted


@triton.jit
def bounded(ratio, min_trust_ratio, max_trust_ratio):
    """A computed trust ratio clamped to [min_trust_ratio, max_trust_ratio] (the host passes -inf and inf for
    absent bounds), in the ratio's float64."""
    return tl.maximum(tl.minimum(ratio, max_trust_ratio), min_trust_ratio)


@triton.jit
def is_aligned(row_ptr):
    """Whether every tensor of the layer is 16-byte aligned (the host sets the flag per layer)."""
    return (tl.load(row_ptr + COL_FLAGS_C) & FLAG_ALIGNED16_C) != 0


@triton.jit(noinline=True)
def layer_sum(partials_ptr, row_ptr, RBLOCK: tl.constexpr):
    """The float64 sum of a layer's float64 per-chunk partials, always added in the same order (chunk by
    chunk in tiles of RBLOCK, then one tree reduction), so every program of the layer, ``layer_sums_kernel``
    and every run get the same bits. The tree follows the tile's layout, which the launch's num_warps and
    the surrounding code choose: not inlined, the function's layout is its own and not the vector layout of
    pass 2's element tiles, so pass 2 and ``layer_sums_kernel`` reduce alike."""
    first = tl.load(row_ptr + COL_FIRST_CHUNK_C)
    count = tl.load(row_ptr + COL_NUM_CHUNKS_C)
    acc = tl.zeros([RBLOCK], dtype=tl.float64)
    for offset in range(0, count, RBLOCK):
        index = offset + tl.arange(0, RBLOCK)
        acc += tl.load(partials_ptr + first + index, mask=index < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["num_chunks"])
def layer_sums_kernel(layers_ptr, partials_ptr, layer_sums_ptr, num_chunks, RBLOCK: tl.constexpr):
    """Between the passes, for sharded or very large layers: program i reduces layer i's partials
    (``[2, num_chunks]``) once with ``layer_sum``, the very sums pass 2 would form (launched with pass 2's
    num_warps), into ``layer_sums[i]`` (float64 ``[num_layers, 2]``), which the host sums over the ranks for
    sharded layers. Every layer owns at least one chunk, so an empty shard stores zeros."""
    layer = tl.program_id(0).to(tl.int64)
    row_ptr = layers_ptr + layer * NUM_COLS_C
    tl.store(layer_sums_ptr + 2 * layer, layer_sum(partials_ptr, row_ptr, RBLOCK))
    tl.store(layer_sums_ptr + 2 * layer + 1, layer_sum(partials_ptr + num_chunks, row_ptr, RBLOCK))


@triton.jit
def whole_layer_sums(sums_ptr, num_chunks, row_ptr, layer, RBLOCK: tl.constexpr, LAYER_SUMS: tl.constexpr):
    """Pass 2's two float64 sums of squares over the whole layer: read from ``sums_ptr`` as
    ``[num_layers, 2]`` all-reduced sums when LAYER_SUMS (sharded layers), else reduced here from it as
    ``[2, num_chunks]`` partials."""
    if LAYER_SUMS:
        return tl.load(sums_ptr + 2 * layer), tl.load(sums_ptr + 2 * layer + 1)
    else:
        return layer_sum(sums_ptr, row_ptr, RBLOCK), layer_sum(sums_ptr + num_chunks, row_ptr, RBLOCK)


@triton.jit
def exp_rn(x):
    """exp of a float32 x as a float32 rounded once from libdevice's float64 exp (so correctly rounded but for
    rare near-ties), where ``tl.exp`` is ``ex2.approx.f32`` of x * log2(e), whose product's rounding alone is
    worth up to about 64 ulps near the overflow. It overflows to inf exactly where float32 does. Called once per
    program, never per element, so the float64 costs nothing; the interpreter takes numpy's exp."""
    return tl.exp(x.to(tl.float64)).to(tl.float32)


@triton.jit
def phi(t, lmbda, alpha, delay, gamma_min):
    """TVLARS's 1 / (alpha + exp(lmbda * (t - delay))) + gamma_min in float32; an overflowing exp gives
    1 / inf = 0, so phi = gamma_min and never NaN."""
    return tl.div_rn(1.0, alpha + exp_rn(lmbda * (t - delay))) + gamma_min


@triton.jit
def one_minus_pow(log_beta, t):
    """1 - beta**t = -expm1(t * log(beta)) in float32 (``log_beta`` from float64 on the host). Triton has no
    portable expm1 (the interpreter has no libdevice), so it is computed here."""
    x = t * log_beta
    small = tl.minimum(tl.maximum(x, -EXPM1_SERIES_LIMIT), EXPM1_SERIES_LIMIT)  # no overflow in the unused branch
    # Horner: x * (1 + x/2 * (1 + x/3 * (... * (1 + x/DEGREE))))
    series = tl.zeros_like(small) + 1.0
    for i in tl.static_range(EXPM1_SERIES_DEGREE - 1):
        series = 1.0 + tl.div_rn(small, EXPM1_SERIES_DEGREE - i + 0.0) * series
    series = small * series
    expm1 = tl.where(tl.abs(x) < EXPM1_SERIES_LIMIT, series, exp_rn(x) - 1.0)
    return -expm1


@triton.jit
def to_param_dtype(x, PARAM_DTYPE: tl.constexpr):
    """float32 -> the parameter dtype, rounded once to nearest-even. bfloat16 rounds by hand on the bits: the
    Triton interpreter's own float32 -> bfloat16 cast truncates (and its round-to-nearest mode does not carry
    into the exponent), and hand rounding keeps what CI checks identical to what a GPU runs. NaN stays NaN."""
    if PARAM_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        nearest_even = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40
        return tl.where(x != x, quiet_nan, nearest_even).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(PARAM_DTYPE)


# ----------------------------------------------------------------------------- bfloat16 state, Kahan weights
@triton.jit
def mix32(x):
    """lowbias32, the bijective 32-bit hash, on uint32 values (every operation wraps modulo 2**32; ``>>`` of an
    unsigned value is a logical shift)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), MIX1_C, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), MIX2_C, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def rounding_key(seed, row_ptr, STREAM: tl.constexpr):
    """``mix32(seed ^ mix32(2 * layer + stream))`` for the layer of ``row_ptr`` (its COL_LAYER_ID) and the state
    tensor STREAM (0: momentum buffer or exp_avg, 1: exp_avg_sq); ``seed`` arrives as an int32 holding the bits
    of the uint32 seed."""
    layer_id = tl.load(row_ptr + COL_LAYER_ID_C)
    return mix32(tl.cast(seed, tl.uint32, bitcast=True) ^ mix32((2 * layer_id + STREAM).to(tl.uint32)))


@triton.jit
def rounding_base(seed, row_ptr, t, STREAM: tl.constexpr, STOCHASTIC: tl.constexpr):
    """The per-(layer, step, stream) part of the hash, ``mix32(key ^ t)`` with t the layer's new step count
    (float32, an integer value), once per program; 0 (unused) without stochastic rounding."""
    if STOCHASTIC:
        return mix32(rounding_key(seed, row_ptr, STREAM) ^ tl.cast(t, tl.uint32))
    else:
        return 0


@triton.jit
def element_offset(row_ptr, STOCHASTIC: tl.constexpr):
    """The index in the whole layer of the row's first element (a shard's offset; COL_ELEMENT_OFFSET), which the
    random bits of an element are drawn for; 0 (unused) without stochastic rounding."""
    if STOCHASTIC:
        return tl.load(row_ptr + COL_ELEMENT_OFFSET_C)
    else:
        return 0


@triton.jit
def rounding_bits(base, index):
    """The 16 random bits of the elements ``index`` (int64, indices in the whole layer):
    ``mix32((base ^ lo32(i)) + hi32(i) * 0x9E3779B9) >> 16``, as uint32."""
    lo = index.to(tl.uint32)  # truncation: the low word
    hi = (index >> 32).to(tl.uint32)
    return mix32((base ^ lo) + hi * tl.full((), GOLDEN32_C, tl.uint32)) >> 16


@triton.jit
def bf16_nearest_bits(x):
    """float32 -> the pattern (uint32 in [0, 2**16)) of its nearest bfloat16, ties to even; NaN -> 0x7FC0."""
    bits = x.to(tl.uint32, bitcast=True)
    nearest_even = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, tl.full((), BF16_NAN_C, tl.uint32), nearest_even)


@triton.jit
def bf16_stochastic_bits(x, random_bits):
    """float32 -> the pattern of a bfloat16 neighbour, ``(bits(x) + r) >> 16``: away from zero with probability
    (the dropped 16 bits) / 2**16, so the mean stored is x; NaN -> 0x7FC0 (a NaN's bits plus r could carry into
    the sign)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where(x != x, tl.full((), BF16_NAN_C, tl.uint32), (bits + random_bits) >> 16)


@triton.jit
def bf16_from_bits(bits):
    """The bfloat16 values of patterns held as uint32 in [0, 2**16)."""
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def bf16_bits_to_float(bits):
    """The float32 value (exact) of bfloat16 patterns held as uint32."""
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def widen(x):
    """A loaded element in float32. bfloat16 is widened on the bits (exact, a shift): the Triton interpreter's
    conversion gets subnormal bfloat16 values wrong (2e-39 becomes 4.4e-39, 1e-40 zero)."""
    if x.dtype == tl.bfloat16:
        return bf16_bits_to_float(x.to(tl.uint16, bitcast=True).to(tl.uint32))
    else:
        return x.to(tl.float32)


@triton.jit
def rounded_state(x, base, index, STATE_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """A new state value x (float32) as stored: (the value to store, in STATE_DTYPE; its float32 value, which the
    step continues with). bfloat16 state rounds stochastically with the bits of ``base`` for the elements
    ``index`` (in the whole layer), or to nearest; float32 state is x itself."""
    if STATE_DTYPE == tl.bfloat16:
        if STOCHASTIC:
            bits = bf16_stochastic_bits(x, rounding_bits(base, index))
        else:
            bits = bf16_nearest_bits(x)
        return bf16_from_bits(bits), bf16_bits_to_float(bits)
    else:
        return x, x


@triton.jit
def load_weight(param_ptr, master_ptr, comp_ptr, index, mask, HAS_MASTER: tl.constexpr, KAHAN: tl.constexpr):
    """The weight a step reads, in float32: the master weight, the parameter plus its Kahan compensation (exact),
    or the parameter."""
    if HAS_MASTER:
        return load(master_ptr + index, mask)
    else:
        w = widen(load(param_ptr + index, mask))
        if KAHAN:
            w = w + widen(load(comp_ptr + index, mask))
        return w


@triton.jit
def store_weight(param_ptr, master_ptr, comp_ptr, index, mask, w, PARAM_DTYPE: tl.constexpr,
                 HAS_MASTER: tl.constexpr, KAHAN: tl.constexpr):
    """Stores the new float32 weight: into the master and the parameter (its one rounding), or with KAHAN as
    param = nearest(w) and comp = nearest(w - param) (w - param is exact in float32)."""
    if HAS_MASTER:
        tl.store(master_ptr + index, w, mask=mask)
    if KAHAN:
        param_bits = bf16_nearest_bits(w)
        tl.store(param_ptr + index, bf16_from_bits(param_bits), mask=mask)
        tl.store(comp_ptr + index, bf16_from_bits(bf16_nearest_bits(w - bf16_bits_to_float(param_bits))),
                 mask=mask)
    else:
        tl.store(param_ptr + index, to_param_dtype(w, PARAM_DTYPE), mask=mask)  # the one rounding
