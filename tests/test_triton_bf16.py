"""The Triton kernels with bfloat16 state and Kahan-compensated bfloat16 weights (docs/algorithms.md, section 9).

On the CPU the kernels run under the Triton interpreter (tests/conftest.py), so the layers stay small.

- The kernels' hash and roundings are tvlars_fused/_rounding.py's, bit for bit: seeds from 2**31 (passed as an
  int32), large layer numbers, element indices beyond 2**32; round-to-nearest-even, the stochastic store, NaN and
  infinity, the Kahan split.
- TVLARS, LARS and LAMB stepped by the kernels and by the reference side by side, each step from the same state
  (the reference's copied into the kernels' after each comparison), stochastic and nearest rounding and Kahan
  weights, excluded layers included, layers whole in one chunk and spread over many, checked by cases.lockstep
  (every bfloat16 state element equal or one ulp apart but where a value cancelled, at most ``MAX_FRACTION`` of
  them apart; the bounds are justified there; the weights equal to float32 accuracy where the states agree).
- A layer sharded over two ranks (element offsets in the table) draws the unsharded layer's bits; a GradScaler
  skip writes nothing, sharded or not; the vector path and the scalar path (misaligned bfloat16 columns) store
  the same bits; the bytes model counts bfloat16 state and the compensation.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from cases import BF16_CASES, SMALL_SHAPES, backend_or_skip, bf16_lockstep, bf16_ulp_distance  # noqa: E402
from tvlars_fused import _rounding, reference  # noqa: E402
from tvlars_fused._layer_table import COL_ELEMENT_OFFSET, COL_LAYER_ID, NUM_COLS, prepare  # noqa: E402
from tvlars_fused._types import Bucket, LambHyper, LarsHyper  # noqa: E402
from tvlars_fused.triton_kernels.common import (bf16_from_bits, bf16_nearest_bits, element_offset,  # noqa: E402
                                                load_weight, rounded_state, rounding_base, rounding_bits,
                                                store_weight)

BF16 = torch.bfloat16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("triton_backend")

# At most this fraction of the bfloat16 state elements may differ from the reference's, by one ulp. The kernels
# draw the reference's random bits (test_the_kernels_draw_the_documented_bits), so a stored element differs only
# where the float32 values before rounding differ and a rounding boundary lies between them: for values k float32
# ulps apart, k / 2**16 of the elements (stochastic: the 16 random bits are uniform; nearest: where the value lies
# between two bfloat16 neighbours is). The float32 values differ by a few ulps at most (the last bit of the trust
# ratio, from float64 sums added in another order, scales every element of a layer; the element-wise arithmetic is
# the reference's, up to a GPU's fused multiply-adds), so about 1e-4 of the elements at worst. Measured by
# test_steps_match_the_reference under the interpreter: 1 of the 174,096 compared (6e-6). The bound 1e-3 would take
# 65 float32 ulps on every element, and is 500 times below what a wrong rounding does (a truncation, a wrong stream,
# element index or step count: about half the elements apart).
MAX_FRACTION = 1e-3
WEIGHT_TOL = 1e-6  # float32 weights where the state agrees: the float32 contract of tests/cases.py's lockstep
STORAGES = ["stochastic", "nearest", "kahan"]


@pytest.fixture
def triton_backend():
    backend_or_skip("triton", DEVICE)


def _backend():
    from tvlars_fused import _triton_backend

    return _triton_backend


@pytest.fixture
def no_foreach(monkeypatch):
    """The kernels step every layer: a bucket handed to foreach (by the optimizer or the backend) fails the test."""
    from tvlars_fused import _foreach

    def refuse(*args, **kwargs):
        raise AssertionError("a bfloat16-state bucket went to foreach")

    monkeypatch.setattr(_foreach, "lars_step", refuse)
    monkeypatch.setattr(_foreach, "lamb_step", refuse)


@pytest.fixture
def many_chunks(monkeypatch):
    """Chunks of 32 elements in tiles of 16: most layers span several programs (full tiles and tails), so the element
    index of the stream crosses chunk boundaries."""
    backend = _backend()
    monkeypatch.setattr(backend, "launch_sizes", lambda bucket: backend.LaunchSizes(chunk=32, block=16,
                                                                                       reduce_block=2))


# ----------------------------------------------------------------------------- the hash and the roundings
@triton.jit
def _rounding_kernel(row_ptr, x_ptr, index_ptr, bits_ptr, stochastic_ptr, stochastic_value_ptr, nearest_ptr,
                     nearest_value_ptr, seed, t_ptr, n, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    base = rounding_base(seed, row_ptr, tl.load(t_ptr), STREAM, True)
    index = tl.load(index_ptr + i, mask=mask, other=0) + element_offset(row_ptr, True)
    x = tl.load(x_ptr + i, mask=mask, other=0.0)
    tl.store(bits_ptr + i, rounding_bits(base, index).to(tl.int64), mask=mask)
    stored, value = rounded_state(x, base, index, tl.bfloat16, True)
    tl.store(stochastic_ptr + i, stored, mask=mask)
    tl.store(stochastic_value_ptr + i, value, mask=mask)  # float32: the value the step continues with
    stored, value = rounded_state(x, base, index, tl.bfloat16, False)
    tl.store(nearest_ptr + i, stored, mask=mask)
    tl.store(nearest_value_ptr + i, value, mask=mask)


def _kernel_roundings(x, index, *, seed, layer_id, stream, t, offset=0):
    """(random bits, stochastic store, nearest store) of the kernels' code for float32 x at the indices given, in a
    layer whose row holds ``layer_id`` and the element offset ``offset``."""
    row = torch.zeros(NUM_COLS, dtype=torch.int64)
    row[COL_LAYER_ID], row[COL_ELEMENT_OFFSET] = layer_id, offset
    n = x.numel()
    bits = torch.empty(n, dtype=torch.int64, device=DEVICE)
    stochastic, nearest = (torch.empty(n, dtype=BF16, device=DEVICE) for _ in range(2))
    stochastic_value, nearest_value = (torch.empty(n, device=DEVICE) for _ in range(2))
    _rounding_kernel[(1,)](row.to(DEVICE), x.to(DEVICE), index.to(DEVICE), bits, stochastic, stochastic_value,
                           nearest, nearest_value, _backend()._seed_bits(seed),
                           torch.tensor([float(t)], device=DEVICE), n, STREAM=stream,
                           BLOCK=triton.next_power_of_2(n))
    for stored, value in ((stochastic, stochastic_value), (nearest, nearest_value)):
        # the value returned for the rest of the step is the value stored
        assert torch.equal(stored.float().nan_to_num(0.5), value.nan_to_num(0.5))
    return bits.cpu(), stochastic.cpu(), nearest.cpu()


def _same_bits(a, b):
    """Equal bfloat16 tensors, NaN for NaN (whose pattern torch's own conversion does not fix)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16))


SPECIAL = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.3e38, 3.39e38, -3.39e38, 1e-40, -1e-40, 0.0, -0.0,
           math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("seed, layer_id, stream, t", [(0, 0, 0, 1), (12345, 7, 1, 33), (2**31 + 5, 2**33 + 3, 0, 2),
                                                      (2**32 - 1, 1, 1, 2**24)])
def test_the_kernels_draw_the_documented_bits(seed, layer_id, stream, t):
    gen = torch.Generator().manual_seed(seed % 1000)
    x = torch.cat([torch.randn(500, generator=gen) * 10, torch.tensor(SPECIAL)])
    index = torch.cat([torch.arange(480), torch.tensor([2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**32 + 9, 2**40 + 7]),
                       torch.randint(0, 2**50, (x.numel() - 486,), generator=gen)])
    offset = 2**32 - 100  # a shard's first element: adds to every index
    bits, stochastic, nearest = _kernel_roundings(x, index, seed=seed, layer_id=layer_id, stream=stream, t=t,
                                                  offset=offset)
    expected = _rounding.element_bits(_rounding.step_base(_rounding.layer_key(seed, layer_id, stream),
                                                          torch.tensor(float(t))), index + offset)
    assert torch.equal(bits, expected)
    assert _same_bits(stochastic, _rounding.stochastic_round(x, expected))
    assert _same_bits(nearest, x.to(BF16))


def test_another_stream_step_layer_or_seed_draws_other_bits():
    x, index = torch.zeros(256), torch.arange(256)
    draws = [_kernel_roundings(x, index, **kw)[0] for kw in (
        dict(seed=1, layer_id=3, stream=0, t=5), dict(seed=1, layer_id=3, stream=1, t=5),
        dict(seed=1, layer_id=3, stream=0, t=6), dict(seed=1, layer_id=4, stream=0, t=5),
        dict(seed=2, layer_id=3, stream=0, t=5))]
    for i in range(len(draws)):
        for j in range(i):
            assert (draws[i] != draws[j]).float().mean() > 0.99


@triton.jit
def _kahan_kernel(param_ptr, comp_ptr, w_ptr, read_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    store_weight(param_ptr, param_ptr, comp_ptr, i, mask, tl.load(w_ptr + i, mask=mask), tl.bfloat16, False, True)
    tl.store(read_ptr + i, load_weight(param_ptr, param_ptr, comp_ptr, i, mask, False, True), mask=mask)


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")  # inf - inf, under the interpreter
def test_the_kahan_split_and_read_are_the_references():
    w = torch.cat([torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3,
                   torch.tensor([1 + 2 ** -8, 1 + 2 ** -9 + 2 ** -20, 3.39e38, 1e-40, -0.0, math.inf])])
    n = w.numel()
    param, comp = torch.empty(n, dtype=BF16, device=DEVICE), torch.empty(n, dtype=BF16, device=DEVICE)
    read = torch.empty(n, device=DEVICE)
    _kahan_kernel[(1,)](param, comp, w.to(DEVICE), read, n, BLOCK=triton.next_power_of_2(n))
    ref_param, ref_comp = torch.empty(n, dtype=BF16), torch.empty(n, dtype=BF16)
    _rounding.kahan_split(w, ref_param, ref_comp)
    assert _same_bits(param.cpu(), ref_param) and _same_bits(comp.cpu(), ref_comp)
    finite = w.isfinite()
    ref_read = _rounding.kahan_weight(ref_param, ref_comp)
    assert torch.equal(read.cpu()[finite], ref_read[finite])
    # the pair holds the weight to about 16 bits, where the parameter alone holds 8
    err_pair = ((read.cpu() - w).abs() / w.abs())[finite & (w.abs() > 1e-30)]
    assert err_pair.max() < 2 ** -16


@triton.jit
def _nearest_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    tl.store(y_ptr + i, bf16_from_bits(bf16_nearest_bits(tl.load(x_ptr + i, mask=mask))), mask=mask)


def test_nearest_breaks_ties_to_even_and_carries_into_the_exponent():
    x = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 2 - 2 ** -9, 3.3961e38, 2 ** -133 * 1.5, -(1 + 2 ** -8)])
    y = torch.empty(x.numel(), dtype=BF16, device=DEVICE)
    _nearest_kernel[(1,)](x.to(DEVICE), y, x.numel(), BLOCK=8)
    assert torch.equal(y.cpu().view(torch.int16), x.to(BF16).view(torch.int16))
    assert y[2].item() == 2.0 and y[0].item() == 1.0 and y[1].item() == 1 + 2 ** -6


# ----------------------------------------------------------------------------- the optimizers against the reference
def _options(storage, seed=4):
    return dict(state_dtype=BF16, rounding="nearest" if storage == "nearest" else "stochastic",
                kahan=storage == "kahan", seed=seed)


def _lockstep(case, storage, *, shapes=SMALL_SHAPES, steps=4):
    """The kernels and the reference stepped side by side from the same state (cases.lockstep's checks)."""
    dtype = BF16 if storage == "kahan" else torch.float32
    return bf16_lockstep(case, "triton", _options(storage), dtype=dtype, shapes=shapes, steps=steps, device=DEVICE,
                         tol=WEIGHT_TOL)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("case", BF16_CASES, ids=repr)
def test_steps_match_the_reference(case, storage, no_foreach):
    _lockstep(case, storage)


@pytest.mark.parametrize("storage", ["stochastic", "kahan"])
@pytest.mark.parametrize("case", [c for c in BF16_CASES if c.name in ("tvlars-nesterov-clip", "lamb-variants")],
                         ids=repr)
def test_layers_over_many_chunks_match_the_reference(case, storage, no_foreach, many_chunks):
    _lockstep(case, storage, shapes=[(16, 8), (3, 3, 4, 4), (37,), (1,), (0,), (5, 13)], steps=3)


# ----------------------------------------------------------------------------- buckets by hand
LARS_HP = LarsHyper(lr=0.5, momentum=0.9, weight_decay=5e-4, eta=1e-3, eps=0.0, norm_clip=None, sum_of_norms=False,
                    nesterov=True, use_phi=True, lmbda=0.1, alpha=1.0, delay=2.0, gamma_min=0.05,
                    stochastic_rounding=True, seed=2**31 + 11)
LAMB_HP = LambHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                    norm_clip=None, stochastic_rounding=True, seed=9)


def _bucket(shapes, *, lamb, kahan, seed=0):
    """bfloat16 state (LAMB's second moment non-negative), layer numbers not 0, 1, 2, ..., step counts 0, 1, 2;
    bfloat16 parameters with a compensation when ``kahan``."""
    gen = torch.Generator().manual_seed(seed)
    dtype = BF16 if kahan else torch.float32

    def rand(shape, scale=1.0, positive=False):
        x = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
        return x * scale

    params = [rand(s).to(DEVICE, dtype) for s in shapes]
    return Bucket(
        params=params,
        grads=[rand(s).to(DEVICE, dtype) for s in shapes],
        states=[[rand(s, 0.01, positive=k == 1).to(DEVICE, BF16) for s in shapes] for k in range(1 + lamb)],
        steps=[torch.tensor(float(i % 3), device=DEVICE) for i in range(len(shapes))],
        excluded=[len(s) <= 1 for s in shapes],
        comps=[(p.float() * rand(p.shape, 2 ** -10)).to(BF16) for p in params] if kahan else None,
        layer_ids=[5 + 3 * i for i in range(len(shapes))],
    )


def _clone(bucket, **changes):
    copy = lambda ts: None if ts is None else [t.clone() for t in ts]  # noqa: E731
    fields = dict(params=copy(bucket.params), grads=copy(bucket.grads), states=[copy(s) for s in bucket.states],
                  steps=copy(bucket.steps), excluded=list(bucket.excluded), comps=copy(bucket.comps),
                  layer_ids=list(bucket.layer_ids), element_offsets=list(bucket.element_offsets))
    return Bucket(**{**fields, **changes})


def _written(bucket):
    return bucket.params + (bucket.comps or []) + [t for s in bucket.states for t in s] + bucket.steps


def _step(bucket, lamb, module=None, **kwargs):
    module = module or _backend()
    if lamb:
        module.lamb_step(bucket, LAMB_HP, **kwargs)
    else:
        module.lars_step(bucket, LARS_HP, **kwargs)


class Recording:
    def __init__(self):
        self.calls = []

    def __call__(self, sums):
        self.calls.append(sums.clone())


@pytest.mark.parametrize("sharded", [False, True], ids=["whole", "sharded"])
@pytest.mark.parametrize("kahan", [False, True], ids=["params", "kahan"])
@pytest.mark.parametrize("lamb", [False, True], ids=["lars", "lamb"])
def test_a_skipped_step_writes_nothing(lamb, kahan, sharded):
    bucket = _bucket(SMALL_SHAPES, lamb=lamb, kahan=kahan)
    if sharded:
        bucket.reduce_sums = reduce = Recording()
    before = _clone(bucket)
    scale, inf, no_inf = (torch.tensor(v, device=DEVICE) for v in (4.0, 1.0, 0.0))
    _step(bucket, lamb, grad_scale=scale, found_inf=inf)
    assert all(torch.equal(t, b) for t, b in zip(_written(bucket), _written(before)))
    if sharded:
        assert len(reduce.calls) == 1  # every rank joins the all-reduce: the host never reads found_inf
    _step(bucket, lamb, grad_scale=scale, found_inf=no_inf)  # the same step unskipped writes them all
    moved = [bucket.params[0]] + [s[0] for s in bucket.states] + (bucket.comps[:1] if kahan else [])
    unmoved = [before.params[0]] + [s[0] for s in before.states] + (before.comps[:1] if kahan else [])
    assert not any(torch.equal(a, b) for a, b in zip(moved, unmoved))
    assert all(s == b + 1 for s, b in zip(bucket.steps, before.steps))


# dim 0 split in two: even, odd (rank 0 one row more), one row (rank 1 empty), empty
SHARD_SHAPES = [(16, 8), (37,), (3, 3, 4, 4), (1, 5), (0,)]


def _shards(bucket, rank):
    """Rank ``rank`` of two's local shards (FSDP2's Shard(0): the first ceil(n / 2) rows on rank 0), as separate
    tensors, with the index in the whole layer of their first element."""
    def part(t):
        rows = -(-t.shape[0] // 2) if t.dim() else 0
        return t[:rows].clone() if rank == 0 else t[rows:].clone()

    def first_element(t):
        rows = -(-t.shape[0] // 2)
        return 0 if rank == 0 else rows * (t[0].numel() if t.shape[0] else 0)

    copy = lambda ts: None if ts is None else [part(t) for t in ts]  # noqa: E731
    return Bucket(params=copy(bucket.params), grads=copy(bucket.grads), states=[copy(s) for s in bucket.states],
                  steps=[t.clone() for t in bucket.steps], excluded=list(bucket.excluded), comps=copy(bucket.comps),
                  layer_ids=list(bucket.layer_ids), element_offsets=[first_element(p) for p in bucket.params])


def _two_rank_step(ranks, lamb):
    """One step of two ranks' shards, their whole-layer sums the sum of both ranks' local ones (what the all-reduce
    forms): each rank's local sums are taken first from a copy of its bucket stepped alone."""
    local = []
    for bucket in ranks:
        probe = _clone(bucket, reduce_sums=Recording())
        _step(probe, lamb)
        local.append(probe.reduce_sums.calls[0])
    total = local[0] + local[1]
    for bucket in ranks:
        bucket.reduce_sums = lambda sums: sums.copy_(total)
        _step(bucket, lamb)


@pytest.mark.parametrize("lamb, kahan", [(False, False), (True, True)], ids=["lars-params", "lamb-kahan"])
def test_shards_draw_the_bits_of_the_whole_layer(lamb, kahan, many_chunks):
    """Two ranks' shards stepped around an all-reduce store what the unsharded layer stores: the element offsets
    give each shard's elements the whole layer's indices in the stream (only the float64 sums' order of addition
    differs: at most a rare element one ulp apart)."""
    whole = _bucket(SHARD_SHAPES, lamb=lamb, kahan=kahan)
    ranks = [_shards(whole, 0), _shards(whole, 1)]
    assert ranks[1].element_offsets == [64, 19, 96, 5, 0]
    for _ in range(2):
        _step(whole, lamb)
        _two_rank_step(ranks, lamb)
    differ = total = 0
    for k, state in enumerate(whole.states):
        for i, s in enumerate(state):
            joined = torch.cat([ranks[0].states[k][i], ranks[1].states[k][i]])
            distance = bf16_ulp_distance(joined, s)
            assert distance.numel() == 0 or distance.max() <= 1, (k, i)
            differ, total = differ + int((distance > 0).sum()), total + distance.numel()
    assert differ <= MAX_FRACTION * total, f"{differ} of {total} state elements differ"
    for i, p in enumerate(whole.params):
        joined = torch.cat([ranks[0].params[i], ranks[1].params[i]]).double()
        if kahan:
            joined = joined + torch.cat([ranks[0].comps[i], ranks[1].comps[i]]).double()
            expected = p.double() + whole.comps[i].double()
        else:
            expected = p.double()
        torch.testing.assert_close(joined, expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(r.steps[i], s) for r in ranks for i, s in enumerate(whole.steps))


def _misaligned(t):
    """t's values in a view one element into a flat buffer: dense, so the table covers it, never 16-byte aligned."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return view.copy_(t)


@pytest.mark.parametrize("lamb, kahan", [(False, True), (True, False)], ids=["lars-kahan", "lamb-params"])
def test_misaligned_bfloat16_columns_store_the_bits_of_the_vector_path(lamb, kahan, many_chunks):
    """A layer whose bfloat16 state (or compensation) sits at an address 2 bytes past a multiple of 16 takes the
    scalar path (on a GPU a vector access there would fault), and stores the bits the aligned layers' path does."""
    aligned = _bucket(SHARD_SHAPES, lamb=lamb, kahan=kahan)
    assert prepare(aligned, 32)[1].aligned16
    misaligned = _clone(aligned)
    misaligned.states[-1][0] = _misaligned(misaligned.states[-1][0])
    if kahan:
        misaligned.comps[1] = _misaligned(misaligned.comps[1])
    assert not prepare(misaligned, 32)[1].aligned16
    for _ in range(2):
        _step(aligned, lamb)
        _step(misaligned, lamb)
    assert all(torch.equal(a, b) for a, b in zip(_written(aligned), _written(misaligned)))


def test_the_reference_and_the_kernels_agree_on_a_hand_made_bucket(many_chunks):
    """The same bucket (layer numbers from 5, a seed from 2**31) through both: states within an ulp."""
    for lamb in (False, True):
        bucket = _bucket(SHARD_SHAPES, lamb=lamb, kahan=True)
        expected = _clone(bucket)
        _step(bucket, lamb)
        _step(expected, lamb, reference)
        for got, want in zip([t for s in bucket.states for t in s], [t for s in expected.states for t in s]):
            distance = bf16_ulp_distance(got, want)
            assert distance.numel() == 0 or (distance.max() <= 1 and (distance > 0).float().mean() <= MAX_FRACTION)


# ----------------------------------------------------------------------------- the bytes model
def _bytes(lamb, dtype, kahan):
    bucket = SimpleNamespace(params=[torch.empty(1, dtype=dtype, device="meta")], masters=None,
                             states=[[torch.empty(1, dtype=BF16, device="meta")]] * (1 + lamb),
                             comps=[] if kahan else None)
    return _backend().element_bytes(bucket)


def test_element_bytes_count_bfloat16_state_and_the_compensation():
    # LARS: w, g | w, g, buf, buf, w; LAMB: g, m, v, w, m, v | w, m, v, w (a Kahan weight: param + comp)
    assert [_bytes(False, torch.float32, False), _bytes(False, BF16, False), _bytes(False, BF16, True)] == [24, 14, 20]
    assert [_bytes(True, torch.float32, False), _bytes(True, BF16, False), _bytes(True, BF16, True)] == [28, 20, 26]
