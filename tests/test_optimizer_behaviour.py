"""The classes behave like torch.optim optimizers: closures, groups, skipped params, schedulers, checkpoints."""

import io

import pytest
import torch

import stepwise
from cases import CASES, SMALL_SHAPES, backend_or_skip, make_params, run, set_grads
from tvlars_fused import LAMB, LARS, TVLARS

BACKENDS = ["reference", "foreach", "cpp", "triton"]
CASE_BY_NAME = {c.name: c for c in CASES}
FAMILY_CASES = [CASE_BY_NAME[n] for n in ("tvlars", "lars-sum-of-norms", "lamb-max-grad-norm-exclude")]


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state}


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_is_called_with_grad_and_its_loss_returned(backend):
    backend_or_skip(backend)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = TVLARS([w], lr=0.1, backend=backend)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx((before ** 2).sum().item())
    assert not torch.equal(w.detach(), before)


@pytest.mark.parametrize("case", FAMILY_CASES, ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_skipped(case, backend):
    backend_or_skip(backend)
    params = make_params(SMALL_SHAPES)
    opt = case.cls(params, backend=backend, **case.kwargs)
    set_grads(params, 0)
    opt.step()
    frozen = params[0]
    frozen.grad = None
    before = frozen.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[frozen].items()}
    set_grads(params[1:], 1)
    opt.step()
    assert torch.equal(frozen.detach(), before)
    for k, v in opt.state[frozen].items():
        assert torch.equal(v, state_before[k])
    assert opt.state[frozen]["step"].item() == 1 and opt.state[params[1]]["step"].item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_equal_separate_optimizers(backend):
    backend_or_skip(backend)
    a, b = make_params([(8, 4), (5,)], seed=1), make_params([(6, 6), (3, 2)], seed=2)
    opt = TVLARS([{"params": a}, {"params": b, "lr": 0.05, "lmbda": 0.1, "trust_denominator": "sum_of_norms"}],
                 lr=0.3, backend=backend)
    a2, b2 = make_params([(8, 4), (5,)], seed=1), make_params([(6, 6), (3, 2)], seed=2)
    opt_a = TVLARS(a2, lr=0.3, backend=backend)
    opt_b = TVLARS(b2, lr=0.05, lmbda=0.1, trust_denominator="sum_of_norms", backend=backend)
    for step in range(5):
        for ps in (a, a2):
            set_grads(ps, step, seed=1)
        for ps in (b, b2):
            set_grads(ps, step, seed=2)
        opt.step(), opt_a.step(), opt_b.step()
    for x, y in zip(a + b, a2 + b2):
        assert torch.equal(x, y)


def test_add_param_group_is_validated_and_used():
    a, b = make_params([(4, 4)]), make_params([(3, 3)], seed=3)
    opt = LARS(a, lr=0.1, backend="foreach")
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": b, "momentum": 1.5})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": b, "lr": 0.2})
    assert opt.param_groups[1]["lr"] == 0.2 and opt.param_groups[1]["eta"] == 1e-3
    set_grads(a + b, 0)
    before = b[0].detach().clone()
    opt.step()
    assert not torch.equal(before, b[0].detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_drives_the_step(backend):
    backend_or_skip(backend)
    params = make_params([(6, 5), (5,)])
    opt = LARS(params, lr=1.0, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    manual = make_params([(6, 5), (5,)])
    manual_opt = LARS(manual, lr=1.0, backend=backend)
    for step in range(6):
        set_grads(params, step), set_grads(manual, step)
        opt.step()
        sched.step()
        manual_opt.step()
        manual_opt.param_groups[0]["lr"] = 1.0 * 0.1 ** ((step + 1) // 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    for x, y in zip(params, manual):
        assert torch.equal(x, y)


def test_lr_as_tensor():
    a, b = make_params([(5, 5), (7,)]), make_params([(5, 5), (7,)])
    opt_t = TVLARS(a, lr=torch.tensor(0.3), backend="foreach")
    opt_f = TVLARS(b, lr=0.3, backend="foreach")
    for step in range(3):
        set_grads(a, step), set_grads(b, step)
        opt_t.step(), opt_f.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", FAMILY_CASES, ids=repr)
def test_state_dict_keys_like_pytorch(case):
    params, opt = run(case, "foreach", shapes=SMALL_SHAPES, steps=2)
    sd = opt.state_dict()
    keys = {"step", "momentum_buffer"} if case.cls is not LAMB else {"step", "exp_avg", "exp_avg_sq"}
    assert set(sd["state"][0]) == keys
    assert sd["state"][0]["step"].item() == 2
    assert "exclude" not in sd["param_groups"][0] and sd["param_groups"][0]["lr"] == case.kwargs["lr"]


@pytest.mark.parametrize("case", FAMILY_CASES, ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_checkpoint_is_bit_identical(case, backend):
    backend_or_skip(backend)
    straight, straight_opt = run(case, backend, shapes=SMALL_SHAPES, steps=8)

    params, opt = run(case, backend, shapes=SMALL_SHAPES, steps=4)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only=True: the state dict holds no code
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed_opt = case.cls(resumed, backend=backend, **case.kwargs)
    resumed_opt.load_state_dict(saved["opt"])
    for step in range(4, 8):
        set_grads(resumed, step)
        resumed_opt.step()
    _assert_same(_snapshot(straight_opt, straight), _snapshot(resumed_opt, resumed))


@pytest.mark.parametrize("source,target", [("reference", "foreach"), ("foreach", "cpp"), ("cpp", "foreach"),
                                           ("foreach", "triton")])
def test_checkpoint_moves_between_backends(source, target):
    backend_or_skip(source), backend_or_skip(target)
    case = CASE_BY_NAME["tvlars"]
    straight, _ = run(case, "reference", shapes=SMALL_SHAPES, steps=6)
    params, opt = run(case, source, shapes=SMALL_SHAPES, steps=3)
    moved = [torch.nn.Parameter(p.detach().clone()) for p in params]
    moved_opt = case.cls(moved, backend=target, **case.kwargs)
    moved_opt.load_state_dict(opt.state_dict())
    for step in range(3, 6):
        set_grads(moved, step)
        moved_opt.step()
    for x, y in zip(moved, straight):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_load_state_dict_keeps_float32_state_for_bf16_params():
    case = CASE_BY_NAME["lamb"]
    params, opt = run(case, "foreach", dtype=torch.bfloat16, shapes=SMALL_SHAPES, steps=2)
    sd = opt.state_dict()
    fresh = make_params(SMALL_SHAPES, dtype=torch.bfloat16)
    opt2 = LAMB(fresh, backend="foreach", **case.kwargs)
    opt2.load_state_dict(sd)
    for p, q in zip(params, fresh):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert opt2.state[q][key].dtype == torch.float32
            assert torch.equal(opt2.state[q][key], opt.state[p][key])
            if p.numel():  # a copy, not an alias
                assert opt2.state[q][key].data_ptr() != opt.state[p][key].data_ptr()


def test_load_state_dict_rejects_a_mismatched_layout():
    params, opt = run(CASE_BY_NAME["lars"], "foreach", shapes=SMALL_SHAPES, steps=1)
    other = LARS(make_params(SMALL_SHAPES[:3]), lr=0.5)
    with pytest.raises(ValueError, match="parameters"):
        other.load_state_dict(opt.state_dict())


def test_exclude_per_group_and_default():
    w = torch.nn.Parameter(torch.ones(4, 4))
    b = torch.nn.Parameter(torch.ones(4))
    opt = LARS([{"params": [w]}, {"params": [b], "exclude": None}], lr=0.1, weight_decay=0.1, eta=0.5,
               backend="reference")
    w.grad, b.grad = torch.zeros(4, 4), torch.zeros(4)
    opt.step()
    # w (2-D, adapted): d = 0.1 w, q = eta * ||w|| / ||d|| = 5, u = 0.5 w. b (1-D but exclude=None): same.
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 0.95))
    torch.testing.assert_close(b.detach(), torch.full((4,), 0.95))
    default = LARS([torch.nn.Parameter(torch.ones(4))], lr=0.1, weight_decay=0.1, backend="reference")
    p = default.param_groups[0]["params"][0]
    p.grad = torch.zeros(4)
    default.step()
    assert torch.equal(p.detach(), torch.ones(4))  # excluded by default: no decay, zero gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_parameter_is_updated_in_place(backend):
    backend_or_skip(backend)
    def make():
        base = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
        strided = base[:, ::2].detach().requires_grad_()
        dense = torch.randn(5, 5, generator=torch.Generator().manual_seed(6)).requires_grad_()
        return [strided, dense]
    params, ref = make(), make()
    assert not params[0].is_contiguous()
    ptr = params[0].data_ptr()
    opt, ref_opt = LARS(params, lr=0.5, backend=backend), LARS(ref, lr=0.5, backend="reference")
    for step in range(3):
        set_grads(params, step), set_grads(ref, step)
        opt.step(), ref_opt.step()
    assert params[0].data_ptr() == ptr
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def _dense_non_contiguous(dtype, device):
    """A channels_last conv weight, a transposed Linear weight (``W.t()``) and a bias: the first two are dense
    but not contiguous, so the layer table can cover them (the kernels walk the storage in memory order)."""
    gen = torch.Generator().manual_seed(7)
    conv = torch.randn(8, 3, 3, 3, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    linear = torch.randn(6, 10, generator=gen).to(device, dtype).t()
    bias = torch.randn(10, generator=gen).to(device, dtype)
    return [t.requires_grad_() for t in (conv, linear, bias)]


def _grads_with_the_params_strides(params, step):
    set_grads(params, step)
    for p in params:
        p.grad = torch.empty_like(p).copy_(p.grad)  # empty_like keeps a dense tensor's strides


@pytest.mark.parametrize("case", FAMILY_CASES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, device", [
    ("cpp", "cpu"), ("triton", "cpu"), ("cuda", "cuda"),
    pytest.param("triton", "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")])],
    ids=["cpp", "triton", "cuda", "triton-cuda"])
def test_dense_non_contiguous_layers_go_through_the_kernel_in_place(case, dtype, backend, device, monkeypatch):
    """Each step against the reference from the same state (tests/stepwise.py); the layers stay where they
    were, with their strides; the layer table covers them (table_fits), and foreach (spied on) never runs.
    Triton runs on the CPU under the interpreter and on CUDA parameters where there is a GPU (each case skips
    where its device cannot run it).

    Fails when such layers are left to foreach, e.g. ``.venv/bin/python -c "import sys, pytest,
    tvlars_fused._layer_table as t; t.table_fits = lambda b: [p.is_contiguous() for p in b.params];
    sys.exit(pytest.main(['tests/test_optimizer_behaviour.py', '-k', 'dense_non']))"``, and when the kernel is
    handed contiguous copies of them (its writes then never reach the parameters)."""
    from tvlars_fused import _foreach
    from tvlars_fused._layer_table import table_fits
    from tvlars_fused._types import Bucket

    backend_or_skip(backend, device)
    params = _dense_non_contiguous(dtype, device)
    assert not params[0].is_contiguous() and not params[1].is_contiguous()
    layout = [(p.data_ptr(), p.stride()) for p in params]
    foreach_calls = []
    for name in ("lars_step", "lamb_step"):
        monkeypatch.setattr(_foreach, name, lambda bucket, *args: foreach_calls.append(len(bucket)))
    opt = case.cls(params, backend=backend, **case.kwargs)
    for step in range(3):
        _grads_with_the_params_strides(params, step)
        problems = stepwise.step_mismatches(case.cls, case.kwargs, opt, params)
        assert not problems, f"step {step + 1}: " + "\n".join(problems)
    assert [(p.data_ptr(), p.stride()) for p in params] == layout
    assert foreach_calls == []
    keys = [k for k in opt.state[params[0]] if k != "step"]
    assert all(opt.state[p][k].stride() == p.stride() for p in params for k in keys)
    bucket = Bucket(params=params, grads=[p.grad for p in params],
                    states=[[opt.state[p][k] for p in params] for k in keys],
                    steps=[opt.state[p]["step"] for p in params], excluded=[p.ndim <= 1 for p in params])
    assert table_fits(bucket) == [True, True, True]


def test_zero_grad_and_momentum_buffer_persist():
    params = make_params([(3, 3)])
    opt = LARS(params, lr=0.1, backend="foreach")
    set_grads(params, 0)
    opt.step()
    opt.zero_grad()
    assert params[0].grad is None
    assert opt.state[params[0]]["momentum_buffer"].abs().sum() > 0


@pytest.mark.parametrize("case", FAMILY_CASES, ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_never_written(case, backend):
    backend_or_skip(backend)
    params = make_params(SMALL_SHAPES)
    opt = case.cls(params, backend=backend, **case.kwargs)
    for step in range(2):
        set_grads(params, step)
        grads = [p.grad.clone() for p in params]
        opt.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_backends_keep_no_old_gradients_alive(backend):
    # zero_grad(set_to_none=True) frees the gradients; a cache that held them would double gradient memory
    # and give the next gradients new addresses, so the layer table would be rebuilt every step.
    import gc
    import weakref

    backend_or_skip(backend)
    params = make_params(SMALL_SHAPES)
    opt = LARS(params, lr=0.1, backend=backend)
    set_grads(params, 0)
    opt.step()
    old = [weakref.ref(p.grad) for p in params]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(ref() is None for ref in old)


@pytest.mark.parametrize("case", FAMILY_CASES, ids=repr)
def test_float64_parameters_match_the_reference_on_foreach(case):
    params, opt = run(case, "foreach", dtype=torch.float64, shapes=SMALL_SHAPES, steps=5)
    ref_params, ref_opt = run(case, "reference", dtype=torch.float64, shapes=SMALL_SHAPES, steps=5)
    for p, r in zip(params, ref_params):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", FAMILY_CASES, ids=repr)
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_float64_parameters_on_a_fused_backend_go_to_foreach(case, backend, monkeypatch):
    """The kernels compute in float32, so float64 buckets are stepped by foreach in float64: every bucket
    reaches foreach (spied on) as float64, and the result is foreach's, bit for bit."""
    from tvlars_fused import _foreach

    backend_or_skip(backend)
    seen = []
    name = "lamb_step" if case.cls is LAMB else "lars_step"
    original = getattr(_foreach, name)

    def spy(bucket, *args):
        seen.append((bucket.dtype, len(bucket)))
        return original(bucket, *args)

    monkeypatch.setattr(_foreach, name, spy)
    params, _ = run(case, backend, dtype=torch.float64, shapes=SMALL_SHAPES, steps=5)
    assert seen == [(torch.float64, len(SMALL_SHAPES))] * 5
    monkeypatch.undo()
    foreach_params, _ = run(case, "foreach", dtype=torch.float64, shapes=SMALL_SHAPES, steps=5)
    for p, q in zip(params, foreach_params):
        assert p.dtype == torch.float64 and torch.equal(p, q)
