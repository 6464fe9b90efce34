"""The Triton backend beyond the parity table: layers split over many chunks, the launch count, GradScaler
inputs, lr as a tensor, reproducibility, strided layers, the variants of docs/algorithms.md section 8 with
separate decay and adaptation exclusions, the step of sharded layers split around an all-reduce, the per-layer
reduction's traffic model and its launch between the passes, aligned and misaligned tensors (per layer), norms
beyond float32's range, phi and bias-correction numerics, bfloat16 rounding.

On the CPU the kernels run under the Triton interpreter (tests/conftest.py); the tests marked ``gpu`` need CUDA.
"""

import functools
import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import buckets
from buckets import assert_buckets_close, assert_buckets_equal, clone_bucket
from cases import CASES, SHAPES, SMALL_SHAPES, assert_matches, backend_or_skip, make_params, run, set_grads
from tvlars_fused import LAMB, LARS, TVLARS, reference
from tvlars_fused._layer_table import COL_FLAGS, FLAG_ALIGNED16, prepare
from tvlars_fused._types import Bucket, LambHyper, LarsHyper
from tvlars_fused.triton_kernels.common import one_minus_pow, phi, to_param_dtype

pytestmark = pytest.mark.usefixtures("triton_backend")
# Where the kernels run: the GPU when there is one, else the CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


make_bucket = functools.partial(buckets.make_bucket, device=DEVICE)


@pytest.fixture
def triton_backend():
    backend_or_skip("triton", DEVICE)


def _triton_module():
    from tvlars_fused import _triton_backend

    return _triton_backend


TVLARS_HP = LarsHyper(lr=0.5, momentum=0.9, weight_decay=5e-4, eta=1e-3, eps=0.0, norm_clip=None,
                      sum_of_norms=False, nesterov=False, use_phi=True, lmbda=0.1, alpha=1.0, delay=2.0,
                      gamma_min=0.05)
LAMB_HP = LambHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                    norm_clip=10.0)
# Tiny chunks: these layers span 1 to 5 chunks, which pass 2 reduces in tiles of 2 partials (the interpreter
# runs a program in milliseconds, so the layers stay few and small).
MANY_CHUNKS = dict(chunk=32, block=16, reduce_block=2)
MULTI_CHUNK_SHAPES = [s for s in SMALL_SHAPES if s != (300, 7)]


@pytest.fixture
def many_chunks(monkeypatch):
    backend = _triton_module()
    monkeypatch.setattr(backend, "launch_sizes", lambda bucket: backend.LaunchSizes(**MANY_CHUNKS))








def step(bucket, lamb, backend, grad_scale=None, found_inf=None, **hyper):
    if lamb:
        backend.lamb_step(bucket, LambHyper(**{**LAMB_HP.__dict__, **hyper}), grad_scale, found_inf)
    else:
        backend.lars_step(bucket, LarsHyper(**{**TVLARS_HP.__dict__, **hyper}), grad_scale, found_inf)






# ----------------------------------------------------------------------------- layers over many chunks
MULTI_CHUNK_CASES = [c for c in CASES if c.name in ("tvlars", "tvlars-delay-floor-sum", "lars-nesterov-noexclude",
                                                    "lamb", "lamb-max-grad-norm-exclude")]


@pytest.mark.parametrize("case", MULTI_CHUNK_CASES, ids=repr)
def test_layers_split_over_many_chunks_match_reference(case, many_chunks):
    params, opt = run(case, "triton", shapes=MULTI_CHUNK_SHAPES, steps=8, device=DEVICE)
    ref_params, ref_opt = run(case, "reference", shapes=MULTI_CHUNK_SHAPES, steps=8, device=DEVICE)
    assert_matches(params, ref_params, opt, ref_opt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in MULTI_CHUNK_CASES if c.name in ("tvlars", "lamb")], ids=repr)
def test_master_weights_over_many_chunks_match_reference(case, many_chunks):
    kwargs = dict(dtype=torch.bfloat16, shapes=MULTI_CHUNK_SHAPES, steps=5, device=DEVICE,
                  optimizer_kwargs=dict(master_weights=True))
    params, opt = run(case, "triton", **kwargs)
    ref_params, ref_opt = run(case, "reference", **kwargs)
    # The float32 masters and states agree to float32 accuracy; parameters are their one rounding.
    for p, r in zip(params, ref_params):
        for key in ref_opt.state[r]:
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[r][key], rtol=1e-5, atol=1e-5)
        assert torch.equal(p.detach(), opt.state[p]["master_weight"].to(torch.bfloat16))


# ----------------------------------------------------------------------------- launches per step
@contextmanager
def count_kernel_launches(device):
    """Yields a one-element list holding the number of kernels launched in the block: Triton grids run by the
    interpreter on the CPU, every CUDA kernel in the profiler's trace on a GPU."""
    counter = [0]
    if device == "cpu":
        from triton.runtime import interpreter

        run_grid = interpreter.GridExecutor.__call__

        def counting(self, *args, **kwargs):
            counter[0] += 1
            return run_grid(self, *args, **kwargs)

        interpreter.GridExecutor.__call__ = counting
        try:
            yield counter
        finally:
            interpreter.GridExecutor.__call__ = run_grid
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            yield counter
            torch.cuda.synchronize()
        counter[0] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                         and not e.name.startswith("Memcpy") and not e.name.startswith("Memset"))


def _tiny_shapes(count):
    return [[(3, 2), (4,), (1,), (0,), (2, 2, 2)][i % 5] for i in range(count)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("num_layers", [3, 300])
@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5)), (LARS, dict(lr=0.5, nesterov=True)),
                                         (LAMB, dict(lr=1e-2))], ids=["tvlars", "lars", "lamb"])
def test_at_most_two_launches_per_step(cls, kwargs, num_layers, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the interpreter count runs where the kernels are interpreted (no GPU)")
    shapes = _tiny_shapes(num_layers)
    params = make_params(shapes, device=device)
    ref_params = make_params(shapes, device=device)
    opt = cls(params, backend="triton", **kwargs)
    ref_opt = cls(ref_params, backend="reference", **kwargs)
    for step_index in range(2):
        set_grads(params, step_index)
        set_grads(ref_params, step_index)
        if step_index == 0:
            opt.step()  # the first step builds the state and the layer table
        else:
            with count_kernel_launches(device) as launches:
                opt.step()
            assert launches[0] == 2, f"{launches[0]} kernel launches for one step of {num_layers} layers"
        ref_opt.step()
    assert_matches(params, ref_params, opt, ref_opt, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GradScaler inputs
@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
@pytest.mark.parametrize("masters", [False, True], ids=["params", "masters"])
def test_found_inf_writes_nothing(lamb, masters):
    backend = _triton_module()
    dtype = torch.bfloat16 if masters else torch.float32
    bucket = make_bucket(SMALL_SHAPES, lamb=lamb, dtype=dtype, masters=masters)
    before = clone_bucket(bucket)
    scale, inf, no_inf = (torch.tensor(v, device=DEVICE) for v in (4.0, 1.0, 0.0))
    step(bucket, lamb, backend, grad_scale=scale, found_inf=inf)
    assert_buckets_equal(bucket, before)
    step(bucket, lamb, backend, grad_scale=scale, found_inf=no_inf)
    assert not torch.equal(bucket.params[0], before.params[0])
    assert all(s == b + 1 for s, b in zip(bucket.steps, before.steps))


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_grad_scale_divides_gradients(lamb):
    backend = _triton_module()
    scale = torch.tensor(3.0, device=DEVICE)  # not a power of two: the division must really happen in-kernel
    bucket = make_bucket(SMALL_SHAPES, lamb=lamb, grad_factor=3.0)
    expected = clone_bucket(bucket)
    for _ in range(3):
        step(bucket, lamb, backend, grad_scale=scale)
        step(expected, lamb, reference, grad_scale=scale)
    assert_buckets_close(bucket, expected, 1e-5)


def test_lamb_clip_coef_multiplies_gradients():
    backend = _triton_module()
    bucket = make_bucket(SMALL_SHAPES, lamb=True)
    expected = clone_bucket(bucket)
    coef = torch.tensor(0.37, device=DEVICE)
    for _ in range(2):
        step(bucket, True, backend, grad_scale=torch.tensor(2.0, device=DEVICE), clip_coef=coef)
        step(expected, True, reference, grad_scale=torch.tensor(2.0, device=DEVICE), clip_coef=coef)
    assert_buckets_close(bucket, expected, 1e-5)


# LARC's clip (q / lr) and LAMB's decoupled decay (1 - lr * beta') read lr before the update too.
@pytest.mark.parametrize("lamb, hyper", [(False, {}), (True, {}), (False, dict(trust_clip=True)),
                                         (True, dict(decoupled_decay=True))],
                         ids=["tvlars", "lamb", "tvlars-trust-clip", "lamb-decoupled"])
def test_lr_tensor_is_read_in_kernel_at_each_step(lamb, hyper):
    backend = _triton_module()
    lr = torch.tensor(0.25, device=DEVICE)
    with_tensor = make_bucket(SMALL_SHAPES, lamb=lamb)
    with_float = clone_bucket(with_tensor)
    for value in (0.25, 0.1, 0.0):
        lr.fill_(value)  # like an LR scheduler writing a tensor lr in place
        step(with_tensor, lamb, backend, lr=lr, **hyper)
        step(with_float, lamb, backend, lr=value, **hyper)
    assert_buckets_equal(with_tensor, with_float)


# ----------------------------------------------------------------------------- determinism, strided layers
@pytest.mark.parametrize("case", [c for c in MULTI_CHUNK_CASES if c.name in ("tvlars", "lamb")], ids=repr)
def test_bit_identical_across_runs(case, many_chunks):
    first, first_opt = run(case, "triton", shapes=MULTI_CHUNK_SHAPES, steps=4, device=DEVICE)
    second, second_opt = run(case, "triton", shapes=MULTI_CHUNK_SHAPES, steps=4, device=DEVICE)
    assert_matches(first, second, first_opt, second_opt, rtol=0, atol=0)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_strided_layers_are_updated_in_place_through_foreach(lamb):
    backend = _triton_module()
    bucket = make_bucket([(8, 6), (5,), (6, 4)], lamb=lamb)
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    bucket.params[2] = base[:, ::2]  # a strided view: the table cannot cover it
    original = base.clone()
    expected = clone_bucket(bucket)
    for _ in range(2):
        step(bucket, lamb, backend)
        step(expected, lamb, reference)
    assert_buckets_close(bucket, expected, 1e-5)
    assert not torch.equal(base[:, ::2], original[:, ::2])  # the view's own storage moved ...
    assert torch.equal(base[:, 1::2], original[:, 1::2])  # ... and nothing between its elements


# ----------------------------------------------------------------------------- variants (docs/algorithms.md, 8)
# (lamb, hyper-parameters): the options of section 8 on layers over many chunks. The bounds sit inside the range
# of these layers' computed ratios, so some are clamped and some not; lr 2 makes LARC's clip of q = 1 a real
# 1 / lr (for layer 0's zero gradient under sum_of_norms; and for unadapted layers, were they clipped); eta 1 makes
# the TVLARS ratios large enough that a 1e-3 relative error in one norm shows in the momentum buffers.
VARIANTS = {
    "lars-sum-of-norms-clip-bounds": (False, dict(use_phi=False, sum_of_norms=True, weight_decay=1e-2, lr=2.0,
                                                  trust_clip=True, min_trust_ratio=9e-4, max_trust_ratio=2e-3)),
    "tvlars-dampening-bounds": (False, dict(dampening=0.3, weight_decay=0.1, eta=1.0, min_trust_ratio=0.45,
                                            max_trust_ratio=1.0)),
    "tvlars-not-adapted": (False, dict(adapt=False, dampening=0.1, trust_clip=True, lr=2.0)),
    "lamb-decoupled-bounds": (True, dict(decoupled_decay=True, grad_averaging=False, weight_decay=0.5, lr=0.1,
                                         min_trust_ratio=0.15, max_trust_ratio=1.0)),
    "lamb-not-adapted": (True, dict(adapt=False, grad_averaging=False)),
}
# Per layer (MULTI_CHUNK_SHAPES): decayed and adapted; without decay but adapted (over 5 chunks); decayed but not
# adapted (a 1-D layer, which make_bucket's ``excluded`` alone would exclude from both); neither; empty; both.
NO_DECAY = [False, True, False, True, False, False]
NO_ADAPT = [False, False, True, True, False, False]


def _split_exclusions(bucket):
    bucket.no_decay, bucket.no_adapt = list(NO_DECAY), list(NO_ADAPT)
    bucket.grads[0].zero_()  # the zero-norm branch: ||g|| = 0 (sum_of_norms), d = beta * w (norm_of_sum)
    return bucket


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_with_split_exclusions_match_reference(variant, many_chunks):
    lamb, hyper = VARIANTS[variant]
    bucket = _split_exclusions(make_bucket(MULTI_CHUNK_SHAPES, lamb=lamb))
    expected = _split_exclusions(clone_bucket(bucket))
    for _ in range(3):  # make_bucket's step counts 0, 1, 2: a first step (buf = u) and later ones
        step(bucket, lamb, _triton_module(), **hyper)
        step(expected, lamb, reference, **hyper)
    assert_buckets_close(bucket, expected, 1e-5)


# ----------------------------------------------------------------------------- sharded layers (split step)
def doubling(sums):
    """reduce_sums as if a second rank held an identical shard of every layer: the all-reduce doubles sums."""
    sums.mul_(2)


class RecordingReduce:
    """reduce_sums that records a copy of what it is given and leaves it as it is."""

    def __init__(self):
        self.calls = []

    def __call__(self, sums):
        self.calls.append(sums.clone())


# (lamb, hyper-parameters). norm_clip 14 lies between the local norms of the 128- and 144-element layers
# (about 11 and 12) and their doubled ones (about 16 and 17), so the doubled sums change q; with eps = 0 and
# no clip, doubling every sum would leave LARS's ratio of norms as it is.
SHARDED_VARIANTS = {
    "lars-norm-of-sum": (False, dict(use_phi=False, eps=1e-3, norm_clip=14.0)),
    "lars-sum-of-norms": (False, dict(use_phi=False, sum_of_norms=True, weight_decay=1e-2, norm_clip=14.0)),
    "tvlars": (False, dict(norm_clip=14.0)),
    "lamb": (True, dict(norm_clip=14.0)),
    "lars-trust-clip-dampening": (False, dict(use_phi=False, eps=1e-3, norm_clip=14.0, trust_clip=True,
                                              dampening=0.3)),
    "lamb-decoupled": (True, dict(norm_clip=14.0, decoupled_decay=True, grad_averaging=False, weight_decay=0.1)),
}
# An FSDP2 rank can hold empty shards, 2-D ones included.
SHARDED_SHAPES = MULTI_CHUNK_SHAPES + [(0, 3)]


def _sharded_steps(bucket, lamb, backend, reduce_sums, steps=3, **hyper):
    bucket.reduce_sums = reduce_sums
    for _ in range(steps):
        step(bucket, lamb, backend, **hyper)
    return bucket


@pytest.mark.parametrize("variant", list(SHARDED_VARIANTS))
def test_sharded_split_step_matches_reference(variant, many_chunks):
    lamb, hyper = SHARDED_VARIANTS[variant]
    bucket = make_bucket(SHARDED_SHAPES, lamb=lamb)
    expected, local_only = clone_bucket(bucket), clone_bucket(bucket)
    _sharded_steps(bucket, lamb, _triton_module(), doubling, **hyper)
    _sharded_steps(expected, lamb, reference, doubling, **hyper)
    assert_buckets_close(bucket, expected, 1e-5)
    # The comparison sees whether the summed sums reach pass 2: the local sums alone fail it.
    _sharded_steps(local_only, lamb, _triton_module(), RecordingReduce(), **hyper)
    with pytest.raises(AssertionError):
        assert_buckets_close(local_only, expected, 1e-5)


@pytest.mark.parametrize("variant", list(SHARDED_VARIANTS))
def test_sharded_split_step_on_one_rank_is_bit_identical_to_the_ordinary_step(variant, many_chunks):
    # The layer sums are formed by the very reduction pass 2 runs on the ordinary path.
    lamb, hyper = SHARDED_VARIANTS[variant]
    bucket = make_bucket(SHARDED_SHAPES, lamb=lamb)
    ordinary = clone_bucket(bucket)
    _sharded_steps(bucket, lamb, _triton_module(), RecordingReduce(), **hyper)
    for _ in range(3):
        step(ordinary, lamb, _triton_module(), **hyper)
    assert_buckets_equal(bucket, ordinary)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
@pytest.mark.parametrize("masters", [False, True], ids=["params", "masters"])
def test_sharded_found_inf_writes_nothing_but_joins_the_all_reduce(lamb, masters):
    backend = _triton_module()
    dtype = torch.bfloat16 if masters else torch.float32
    bucket = make_bucket(SHARDED_SHAPES, lamb=lamb, dtype=dtype, masters=masters)
    bucket.reduce_sums = reduce = RecordingReduce()
    before = clone_bucket(bucket)
    scale, inf, no_inf = (torch.tensor(v, device=DEVICE) for v in (4.0, 1.0, 0.0))
    step(bucket, lamb, backend, grad_scale=scale, found_inf=inf)
    assert_buckets_equal(bucket, before)
    assert len(reduce.calls) == 1  # every rank must join the collective: the host never reads found_inf
    step(bucket, lamb, backend, grad_scale=scale, found_inf=no_inf)
    assert not torch.equal(bucket.params[0], before.params[0])
    assert all(s == b + 1 for s, b in zip(bucket.steps, before.steps))


@pytest.mark.parametrize("variant", ["tvlars", "lars-sum-of-norms", "lamb"])
def test_sharded_split_step_is_three_launches_around_one_all_reduce(variant):
    lamb, hyper = SHARDED_VARIANTS[variant]
    shapes = _tiny_shapes(40)
    bucket = make_bucket(shapes, lamb=lamb)
    bucket.reduce_sums = reduce = RecordingReduce()
    step(bucket, lamb, _triton_module(), **hyper)  # the first step builds the layer table
    with count_kernel_launches(DEVICE) as launches:
        step(bucket, lamb, _triton_module(), **hyper)
    assert launches[0] == 3, f"{launches[0]} kernel launches for one sharded step"
    assert [tuple(c.shape) for c in reduce.calls] == [(len(shapes), 2)] * 2


# ----------------------------------------------------------------------------- the per-layer reduction
@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_launch_between_the_passes_gives_the_bits_of_two_launches(lamb, many_chunks, monkeypatch):
    # The traffic model made to take layer_sums_kernel between the passes (as for layers beyond 2**26
    # elements): pass 2 then reads each layer's sums once reduced instead of re-reducing them in every program.
    backend = _triton_module()
    bucket = make_bucket(MULTI_CHUNK_SHAPES, lamb=lamb)
    two_launches = clone_bucket(bucket)
    for _ in range(3):
        step(two_launches, lamb, backend)
    monkeypatch.setattr(backend.ReductionTraffic, "reduce_first", property(lambda traffic: True))
    step(bucket, lamb, backend)  # the first step builds the layer table
    with count_kernel_launches(DEVICE) as launches:
        step(bucket, lamb, backend)
    step(bucket, lamb, backend)
    assert launches[0] == 3, f"{launches[0]} kernel launches for one step"
    assert_buckets_equal(bucket, two_launches)


def _reduction_traffic(numels, lamb=False, dtype=torch.float32, masters=False):
    """The traffic model of a CUDA bucket of layers of these sizes (meta tensors: nothing is allocated)."""
    backend = _triton_module()
    bucket = SimpleNamespace(params=[torch.empty(n, dtype=dtype, device="meta") for n in numels], cache={},
                             device=torch.device("cuda"), states=[[]] * (1 + lamb), masters=[] if masters else None)
    sizes = backend.launch_sizes(bucket)
    chunks = [max(1, -(-n // sizes.chunk)) for n in numels]
    return backend.reduction_traffic(numels, chunks, backend.element_bytes(bucket))


STEP_KINDS = [(lamb, dtype, masters) for lamb in (False, True) for dtype, masters in
              [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]]


def test_element_bytes_count_both_passes():
    assert [_reduction_traffic([1], *kind).step for kind in STEP_KINDS] == [28, 18, 26, 40, 32, 40]


@pytest.mark.parametrize("lamb, dtype, masters", STEP_KINDS, ids=lambda v: str(v))
def test_per_layer_reduction_stays_under_five_percent_of_the_step(lamb, dtype, masters):
    # Layers from 1 Ki to 32 Gi elements, at and between powers of two (the chunk jumps at powers of 4): the
    # path taken adds less than 5 % to the step's bytes (a launch in between costs its time, not traffic).
    backend = _triton_module()
    for numel in sorted({m << k for k in range(10, 35) for m in (1, 3)} | {(1 << 31) + 4099}):
        traffic = _reduction_traffic([numel], lamb, dtype, masters)
        added = traffic.between - backend.LAUNCH_BYTES if traffic.reduce_first else traffic.rereads
        assert added < 0.05 * traffic.step, (numel, traffic)


@pytest.mark.parametrize("lamb, dtype, masters", STEP_KINDS, ids=lambda v: str(v))
def test_launch_between_the_passes_only_for_very_large_layers(lamb, dtype, masters):
    # Up to 2**26 elements (a ResNet-50, a 64 Mi-element embedding) two launches, from 2**27 three.
    resnet = [64 * 3 * 49] + [256 * 256 * 9] * 12 + [512 * 512 * 9] * 4 + [2048 * 1000, 2048 * 512] + [256] * 100
    assert not _reduction_traffic(resnet, lamb, dtype, masters).reduce_first
    for numel in [m << k for k in range(10, 27) for m in (1, 3) if m << k <= 1 << 26]:
        assert not _reduction_traffic([numel, 1000], lamb, dtype, masters).reduce_first, numel
    for numel in (1 << 27, 1 << 28, 1 << 31, 1 << 34):
        assert _reduction_traffic([numel], lamb, dtype, masters).reduce_first, numel


def test_rereads_alone_would_add_29_percent_at_two_to_the_31():
    beyond = _reduction_traffic([1 << 31])  # float32 LARS
    assert 0.28 < beyond.rereads / beyond.step < 0.3


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_sharded_rank_with_only_empty_shards_steps(lamb):
    # This rank holds nothing of any layer: it contributes zero sums and advances its step counts.
    bucket = make_bucket([(0, 3), (0,), (0, 2, 2)], lamb=lamb)
    bucket.reduce_sums = reduce = RecordingReduce()
    before = clone_bucket(bucket)
    step(bucket, lamb, _triton_module())
    assert [c.tolist() for c in reduce.calls] == [[[0.0, 0.0]] * 3]
    assert all(s == b + 1 for s, b in zip(bucket.steps, before.steps))


# ----------------------------------------------------------------------------- alignment, float64 norms
# A chunk of full tiles, one of full tiles and a tail, one of a tail alone (MANY_CHUNKS: chunks of 32, tiles of 16).
ALIGNMENT_SHAPES = [(16, 8), (3, 19), (37,), (1,), (0,)]


def _misaligned(t):
    """t's values in a view one element into a flat buffer: dense, so the table covers it, never 16-byte aligned."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return view.copy_(t)


def _misalign(bucket):
    bucket.params = [_misaligned(t) for t in bucket.params]
    bucket.grads = [_misaligned(t) for t in bucket.grads]
    bucket.states = [[_misaligned(t) for t in state] for state in bucket.states]
    if bucket.masters is not None:
        bucket.masters = [_misaligned(t) for t in bucket.masters]


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_aligned_and_misaligned_layers_match_reference(aligned, dtype, lamb, many_chunks):
    masters = dtype != torch.float32
    bucket = make_bucket(ALIGNMENT_SHAPES, lamb=lamb, dtype=dtype, masters=masters)
    if not aligned:
        _misalign(bucket)
    assert prepare(bucket, MANY_CHUNKS["chunk"])[1].aligned16 == aligned  # the path the launches take
    expected = clone_bucket(bucket)
    for _ in range(3):
        step(bucket, lamb, _triton_module(), grad_scale=torch.tensor(0.5, device=DEVICE))
        step(expected, lamb, reference, grad_scale=torch.tensor(0.5, device=DEVICE))
    if masters:  # parameters are the one rounding of their float32 masters, compared below with the states
        assert all(torch.equal(p, m.to(dtype)) for p, m in zip(bucket.params, bucket.masters))
        bucket.params, expected.params = [], []
    assert_buckets_close(bucket, expected, 1e-5)


def _aligned_layers(bucket):
    return (prepare(bucket, MANY_CHUNKS["chunk"])[1].layers_host[:, COL_FLAGS] & FLAG_ALIGNED16 != 0).tolist()


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_misaligned_layer_leaves_the_others_on_the_vector_path(dtype, lamb, many_chunks):
    # Alignment is decided per layer (on a GPU a vector access to the misaligned layer would fault): the
    # parameter of layer 1, then the gradient of layer 0 (a new gradient column), are views at an odd offset.
    masters = dtype != torch.float32
    bucket = make_bucket(ALIGNMENT_SHAPES, lamb=lamb, dtype=dtype, masters=masters)
    bucket.params[1] = _misaligned(bucket.params[1])
    assert _aligned_layers(bucket) == [True, False, True, True, True]
    assert not prepare(bucket, MANY_CHUNKS["chunk"])[1].aligned16
    expected = clone_bucket(bucket)
    for k in range(4):
        if k == 2:
            bucket.grads[0] = _misaligned(bucket.grads[0])
            assert _aligned_layers(bucket) == [False, False, True, True, True]
        step(bucket, lamb, _triton_module(), grad_scale=torch.tensor(0.5, device=DEVICE))
        step(expected, lamb, reference, grad_scale=torch.tensor(0.5, device=DEVICE))
    if masters:
        assert all(torch.equal(p, m.to(dtype)) for p, m in zip(bucket.params, bucket.masters))
        bucket.params, expected.params = [], []
    assert_buckets_close(bucket, expected, 1e-5)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_weights_near_1e20_have_finite_norms_and_match_reference(lamb):
    # Squares of 1e20 overflow float32 (3.4e38); without norm_clip an infinite ||w|| makes q infinite.
    bucket = make_bucket([(16, 8), (3, 19)], lamb=lamb)
    for p in bucket.params:
        p.mul_(1e20)
    expected = clone_bucket(bucket)
    for _ in range(2):
        step(bucket, lamb, _triton_module(), norm_clip=None)
        step(expected, lamb, reference, norm_clip=None)
    assert all(torch.isfinite(t).all() for t in bucket.params + [s for state in bucket.states for s in state])
    assert_buckets_close(bucket, expected, 1e-5)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_sum_of_squares_below_float32_normal_range_takes_the_trust_ratio(lamb):
    # Elements near 1e-25: each layer's sum of squares (about 1e-48) lies below 2**-126 and even below
    # float32's smallest subnormal, so a float32 sum is 0 and takes q = 1, a step of lr * g here.
    bucket = make_bucket([(16, 8), (3, 19)], lamb=lamb)
    for t in bucket.params + [s for state in bucket.states for s in state]:
        t.mul_(1e-25)
    expected = clone_bucket(bucket)
    for _ in range(2):
        step(bucket, lamb, _triton_module())
        step(expected, lamb, reference)
    assert all(p.abs().max() < 1e-20 for p in bucket.params)  # q ~ ||w|| / ||d|| ~ 1e-25: the step is tiny
    assert_buckets_close(bucket, expected, 1e-5)


def test_launch_sizes_reject_chunks_that_split_a_tile():
    backend = _triton_module()
    with pytest.raises(ValueError, match="chunk must be a positive multiple of block"):
        backend.LaunchSizes(chunk=48, block=32)
    with pytest.raises(ValueError, match="block must be a power of two >= 8"):
        backend.LaunchSizes(chunk=48, block=24)


# ----------------------------------------------------------------------------- device numerics
# exp overflowing to inf is the point (phi = gamma_min); numpy says so when it interprets the kernel: in the
# float64 exp, or in its rounding to float32.
EXP_OVERFLOW_IS_EXPECTED = pytest.mark.filterwarnings("ignore:overflow encountered in (exp|cast):RuntimeWarning")


@triton.jit
def _scalar_math_kernel(t_ptr, phi_ptr, correction_ptr, n, lmbda, alpha, delay, gamma_min, log_beta,
                        BLOCK: tl.constexpr):
    index = tl.arange(0, BLOCK)
    mask = index < n
    t = tl.load(t_ptr + index, mask=mask, other=1.0)
    tl.store(phi_ptr + index, phi(t, lmbda, alpha, delay, gamma_min), mask=mask)
    tl.store(correction_ptr + index, one_minus_pow(log_beta, t), mask=mask)


def _scalar_math(t, lmbda, alpha, delay, gamma_min, beta):
    t = t.to(DEVICE)
    phis, corrections = torch.empty_like(t), torch.empty_like(t)
    _scalar_math_kernel[(1,)](t, phis, corrections, t.numel(), lmbda, alpha, delay, gamma_min, math.log(beta),
                              BLOCK=triton.next_power_of_2(t.numel()))
    return phis.cpu(), corrections.cpu()


@pytest.mark.parametrize("beta", [0.9, 0.99, 0.999, 0.9999, 0.5])
def test_bias_correction_is_float32_accurate(beta):
    t = torch.cat([torch.arange(1.0, 2001.0), torch.tensor([5e3, 1e4, 1e5, 1e6])])
    _, corrections = _scalar_math(t, 0.0, 1.0, 0.0, 0.0, beta)
    exact = torch.tensor([1 - beta ** s for s in t.tolist()], dtype=torch.float64)
    # A few float32 ulps; plain 1 - beta**t in float32 is off by 1.3e-5 relative at t = 1 for beta = 0.999.
    torch.testing.assert_close(corrections.double(), exact, rtol=5e-7, atol=0)


@EXP_OVERFLOW_IS_EXPECTED
def test_phi_matches_float64_and_overflow_gives_gamma_min():
    t = torch.arange(1.0, 200.0)
    for lmbda, alpha, delay, gamma_min in [(0.1, 0.1, 0.0, 0.0), (0.05, 1.0, 10.0, 0.2), (5.0, 0.5, 3.0, 0.01)]:
        phis, _ = _scalar_math(t, lmbda, alpha, delay, gamma_min, 0.9)
        exact = torch.tensor([reference.phi(s, lmbda, alpha, delay, gamma_min) for s in t.tolist()],
                             dtype=torch.float64)
        assert torch.isfinite(phis).all()
        torch.testing.assert_close(phis.double(), exact, rtol=1e-6, atol=1e-7)
    overflowing, _ = _scalar_math(t, 5.0, 0.5, 3.0, 0.01, 0.9)
    assert (overflowing[t > 30] == torch.tensor(0.01)).all()  # exp(5 * 27) overflows float32


@EXP_OVERFLOW_IS_EXPECTED
def test_tvlars_with_overflowing_exp_matches_reference():
    kwargs = dict(lr=0.5, lmbda=40.0, alpha=0.5, delay=0, gamma_min=0.1)  # exp(40 t) overflows from t = 3
    params = make_params(SMALL_SHAPES, device=DEVICE)
    ref_params = make_params(SMALL_SHAPES, device=DEVICE)
    opt, ref_opt = TVLARS(params, backend="triton", **kwargs), TVLARS(ref_params, backend="reference", **kwargs)
    for step_index in range(4):
        set_grads(params, step_index)
        set_grads(ref_params, step_index)
        opt.step()
        ref_opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert_matches(params, ref_params, opt, ref_opt, rtol=1e-5, atol=1e-5)


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    index = tl.arange(0, BLOCK)
    mask = index < n
    tl.store(y_ptr + index, to_param_dtype(tl.load(x_ptr + index, mask=mask), tl.bfloat16), mask=mask)


def test_bfloat16_store_rounds_to_nearest_even():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 10
    halfway = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.3e38, 3.4e38, 1e-40, -0.0])
    x = torch.cat([x, halfway, torch.tensor([math.inf, -math.inf])]).to(DEVICE)
    y = torch.empty_like(x, dtype=torch.bfloat16)
    _round_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    nan = torch.full((4,), math.nan, device=DEVICE)
    _round_kernel[(1,)](nan, y, 4, BLOCK=4)
    assert y[:4].isnan().all()


# ----------------------------------------------------------------------------- GPU only
def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_gpu_matches_reference(case):
    _cuda_or_skip()
    shapes = SHAPES + [(1 << 20) + 3]  # a layer over many chunks of the GPU chunk size
    params, opt = run(case, "triton", shapes=shapes, steps=50, device="cuda")
    ref_params, ref_opt = run(case, "reference", shapes=shapes, steps=50, device="cuda")
    assert_matches(params, ref_params, opt, ref_opt, rtol=1e-5, atol=1e-5)
    again, again_opt = run(case, "triton", shapes=shapes, steps=50, device="cuda")
    assert_matches(params, again, opt, again_opt, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_gpu_step_replays_in_a_cuda_graph(lamb):
    _cuda_or_skip()
    backend = _triton_module()
    lr = torch.tensor(0.1, device="cuda")
    graphed = make_bucket(SHAPES, lamb=lamb, device="cuda")
    eager = clone_bucket(graphed)
    scale, found_inf = torch.tensor(2.0, device="cuda"), torch.tensor(0.0, device="cuda")
    step(graphed, lamb, backend, grad_scale=scale, found_inf=found_inf, lr=lr)  # warm-up: compile, build tables
    step(eager, lamb, backend, grad_scale=scale, found_inf=found_inf, lr=lr)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, lamb, backend, grad_scale=scale, found_inf=found_inf, lr=lr)
    for value in (0.1, 0.05):
        lr.fill_(value)
        graph.replay()
        step(eager, lamb, backend, grad_scale=scale, found_inf=found_inf, lr=lr)
    found_inf.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert_buckets_equal(graphed, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_gpu_step_on_a_side_stream_records_the_table_there_once(lamb, monkeypatch):
    _cuda_or_skip()
    backend = _triton_module()
    bucket = make_bucket(SHAPES, lamb=lamb, device="cuda")
    expected = clone_bucket(bucket)
    recorded = []
    record_stream = torch.Tensor.record_stream
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: recorded.append(s) or record_stream(t, s))
    side = torch.cuda.Stream()
    step(bucket, lamb, backend)  # the table is built on the current stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(bucket, lamb, backend)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        step(expected, lamb, backend)
    torch.cuda.synchronize()
    assert_buckets_equal(bucket, expected)
    # layers, chunk_layer, partials, new_steps and zero: once on each of the two streams
    assert len(recorded) == 10 and set(recorded) == {torch.cuda.current_stream(), side}


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_layer_beyond_two_to_the_31_elements():
    _cuda_or_skip()
    numel = (1 << 31) + 4099
    if torch.cuda.get_device_properties(0).total_memory < 12 * numel:
        pytest.skip("needs about 12 bytes of GPU memory per element of a 2**31-element layer")
    backend = _triton_module()
    bucket = Bucket(params=[torch.ones(numel, dtype=torch.bfloat16, device="cuda")],
                    grads=[torch.ones(numel, dtype=torch.bfloat16, device="cuda")],
                    states=[[torch.zeros(numel, device="cuda")]], steps=[torch.zeros((), device="cuda")],
                    excluded=[False])
    bucket.grads[0][-5:] = 0.0  # elements beyond 2**31 must see their own gradient
    # No decay, lmbda = 0 so phi = 1/2, eta = lr = 1: q = ||w|| / (2 ||g||) ~ 1/2 and w -= q * g.
    step(bucket, False, backend, lmbda=0.0, alpha=1.0, delay=0.0, gamma_min=0.0, weight_decay=0.0, lr=1.0,
         eta=1.0)
    q = 0.5 * math.sqrt(numel) / math.sqrt(numel - 5)
    tail = bucket.params[0][-8:].float().cpu()
    assert torch.equal(tail, torch.tensor([0.5] * 3 + [1.0] * 5))
    torch.testing.assert_close(bucket.states[0][0][-8:].cpu(), torch.tensor([q] * 3 + [0.0] * 5))
    assert bucket.steps[0].item() == 1.0
