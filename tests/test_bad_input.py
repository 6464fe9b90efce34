"""Bad input: a clear error naming what is wrong, and every parameter and state tensor left untouched."""

import pytest
import torch

from cases import SMALL_SHAPES, backend_or_skip, make_params, set_grads
from tvlars_fused import LAMB, LARS, TVLARS, BackendUnavailableError

BACKENDS = ["reference", "foreach", "cpp", "triton"]


@pytest.mark.parametrize("cls,kwargs,match", [
    (TVLARS, dict(lr=-0.1), "lr"),
    (LARS, dict(lr=0.1, momentum=1.0), "momentum"),
    (LARS, dict(lr=0.1, momentum=-0.1), "momentum"),
    (LARS, dict(lr=0.1, weight_decay=-1e-4), "weight_decay"),
    (LARS, dict(lr=0.1, eta=-1.0), "eta"),
    (LARS, dict(lr=0.1, trust_denominator="mean"), "trust_denominator"),
    (LARS, dict(lr=0.1, norm_clip=0.0), "norm_clip"),
    (LARS, dict(lr=0.1, momentum=0.0, nesterov=True), "nesterov"),
    (TVLARS, dict(lr=0.1, alpha=0.0), "alpha"),
    (TVLARS, dict(lr=0.1, lmbda=-1.0), "lmbda"),
    (TVLARS, dict(lr=0.1, backend="gpu"), "backend"),
    (LAMB, dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (LAMB, dict(betas=(0.9, -0.5)), r"betas\[1\]"),
    (LAMB, dict(betas=(0.9,)), "betas"),
    (LAMB, dict(eps=0.0), "eps"),
    (LAMB, dict(max_grad_norm=-1.0), "max_grad_norm"),
    (LAMB, dict(lr=-1.0), "lr"),
    (LAMB, dict(exclude="1d"), "exclude"),
    (TVLARS, dict(lr=float("inf")), "lr"),
    (TVLARS, dict(lr=0.1, lmbda=float("inf")), "lmbda"),
])
def test_bad_hyper_parameters_raise_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(make_params([(2, 2)]), **kwargs)


@pytest.mark.parametrize("make", [
    lambda **kw: LARS(make_params([(2, 2)]), lr=0.1, **kw),
    lambda **kw: TVLARS(make_params([(2, 2)]), lr=0.1, **kw),
    lambda **kw: TVLARS.official(make_params([(2, 2)]), lr=0.1, **kw),
    lambda **kw: LAMB(make_params([(2, 2)]), **kw),
], ids=["LARS", "TVLARS", "TVLARS.official", "LAMB"])
@pytest.mark.parametrize("name", ["trust_coeff", "foreach", "caution", "lmbda", "betas", "momentum", "dampening",
                                  "grad_averaging"])
def test_an_argument_a_class_does_not_know_is_a_type_error_naming_it(make, name):
    """As torch.optim: an unknown keyword is a TypeError, never kept in the defaults (and shown in the repr) while
    changing nothing. LARS used to accept any keyword. Each class is asked for ones it does know, too."""
    known = {"LARS": ("momentum", "dampening"), "TVLARS": ("momentum", "lmbda", "dampening"),
             "LAMB": ("betas", "grad_averaging")}
    try:
        optimizer = make(**{name: 0.5 if name != "betas" else (0.9, 0.99)})
    except TypeError as exc:
        assert name in str(exc)
        return
    assert name in known[type(optimizer).__name__], f"{type(optimizer).__name__} kept unknown argument {name!r}"
    assert optimizer.defaults[name] == (0.5 if name != "betas" else (0.9, 0.99))


# What a scheduler, a loaded checkpoint or a hand-edit of param_groups can set after construction.
LATER_BAD_VALUES = [
    (TVLARS, dict(lr=0.1), "lr", float("nan")),
    (TVLARS, dict(lr=0.1), "lr", -0.1),
    (TVLARS, dict(lr=0.1), "momentum", 1.5),
    (TVLARS, dict(lr=0.1), "lmbda", float("inf")),
    (TVLARS, dict(lr=0.1), "alpha", 0.0),
    (LARS, dict(lr=0.1), "weight_decay", float("nan")),
    (LARS, dict(lr=0.1), "trust_denominator", "mean"),
    (LAMB, dict(), "betas", (0.9, 1.0)),
    (LAMB, dict(), "eps", 0.0),
    (LAMB, dict(), "exclude", "1d"),
]


@pytest.mark.parametrize("cls,kwargs,key,value", LATER_BAD_VALUES,
                         ids=[f"{c.__name__}-{k}={v}" for c, _, k, v in LATER_BAD_VALUES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_hyper_parameters_set_after_construction_raise_at_the_step_and_change_nothing(
        cls, kwargs, key, value, backend):
    backend_or_skip(backend)
    params = make_params(SMALL_SHAPES[:3])
    opt = cls([{"params": params[:1]}, {"params": params[1:]}], backend=backend, **kwargs)
    before, state_before = _bad_step(opt, params, lambda ps: None)
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        opt.step()
    _assert_untouched(opt, params, before, state_before)


def test_hyper_parameters_are_checked_again_only_when_one_changed(monkeypatch):
    params = make_params(SMALL_SHAPES[:2])
    opt = TVLARS(params, lr=0.1)
    checked = []
    monkeypatch.setattr(opt, "_validate_group", lambda group: checked.append(group["lr"]))
    for lr in (0.1, 0.1, 0.1, 0.05, 0.05):  # a scheduler changing lr once
        opt.param_groups[0]["lr"] = lr
        set_grads(params, 0)
        opt.step()
    assert checked == [0.1, 0.05]  # the first step, then the changed value: a steady step compares, not checks


def test_a_hyper_parameter_list_edited_in_place_is_checked_again():
    params = make_params(SMALL_SHAPES[:2])
    opt = LAMB(params, betas=[0.9, 0.999])
    set_grads(params, 0)
    opt.step()
    opt.param_groups[0]["betas"][1] = 1.0  # the same list object, a new value
    set_grads(params, 1)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.step()


def test_unavailable_backend_says_why():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        TVLARS(make_params([(2, 2)]), lr=0.1, backend="cuda")


def _bad_step(opt, params, make_bad):
    """Step once fine, then make one gradient bad and check the failed step changed nothing."""
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    make_bad(params)
    return _snapshot(opt, params)


def _snapshot(opt, params):
    """Copies of the parameters and of their state, for _assert_untouched."""
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


def _assert_untouched(opt, params, before, state_before):
    for p, b, s in zip(params, before, state_before):
        assert torch.equal(p.detach(), b)
        for k, v in opt.state[p].items():
            assert torch.equal(v, s[k]), k


@pytest.mark.parametrize("cls,kwargs", [(TVLARS, dict(lr=0.1)), (LAMB, dict(max_grad_norm=1.0))])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient_raises_and_changes_nothing(cls, kwargs, backend):
    backend_or_skip(backend)
    first, second = make_params(SMALL_SHAPES[:3]), make_params([(6, 4)], seed=9)
    opt = cls([{"params": first}, {"params": second}], backend=backend, **kwargs)
    params = first + second

    def make_bad(ps):
        ps[-1].grad = ps[-1].grad.to_sparse()

    before, state_before = _bad_step(opt, params, make_bad)
    with pytest.raises(RuntimeError, match="sparse gradients.*parameter 0 of param group 1"):
        opt.step()
    _assert_untouched(opt, params, before, state_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_parameter_raises_and_changes_nothing(backend):
    backend_or_skip(backend)
    params = make_params(SMALL_SHAPES[:3])
    z = torch.randn(3, 3, dtype=torch.complex64, requires_grad=True)
    opt = LARS([{"params": params}, {"params": [z]}], lr=0.1, backend=backend)
    set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    z.grad = torch.randn_like(z)
    with pytest.raises(ValueError, match="complex"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    assert not opt.state


def test_parameters_of_one_group_on_two_devices_raise_and_change_nothing():
    cpu = make_params([(3, 3)])
    meta = torch.nn.Parameter(torch.empty(3, 3, device="meta"))
    opt = LARS(cpu + [meta], lr=0.1, backend="foreach")
    set_grads(cpu, 0)
    meta.grad = torch.empty(3, 3, device="meta")
    before = cpu[0].detach().clone()
    with pytest.raises(RuntimeError, match="several devices"):
        opt.step()
    assert torch.equal(cpu[0].detach(), before)
    assert not opt.state


def test_integer_parameter_is_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        opt = LARS([torch.zeros(3, dtype=torch.int64)], lr=0.1)
        opt.param_groups[0]["params"][0].grad = torch.zeros(3, dtype=torch.int64)
        opt.step()


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("cls", [TVLARS, LAMB])
def test_a_parameter_listed_twice_in_a_group_is_refused(cls):
    # torch.optim only warns; a fused launch would update the parameter twice at once (a race on a GPU).
    params = make_params(SMALL_SHAPES[:2])
    with pytest.raises(ValueError, match="param group 0 lists the same parameter twice .positions 0 and 2."):
        cls([params[0], params[1], params[0]], lr=0.1)
    opt = cls(params, lr=0.1)
    before, state_before = _bad_step(opt, params, lambda ps: None)
    opt.param_groups[0]["params"].append(params[1])  # an edit after construction
    with pytest.raises(ValueError, match="positions 1 and 2"):
        opt.step()
    _assert_untouched(opt, params, before, state_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_sharing_memory_are_refused_before_anything_is_written(backend):
    backend_or_skip(backend)
    encoder, decoder = torch.nn.Linear(4, 6), torch.nn.Linear(6, 4)
    decoder.weight.data = encoder.weight.data.t()  # tied as two Parameters: one launch would race on it
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = TVLARS(params, lr=0.1, backend=backend)
    set_grads(params, 1)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="parameters 0 and 2 of param group 0 share memory"):
        opt.step()
    _assert_untouched(opt, params, before, [{} for _ in params])  # and no state was created


def test_views_of_one_buffer_that_do_not_overlap_are_fine_and_overlapping_ones_are_not():
    flat = torch.zeros(64)
    a, b = torch.nn.Parameter(flat[:24].view(4, 6)), torch.nn.Parameter(flat[24:].view(8, 5).t())  # b strided
    set_grads([a, b], 1)
    TVLARS([a, b], lr=0.1).step()  # adjacent, not overlapping
    c = torch.nn.Parameter(flat[20:30])  # the last 4 elements of a
    set_grads([c], 2)
    with pytest.raises(ValueError, match="parameters 0 and 1 of param group 0 share memory"):
        TVLARS([a, c], lr=0.1).step()
    d = torch.nn.Parameter(flat[60:])  # within b's span only through b's last column
    set_grads([d], 3)
    with pytest.raises(ValueError, match="share memory"):
        TVLARS([b, d], lr=0.1).step()


@pytest.mark.parametrize("cls,key", [(TVLARS, "momentum_buffer"), (LAMB, "exp_avg_sq"), (LAMB, "step")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_that_does_not_fit_fails_before_any_group_is_stepped(cls, key, backend):
    backend_or_skip(backend)
    first, second = make_params(SMALL_SHAPES[:2]), make_params([(3, 3)], seed=5)
    opt = cls([{"params": first}, {"params": second}], lr=0.1, backend=backend)
    params = first + second
    set_grads(params, 0)
    opt.step()
    saved = opt.state_dict()
    saved["state"][2][key] = torch.zeros(2, 2)  # the last group's layer, from a checkpoint of another model
    opt.load_state_dict(saved)
    set_grads(params, 1)
    before, state_before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=f"state '{key}' of parameter 0 of param group 1 is a torch.float32 tensor "
                                         r"of shape \(2, 2\)"):
        opt.step()
    _assert_untouched(opt, params, before, state_before)  # the first group was not stepped either
