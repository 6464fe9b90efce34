"""Real training stacks on the CPU: GradScaler, master weights, checkpoints of both."""

import io

import pytest
import torch

import stepwise
from cases import SMALL_SHAPES, backend_or_skip, make_params, set_grads
from tvlars_fused import LAMB, LARS, TVLARS

BACKENDS = ["reference", "foreach", "cpp", "triton"]
OPTIMIZERS = [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2, max_grad_norm=1.0))]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _batch(step):
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_matches_unscaled_training_and_skips_inf(cls, kwargs, backend):
    backend_or_skip(backend)
    scaled_model, plain_model = _model(), _model()
    opt = cls(scaled_model.parameters(), backend=backend, **kwargs)
    plain_opt = cls(plain_model.parameters(), backend=backend, **kwargs)
    # A power-of-two scale: scaling and unscaling are exact, so both runs see the same gradients.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    for step in range(4):
        x = _batch(step)
        opt.zero_grad()
        scaler.scale(scaled_model(x).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        plain_opt.zero_grad()
        plain_model(x).square().mean().backward()
        plain_opt.step()
    for p, q in zip(scaled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    # An inf in one gradient: the whole step is skipped, nothing changes, the scale backs off.
    before = [p.detach().clone() for p in scaled_model.parameters()]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in scaled_model.parameters()]
    opt.zero_grad()
    scaler.scale(scaled_model(_batch(9)).square().mean()).backward()
    next(scaled_model.parameters()).grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    for p, b, s in zip(scaled_model.parameters(), before, state_before):
        assert torch.equal(p.detach(), b)
        for key, value in opt.state[p].items():
            assert torch.equal(value, s[key]), key


NON_FINITE = {"inf": [float("inf")], "nan": [float("nan")], "inf+nan": [float("-inf"), float("nan")]}


@pytest.mark.parametrize("bad", list(NON_FINITE))
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_skips_a_non_finite_step_and_the_next_step_matches_the_reference(cls, kwargs, backend, bad):
    """A real GradScaler (the fused backends take its scale and inf flag in the kernel, the others its ordinary
    path): inf and/or NaN in the last layer's gradient skip the whole step (parameters, state and step counts
    unchanged), the scale halves, and the next finite step matches the reference from the same state.

    Fails when a fused backend ignores found_inf (its op then steps with the inf) or grad_scale."""
    backend_or_skip(backend)
    model = _model()
    params = list(model.parameters())
    opt = cls(params, backend=backend, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)

    def backward(step):
        opt.zero_grad()
        scaler.scale(model(_batch(step)).square().mean()).backward()

    for step in range(2):
        backward(step)
        scaler.step(opt)
        scaler.update()
    backward(2)
    # The last layer: a step that wrote layer by layer before seeing the bad value would have changed the others.
    params[-2].grad.view(-1)[:len(NON_FINITE[bad])] = torch.tensor(NON_FINITE[bad])
    before = [p.detach().clone() for p in params]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    for i, (p, b, s) in enumerate(zip(params, before, state_before)):
        assert torch.equal(p.detach(), b), f"parameter {i} changed"
        assert opt.state[p].keys() == s.keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, s[key]), f"parameter {i} state {key!r} changed"

    backward(3)
    problems = stepwise.step_mismatches(cls, kwargs, opt, params, step=lambda: scaler.step(opt),
                                        grad_scale=scaler.get_scale())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amp_scaling_support_is_declared_only_for_fused_backends(backend):
    backend_or_skip(backend)
    opt = LARS(make_params([(3, 3)]), lr=0.1, backend=backend)
    assert opt._step_supports_amp_scaling == (backend in ("cpp", "triton", "cuda"))


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_follow_the_float32_run(cls, kwargs, dtype, backend):
    master_weights_follow_the_float32_run(cls, kwargs, dtype, backend, SMALL_SHAPES, "cpu", rtol=1e-5, atol=1e-6)


def master_weights_follow_the_float32_run(cls, kwargs, dtype, backend, shapes, device, rtol, atol):
    """Low-precision parameters with master_weights=True: the float32 masters follow a float32 reference run on the
    same gradients, and each parameter is its master rounded once."""
    backend_or_skip(backend, device)
    low = make_params(shapes, dtype=dtype, device=device)
    full = [p.detach().float().requires_grad_() for p in low]  # the same starting values, in float32
    opt = cls(low, backend=backend, master_weights=True, **kwargs)
    full_opt = cls(full, backend="reference", **kwargs)
    for step in range(5):
        set_grads(low, step)
        for p, q in zip(low, full):
            q.grad = p.grad.float()  # identical (representable) gradients for both runs
        opt.step()
        full_opt.step()
    for p, q in zip(low, full):
        master = opt.state[p]["master_weight"]
        assert master.dtype == torch.float32 and master.device == p.device
        torch.testing.assert_close(master, q.detach(), rtol=rtol, atol=atol)
        assert torch.equal(p.detach(), master.to(dtype))  # the parameter is its master, rounded once


def test_master_weights_survive_a_checkpoint_in_float32():
    params = make_params(SMALL_SHAPES, dtype=torch.bfloat16)
    opt = TVLARS(params, lr=0.5, master_weights=True, backend="foreach")
    for step in range(3):
        set_grads(params, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = TVLARS(fresh, lr=0.5, master_weights=True, backend="foreach")
    opt2.load_state_dict(torch.load(buffer))
    for p, q in zip(params, fresh):
        m, m2 = opt.state[p]["master_weight"], opt2.state[q]["master_weight"]
        assert m2.dtype == torch.float32 and torch.equal(m, m2)
    assert any((opt.state[p]["master_weight"] != p.float()).any() for p in params)  # masters hold more bits


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("backend", ["foreach", "cpp"])
def test_compiled_step_matches_eager_without_graph_breaks(cls, kwargs, backend):
    compiled_matches_eager_without_graph_breaks(cls, kwargs, backend, "cpu")


def compiled_matches_eager_without_graph_breaks(cls, kwargs, backend, device):
    """torch.compile(opt.step) on ``device`` gives the eager step's result, and dynamo sees no graph break."""
    backend_or_skip(backend, device)
    compiled_params, eager_params = make_params(SMALL_SHAPES, device=device), make_params(SMALL_SHAPES, device=device)
    opt = cls(compiled_params, backend=backend, **kwargs)
    eager = cls(eager_params, backend=backend, **kwargs)
    compiled_step = torch.compile(opt.step)
    for step in range(3):
        set_grads(compiled_params, step), set_grads(eager_params, step)
        compiled_step()
        eager.step()
    for p, q in zip(compiled_params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    set_grads(compiled_params, 3)
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]


def test_compiled_step_runs_triton_outside_the_graph():
    backend_or_skip("triton")
    compiled_params, eager_params = make_params(SMALL_SHAPES), make_params(SMALL_SHAPES)
    opt, eager = TVLARS(compiled_params, lr=0.5, backend="triton"), TVLARS(eager_params, lr=0.5, backend="triton")
    compiled_step = torch.compile(opt.step)
    for step in range(2):
        set_grads(compiled_params, step), set_grads(eager_params, step)
        compiled_step()
        eager.step()
    for p, q in zip(compiled_params, eager_params):
        assert torch.equal(p, q)
