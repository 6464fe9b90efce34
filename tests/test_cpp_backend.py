"""The CPU twin (backend="cpp") beyond the parity table: GradScaler inputs, lr as a tensor, reproducibility,
many layers, strided layers, master weights, the op schemas and their checks."""

import os

import numpy as np
import pytest
import torch

from buckets import assert_buckets_close, assert_buckets_equal, bucket_tensors, clone_bucket, make_bucket
from cases import CASES, SHAPES, assert_matches, backend_or_skip, make_params, run, set_grads
from spec_numpy import lamb as spec_lamb
from spec_numpy import lars_family as spec_lars
from tvlars_fused import LAMB, TVLARS, _extension, _foreach, reference

_unavailable = _extension.unavailable_reason("cpu")
if _unavailable is not None:  # a failed build must not fail collection (and hide every other test with it)
    pytest.skip(f"the cpp backend is unavailable: {_unavailable}", allow_module_level=True)
from tvlars_fused import _cpp_backend  # noqa: E402
from tvlars_fused._layer_table import prepare
from tvlars_fused._types import Bucket, LambHyper, LarsHyper

pytestmark = pytest.mark.usefixtures("cpp_backend")

TVLARS_HP = LarsHyper(lr=0.5, momentum=0.9, weight_decay=5e-4, eta=1e-3, eps=0.0, norm_clip=None,
                      sum_of_norms=False, nesterov=False, use_phi=True, lmbda=1e-3, alpha=1.0, delay=0.0,
                      gamma_min=0.0)
LAMB_HP = LambHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                    norm_clip=10.0)


@pytest.fixture
def cpp_backend():
    backend_or_skip("cpp")








def step(bucket, lamb, backend, grad_scale=None, found_inf=None, **hyper):
    if lamb:
        backend.lamb_step(bucket, LambHyper(**{**LAMB_HP.__dict__, **hyper}), grad_scale, found_inf)
    else:
        backend.lars_step(bucket, LarsHyper(**{**TVLARS_HP.__dict__, **hyper}), grad_scale, found_inf)






def assert_step_wrote_everything(bucket, before):
    """The positive control of a found_inf test: the same step with found_inf = 0 writes every parameter, state,
    master and step count (so that "nothing was written" with the flag set shows the flag at work, not a step that
    writes nothing), and still leaves the gradients alone. Empty layers have nothing to write but their step count."""
    pairs = zip(bucket_tensors(bucket, grads=False), bucket_tensors(before, grads=False))
    unchanged = [i for i, (t, b) in enumerate(pairs) if t.numel() and torch.equal(t, b)]
    assert not unchanged, f"tensors the step did not write (params, steps, states, masters in order): {unchanged}"
    assert all(s.item() == b.item() + 1 for s, b in zip(bucket.steps, before.steps))
    assert all(torch.equal(g, b) for g, b in zip(bucket.grads, before.grads))


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
@pytest.mark.parametrize("masters", [False, True], ids=["params", "masters"])
def test_found_inf_writes_nothing(lamb, masters):
    bucket = make_bucket(SHAPES, lamb=lamb, dtype=torch.bfloat16 if masters else torch.float32, masters=masters)
    before = clone_bucket(bucket)
    step(bucket, lamb, _cpp_backend, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    assert_buckets_equal(bucket, before)
    step(bucket, lamb, _cpp_backend, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    assert_step_wrote_everything(bucket, before)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_grad_scale_divides_gradients(lamb):
    scale = torch.tensor(1024.0)
    bucket = make_bucket(SHAPES, lamb=lamb, grad_factor=1024.0)
    expected = clone_bucket(bucket)
    for _ in range(3):
        step(bucket, lamb, _cpp_backend, grad_scale=scale)
        step(expected, lamb, reference, grad_scale=scale)
    assert_buckets_close(bucket, expected, 1e-6)
    unscaled = make_bucket(SHAPES, lamb=lamb)  # the same gradients, not scaled (1024 is a power of two)
    for _ in range(3):
        step(unscaled, lamb, _cpp_backend)
    assert_buckets_equal(bucket, unscaled, grads=False)


def test_lamb_clip_coef_multiplies_gradients():
    bucket = make_bucket(SHAPES, lamb=True)
    expected = clone_bucket(bucket)
    coef = torch.tensor(0.37)
    step(bucket, True, _cpp_backend, grad_scale=torch.tensor(2.0), clip_coef=coef)
    step(expected, True, reference, grad_scale=torch.tensor(2.0), clip_coef=coef)
    assert_buckets_close(bucket, expected, 1e-6)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_lr_tensor_is_read_at_each_step(lamb):
    lr = torch.tensor(0.25)
    with_tensor = make_bucket(SHAPES, lamb=lamb)
    with_float = clone_bucket(with_tensor)
    for value in (0.25, 0.1, 0.0):
        lr.fill_(value)  # like an LR scheduler writing a tensor lr in place
        step(with_tensor, lamb, _cpp_backend, lr=lr)
        step(with_float, lamb, _cpp_backend, lr=value)
    assert_buckets_equal(with_tensor, with_float)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_bit_identical_across_runs_and_thread_counts(case):
    threads = torch.get_num_threads()
    if os.cpu_count() == 1 or threads == 1:
        pytest.skip(f"one thread only (os.cpu_count() = {os.cpu_count()}, torch.get_num_threads() = {threads}): "
                    "nothing to compare a one-thread step with")
    first, first_opt = run(case, "cpp", steps=5)
    try:
        torch.set_num_threads(1)
        second, second_opt = run(case, "cpp", steps=5)
    finally:
        torch.set_num_threads(threads)
    assert_matches(first, second, first_opt, second_opt, rtol=0, atol=0)


@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))], ids=["tvlars", "lamb"])
def test_thousands_of_tiny_layers_in_one_call(cls, kwargs):
    shapes = [(1 + i % 7, 1 + i % 5) if i % 3 else (i % 11,) for i in range(3000)]
    params = make_params(shapes)
    ref_params = make_params(shapes)
    opt = cls(params, backend="cpp", **kwargs)
    ref_opt = cls(ref_params, backend="reference", **kwargs)
    for k in range(3):
        set_grads(params, k)
        set_grads(ref_params, k)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        ref_opt.step()
        op = "tvlars_fused::lamb_step_table" if cls is LAMB else "tvlars_fused::lars_step_table"
        assert sum(e.name.startswith("tvlars_fused::") for e in prof.events()) == 1
        assert sum(e.name == op for e in prof.events()) == 1
    assert_matches(params, ref_params, opt, ref_opt, rtol=1e-6, atol=1e-6)


def test_master_weights_match_reference():
    case = next(c for c in CASES if c.name == "tvlars")
    kwargs = dict(dtype=torch.bfloat16, steps=10, optimizer_kwargs=dict(master_weights=True))
    params, opt = run(case, "cpp", **kwargs)
    ref_params, ref_opt = run(case, "reference", **kwargs)
    for p, r in zip(params, ref_params):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(opt.state[p]["master_weight"], ref_opt.state[r]["master_weight"],
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(p, opt.state[p]["master_weight"].to(torch.bfloat16))  # one rounding from the master
    assert_matches(params, ref_params, opt, ref_opt, rtol=2 * 2.0 ** -8, atol=2 * 2.0 ** -8)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_strided_layers_go_to_foreach_in_place(lamb):
    bucket = make_bucket(SHAPES, lamb=lamb)
    base = torch.randn(16, 32)
    bucket.params[0] = base[:, ::2]  # not dense: the table cannot cover it
    bucket.grads[0] = torch.randn(16, 16)
    for s in bucket.states:
        s[0] = torch.zeros(16, 16)
    expected = clone_bucket(bucket)
    pointer = bucket.params[0].data_ptr()
    step(bucket, lamb, _cpp_backend)
    step(expected, lamb, reference)
    _, _, rest = prepare(bucket, _cpp_backend.CHUNK)
    assert rest is not None and len(rest) == 1
    assert bucket.params[0].data_ptr() == pointer and torch.equal(base[:, ::2], bucket.params[0])
    assert_buckets_close(bucket, expected, 1e-6)


def test_chunk_elements_uses_64_bit_offsets():
    # Layers above 2^31 elements need > 24 GB with their gradient and state: the full step on such a layer is
    # tested on the GPU machine (tests/test_cuda_gpu.py); here the kernels' own int64 chunk arithmetic is checked.
    ops = torch.ops.tvlars_fused
    numel, chunk = 3 * 2 ** 31 + 5, 16384
    num_chunks = -(-numel // chunk)
    first = 7
    assert ops.chunk_elements(numel, first, first, chunk) == [0, chunk]
    assert ops.chunk_elements(numel, first, first + 2 ** 17 + 3, chunk) == [(2 ** 17 + 3) * chunk,
                                                                          (2 ** 17 + 4) * chunk]
    assert ops.chunk_elements(numel, first, first + num_chunks - 1, chunk) == [(num_chunks - 1) * chunk, numel]
    assert ops.chunk_elements(0, first, first, chunk) == [0, 0]


def op_args(bucket, lamb, lists=None, hp=None):
    """The op's arguments for the bucket's table; the tensor lists from ``lists`` (default: the bucket), the
    hyper-parameters from ``hp`` (default: LAMB_HP or TVLARS_HP)."""
    covered, table, _ = prepare(bucket, _cpp_backend.CHUNK)
    lists = lists or covered
    head = [table.layers, table.layers_host, table.chunk_layer, lists.params, lists.grads, *lists.states,
            lists.masters or [], lists.comps or [], lists.steps, _cpp_backend._workspace(table), None, None, None]
    return head + hyper_args(lamb, hp) + [covered.state_dtype, *rounding_args(lamb, hp)]


def hyper_args(lamb, hp=None):
    """The ops' hyper-parameter arguments, the same in both forms: LAMB's clip_coef (None) and the hyper-parameters
    from ``hp`` (default: LAMB_HP or TVLARS_HP) up to ``adapt``."""
    if lamb:
        h = hp or LAMB_HP
        return [None, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.bias_correction, h.norm_clip,
                h.grad_averaging, h.decoupled_decay, h.min_trust_ratio, h.max_trust_ratio, h.adapt]
    h = hp or TVLARS_HP
    return [h.lr, h.momentum, h.weight_decay, h.eta, h.eps, h.norm_clip, h.sum_of_norms, h.nesterov, h.use_phi,
            h.lmbda, h.alpha, h.delay, h.gamma_min, h.dampening, h.trust_clip, h.min_trust_ratio, h.max_trust_ratio,
            h.adapt]


def rounding_args(lamb, hp=None):
    """The ops' last arguments, the same in both forms: stochastic rounding and its seed (for bfloat16 state), then
    the chunk size (the list form takes the state's dtype before them)."""
    h = hp or (LAMB_HP if lamb else TVLARS_HP)
    return [h.stochastic_rounding, h.seed, _cpp_backend.CHUNK]


@pytest.mark.parametrize("lamb", [False, True], ids=["lars_step", "lamb_step"])
def test_opcheck(lamb):
    op = torch.ops.tvlars_fused.lamb_step.default if lamb else torch.ops.tvlars_fused.lars_step.default
    args = op_args(make_bucket([(4, 3), (5,), (0,), (2, 2)], lamb=lamb), lamb)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("lamb", [False, True], ids=["lars_step", "lamb_step"])
def test_op_writes_the_tensors_it_is_given(lamb):
    """Under functionalization the lists hold copies of the tabled tensors: the copies must be updated."""
    bucket = make_bucket(SHAPES, lamb=lamb)
    copies = clone_bucket(bucket)
    before = clone_bucket(bucket)
    args = op_args(bucket, lamb, lists=copies)
    (torch.ops.tvlars_fused.lamb_step if lamb else torch.ops.tvlars_fused.lars_step)(*args)
    assert_buckets_equal(bucket, before)
    expected = clone_bucket(before)
    step(expected, lamb, _cpp_backend)
    assert_buckets_equal(copies, expected)


@pytest.mark.parametrize("position, value, message", [
    (12, torch.tensor([1.0, 2.0]), "found_inf must have one element"),
    (11, torch.tensor(2.0, dtype=torch.float64), "grad_scale must be float32"),
    (10, torch.zeros(1, dtype=torch.int32), "lr_tensor must be float32"),
    (9, torch.zeros(3), "workspace must be"),
    (-1, 6, "chunk_size must be a positive multiple of 4"),
    (-2, 2**32, r"lars_step: seed must be in \[0, 2\*\*32\), got 4294967296"),
    (-2, -1, r"lars_step: seed must be in \[0, 2\*\*32\), got -1"),
    (-4, torch.float16, "lars_step: state_dtype must be float32 or bfloat16, got Half"),
])
def test_bad_arguments_name_the_parameter(position, value, message):
    bucket = make_bucket(SHAPES)
    before = clone_bucket(bucket)
    args = op_args(bucket, False)
    args[position] = value
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tvlars_fused.lars_step(*args)
    assert_buckets_equal(bucket, before)


def test_mismatched_lists_are_rejected():
    bucket = make_bucket(SHAPES)
    args = op_args(bucket, False)
    args[4] = args[4][:-1]
    with pytest.raises(RuntimeError, match="grads has 9 tensors but the layer table has 10 layers"):
        torch.ops.tvlars_fused.lars_step(*args)
    args = op_args(bucket, False)
    args[5] = [s.double() for s in args[5]]
    with pytest.raises(RuntimeError, match=r"state\[0\] has dtype Double, expected Float"):
        torch.ops.tvlars_fused.lars_step(*args)


def test_foreach_and_cpp_agree_on_a_mixed_bucket():
    """Sanity on the comparison itself: a real difference (another lr) is caught at the tolerance used above."""
    bucket = make_bucket(SHAPES)
    other = clone_bucket(bucket)
    step(bucket, False, _cpp_backend)
    step(other, False, _foreach, lr=0.5 * (1 + 1e-5))
    with pytest.raises(AssertionError):
        assert_buckets_close(bucket, other, 1e-6)


def test_missing_build_tools_are_named(monkeypatch):
    from tvlars_fused import _extension

    with pytest.raises(ValueError, match="must be 'cpu' or 'cuda'"):
        _extension.unavailable_reason("gpu")
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert _extension._missing_tools("cpu") == "no C++ compiler ('no-such-compiler' is not on PATH; set CXX)"
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("TVLARS_FUSED_JIT", "0")
    assert _extension._missing_tools("cpu") == "TVLARS_FUSED_JIT=0 forbids building it"
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU-only build" in _extension._missing_tools("cuda")


@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))], ids=["tvlars", "lamb"])
def test_grad_scaler_unscales_in_the_op_and_skips_inf_steps(cls, kwargs):
    params = make_params(SHAPES)
    ref_params = make_params(SHAPES)
    opt = cls(params, backend="cpp", **kwargs)
    ref_opt = cls(ref_params, backend="reference", **kwargs)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for k in range(3):
        set_grads(ref_params, k)
        ref_opt.step()
        set_grads(params, k)
        scale = scaler.scale(torch.tensor(1.0))  # as scaler.scale(loss).backward() would scale the gradients
        for p in params:
            p.grad.mul_(scale)
        scaler.step(opt)
        scaler.update()
    assert_matches(params, ref_params, opt, ref_opt, rtol=1e-6, atol=1e-6)
    before = [p.clone() for p in params] + [t.clone() for p in params for t in opt.state[p].values()]
    set_grads(params, 3)
    params[1].grad[0, 0, 0, 0] = float("inf")
    scaler.step(opt)
    after = [p for p in params] + [t for p in params for t in opt.state[p].values()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_lamb_zero_betas_give_unit_bias_corrections():
    """log(0) = -inf on the way to -expm1(t*log(beta)) must give 1 - 0**t = 1, not NaN."""
    bucket = make_bucket(SHAPES, lamb=True)
    expected = clone_bucket(bucket)
    for _ in range(2):
        step(bucket, True, _cpp_backend, beta1=0.0, beta2=0.0)
        step(expected, True, reference, beta1=0.0, beta2=0.0)
    assert_buckets_close(bucket, expected, 1e-6)


# ---------------------------------------------------------------- sharded buckets: the step split around reduce_sums

# norm_clip=30 clips the large layers' norms only, so the small layers' ratios still depend on the sums.
SPLIT_CASES = [(False, {}), (False, dict(use_phi=False)),
               (False, dict(use_phi=False, sum_of_norms=True, norm_clip=30.0)), (True, {})]
SPLIT_IDS = ["tvlars", "lars", "lars-sum-of-norms", "lamb"]


def other_ranks(sums):
    """Stands in for the all-reduce: elementwise, so the same for the reference's per-norm calls, and it changes
    every trust ratio (doubling alone would leave w/d ratios as they are), so a step that skipped it or
    reduced the wrong numbers would not match."""
    sums.mul_(2.0).add_(0.5)


def counting(reduce, calls):
    def reduce_sums(sums):
        calls.append(tuple(sums.shape))
        reduce(sums)

    return reduce_sums


@pytest.mark.parametrize("lamb, hyper", SPLIT_CASES, ids=SPLIT_IDS)
def test_split_step_matches_reference_with_the_same_reduce_sums(lamb, hyper):
    bucket = make_bucket(SHAPES, lamb=lamb)
    expected, unsharded = clone_bucket(bucket), clone_bucket(bucket)
    calls = []
    bucket.reduce_sums = counting(other_ranks, calls)
    expected.reduce_sums = other_ranks
    for _ in range(3):
        step(bucket, lamb, _cpp_backend, **hyper)
        step(expected, lamb, reference, **hyper)
        step(unsharded, lamb, _cpp_backend, **hyper)
    assert calls == [(len(SHAPES), 2)] * 3  # one all-reduce of all the layers' sums per step
    assert_buckets_close(bucket, expected, 1e-6)
    # The reduced sums were used: the trust ratios, hence LARS's momentum and LAMB's weights, differ unsharded.
    moved = [not torch.allclose(t, u, rtol=1e-4, atol=0)
             for t, u in zip(bucket_tensors(bucket, grads=False), bucket_tensors(unsharded, grads=False))]
    assert any(moved)


@pytest.mark.parametrize("lamb, hyper", SPLIT_CASES, ids=SPLIT_IDS)
@pytest.mark.parametrize("masters", [False, True], ids=["params", "masters"])
def test_split_step_with_one_rank_is_the_whole_step(lamb, hyper, masters):
    """An all-reduce over one rank changes nothing: sums then apply must be bit-identical to one call."""
    bucket = make_bucket(SHAPES, lamb=lamb, dtype=torch.bfloat16 if masters else torch.float32, masters=masters)
    whole = clone_bucket(bucket)
    bucket.reduce_sums = lambda sums: None
    for _ in range(3):
        step(bucket, lamb, _cpp_backend, grad_scale=torch.tensor(2.0), **hyper)
        step(whole, lamb, _cpp_backend, grad_scale=torch.tensor(2.0), **hyper)
    assert_buckets_equal(bucket, whole)


@pytest.mark.parametrize("lamb, hyper", SPLIT_CASES, ids=SPLIT_IDS)
def test_sums_phase_writes_the_local_sums_and_no_step(lamb, hyper):
    bucket = make_bucket(SHAPES, lamb=lamb)
    before = clone_bucket(bucket)
    hp = LambHyper(**{**LAMB_HP.__dict__, **hyper}) if lamb else LarsHyper(**{**TVLARS_HP.__dict__, **hyper})
    args = op_args(bucket, lamb, hp=hp)
    sums = torch.full((len(SHAPES), 2), float("nan"), dtype=torch.float64)
    (torch.ops.tvlars_fused.lamb_step if lamb else torch.ops.tvlars_fused.lars_step)(*args, sums,
                                                                                     _cpp_backend.PHASE_SUMS)
    w = [p.double() for p in bucket.params]
    if lamb:  # LAMB's sums phase stores the new moments; the second sum is of u from them
        m_hat = [m.double() / (1 - hp.beta1 ** (t.item() + 1)) for m, t in zip(bucket.states[0], bucket.steps)]
        v_hat = [v.double() / (1 - hp.beta2 ** (t.item() + 1)) for v, t in zip(bucket.states[1], bucket.steps)]
        second = [m / (v.sqrt() + hp.eps) + (0.0 if e else hp.weight_decay) * x
                  for m, v, x, e in zip(m_hat, v_hat, w, bucket.excluded)]
        torch.testing.assert_close(bucket.states[0][0], before.states[0][0] * 0.9 + before.grads[0] * 0.1)
    else:
        g = [x.double() for x in bucket.grads]
        second = g if hp.sum_of_norms else [gi + hp.weight_decay * x for gi, x in zip(g, w)]
    want = torch.tensor([[0.0, 0.0] if (e and not lamb) else [x.square().sum(), s.square().sum()]
                         for x, s, e in zip(w, second, bucket.excluded)])
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-6)
    unchanged = bucket.params + bucket.steps + bucket.grads + ([] if lamb else bucket.states[0])
    reference_tensors = before.params + before.steps + before.grads + ([] if lamb else before.states[0])
    assert all(torch.equal(a, b) for a, b in zip(unchanged, reference_tensors))


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_split_step_with_found_inf_writes_nothing_but_still_reduces(lamb):
    bucket = make_bucket(SHAPES, lamb=lamb)
    calls = []
    bucket.reduce_sums = counting(other_ranks, calls)
    before = clone_bucket(bucket)
    step(bucket, lamb, _cpp_backend, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    assert_buckets_equal(bucket, before)
    assert len(calls) == 1  # every rank issues the same collectives, whatever found_inf says
    step(bucket, lamb, _cpp_backend, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    assert_step_wrote_everything(bucket, before)
    bucket = clone_bucket(before)
    args = op_args(bucket, lamb)
    args[13 if lamb else 12] = torch.tensor(1.0)  # found_inf (after LAMB's two state lists)
    sums = torch.full((len(SHAPES), 2), 7.0, dtype=torch.float64)
    op = torch.ops.tvlars_fused.lamb_step if lamb else torch.ops.tvlars_fused.lars_step
    op(*args, sums, _cpp_backend.PHASE_SUMS)
    assert torch.equal(sums, torch.full((len(SHAPES), 2), 7.0, dtype=torch.float64))


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_split_step_on_empty_local_shards(lamb):
    """A rank whose shards are all empty (FSDP2 gives the last ranks nothing of a small layer) still takes
    part: its sums are 0 and its step counts advance."""
    shapes = [(0,), (0, 5), (3, 0)]
    bucket = make_bucket(shapes, lamb=lamb)
    expected = clone_bucket(bucket)
    calls = []
    bucket.reduce_sums = counting(other_ranks, calls)
    expected.reduce_sums = other_ranks
    step(bucket, lamb, _cpp_backend)
    step(expected, lamb, reference)
    assert calls == [(3, 2)]
    assert_buckets_equal(bucket, expected)
    assert [s.item() for s in bucket.steps] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("lamb", [False, True], ids=["lars_step", "lamb_step"])
@pytest.mark.parametrize("phase", [1, 2], ids=["sums", "apply"])
def test_opcheck_split_phases(lamb, phase):
    op = torch.ops.tvlars_fused.lamb_step.default if lamb else torch.ops.tvlars_fused.lars_step.default
    args = op_args(make_bucket([(4, 3), (5,), (0,), (2, 2)], lamb=lamb), lamb)
    torch.library.opcheck(op, args + [torch.rand(4, 2, dtype=torch.float64), phase])


@pytest.mark.parametrize("sums, phase, message", [
    (None, 3, "phase must be 0"),
    (None, 1, r"phase 1 needs layer_sums, a contiguous float64 tensor of shape \[10, 2\]"),
    (torch.zeros(10, 3, dtype=torch.float64), 2, r"phase 2 needs layer_sums"),
    (torch.zeros(10, 2), 1, r"phase 1 needs layer_sums"),
    (torch.zeros(2, 10, dtype=torch.float64).t(), 1, r"phase 1 needs layer_sums"),
    (torch.zeros(10, 2, dtype=torch.float64), 0, "layer_sums is read or written by phases 1 and 2 only"),
])
def test_bad_split_arguments_are_rejected(sums, phase, message):
    bucket = make_bucket(SHAPES)
    before = clone_bucket(bucket)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tvlars_fused.lars_step(*op_args(bucket, False), sums, phase)
    assert_buckets_equal(bucket, before)


# ---------------------------------------------------------------- the table-form ops


def table_args(bucket, lamb, hp=None):
    """The table-form op's arguments for the bucket (the hyper-parameters as in op_args)."""
    covered, table, _ = prepare(bucket, _cpp_backend.CHUNK)
    head = [table.layers, table.layers_host, table.chunk_layer, _cpp_backend._workspace(table), covered.dtype,
            covered.masters is not None, covered.state_dtype, covered.comps is not None, None, None, None]
    return head + hyper_args(lamb, hp) + rounding_args(lamb, hp)


def ops_of(lamb):
    """(list form, table form) of the optimizer's op."""
    ops = torch.ops.tvlars_fused
    return (ops.lamb_step, ops.lamb_step_table) if lamb else (ops.lars_step, ops.lars_step_table)


@pytest.mark.parametrize("lamb, hyper", SPLIT_CASES, ids=SPLIT_IDS)
@pytest.mark.parametrize("masters", [False, True], ids=["params", "masters"])
def test_table_form_is_bit_identical_to_list_form(lamb, hyper, masters):
    hp = LambHyper(**{**LAMB_HP.__dict__, **hyper}) if lamb else LarsHyper(**{**TVLARS_HP.__dict__, **hyper})
    listed = make_bucket(SHAPES, lamb=lamb, dtype=torch.bfloat16 if masters else torch.float32, masters=masters)
    tabled, expected = clone_bucket(listed), clone_bucket(listed)
    list_op, table_op = ops_of(lamb)
    for _ in range(3):
        list_op(*op_args(listed, lamb, hp=hp))
        table_op(*table_args(tabled, lamb, hp=hp))
        step(expected, lamb, reference, **hyper)
    assert_buckets_equal(tabled, listed)
    assert_buckets_close(tabled, expected, 2 * 2.0 ** -8 if masters else 1e-6)
    assert not torch.equal(tabled.params[0], make_bucket(SHAPES, lamb=lamb).params[0].to(tabled.dtype))


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_table_form_split_phases_match_list_form(lamb):
    listed = make_bucket(SHAPES, lamb=lamb)
    tabled = clone_bucket(listed)
    list_op, table_op = ops_of(lamb)
    for phase in (_cpp_backend.PHASE_SUMS, _cpp_backend.PHASE_APPLY):
        list_sums = torch.full((len(SHAPES), 2), 3.0, dtype=torch.float64) if phase == 2 else \
            torch.zeros(len(SHAPES), 2, dtype=torch.float64)
        table_sums = list_sums.clone()
        list_op(*op_args(listed, lamb), list_sums, phase)
        table_op(*table_args(tabled, lamb), table_sums, phase)
        assert torch.equal(table_sums, list_sums)
        assert_buckets_equal(tabled, listed)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_table_form_found_inf_writes_nothing(lamb):
    bucket = make_bucket(SHAPES, lamb=lamb)
    before = clone_bucket(bucket)
    args = table_args(bucket, lamb)
    args[9], args[10] = torch.tensor(4.0), torch.tensor(1.0)  # grad_scale, found_inf
    ops_of(lamb)[1](*args)
    assert_buckets_equal(bucket, before)
    args[10] = torch.tensor(0.0)
    ops_of(lamb)[1](*args)
    assert_step_wrote_everything(bucket, before)


def table_bad(bucket, position, value):
    args = table_args(bucket, False)
    args[position] = value
    return args


def table_without_addresses(bucket):
    """A table whose pointer columns are 0 (sizes only)."""
    from tvlars_fused._layer_table import COL_PARAM, COL_STEP, _build
    table = _build(bucket, _cpp_backend.CHUNK)
    table.layers[:, COL_PARAM:COL_STEP + 1] = 0
    return table


@pytest.mark.parametrize("change, message", [
    (lambda b: table_bad(b, 3, torch.zeros(200)), "lars_step_table: workspace must be a contiguous float64 tensor"),
    (lambda b: table_bad(b, 4, torch.float64), "lars_step_table: params must be float32, bfloat16 or float16"),
    (lambda b: table_bad(b, 5, True), "lars_step_table: master weights are for bfloat16/float16 params only"),
    (lambda b: table_bad(b, 1, table_args(b, False)[1].int()), "lars_step_table: layers_host must be a contiguous"),
    (lambda b: table_bad(b, 2, table_args(b, False)[2][:-1]), "lars_step_table: chunk_layer has"),
    (lambda b: table_bad(b, 10, torch.tensor([1.0, 0.0])), "lars_step_table: found_inf must have one element"),
    (lambda b: table_bad(b, 8, torch.zeros((), dtype=torch.float64)), "lars_step_table: lr_tensor must be float32"),
    (lambda b: table_bad(b, 6, torch.float64), "lars_step_table: state_dtype must be float32 or bfloat16"),
    (lambda b: table_bad(b, 7, True), "lars_step_table: a Kahan compensation .comps. is for bfloat16 params without "
     "master weights, got Float params"),
    (lambda b: table_bad(b, -2, 2**32), r"lars_step_table: seed must be in \[0, 2\*\*32\)"),
    (lambda b: table_bad(b, -1, 6), "lars_step_table: chunk_size must be a positive multiple of 4"),
    (lambda b: table_bad(b, -1, 8), r"lars_step_table: layer 0's row does not describe chunks of 8 elements"),
    (lambda b: [table_without_addresses(b).layers] * 2 + table_args(b, False)[2:],
     "lars_step_table: layer 0 has no tensor addresses in the table"),
    (lambda b: table_args(b, False) + [torch.zeros(10, 2), 1], r"lars_step_table: phase 1 needs layer_sums, a "
     r"contiguous float64 tensor of shape \[10, 2\]"),
    (lambda b: table_args(b, False)[:-6] + [2.0, 1.0, True, True, 0, _cpp_backend.CHUNK],
     r"lars_step_table: min_trust_ratio \(2\) must not exceed max_trust_ratio \(1\)"),
])
def test_table_form_bad_arguments_name_the_parameter(change, message):
    bucket = make_bucket(SHAPES)
    before = clone_bucket(bucket)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tvlars_fused.lars_step_table(*change(bucket))
    assert_buckets_equal(bucket, before)


def test_table_form_checks_has_master_against_the_rows():
    """has_master picks how the weights are read (float32 masters or the parameters' dtype): it must agree with
    the table's master column."""
    with_masters = make_bucket(SHAPES, lamb=True, dtype=torch.bfloat16, masters=True)
    without = make_bucket(SHAPES, lamb=True, dtype=torch.bfloat16)
    before = [clone_bucket(with_masters), clone_bucket(without)]
    args = table_args(with_masters, True)
    args[5] = False
    with pytest.raises(RuntimeError, match="lamb_step_table: layer 0 has a master weight but has_master is false"):
        torch.ops.tvlars_fused.lamb_step_table(*args)
    args = table_args(without, True)
    args[5] = True
    with pytest.raises(RuntimeError, match="lamb_step_table: layer 0 has no master weight but has_master is true"):
        torch.ops.tvlars_fused.lamb_step_table(*args)
    assert_buckets_equal(with_masters, before[0])
    assert_buckets_equal(without, before[1])


# ---------------------------------------------------------------- float64 sums of squares


def single_layer_bucket(w, lamb):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(w.shape, generator=gen)
    states = [[torch.zeros_like(w)] for _ in range(1 + lamb)]
    return Bucket(params=[w], grads=[g], states=states, steps=[torch.tensor(0.0)], excluded=[False])


def spec_step(bucket, lamb, hp):
    """The float64 NumPy reading of the spec (tests/spec_numpy.py): one step from zero state."""
    w, g = bucket.params[0].double().numpy(), bucket.grads[0].double().numpy()
    if lamb:
        return spec_lamb([w], [[g]], lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                         weight_decay=hp.weight_decay, bias_correction=hp.bias_correction, norm_clip=hp.norm_clip)[0]
    phi = dict(lmbda=hp.lmbda, alpha=hp.alpha, delay=hp.delay, gamma_min=hp.gamma_min)
    return spec_lars([w], [[g]], lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, eta=hp.eta,
                     eps=hp.eps, phi=phi)[0]


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
@pytest.mark.parametrize("form", ["table", "list"])
def test_huge_finite_weights_give_finite_norms(lamb, form):
    """|w| = 1e20: each square (1e40) overflows float32; summed in float64 the norm and the step are finite.
    LAMB without norm_clip, so that its trust ratio (~100) moves weights this large visibly."""
    w = torch.full((64, 64), 1e20) * torch.linspace(0.5, 1.5, 64 * 64).reshape(64, 64)
    bucket = single_layer_bucket(w.clone(), lamb)
    expected = clone_bucket(bucket)
    hp = LambHyper(**{**LAMB_HP.__dict__, "norm_clip": None}) if lamb else TVLARS_HP
    want = spec_step(bucket, lamb, hp)
    if form == "table":
        ops_of(lamb)[1](*table_args(bucket, lamb, hp=hp))
    else:
        ops_of(lamb)[0](*op_args(bucket, lamb, hp=hp))
    step(expected, lamb, reference, norm_clip=None)
    assert torch.isfinite(bucket.params[0]).all() and not torch.equal(bucket.params[0], w)
    assert_buckets_close(bucket, expected, 1e-6)
    np.testing.assert_allclose(bucket.params[0].double().numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_tiny_weights_take_the_trust_ratio_not_the_zero_norm_branch(lamb):
    """Squares of 1e-25 (1e-50) flush to zero in float32, which would give ||w|| = 0 and q = 1: the step would
    move w by lr * d (about 0.5). In float64 ||w|| = 6.4e-24 > 0, and q = ||w|| / ... keeps the step tiny."""
    w = torch.full((64, 64), 1e-25)
    bucket = single_layer_bucket(w.clone(), lamb)
    expected = clone_bucket(bucket)
    want = spec_step(bucket, lamb, LAMB_HP if lamb else TVLARS_HP)
    step(bucket, lamb, _cpp_backend)
    step(expected, lamb, reference)
    assert (bucket.params[0] - w).abs().max() < 1e-25  # q = 1 would move w by ~1e-3 (LAMB) or ~1 (TVLARS)
    assert_buckets_close(bucket, expected, 1e-6)
    np.testing.assert_allclose(bucket.params[0].double().numpy(), want, rtol=1e-6)
