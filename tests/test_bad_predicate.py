"""An exclusion predicate that raises (issue #18's bad options): a clear error naming the predicate, its param group
and the parameter it raised on, and nothing written."""

import pytest
import torch

from cases import SMALL_SHAPES, backend_or_skip, make_params, set_grads
from tvlars_fused import LAMB, LARS

BACKENDS = ["reference", "foreach", "cpp", "triton"]
KEYS = ["exclude", "exclude_from_weight_decay", "exclude_from_adaptation"]


def _raises_on_vectors(p):
    if p.ndim == 1:
        raise RuntimeError("no rule for vectors")
    return False


def _two_groups(cls, backend):
    first, second = make_params(SMALL_SHAPES[:2]), make_params([(4, 3), (5,)], seed=4)
    kwargs = dict(lr=0.1) if cls is LARS else dict(lr=1e-2, max_grad_norm=1.0)
    return cls([{"params": first}, {"params": second}], backend=backend, **kwargs), first + second


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state})


def _assert_untouched(opt, params, snapshot):
    weights, states = snapshot
    for i, (p, w) in enumerate(zip(params, weights)):
        assert torch.equal(p.detach(), w), f"parameter {i} changed"
    assert {id(p) for p in params if p in opt.state} == set(states), "state was created or dropped"
    for p in params:
        for key, value in opt.state.get(p, {}).items():
            assert torch.equal(value, states[id(p)][key]), f"state {key!r} changed"


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("cls", [LARS, LAMB], ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_predicate_that_raises_is_named_and_the_step_writes_nothing(key, cls, backend):
    """Set on the second group after a first step (a changed predicate is evaluated again at the next step): the
    error names the key, the group and the parameter's position and shape, chains the predicate's exception,
    and no parameter or state tensor of either group changes. The step after the predicate is fixed runs."""
    backend_or_skip(backend)
    opt, params = _two_groups(cls, backend)
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    opt.param_groups[1][key] = _raises_on_vectors
    snapshot = _snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"the {key} predicate of param group 1 raised on parameter 1 "
                                         r"\(shape \(5,\)\)") as info:
        opt.step()
    assert isinstance(info.value.__cause__, RuntimeError) and "no rule for vectors" in str(info.value)
    _assert_untouched(opt, params, snapshot)
    opt.param_groups[1][key] = None
    opt.step()
    assert not torch.equal(params[0].detach(), snapshot[0][0])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_predicate_that_raises_at_the_first_step_creates_no_state(backend):
    backend_or_skip(backend)
    first, second = make_params(SMALL_SHAPES[:2]), make_params([(4, 3), (5,)], seed=4)
    opt = LAMB([{"params": first}, {"params": second, "exclude": _raises_on_vectors}], backend=backend)
    params = first + second
    set_grads(params, 0)
    snapshot = _snapshot(opt, params)
    with pytest.raises(ValueError, match="the exclude predicate of param group 1 raised on parameter 1"):
        opt.step()
    _assert_untouched(opt, params, snapshot)
