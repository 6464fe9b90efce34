"""bfloat16 state with stochastic rounding, and Kahan-compensated bfloat16 weights (docs/algorithms.md, section 9).

What the option promises, checked on the backends every machine has (the fused backends' kernels are compared
with the reference in their own files): the stochastic store is unbiased and a truncating store is caught, the
random stream is the documented hash and reproducible, rounding matters where it should (a bfloat16 second moment
stalls under round-to-nearest and follows float32 under stochastic rounding; a bfloat16 weight whose updates are
below its half-ulp moves only with Kahan compensation), checkpoints convert between state dtypes, bad
combinations are refused before anything is written, and a skipped step writes nothing.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from cases import (BF16_CASES, SHAPES, SMALL_SHAPES, bf16_bits as _bits, bf16_lockstep, make_params,
                   set_grads)
from tvlars_fused import LAMB, LARS, TVLARS, _rounding
from tvlars_fused._types import Bucket, LambHyper, LarsHyper

BF16 = torch.bfloat16
OPTIMIZERS = {
    "tvlars": (TVLARS, dict(lr=0.5, lmbda=0.05)),
    "lars": (LARS, dict(lr=0.5, nesterov=True)),
    "lamb": (LAMB, dict(lr=1e-2)),
}
STATE_KEYS = {"tvlars": ("momentum_buffer",), "lars": ("momentum_buffer",), "lamb": ("exp_avg", "exp_avg_sq")}


def _lowbias32(x: int) -> int:
    """The hash as docs/algorithms.md writes it, in plain Python integers (no torch), for comparison."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_stream_is_the_documented_hash():
    seed, layer, stream, t = 12345, 7, 1, 33
    key = _lowbias32(seed ^ _lowbias32(2 * layer + stream))
    base = _lowbias32(key ^ t)
    index = torch.tensor([0, 1, 2, 1000, 2**32 + 5, 3 * 2**32 + 9])
    expected = [_lowbias32(((base ^ (i & 0xFFFFFFFF)) + (i >> 32) * 0x9E3779B9) & 0xFFFFFFFF) >> 16
                for i in index.tolist()]
    got = _rounding.element_bits(_rounding.step_base(_rounding.layer_key(seed, layer, stream), torch.tensor(float(t))),
                                 index)
    assert got.tolist() == expected


def _stochastic_mean_error(store_bits) -> torch.Tensor:
    """z-scores of the mean of 2,000 stochastic stores of 512 values against the values themselves: each store
    draws its bits from another step count of the stream; the stored value is x rounded down (towards zero) or up
    one bfloat16 ulp, so its standard error is ulp * sqrt(p (1 - p) / n) with p the exact fraction x lies above."""
    x = (torch.randn(512, generator=torch.Generator().manual_seed(3)) * 10).float()
    down = _rounding.stochastic_round(x, torch.zeros(512, dtype=torch.int64))  # towards zero
    up = _rounding._bf16_from_bits((_bits(down) + 1) & 0xFFFF)  # the next bfloat16 away from zero
    ulp = (up.float() - down.float()).abs()
    p = (x - down.float()).abs() / ulp
    assert torch.all((p > 0) & (p < 1))  # no x is a bfloat16 value
    draws = 2000
    index = torch.arange(512)
    total = torch.zeros(512, dtype=torch.float64)
    for t in range(1, draws + 1):
        total += store_bits(x, index, t).to(torch.float64)
    mean = total / draws
    standard_error = ulp.double() * torch.sqrt(p.double() * (1 - p.double()) / draws)
    return (mean - x.double()) / standard_error.clamp(min=1e-30)


def _stochastic_store(x, index, t):
    base = _rounding.step_base(_rounding.layer_key(0, 0, 0), torch.tensor(float(t)))
    return _rounding.stochastic_round(x, _rounding.element_bits(base, index)).float()


def _truncating_store(x, index, t):
    return _rounding.stochastic_round(x, torch.zeros_like(index)).float()  # no random bits: truncation


def test_stochastic_rounding_is_unbiased():
    z = _stochastic_mean_error(_stochastic_store)
    # 512 independent z-scores: none beyond 5 (p ~ 3e-4 for one of them at random), and their mean near 0.
    assert z.abs().max() < 5, z.abs().max()
    assert abs(z.mean()) < 4 / math.sqrt(512), z.mean()


def test_a_truncating_store_fails_the_unbiasedness_check():
    z = _stochastic_mean_error(_truncating_store)
    assert z.abs().max() > 5 and abs(z.mean()) > 4 / math.sqrt(512)


def test_stochastic_rounding_keeps_nan_and_rounds_between_neighbours():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, 3e38, -1e-40])
    for bits in (0, 0x7FFF, 0xFFFF):
        y = _rounding.stochastic_round(x, torch.full((8,), bits, dtype=torch.int64))
        assert torch.isnan(y[0]) and y[1] == math.inf and y[2] == -math.inf
        assert y[3] == 0 and y[4] == 0 and torch.signbit(y[4]) and y[5] == 1.0
    y = torch.tensor([1.0 + 2**-8], dtype=torch.float32)  # halfway between 1 and 1 + 2**-7
    assert _rounding.stochastic_round(y, torch.tensor([0x7FFF])).item() == 1.0
    assert _rounding.stochastic_round(y, torch.tensor([0x8000])).item() == 1.0 + 2**-7


def _train(name, backend="reference", steps=6, shapes=SMALL_SHAPES, dtype=torch.float32, **options):
    cls, kwargs = OPTIMIZERS[name]
    params = make_params(shapes, dtype)
    opt = cls(params, backend=backend, **kwargs, **options)
    for step in range(steps):
        set_grads(params, step)
        opt.step()
    return params, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_is_bfloat16_and_a_run_is_bit_reproducible(name):
    params, opt = _train(name, state_dtype=BF16, seed=5)
    again, opt_again = _train(name, state_dtype=BF16, seed=5)
    other, opt_other = _train(name, state_dtype=BF16, seed=6)
    differ = 0
    for p, q, r in zip(params, again, other):
        assert torch.equal(p, q)
        for key in STATE_KEYS[name]:
            s = opt.state[p][key]
            assert s.dtype == BF16 and s.shape == p.shape
            assert torch.equal(s, opt_again.state[q][key])
            differ += int((s != opt_other.state[r][key]).sum())
    assert differ > 0  # another seed, other rounding
    assert opt.state_dict()["param_groups"][0]["seed"] == 5


@pytest.mark.parametrize("case", BF16_CASES, ids=repr)
@pytest.mark.parametrize("storage", ["stochastic", "nearest", "kahan"])
def test_foreach_matches_the_reference(case, storage):
    """The foreach backend follows the same steps in multi-tensor ops; its float32 values can differ from the
    reference's by an ulp (other operation order, as for float32 state), so a rounding can rarely go the other way
    (cases.bf16_lockstep)."""
    options = dict(state_dtype=BF16, rounding="nearest" if storage == "nearest" else "stochastic",
                   kahan=storage == "kahan", seed=4)
    bf16_lockstep(case, "foreach", options, dtype=BF16 if storage == "kahan" else torch.float32, shapes=SHAPES)


def test_the_step_continues_with_the_stored_moments():
    """LAMB's u comes from the stored (rounded) moments: a reference step from bfloat16 moments equals a float32
    reference step from the same moments widened, stored with the same bits, for a layer whose rounding is exact."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    opt = LAMB([p], lr=0.1, state_dtype=BF16, rounding="nearest", weight_decay=0.0, backend="reference")
    p.grad = torch.tensor([0.5, 0.25, -1.0, 2.0])  # (1 - beta1) g and (1 - beta2) g^2: not bf16 values
    opt.step()
    m, v = opt.state[p]["exp_avg"].float(), opt.state[p]["exp_avg_sq"].float()
    u = (m / 0.1) / ((v / (1 - 0.999)).sqrt() + 1e-6)
    q = torch.tensor([1.0, -2.0, 3.0, 0.5]).norm() / u.norm()
    expected = torch.tensor([1.0, -2.0, 3.0, 0.5]) - 0.1 * q * u
    torch.testing.assert_close(p.detach(), expected, rtol=2e-6, atol=0)


def test_stochastic_rounding_follows_float32_where_nearest_stalls():
    """exp_avg_sq with a constant gradient and beta2 = 0.999: each step adds 0.1 % of the gap to g^2. Once that is
    below half a bfloat16 ulp (0.2 %), round-to-nearest stores the old value again and the moment stalls far
    below float32's; stochastic rounding follows float32 in expectation."""
    def second_moment(**options):
        p = torch.nn.Parameter(torch.ones(4096))
        opt = LAMB([p], lr=0.0, weight_decay=0.0, backend="foreach", **options)
        for _ in range(1500):
            p.grad = torch.ones(4096)
            opt.step()
        return opt.state[p]["exp_avg_sq"].float().mean().item()

    float32 = second_moment()
    assert abs(float32 - (1 - 0.999**1500)) < 1e-4
    stochastic = second_moment(state_dtype=BF16)
    nearest = second_moment(state_dtype=BF16, rounding="nearest")
    assert abs(stochastic - float32) < 0.01 * float32, (stochastic, float32)
    assert nearest < 0.6 * float32, (nearest, float32)


def test_kahan_keeps_updates_below_half_an_ulp():
    """SGD-like steps (excluded layer: q = 1, no momentum or decay) of 1e-4 on a weight of 1: each is below half a
    bfloat16 ulp (2**-8), so a bfloat16 weight never moves; with Kahan compensation param + comp follows float32."""
    def weight(**options):
        p = torch.nn.Parameter(torch.ones(64, dtype=BF16))
        opt = LARS([p], lr=1e-4, momentum=0.0, weight_decay=0.0, backend="reference", **options)
        for _ in range(1000):
            p.grad = torch.ones(64, dtype=BF16)
            opt.step()
        return p, opt

    plain, _ = weight()
    assert torch.all(plain == 1)
    compensated, opt = weight(kahan=True)
    comp = opt.state[compensated]["kahan_comp"]
    assert comp.dtype == BF16
    total = compensated.float() + comp.float()
    # The compensation is itself bfloat16 (8 bits below the parameter's 8): each step's rest is stored to about
    # 2**-17 of the weight, so the pair follows float32 to within 1 % of the 0.1 it moved (the plain one: 100 %).
    torch.testing.assert_close(total, torch.full((64,), 0.9), rtol=0, atol=1e-3)
    assert torch.all(compensated.float() < 0.91)  # the parameter itself moved, not only the compensation


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_checkpoints_move_between_state_dtypes(name):
    params, opt = _train(name)  # float32 state
    saved = opt.state_dict()
    cls, kwargs = OPTIMIZERS[name]
    bf16 = cls([p.detach().clone().requires_grad_() for p in params], state_dtype=BF16, seed=9, kahan=False,
               **kwargs)
    bf16.load_state_dict(saved)
    group = bf16.param_groups[0]
    assert group["state_dtype"] == BF16 and group["seed"] == 0  # storage from the live optimizer, seed restored
    for p, q in zip(params, bf16.param_groups[0]["params"]):
        for key in STATE_KEYS[name]:
            loaded = bf16.state[q][key]
            assert loaded.dtype == BF16 and torch.equal(loaded, opt.state[p][key].to(BF16))  # rounded to nearest
    widened = cls([p.detach().clone().requires_grad_() for p in params], **kwargs)
    widened.load_state_dict(bf16.state_dict())
    for q, r in zip(bf16.param_groups[0]["params"], widened.param_groups[0]["params"]):
        for key in STATE_KEYS[name]:
            assert widened.state[r][key].dtype == torch.float32
            assert torch.equal(widened.state[r][key], bf16.state[q][key].float())  # exact
    buffer = io.BytesIO()  # a bfloat16-state checkpoint (dtypes in its param groups) loads with weights_only
    torch.save(bf16.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["param_groups"][0]["state_dtype"] == BF16
    # and the loaded optimizer steps on (the cached plan sees the new state)
    set_grads(list(widened.param_groups[0]["params"]), 50)
    widened.step()


def test_a_checkpoint_gains_or_loses_the_kahan_compensation():
    p = torch.nn.Parameter(torch.ones(8, dtype=BF16))
    opt = LARS([p], lr=1e-4, momentum=0.0, weight_decay=0.0, kahan=True)
    p.grad = torch.ones(8, dtype=BF16)
    opt.step()
    saved = opt.state_dict()
    assert "kahan_comp" in saved["state"][0]
    plain = LARS([p], lr=1e-4, momentum=0.0, weight_decay=0.0)
    plain.load_state_dict(saved)
    assert "kahan_comp" not in plain.state[p] and plain.param_groups[0]["kahan"] is False
    again = LARS([p], lr=1e-4, momentum=0.0, weight_decay=0.0, kahan=True)
    again.load_state_dict(plain.state_dict())
    p.grad = torch.ones(8, dtype=BF16)
    again.step()
    assert torch.equal(again.state[p]["kahan_comp"].float(), torch.full((8,), -1e-4).to(BF16).float())


@pytest.mark.parametrize("kwargs,message", [
    (dict(state_dtype=torch.float16), "state_dtype"),
    (dict(state_dtype="bfloat16"), "state_dtype"),
    (dict(rounding="up"), "rounding"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
    (dict(kahan="yes"), "kahan"),
    (dict(kahan=True, master_weights=True), "kahan"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LARS([torch.nn.Parameter(torch.ones(3, dtype=BF16))], lr=0.1, **kwargs)


def test_combinations_that_make_no_sense_are_refused_naming_the_parameter():
    with pytest.raises(ValueError, match="kahan=True, but parameter 1 of param group 0 is torch.float32"):
        LAMB([torch.nn.Parameter(torch.ones(3, dtype=BF16)), torch.nn.Parameter(torch.ones(3))], kahan=True)
    with pytest.raises(ValueError, match="parameter 0 of param group 0 is float64"):
        LAMB([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))], state_dtype=BF16)


def test_a_hand_edit_that_makes_no_sense_is_refused_before_anything_is_written():
    params, opt = _train("lars", steps=2, state_dtype=BF16)
    before = [p.detach().clone() for p in params]
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    opt.param_groups[0]["kahan"] = True  # float32 parameters
    set_grads(params, 3)
    with pytest.raises(ValueError, match="kahan=True, but parameter 0"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        assert all(torch.equal(opt.state[p][k], v) for k, v in states[id(p)].items())


@pytest.mark.parametrize("backend", ["reference", "foreach"])
@pytest.mark.parametrize("lamb", [False, True], ids=["lars", "lamb"])
def test_a_skipped_step_writes_nothing(backend, lamb):
    from tvlars_fused import _backends

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen).to(BF16), torch.randn(7, generator=gen).to(BF16)]
    bucket = Bucket(params=params, grads=[torch.randn_like(p) for p in params],
                    states=[[torch.randn(p.shape, generator=gen).to(BF16) for p in params]
                            for _ in range(2 if lamb else 1)],
                    steps=[torch.tensor(3.0) for _ in params], excluded=[False, True],
                    comps=[torch.randn(p.shape, generator=gen).to(BF16) * 1e-3 for p in params])
    written = bucket.params + bucket.comps + [s for states in bucket.states for s in states] + bucket.steps
    before = [t.clone() for t in written]
    hp = LambHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                   norm_clip=None) if lamb else LarsHyper(lr=0.1, momentum=0.9, weight_decay=5e-4, eta=1e-3,
                                                          eps=0.0, norm_clip=None, sum_of_norms=False,
                                                          nesterov=False, use_phi=False)
    step = getattr(_backends.module(backend), "lamb_step" if lamb else "lars_step")
    step(bucket, hp, None, torch.tensor(1.0))
    assert all(torch.equal(t, b) for t, b in zip(written, before))
    step(bucket, hp, None, torch.tensor(0.0))  # and the same step unskipped writes them
    assert not torch.equal(bucket.states[0][0], before[4])


def test_the_step_inside_backward_draws_the_same_bits():
    """Layers keep their number in the stream whatever bucket steps them: the step inside backward (buckets in
    gradient order) stays bit-identical to the ordinary step with bfloat16 state."""
    import test_in_backward as tib

    saved = dict(tib.OPTIMIZERS)
    try:
        for name, (cls, kwargs) in saved.items():
            tib.OPTIMIZERS[name] = (cls, dict(kwargs, state_dtype=BF16, seed=3))
        for name in saved:
            model, opt, handle = tib._train_both(name, "foreach", torch.float32, iterations=4)
            assert len(handle._slots) >= 3
            assert next(iter(opt.state.values()))["step"] == 4
            assert any(v.dtype == BF16 for s in opt.state.values() for v in s.values())
    finally:
        tib.OPTIMIZERS.clear()
        tib.OPTIMIZERS.update(saved)


def test_channels_last_state_draws_bits_in_memory_order():
    """The element index is the position in memory: a channels_last layer stores what the same values laid out
    contiguously in that order store."""
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    dest = torch.empty_like(x, dtype=BF16)
    _rounding.store(dest, x, stochastic=True, seed=1, layer_id=2, stream=0, step=torch.tensor(4.0))
    flat = x.permute(0, 2, 3, 1).reshape(-1)  # memory order of NCHW channels_last
    expected = torch.empty_like(flat, dtype=BF16)
    _rounding.store(expected, flat, stochastic=True, seed=1, layer_id=2, stream=0, step=torch.tensor(4.0))
    assert torch.equal(dest.permute(0, 2, 3, 1).reshape(-1), expected)


def test_a_compiled_step_draws_the_eager_bits_and_never_recompiles():
    """Under torch.compile the step count that feeds the hash is a tensor: each step draws new bits without a
    recompilation, and the stored state is the eager step's (Inductor's float32 arithmetic may differ by an ulp:
    within cases.bf16_ulp_distance of one, rarely)."""
    import torch._dynamo

    from cases import assert_bf16_states_agree

    torch._dynamo.reset()
    name = "lamb"  # both state streams; tracing costs about 10 s per layer here, so three layers
    cls, kwargs = OPTIMIZERS[name]
    shapes = [(16, 8), (37,), (3, 3, 4, 4)]
    params, twin = make_params(shapes), make_params(shapes)
    opt = cls(params, backend="foreach", state_dtype=BF16, seed=2, **kwargs)
    twin_opt = cls(twin, backend="foreach", state_dtype=BF16, seed=2, **kwargs)
    compiled = torch.compile(opt.step)
    for step in range(5):
        set_grads(params, step)
        set_grads(twin, step)
        if step == 2:  # traced for the first step (state created) and a steady one; never again
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled()
        else:
            compiled()
        twin_opt.step()
    for key in STATE_KEYS[name]:
        assert_bf16_states_agree([opt.state[p][key] for p in params], [twin_opt.state[q][key] for q in twin],
                                 max_fraction=1e-3)
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
