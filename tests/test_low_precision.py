"""bfloat16 and float16 parameters, one step at a time against the reference rounded once (tests/stepwise.py).

The tolerance is one rounding of the storage dtype (ulp/2) plus float32 arithmetic error, for the parameters;
float32 accuracy for the float32 state. tests/stepwise.py derives it and shows that a 1 % error in ``eta`` (TVLARS,
LARS) or ``lr`` (LAMB) is far outside it; ``test_a_one_percent_error_fails_the_comparison`` keeps checking that
the comparison catches such an error for every optimizer, dtype and backend.
"""

import pytest
import torch

import stepwise
from cases import CASES, SMALL_SHAPES, backend_or_skip, make_params, set_grads
from tvlars_fused import LAMB, _backends

BACKENDS = ["foreach", "cpp", "triton"]
LOW_PRECISION = [torch.bfloat16, torch.float16]
STEPS = 3  # the first step, momentum / moments carried over, and nesterov's and bias correction's later terms
CASE_BY_NAME = {c.name: c for c in CASES}
ONE_PER_OPTIMIZER = [CASE_BY_NAME[n] for n in ("tvlars", "lars", "lamb")]


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_step_matches_the_reference_rounded_once(case, dtype, backend):
    backend_or_skip(backend)
    params = make_params(SMALL_SHAPES, dtype)
    problems = stepwise.run_mismatches(case.cls, case.kwargs, params, backend, set_grads, STEPS)
    assert not problems, "\n".join(problems[:10])
    assert all(p.dtype == dtype for p in params)


@pytest.mark.parametrize("case", ONE_PER_OPTIMIZER, ids=repr)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_one_percent_error_fails_the_comparison(case, dtype, backend):
    """The backend runs with eta (LAMB: lr) 1 % too large; the comparison with the true settings must fail.

    For LAMB the moments do not depend on lr, so only the parameters, compared to ulp/2 + float32 error,
    can catch it."""
    backend_or_skip(backend)
    params = make_params(SMALL_SHAPES, dtype)
    wrong = stepwise.mutated(case.cls, case.kwargs)
    problems = stepwise.run_mismatches(case.cls, case.kwargs, params, backend, set_grads, STEPS, wrong)
    assert problems, f"{backend} {dtype}: {wrong} passed as {case.kwargs}"
    if case.cls is LAMB:
        assert any("state" not in m for m in problems), problems


def _mixed_params(seed=0):
    """float32, bfloat16 and float16 layers interleaved in one list (one param group), 2-D and 1-D of each."""
    shapes = [(16, 8), (9,), (3, 3, 4, 4), (300, 7)]
    params = []
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16]):
        params += make_params(shapes, dtype, seed=seed + i)
    return params


MIXED_CASES = [CASE_BY_NAME[n] for n in ("tvlars", "lars-nesterov-noexclude", "lamb-max-grad-norm-exclude")]


@pytest.mark.parametrize("case", MIXED_CASES, ids=repr)
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_mixed_dtypes_in_one_group_each_layer_matches_the_reference(case, backend):
    backend_or_skip(backend)
    params = _mixed_params()
    problems = stepwise.run_mismatches(case.cls, case.kwargs, params, backend, set_grads, STEPS)
    assert not problems, "\n".join(problems[:10])


def _skip_layers(monkeypatch, backend, skipped):
    """Make ``backend`` silently leave the tensors ``skipped`` out of its buckets (the reference that the
    comparison runs on copies is not affected, even when ``backend`` is the reference)."""
    module = _backends.module(backend)
    skipped = {id(p) for p in skipped}
    for name in ("lars_step", "lamb_step"):
        original = getattr(module, name)

        def step(bucket, hp, *args, _original=original):
            keep = [i for i, p in enumerate(bucket.params) if id(p) not in skipped]
            if len(keep) == len(bucket):
                return _original(bucket, hp, *args)
            if keep:
                _original(bucket.subset(keep, {}), hp, *args)

        monkeypatch.setattr(module, name, step)


@pytest.mark.parametrize("case", [CASE_BY_NAME["tvlars"], CASE_BY_NAME["lamb-max-grad-norm-exclude"]], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_mixed_dtypes_a_skipped_layer_fails_the_comparison(case, dtype, backend, monkeypatch):
    """The audit's broken foreach, which never updated the bf16 2-D layer, for every dtype and backend."""
    backend_or_skip(backend)
    params = _mixed_params()
    skipped = [i for i, p in enumerate(params) if p.dtype == dtype and p.ndim == 2]
    _skip_layers(monkeypatch, backend, [params[i] for i in skipped])
    problems = stepwise.run_mismatches(case.cls, case.kwargs, params, backend, set_grads, 1)
    assert all(any(m.startswith(f"step 1: parameter {i} ") for m in problems) for i in skipped), problems
