"""The host work of a step: a steady step reuses its plan and layer table, new gradients rewrite only the gradient
column, and every change that must invalidate them does (never a stale address, never a silent wrong update).

Counted with spies on the functions that do per-layer work, so a change that reintroduces it fails here; the times
themselves are measured by ``python -m bench --sets many-tiny-2000x1 --grads same,new``.
"""

from collections import defaultdict

import pytest
import torch

from cases import SMALL_SHAPES, backend_or_skip, make_params, set_grads
from tvlars_fused import LAMB, TVLARS, _layer_table
from tvlars_fused._optimizer import LayerwiseOptimizer

FUSED = ["cpp", "triton"]


@pytest.fixture
def calls(monkeypatch):
    """How often each per-layer function ran since the fixture was made."""
    counts = defaultdict(int)

    def spy(owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    for name in ("_build", "_with_grads", "table_fits"):
        spy(_layer_table, name)
    for name in ("_plan", "_init_state", "_check"):
        spy(LayerwiseOptimizer, name)
    return counts


def _twins(cls, backend, **kwargs):
    params, ref = make_params(SMALL_SHAPES), make_params(SMALL_SHAPES)
    return params, cls(params, backend=backend, **kwargs), ref, cls(ref, backend="reference", **kwargs)


def _step_both(params, opt, ref, ref_opt, step, new_grads):
    for ps in (params, ref):
        if new_grads:
            for p in ps:
                p.grad = None
        set_grads(ps, step)
    opt.step()
    ref_opt.step()


def _same_grads(params, step):
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))], ids=["tvlars", "lamb"])
def test_steady_steps_reuse_plan_and_table(backend, cls, kwargs, calls):
    backend_or_skip(backend)
    params, opt, ref, ref_opt = _twins(cls, backend, **kwargs)
    set_grads(params, 0)
    set_grads(ref, 0)
    opt.step()
    ref_opt.step()
    first = dict(calls)
    for step in range(1, 4):
        _same_grads(params, step)
        _same_grads(ref, step)
        opt.step()
        ref_opt.step()
    assert {k: calls[k] - first.get(k, 0) for k in ("_build", "_with_grads", "table_fits", "_plan", "_init_state")} \
        == {"_build": 0, "_with_grads": 0, "table_fits": 0, "_plan": 0, "_init_state": 0}
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_new_gradients_rewrite_only_the_gradient_column(backend, calls):
    backend_or_skip(backend)
    params, opt, ref, ref_opt = _twins(TVLARS, backend, lr=0.5)
    for step in range(4):
        _step_both(params, opt, ref, ref_opt, step, new_grads=True)
        if step == 0:
            first = dict(calls)
    assert calls["_build"] == first["_build"] and calls["_plan"] == first["_plan"]
    assert calls["table_fits"] == first["table_fits"]
    assert calls["_with_grads"] - first.get("_with_grads", 0) <= 3  # at most one rewrite per step
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_a_parameter_given_new_storage_is_updated_there(backend):
    backend_or_skip(backend)
    params, opt, ref, ref_opt = _twins(TVLARS, backend, lr=0.5)
    _step_both(params, opt, ref, ref_opt, 0, new_grads=False)
    for ps in (params, ref):
        ps[0].data = ps[0].data.clone()  # the old storage is freed: a stale table would write to it
    _step_both(params, opt, ref, ref_opt, 1, new_grads=False)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED + ["foreach"])
def test_state_reset_and_a_missing_gradient_replan(backend):
    backend_or_skip(backend)
    params, opt, ref, ref_opt = _twins(TVLARS, backend, lr=0.5)
    _step_both(params, opt, ref, ref_opt, 0, new_grads=False)
    for o in (opt, ref_opt):  # a common way to reset an optimizer
        o.state = defaultdict(dict)
    _step_both(params, opt, ref, ref_opt, 1, new_grads=False)
    for ps in (params, ref):
        ps[1].grad = None
    for o, ps in ((opt, params), (ref_opt, ref)):
        o.step()
    assert opt.state[params[1]]["step"].item() == 1 == ref_opt.state[ref[1]]["step"].item()
    assert opt.state[params[0]]["step"].item() == 2
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED + ["foreach"])
def test_a_sparse_gradient_after_steady_steps_is_refused_and_changes_nothing(backend):
    backend_or_skip(backend)
    params = make_params([(4, 3), (5,)])
    opt = TVLARS(params, lr=0.5, backend=backend)
    for step in range(2):
        set_grads(params, step)
        opt.step()
    before = [p.detach().clone() for p in params]
    steps = [opt.state[p]["step"].clone() for p in params]
    params[0].grad = params[0].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["step"], s) for p, s in zip(params, steps))


@pytest.mark.parametrize("backend", FUSED + ["foreach"])
def test_a_state_tensor_replaced_by_assignment_is_the_one_stepped(backend):
    """A kept plan holds the state tensors: one replaced by assignment must be seen at the next step."""
    backend_or_skip(backend)
    params, opt, ref, ref_opt = _twins(TVLARS, backend, lr=0.5)
    _step_both(params, opt, ref, ref_opt, 0, new_grads=False)
    for o, ps in ((opt, params), (ref_opt, ref)):
        o.state[ps[0]]["momentum_buffer"] = torch.full_like(ps[0], 0.25)
    _step_both(params, opt, ref, ref_opt, 1, new_grads=False)
    assert not torch.equal(opt.state[params[0]]["momentum_buffer"], torch.full_like(params[0], 0.25))
    for o, r, p, q in ((opt, ref_opt, params[i], ref[i]) for i in range(len(params))):
        torch.testing.assert_close(o.state[p]["momentum_buffer"], r.state[q]["momentum_buffer"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_state_dict_holds_plain_dicts_that_load_with_weights_only(tmp_path):
    params = make_params(SMALL_SHAPES)
    opt = TVLARS(params, lr=0.5, backend="foreach")
    set_grads(params, 0)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert all(type(v) is dict for v in loaded["state"].values())
    opt.load_state_dict(loaded)


@pytest.mark.parametrize("backend", ["foreach", "cpp"])
@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))], ids=["tvlars", "lamb"])
def test_a_compiled_step_does_not_recompile_once_warm(backend, cls, kwargs):
    """torch.compile(opt.step) compiles for the first step (state created) and the second (state present), then
    never again: nothing a step reads may change from step to step in a way dynamo guards on (a counter drawn per
    step once made it recompile every step, 6 s per step on ResNet-50)."""
    backend_or_skip(backend)
    torch._dynamo.reset()
    params = make_params(SMALL_SHAPES)
    step = torch.compile(cls(params, backend=backend, **kwargs).step)
    for i in range(2):
        set_grads(params, i)
        step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(2, 5):
            set_grads(params, i)
            step()
