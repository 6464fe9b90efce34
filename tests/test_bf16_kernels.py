"""bfloat16 state and Kahan-compensated bfloat16 weights in the compiled backends (docs/algorithms.md, section 9):
backend="cpp", the CUDA kernel's C++ twin, against the reference.

Both draw the same random bits (the counter-based stream of seed, step count, layer number, stream and element
index), so their stored bfloat16 state is bit-identical wherever their float32 values before the store are; the two
compute the element-wise math in the same order, but the trust ratio (float64 sums in another order, rounded once)
and LAMB's bias corrections (expm1f here, float64 powers there) can differ by a float32 ulp, and then a value can
round the other way: a float32 ulp of difference flips a stochastic rounding with probability 2**-16 (the chance
that the 16 random bits fall between the two values' dropped bits), a nearest rounding only at a midpoint. So:

- state: at most MAX_FRACTION of the elements differ from the reference's, and those by one bfloat16 ulp, except
  where a value cancelled to far below its layer's magnitudes: there the float32 error (tests/stepwise.py: at most
  F32 times the layer's largest magnitude entering the step) can span several ulps of the small result, and the
  element may differ by more ulps but not by more than that error (the bound of cases.bf16_lockstep). MAX_FRACTION
  = 1e-3 is 65 times the flip rate if every element differed by a float32 ulp before its store (2**-16 = 1.5e-5);
  measured here: LARS family 1e-5 to 5e-5 (of them, one element in a run more than an ulp apart, at a value
  1e-7 of its layer's largest), LAMB 0 (its moments do not depend on the trust ratio). A store that truncates,
  draws another stream's bits or ignores the element offset differs on a third to a half of the elements;
- weights (float32 parameters and masters, a Kahan pair param + comp) within 1e-6 * (1 + |w|) of the reference's
  where the layer's state elements agree (the pair up to an ulp of its bfloat16 compensation, which a float32 ulp
  of difference can round the other way), bfloat16 parameters within one bfloat16 ulp.

Every step starts both from the reference's state (cases.lockstep, which checks all this), so a one-ulp difference is
not carried into later, smaller values.
"""

from __future__ import annotations

import os

import pytest
import torch

import cases
from cases import BF16_CASES, SHAPES, bf16_ulp_distance, make_params, set_grads
from tvlars_fused import LAMB, LARS, TVLARS, _extension, _foreach, reference

_unavailable = _extension.unavailable_reason("cpu")
if _unavailable is not None:
    pytest.skip(f"the cpp backend is unavailable: {_unavailable}", allow_module_level=True)
from tvlars_fused import _cpp_backend  # noqa: E402
from tvlars_fused._types import Bucket, LambHyper, LarsHyper  # noqa: E402

BF16 = torch.bfloat16
MAX_FRACTION = 1e-3
TOL = 1e-6
STORAGES = {
    "stochastic": (dict(state_dtype=BF16, rounding="stochastic", seed=4), torch.float32),
    "nearest": (dict(state_dtype=BF16, rounding="nearest", seed=4), torch.float32),
    "stochastic-bf16-params": (dict(state_dtype=BF16, seed=2**32 - 1), BF16),
    "kahan": (dict(state_dtype=BF16, kahan=True, seed=4), BF16),
    "kahan-float32-state": (dict(kahan=True), BF16),
}


class _NoForeach:
    """Fails any step that reaches the foreach backend: the layers must be stepped by the cpp ops themselves."""

    def __init__(self, monkeypatch):
        def refuse(*args, **kwargs):
            raise AssertionError("a bucket went to the foreach backend")

        monkeypatch.setattr(_foreach, "lars_step", refuse)
        monkeypatch.setattr(_foreach, "lamb_step", refuse)


def lockstep(cls, kwargs, params, **options) -> tuple[int, int]:
    """cases.lockstep with the cpp backend, which must step every bucket itself."""
    opt = cls(params, backend="cpp", **kwargs)
    assert {c["backend"] for c in opt.chosen_backends} == {"cpp"}, opt.chosen_backends
    return cases.lockstep(cls, kwargs, params, "cpp", tol=TOL, max_fraction=MAX_FRACTION, **options)


@pytest.mark.parametrize("storage", list(STORAGES))
@pytest.mark.parametrize("case", BF16_CASES, ids=repr)
def test_cpp_matches_the_reference_step_by_step(monkeypatch, case, storage):
    """The parity table's bfloat16 cases (momentum with Nesterov and norm clipping, LARC's clip with dampening, LAMB's
    variants and its global clipping; 1-D layers excluded), on layers of mixed sizes with a zero-weight and a
    zero-gradient layer and layers of several 16384-element chunks, for 5 steps."""
    _NoForeach(monkeypatch)
    options, dtype = STORAGES[storage]
    differ, total = lockstep(case.cls, {**case.kwargs, **options}, make_params(SHAPES, dtype))
    assert total > 0 or "state_dtype" not in options


def _layers(dtype):
    """A channels_last conv weight, a layer of more than two CPU chunks, an excluded bias and a small matrix."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(6, 5, 3, 3), (40000,), (37,), (16, 9)]
    params = [torch.randn(s, generator=gen) * 0.5 for s in shapes]
    params[0] = params[0].to(memory_format=torch.channels_last)
    assert params[1].numel() > 2 * _cpp_backend.CHUNK
    return [p.to(dtype).requires_grad_() for p in params]


@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5, lmbda=0.05)), (LARS, dict(lr=0.5, nesterov=True)),
                                         (LAMB, dict(lr=1e-2))], ids=["tvlars", "lars", "lamb"])
@pytest.mark.parametrize("storage", ["stochastic", "kahan"])
def test_channels_last_large_layers_and_layer_numbers(monkeypatch, cls, kwargs, storage):
    """A channels_last layer draws its bits in memory order, a layer of several chunks by its index in the whole
    layer, and layers of a second param group by their number in the optimizer (not in their group)."""
    _NoForeach(monkeypatch)
    options, dtype = STORAGES[storage]
    params = _layers(dtype)
    assert not params[0].is_contiguous()
    lockstep(cls, {**kwargs, **options}, params, groups=[[3], [0, 1, 2]])


@pytest.mark.parametrize("case", [c for c in BF16_CASES if c.name in ("tvlars-nesterov-clip", "lamb-variants")],
                         ids=repr)
def test_master_weights_with_bf16_state(monkeypatch, case):
    """bfloat16 parameters with float32 masters and bfloat16 state: the masters follow the reference's in float32,
    the parameters are their one rounding."""
    _NoForeach(monkeypatch)
    lockstep(case.cls, {**case.kwargs, "master_weights": True, "state_dtype": BF16}, make_params(SHAPES, BF16))


# ---------------------------------------------------------------- buckets made by hand


def _bucket(lamb, *, layer_ids=None, element_offsets=None, kahan=True, seed=0):
    """bfloat16 layers with bfloat16 state and (``kahan``) small compensations, step counts 0, 1, 2, ..."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(300, 70), (37,), (5, 4, 3, 3), (0,)]
    params = [torch.randn(s, generator=gen).to(BF16) for s in shapes]
    return Bucket(
        params=params,
        grads=[torch.randn(s, generator=gen).to(BF16) for s in shapes],
        states=[[(torch.rand(s, generator=gen) * 0.01).to(BF16) for s in shapes] for _ in range(1 + lamb)],
        steps=[torch.tensor(float(i % 3)) for i in range(len(shapes))],
        excluded=[len(s) <= 1 for s in shapes],
        comps=[(p.float() * torch.rand(p.shape, generator=gen) * 2**-9).to(BF16) for p in params] if kahan else None,
        layer_ids=layer_ids,
        element_offsets=element_offsets,
    )


def _clone(bucket):
    copy = lambda ts: None if ts is None else [t.clone() for t in ts]  # noqa: E731
    return Bucket(params=copy(bucket.params), grads=copy(bucket.grads), states=[copy(s) for s in bucket.states],
                  steps=copy(bucket.steps), excluded=list(bucket.excluded), comps=copy(bucket.comps),
                  layer_ids=list(bucket.layer_ids), element_offsets=list(bucket.element_offsets))


def _written(bucket):
    """What a step may write: parameters, compensations, state, step counts."""
    return bucket.params + (bucket.comps or []) + [t for s in bucket.states for t in s] + bucket.steps


LARS_HP = LarsHyper(lr=0.5, momentum=0.9, weight_decay=5e-4, eta=1e-3, eps=0.0, norm_clip=None, sum_of_norms=False,
                    nesterov=True, use_phi=True, lmbda=1e-3, alpha=1.0, seed=77)
LAMB_HP = LambHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                    norm_clip=10.0, seed=77)


def _step(backend, bucket, lamb, grad_scale=None, found_inf=None):
    if lamb:
        backend.lamb_step(bucket, LAMB_HP, grad_scale, found_inf)
    else:
        backend.lars_step(bucket, LARS_HP, grad_scale, found_inf)


def _state_distance(bucket, expected) -> tuple[int, int, int]:
    """(largest ulp distance, elements apart, elements) between two buckets' bfloat16 state."""
    distances = [bf16_ulp_distance(s, e).flatten() for ss, es in zip(bucket.states, expected.states)
                 for s, e in zip(ss, es)]
    d = torch.cat(distances)
    return int(d.max()), int((d > 0).sum()), d.numel()


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_layer_numbers_and_element_offsets_come_from_the_table(lamb):
    """A shard's element offset (beyond 2**32: the index's high word enters the hash; the first layer's indices cross
    2**32 within a chunk, the third's 2**33) and a layer's number reach the stream through the table: cpp draws the
    reference's bits, and without them it draws others."""
    ids, offsets = [7, 3, 12, 0], [2**32 - 5000, 2**32 + 11, 2**33 - 100, 2**40]
    bucket = _bucket(lamb, layer_ids=ids, element_offsets=offsets)
    expected = _clone(bucket)
    _step(_cpp_backend, bucket, lamb)
    _step(reference, expected, lamb)
    worst, apart, total = _state_distance(bucket, expected)
    assert worst <= 1 and apart <= MAX_FRACTION * total, (worst, apart, total)
    for name, kwargs in (("offsets", dict(layer_ids=ids)), ("layer numbers", dict(element_offsets=offsets))):
        other = _bucket(lamb, **kwargs)  # the same tensors, the stream's other inputs left at their defaults
        _step(_cpp_backend, other, lamb)
        _, apart, total = _state_distance(other, expected)
        assert apart > 0.2 * total, f"without the {name}: only {apart} of {total} state elements differ"


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_nan_state_stays_nan(lamb):
    """NaN gradients give NaN state by either rounding, also NaNs whose payload fills the low bits (a GPU's canonical
    NaN is 0x7FFFFFFF): adding the rounding's bits to those would carry out of the exponent, to -0 or a finite
    value, without the NaN check. (Which NaN pattern is stored is torch's business: its scalar conversion stores
    0x7FC0, its vectorised one 0xFFFF.) No trust ratios (adapt=False), which a NaN norm would spread over the layer
    (as NaN in the reference, as q = 1 in the kernels)."""
    nan_patterns = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7F800001], dtype=torch.int32).view(torch.float32)
    for stochastic in (True, False):
        bucket = _bucket(lamb, kahan=False, element_offsets=[0, 0, 5, 0])
        bucket.params = [p.float() for p in bucket.params]
        bucket.grads = [g.float() for g in bucket.grads]
        for g in bucket.grads[:3]:
            flat = g.view(-1)[::7]
            flat.copy_(nan_patterns.repeat(flat.numel() // 4 + 1)[:flat.numel()])
        expected = _clone(bucket)
        if lamb:
            hp = LambHyper(**{**LAMB_HP.__dict__, "stochastic_rounding": stochastic, "adapt": False})
            _cpp_backend.lamb_step(bucket, hp)
            reference.lamb_step(expected, hp)
        else:
            hp = LarsHyper(**{**LARS_HP.__dict__, "stochastic_rounding": stochastic, "adapt": False})
            _cpp_backend.lars_step(bucket, hp)
            reference.lars_step(expected, hp)
        nans = 0
        for states, expected_states in zip(bucket.states, expected.states):
            for t, e in zip(states, expected_states):
                assert torch.equal(t.isnan(), e.isnan())
                nans += int(e.isnan().sum())
        assert nans > 100


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
@pytest.mark.parametrize("kahan", [False, True], ids=["bf16-params", "kahan"])
def test_found_inf_leaves_state_and_compensation_untouched(lamb, kahan):
    bucket = _bucket(lamb, kahan=kahan)
    before = _clone(bucket)
    _step(_cpp_backend, bucket, lamb, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    assert all(torch.equal(t, b) for t, b in zip(_written(bucket), _written(before)))
    _step(_cpp_backend, bucket, lamb, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0))  # it would write
    unchanged = [i for i, (t, b) in enumerate(zip(_written(bucket), _written(before)))
                 if t.numel() and torch.equal(t, b)]
    assert not unchanged, unchanged


@pytest.mark.parametrize("cls, kwargs", [(LARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))], ids=["lars", "lamb"])
def test_grad_scaler_skip_leaves_state_and_compensation_untouched(cls, kwargs):
    params = make_params(SHAPES, BF16)
    opt = cls(params, backend="cpp", state_dtype=BF16, kahan=True, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for k in range(2):
        set_grads(params, k)
        scale = scaler.scale(torch.tensor(1.0))  # as scaler.scale(loss).backward() would scale the gradients
        for p in params:
            p.grad.mul_(scale)
        scaler.step(opt)
        scaler.update()
    before = [t.clone() for p in params for t in [p, *opt.state[p].values()]]
    set_grads(params, 3)
    scaler.scale(torch.tensor(1.0))
    params[1].grad[0, 0, 0, 0] = float("inf")
    scaler.step(opt)
    assert sum(v.item() for v in scaler._found_inf_per_device(opt).values()) > 0  # the step saw the inf
    after = [t for p in params for t in [p, *opt.state[p].values()]]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert any("kahan_comp" in opt.state[p] and opt.state[p]["kahan_comp"].any() for p in params)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_split_step_with_one_rank_is_the_whole_step(lamb):
    """The sharded path (sums, all-reduce, apply) with bfloat16 state and compensations: LAMB stores its moments in
    the sums phase, from the step count the apply phase then writes; over one rank it is the whole step, bit for
    bit."""
    bucket = _bucket(lamb, element_offsets=[0, 3, 1000, 0])
    whole = _clone(bucket)
    bucket.reduce_sums = lambda sums: None
    for _ in range(3):
        _step(_cpp_backend, bucket, lamb)
        _step(_cpp_backend, whole, lamb)
    assert all(torch.equal(t, w) for t, w in zip(_written(bucket), _written(whole)))


@pytest.mark.parametrize("storage", ["stochastic", "kahan"])
def test_bit_identical_across_thread_counts(storage):
    threads = torch.get_num_threads()
    if os.cpu_count() == 1 or threads == 1:
        pytest.skip("one thread only: nothing to compare a one-thread step with")
    options, dtype = STORAGES[storage]
    runs = []
    for n in (threads, 1):
        torch.set_num_threads(n)
        try:
            params = make_params(SHAPES, dtype)
            opt = LAMB(params, lr=1e-2, backend="cpp", **options)
            for k in range(3):
                set_grads(params, k)
                opt.step()
        finally:
            torch.set_num_threads(threads)
        runs.append([t for p in params for t in [p, *opt.state[p].values()]])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------- the ops


def _op_args(bucket, lamb, lists=None):
    from test_cpp_backend import op_args

    return op_args(bucket, lamb, lists=lists, hp=LAMB_HP if lamb else LARS_HP)


def _ops(lamb):
    ops = torch.ops.tvlars_fused
    return (ops.lamb_step, ops.lamb_step_table) if lamb else (ops.lars_step, ops.lars_step_table)


@pytest.mark.parametrize("lamb", [False, True], ids=["lars_step", "lamb_step"])
def test_opcheck_with_bf16_state_and_comps(lamb):
    op = _ops(lamb)[0].default
    torch.library.opcheck(op, _op_args(_bucket(lamb), lamb))


@pytest.mark.parametrize("lamb", [False, True], ids=["lars_step", "lamb_step"])
def test_op_writes_the_compensations_it_is_given(lamb):
    """Under functionalization the lists hold copies of the tabled tensors: the copies' state and compensations are
    written (the fresh rows carry the comps column, and the layer numbers and offsets of the table's)."""
    bucket = _bucket(lamb, layer_ids=[4, 5, 6, 7], element_offsets=[9, 0, 0, 0])
    copies, before = _clone(bucket), _clone(bucket)
    _ops(lamb)[0](*_op_args(bucket, lamb, lists=copies))
    assert all(torch.equal(t, b) for t, b in zip(_written(bucket), _written(before)))
    expected = _clone(before)
    _step(_cpp_backend, expected, lamb)
    assert all(torch.equal(t, e) for t, e in zip(_written(copies), _written(expected)))


def test_lists_must_match_the_declared_storage():
    from test_cpp_backend import table_args

    bucket = _bucket(False)
    before = _clone(bucket)
    args = _op_args(bucket, False)
    assert args[-4] == torch.bfloat16  # the declared state dtype
    op, table_op = _ops(False)
    with pytest.raises(RuntimeError, match=r"lars_step: state\[0\] has dtype BFloat16, expected Float"):
        op(*args[:-4], torch.float32, *args[-3:])
    with pytest.raises(RuntimeError, match=r"lars_step: comps\[1\] has dtype Float, expected BFloat16"):
        op(*args[:7], [c.float() if i == 1 else c for i, c in enumerate(args[7])], *args[8:])
    plain = _bucket(False, kahan=False)
    float_params = [p.float() for p in plain.params]
    with pytest.raises(RuntimeError, match="lars_step: a Kahan compensation .comps. is for bfloat16 params without "
                                           "master weights, got Float params"):
        op(*args[:3], float_params, [g.float() for g in plain.grads], *args[5:])
    with pytest.raises(RuntimeError, match="got BFloat16 params with master weights"):
        op(*args[:6], [p.float() for p in plain.params], *args[7:])
    targs = table_args(bucket, False, hp=LARS_HP)
    targs[7] = False
    with pytest.raises(RuntimeError, match="lars_step_table: layer 0 has a Kahan compensation but has_comp is false"):
        table_op(*targs)
    targs = table_args(plain, False, hp=LARS_HP)
    targs[7] = True
    with pytest.raises(RuntimeError, match="lars_step_table: layer 0 has no Kahan compensation but has_comp is true"):
        table_op(*targs)
    assert all(torch.equal(t, b) for t, b in zip(_written(bucket), _written(before)))

