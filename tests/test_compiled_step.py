"""The fused step under torch.compile: one op per bucket in the graph, and a warm compiled step as cheap as an eager one.

A traced tensor has no address, so the compiled (cpp/cuda) step is recorded as one ``tvlars_fused::bucket_*_step`` call
that runs the eager step at run time (``tvlars_fused/_compiled_step.py``). These tests drive the CUDA branch under
tracing on the CPU with fake CUDA tensors, read the traced graph, and count what a warm compiled step builds.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from buckets import make_bucket
from cases import CASES, SMALL_SHAPES, backend_or_skip, make_params, set_grads
from tvlars_fused import LAMB, TVLARS, _layer_table
from tvlars_fused._types import LambHyper, LarsHyper

LARS_HP = LarsHyper(lr=0.5, momentum=0.9, weight_decay=5e-4, eta=1e-3, eps=0.0, norm_clip=None,
                    sum_of_norms=False, nesterov=False, use_phi=True, lmbda=1e-3, alpha=0.1)
LAMB_HP = LambHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                    norm_clip=10.0)


def _fake_cuda_bucket(lamb, masters, kahan=False):
    """A bucket of fake CUDA tensors, as dynamo hands the backend while tracing a step of CUDA parameters; ``kahan``:
    bfloat16 parameters with bfloat16 state and Kahan compensations."""
    bucket = make_bucket(SMALL_SHAPES, lamb=lamb, dtype=torch.bfloat16 if masters or kahan else torch.float32,
                         masters=masters, device="cpu")
    if kahan:
        bucket.states = [[t.to(torch.bfloat16) for t in s] for s in bucket.states]
        bucket.comps = [torch.zeros_like(p) for p in bucket.params]
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    to_cuda = lambda ts: [fake.from_tensor(t).to("cuda") for t in ts]  # noqa: E731
    with fake:
        bucket.params, bucket.grads, bucket.steps = to_cuda(bucket.params), to_cuda(bucket.grads), to_cuda(bucket.steps)
        bucket.states = [to_cuda(s) for s in bucket.states]
        bucket.masters = to_cuda(bucket.masters) if masters else None
        bucket.comps = to_cuda(bucket.comps) if kahan else None
    return bucket, fake


@pytest.mark.parametrize("masters, kahan", [(False, False), (True, False), (False, True)],
                         ids=["float32", "bf16-masters", "bf16-state-kahan"])
@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_a_traced_cuda_step_is_one_op_and_builds_no_table(monkeypatch, lamb, masters, kahan):
    """The GPU branch of the cuda backend while tracing, driven on the CPU: it used to build a table in the trace and
    pin its rows (``NYI: aten._pin_memory.default`` under fake tensors), crashing every compiled CUDA step. The one op
    carries the compensations (declared mutated) and the layers' numbers in the rounding stream."""
    backend_or_skip("cpp")
    from tvlars_fused import _cpp_backend as backend

    bucket, fake = _fake_cuda_bucket(lamb, masters, kahan)
    bucket.layer_ids = [10 + i for i in range(len(bucket.params))]
    built = []
    monkeypatch.setattr(_layer_table, "_build", lambda *a, **k: built.append(a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = []

    class Calls(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func.overloadpacket))
            if "bucket_" in calls[-1]:
                given = dict(zip((a.name for a in func._schema.arguments), args))
                assert len(given["comps"]) == (len(bucket.params) if kahan else 0)
                assert all(c is b for c, b in zip(given["comps"], bucket.comps or []))
                assert given["layer_ids"] == bucket.layer_ids
            return func(*args, **(kwargs or {}))

    with fake:
        scale, found_inf = torch.full((), 2.0, device="cuda"), torch.zeros((), device="cuda")
        with Calls():
            (backend.lamb_step if lamb else backend.lars_step)(bucket, LAMB_HP if lamb else LARS_HP, scale, found_inf)
    assert not built, "a table was built while tracing"
    assert calls == [f"tvlars_fused.bucket_{'lamb' if lamb else 'lars'}_step"], calls


def _graph_ops(cls, kwargs, backend):
    """The call targets of the graph(s) dynamo traces for a compiled step (the second: state present)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    params = make_params(SMALL_SHAPES)
    step = torch.compile(cls(params, backend=backend, **kwargs).step, backend=record)
    for i in range(2):
        set_grads(params, i)
        step()
    return [str(node.target) for node in graphs[-1].graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))], ids=["tvlars", "lamb"])
def test_the_compiled_graph_holds_one_op_per_bucket_and_makes_no_table(cls, kwargs):
    """No int64 table, chunk map, workspace or upload is made inside the graph (the traced table used to be rebuilt,
    its workspace allocated and its rows copied to the device at every run): one op call per bucket, nothing else
    that allocates."""
    backend_or_skip("cpp")
    ops = _graph_ops(cls, kwargs, "cpp")
    name = "lamb" if cls is LAMB else "lars"
    assert ops.count(f"tvlars_fused.bucket_{name}_step") == 1, ops
    allocating = [op for op in ops if any(word in op for word in ("empty", "tensor", "_to_copy", "pin", "zeros",
                                                                 "lift_fresh", "clone"))]
    assert not allocating, allocating


@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2, max_grad_norm=1.0))],
                         ids=["tvlars", "lamb-clipped"])
def test_a_warm_compiled_step_builds_nothing_and_matches_eager(monkeypatch, cls, kwargs):
    """Once warm, a compiled step with the same gradient tensors builds no table, rewrites no gradient column and
    allocates no workspace, as a warm eager step; and every step equals the eager step bit for bit."""
    backend_or_skip("cpp")
    compiled_params, eager_params = make_params(SMALL_SHAPES), make_params(SMALL_SHAPES)
    opt, eager = cls(compiled_params, backend="cpp", **kwargs), cls(eager_params, backend="cpp", **kwargs)
    step = torch.compile(opt.step)
    for p, q in zip(compiled_params, eager_params):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    counts = {"_build": 0, "_with_grads": 0}
    for name in counts:
        original = getattr(_layer_table, name)

        def counted(*args, _name=name, _original=original, **kw):
            counts[_name] += 1
            return _original(*args, **kw)

        monkeypatch.setattr(_layer_table, name, counted)
    for i in range(5):
        gen = torch.Generator().manual_seed(i)
        for p, q in zip(compiled_params, eager_params):
            g = torch.randn(p.shape, generator=gen)
            p.grad.copy_(g), q.grad.copy_(g)  # the same gradient tensors every step
        if i == 2:
            counts.update(_build=0, _with_grads=0)
        step()
        eager.step()
        for p, q in zip(compiled_params, eager_params):
            assert torch.equal(p, q)
    assert counts == {"_build": 0, "_with_grads": 0}, counts
    tables = [t for cache in opt._compiled_owner.caches.values() for key, t in cache.items()
              if isinstance(key, tuple) and key[0] == "layer_table"]
    assert len(tables) == 1 and "cpp_partials" in tables[0].workspace


def _changed_values(f, value):
    """Values of a hyper-parameter field away from its default: bools flipped, ints (the rounding seed, in [0, 2**32))
    at both ends of their range and beyond float32's exact integers, optional floats None and a number."""
    if isinstance(value, bool):
        return [not value]
    if f.type == "int":
        return [0, 1, 2**24 + 1, 2**31, 2**32 - 1]
    return [0.25] if f.type == "float" else [None, 0.25]


def test_every_hyper_parameter_crosses_the_op_schema():
    """The traced op takes the hyper-parameters as one list of floats (field order); each field, set away from its
    default (bools flipped, None and a number both, ints exactly and as ints), comes back as it was."""
    from dataclasses import fields

    from tvlars_fused._compiled_step import _decode, _encode

    for cls, base in ((LarsHyper, LARS_HP), (LambHyper, LAMB_HP)):
        for f in fields(cls):
            if f.name in ("lr", "clip_coef"):
                continue
            for changed in _changed_values(f, getattr(base, f.name)):
                hp = cls(**{**base.__dict__, f.name: changed})
                decoded = _decode(cls, _encode(hp), hp.lr, None, **({"clip_coef": None} if cls is LambHyper else {}))
                assert decoded == hp, f.name
                assert type(getattr(decoded, f.name)) is type(changed), f.name


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("tvlars-dampening-bounds-split", "lamb-variants")],
                         ids=repr)
def test_a_compiled_step_keeps_the_variants(case):
    """The variant options and split exclusions reach the run-time step (they once did not: a compiled dampened LARS
    was 3.2 off the eager one after 3 steps)."""
    backend_or_skip("cpp")
    compiled_params, eager_params = make_params(SMALL_SHAPES), make_params(SMALL_SHAPES)
    opt = case.cls(compiled_params, backend="cpp", **case.kwargs)
    eager = case.cls(eager_params, backend="cpp", **case.kwargs)
    step = torch.compile(opt.step)
    for i in range(3):
        set_grads(compiled_params, i), set_grads(eager_params, i)
        step()
        eager.step()
    for p, q in zip(compiled_params, eager_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))], ids=["tvlars", "lamb"])
def test_a_compiled_step_with_bf16_state_and_kahan_is_the_eager_step(cls, kwargs):
    """bfloat16 state (stochastic rounding) and Kahan-compensated bfloat16 weights under torch.compile: the op carries
    the compensations, the seed (at the top of its range) and each layer's number in the optimizer (a second param
    group's layers are not numbered from 0), so the compiled step stores what the eager one does, bit for bit."""
    backend_or_skip("cpp")
    options = dict(state_dtype=torch.bfloat16, kahan=True, seed=2**32 - 1)
    compiled_params, eager_params = make_params(SMALL_SHAPES, torch.bfloat16), make_params(SMALL_SHAPES, torch.bfloat16)
    split = lambda ps: [dict(params=ps[:3]), dict(params=ps[3:])]  # noqa: E731
    opt = cls(split(compiled_params), backend="cpp", **kwargs, **options)
    eager = cls(split(eager_params), backend="cpp", **kwargs, **options)
    step = torch.compile(opt.step)
    for i in range(3):
        set_grads(compiled_params, i), set_grads(eager_params, i)
        step()
        eager.step()
    for p, q in zip(compiled_params, eager_params):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == eager.state[q].keys() and "kahan_comp" in opt.state[p]
        for key, value in opt.state[p].items():
            assert value.dtype == eager.state[q][key].dtype and torch.equal(value, eager.state[q][key]), key
