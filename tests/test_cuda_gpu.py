"""backend="cuda" on a GPU: one cooperative launch per step, the optimizer step replayed in a CUDA graph,
found_inf skips, 64-bit offsets, the step split around reduce_sums for sharded buckets. The parity table on the
GPU is tests/test_gpu_parity.py. Every test skips with "no CUDA GPU" where there is none (the development
machines)."""

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from cases import SHAPES, assert_matches, backend_or_skip, make_params, set_grads
from buckets import assert_buckets_close, assert_buckets_equal, clone_bucket, make_bucket
from tvlars_fused import LAMB, LARS, TVLARS
from tvlars_fused import reference
from tvlars_fused._types import Bucket, LambHyper, LarsHyper

try:  # both load the compiled library, which raises why when it is neither built nor buildable here
    from test_cpp_backend import SPLIT_CASES, SPLIT_IDS, assert_step_wrote_everything, counting, other_ranks, step
    from test_gpu_large import cuda_memory_released
    from tvlars_fused import _cpp_backend
except RuntimeError as exc:
    pytest.skip(f"the tvlars_fused extension is unavailable: {exc}", allow_module_level=True)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.usefixtures("cuda_backend"),
]

# The float32 contract of docs/algorithms.md: |x - ref| <= 1e-5 * (1 + |ref|) after 50 float32 steps (the GPU's
# expf/expm1f/sqrtf and fused multiply-adds differ from the CPU reference by a few ulps per step).
FLOAT32_TOL = 1e-5
OPTIMIZERS = [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))]


@pytest.fixture
def cuda_backend():
    backend_or_skip("cuda", "cuda")


@pytest.mark.parametrize("num_layers", [3, 300, 3000])
@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS, ids=["tvlars", "lamb"])
def test_one_kernel_launch_per_step(num_layers, cls, kwargs):
    """3 to 3000 layers: one step is one kernel on the GPU (the cooperative step kernel), nothing else."""
    shapes = [(64, 33) if i % 2 else (17,) for i in range(num_layers)]
    params = make_params(shapes, device="cuda")
    opt = cls(params, backend="cuda", **kwargs)
    set_grads(params, 0)
    opt.step()  # builds and caches the layer table (host-to-device copies)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    device_events = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert len(device_events) == 1 and "step_kernel" in device_events[0], device_events


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS, ids=["tvlars", "lamb"])
def test_cuda_graph_replay_matches_eager(cls, kwargs):
    """optimizer.step() alone captured in a CUDA graph: replays read the current gradients, step counts and
    tensor lr, and give the eager steps' bits."""
    eager = make_params(SHAPES, device="cuda")
    graphed = make_params(SHAPES, device="cuda")
    lr_eager = torch.tensor(kwargs["lr"], device="cuda")
    lr_graphed = torch.tensor(kwargs["lr"], device="cuda")
    opt_eager = cls(eager, backend="cuda", **{**kwargs, "lr": lr_eager})
    opt_graphed = cls(graphed, backend="cuda", **{**kwargs, "lr": lr_graphed})
    set_grads(eager, 0)
    set_grads(graphed, 0)
    opt_eager.step()
    opt_graphed.step()  # state and layer table exist before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_graphed.step()
    for k in range(1, 6):
        lr_eager.mul_(0.7)  # a scheduler writing the tensor lr: the replay must read the new value
        lr_graphed.mul_(0.7)
        set_grads(eager, k)
        for p, e in zip(graphed, eager):
            p.grad.copy_(e.grad)  # the graph reads the captured gradient tensors
        opt_eager.step()
        graph.replay()
    torch.cuda.synchronize()
    assert_matches(graphed, eager, opt_graphed, opt_eager, rtol=0, atol=0)


def cuda_bucket(lamb: bool, masters: bool) -> Bucket:
    dtype = torch.bfloat16 if masters else torch.float32
    params = [p.detach() for p in make_params(SHAPES, dtype=dtype, device="cuda")]
    grads = [torch.randn(p.shape, device="cuda").to(dtype) for p in params]
    return Bucket(
        params=params,
        grads=grads,
        states=[[torch.rand(p.shape, device="cuda") for p in params] for _ in range(2 if lamb else 1)],
        steps=[torch.tensor(3.0, device="cuda") for _ in params],
        excluded=[p.ndim <= 1 for p in params],
        masters=[p.float() for p in params] if masters else None,
    )


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
@pytest.mark.parametrize("masters", [False, True], ids=["params", "masters"])
def test_found_inf_writes_nothing(lamb, masters):
    """found_inf set: the kernel writes no parameter, gradient, state, master or step count. The same step with
    found_inf = 0 writes them all: the control that the first step's "nothing" is the flag's doing."""
    bucket = cuda_bucket(lamb, masters)
    before = clone_bucket(bucket)
    if lamb:
        hp = LambHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                       norm_clip=10.0)
        step_fn = _cpp_backend.lamb_step
    else:
        hp = LarsHyper(lr=0.5, momentum=0.9, weight_decay=5e-4, eta=1e-3, eps=0.0, norm_clip=None,
                       sum_of_norms=False, nesterov=False, use_phi=True, lmbda=1e-3)
        step_fn = _cpp_backend.lars_step
    scale = torch.tensor(8.0, device="cuda")
    step_fn(bucket, hp, scale, torch.tensor(1.0, device="cuda"))
    torch.cuda.synchronize()
    assert_buckets_equal(bucket, before)
    step_fn(bucket, hp, scale, torch.tensor(0.0, device="cuda"))
    torch.cuda.synchronize()
    assert_step_wrote_everything(bucket, before)


@pytest.mark.slow
def test_layer_beyond_2_31_elements():
    """A 3 * 2^30-element bf16 layer (26 GB with gradient and momentum, given back when the test ends): weights 1
    below element 2^31 and 2 above, so a 32-bit offset anywhere (lost tail, wrong norm) changes the result far
    beyond bf16 rounding."""
    with cuda_memory_released():
        _check_layer_beyond_2_31_elements()


def _check_layer_beyond_2_31_elements() -> None:
    split, numel = 2 ** 31, 3 * 2 ** 30
    p = torch.ones(numel, dtype=torch.bfloat16, device="cuda")
    p[split:] = 2.0
    p.grad = torch.full_like(p, 0.5)
    lr, weight_decay, eta = 100.0, 1e-2, 1e-3
    opt = LARS([p], backend="cuda", lr=lr, weight_decay=weight_decay, eta=eta, exclude=None)
    opt.step()
    torch.cuda.synchronize()
    low, high = split, numel - split
    d_low, d_high = 0.5 + weight_decay * 1.0, 0.5 + weight_decay * 2.0
    w_norm = (low * 1.0 + high * 4.0) ** 0.5
    d_norm = (low * d_low ** 2 + high * d_high ** 2) ** 0.5
    q = eta * w_norm / d_norm
    expected = {0: 1.0 - lr * q * d_low, split - 1: 1.0 - lr * q * d_low, split: 2.0 - lr * q * d_high,
                numel - 1: 2.0 - lr * q * d_high}
    for index, value in expected.items():
        assert p[index].item() == pytest.approx(value, rel=2.0 ** -8), index
    assert torch.all(p[:split] == p[0]) and torch.all(p[split:] == p[-1])
    buf = opt.state[p]["momentum_buffer"]
    assert buf[-1].item() == pytest.approx(q * d_high, rel=1e-4)  # float32 sums over 3e9 squares
    assert opt.state[p]["step"].item() == 1.0


# ---------------------------------------------------------------- sharded buckets: the step split around reduce_sums
@pytest.mark.parametrize("lamb, hyper", SPLIT_CASES, ids=SPLIT_IDS)
def test_split_step_matches_reference_with_the_same_reduce_sums(lamb, hyper):
    """A sharded bucket: the sums phase, reduce_sums (as if other ranks added theirs) and the apply phase equal
    the reference given the same reduce_sums."""
    bucket = make_bucket(SHAPES, lamb=lamb, device="cuda")
    expected = clone_bucket(bucket)
    calls = []
    bucket.reduce_sums = counting(other_ranks, calls)
    expected.reduce_sums = other_ranks
    for _ in range(3):
        step(bucket, lamb, _cpp_backend, **hyper)
        step(expected, lamb, reference, **hyper)
    torch.cuda.synchronize()
    assert calls == [(len(SHAPES), 2)] * 3
    assert_buckets_close(bucket, expected, FLOAT32_TOL)


@pytest.mark.parametrize("lamb, hyper", SPLIT_CASES, ids=SPLIT_IDS)
@pytest.mark.parametrize("masters", [False, True], ids=["params", "masters"])
def test_split_step_with_one_rank_is_the_whole_step(lamb, hyper, masters):
    """With a reduce_sums that adds nothing, the split step gives the unsplit step's bits."""
    dtype = torch.bfloat16 if masters else torch.float32
    bucket = make_bucket(SHAPES, lamb=lamb, dtype=dtype, masters=masters, device="cuda")
    whole = clone_bucket(bucket)
    bucket.reduce_sums = lambda sums: None
    scale = torch.tensor(2.0, device="cuda")
    for _ in range(3):
        step(bucket, lamb, _cpp_backend, grad_scale=scale, **hyper)
        step(whole, lamb, _cpp_backend, grad_scale=scale, **hyper)
    torch.cuda.synchronize()
    assert_buckets_equal(bucket, whole)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_split_step_with_found_inf_writes_nothing(lamb):
    """found_inf set on a sharded bucket: nothing is written, and the all-reduce is still issued."""
    bucket = make_bucket(SHAPES, lamb=lamb, device="cuda")
    calls = []
    bucket.reduce_sums = counting(other_ranks, calls)
    before = clone_bucket(bucket)
    step(bucket, lamb, _cpp_backend, grad_scale=torch.tensor(4.0, device="cuda"),
         found_inf=torch.tensor(1.0, device="cuda"))
    torch.cuda.synchronize()
    assert_buckets_equal(bucket, before)
    assert len(calls) == 1  # the all-reduce is issued anyway: the host never reads found_inf
    step(bucket, lamb, _cpp_backend, grad_scale=torch.tensor(4.0, device="cuda"),
         found_inf=torch.tensor(0.0, device="cuda"))
    torch.cuda.synchronize()
    assert_step_wrote_everything(bucket, before)  # the control: without the flag the same split step writes


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_split_step_on_empty_local_shards(lamb):
    """A rank whose local shards are empty contributes zero sums and advances its step counts."""
    bucket = make_bucket([(0,), (0, 5), (3, 0)], lamb=lamb, device="cuda")
    expected = clone_bucket(bucket)
    bucket.reduce_sums = other_ranks
    expected.reduce_sums = other_ranks
    step(bucket, lamb, _cpp_backend)
    step(expected, lamb, reference)
    torch.cuda.synchronize()
    assert_buckets_equal(bucket, expected)
    assert [s.item() for s in bucket.steps] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_split_step_is_two_kernel_launches(lamb):
    """Sums, then apply: the reduce_sums here launches nothing, so the profile holds the two step kernels."""
    bucket = make_bucket(SHAPES, lamb=lamb, device="cuda")
    bucket.reduce_sums = lambda sums: None
    step(bucket, lamb, _cpp_backend)  # builds and caches the layer table and the sums buffer
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(bucket, lamb, _cpp_backend)
        torch.cuda.synchronize()
    device_events = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert len(device_events) == 2 and all("step_kernel" in name for name in device_events), device_events
