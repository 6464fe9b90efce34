"""Where and how the GPU backends (``cuda`` and ``triton``) launch: a whole training iteration captured in a CUDA
graph, a step on a side stream, the kernel launches of one step per bucket, and buckets on two GPUs. Every test
skips with the reason where there is no GPU (the two-GPU one also where there is one).
"""

import io

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from cases import SHAPES, assert_matches, backend_or_skip, make_params, set_grads
from tvlars_fused import LAMB, TVLARS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

GPU_BACKENDS = ["cuda", "triton"]
OPTIMIZERS = [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2, max_grad_norm=1.0))]
OPTIMIZER_IDS = ["tvlars", "lamb"]
FLOAT32_TOL = 1e-5  # the spec's float32 contract on a GPU (tests/test_gpu_parity.py)


# ----------------------------------------------------------------------------- a whole iteration in a CUDA graph
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10)).cuda()


def _batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(128, 32, generator=gen).cuda(), torch.randint(0, 10, (128,), generator=gen).cuda()


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["foreach"])
def test_a_first_step_inside_a_real_capture_is_refused_and_creates_nothing(backend):
    """State made inside torch.cuda.graph would be made again at every replay (momentum, steps and masters reset
    each time): the step refuses before launching anything, and the capture ends empty."""
    backend_or_skip(backend, "cuda")
    params = make_params(SHAPES, device="cuda")
    opt = TVLARS(params, lr=torch.tensor(0.5, device="cuda"), backend=backend)
    set_grads(params, 0)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="has no optimizer state yet"):
        with torch.cuda.graph(graph):
            opt.step()
    assert not opt.state
    opt.step()  # the warm-up step, outside any capture
    assert len(opt.state) == len(params)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_whole_iteration_graph_replays_like_eager_steps_and_recaptures_after_loading(backend, cls, kwargs):
    """PyTorch's whole-network capture recipe: warm-up on a side stream, zero_grad(set_to_none=True), then
    forward, backward and optimizer.step() captured together, so the gradients are allocated inside the capture
    and the layer table is rebuilt there. 10 replays, a load_state_dict and a recapture, 10 more replays: the
    parameters and state follow an eager twin stepped one step at a time, with a scheduler writing the tensor lr
    before every step."""
    backend_or_skip(backend, "cuda")
    model, twin = _mlp(), _mlp()
    opt = cls(model.parameters(), backend=backend, **{**kwargs, "lr": torch.tensor(kwargs["lr"], device="cuda")})
    twin_opt = cls(twin.parameters(), backend=backend, **{**kwargs, "lr": torch.tensor(kwargs["lr"], device="cuda")})
    static_x, static_y = _batch(0)

    def feed(step):
        x, y = _batch(step)
        static_x.copy_(x)
        static_y.copy_(y)

    def twin_step(step):
        x, y = _batch(step)
        twin_opt.zero_grad(set_to_none=True)
        F.cross_entropy(twin(x), y).backward()
        twin_opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            feed(step)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(static_x), static_y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for step in range(3):
        twin_step(step)

    def capture():
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            F.cross_entropy(model(static_x), static_y).backward()
            opt.step()
        return graph

    def replay(graph, steps):
        for step in steps:
            for o in (opt, twin_opt):
                o.param_groups[0]["lr"].mul_(0.9)  # a scheduler writing the tensor lr in place
            feed(step)
            graph.replay()
            twin_step(step)
        torch.cuda.synchronize()
        assert_matches(list(model.parameters()), list(twin.parameters()), opt, twin_opt, rtol=FLOAT32_TOL,
                       atol=FLOAT32_TOL)

    replay(capture(), range(3, 13))
    # A checkpoint of the twin loaded into the graphed run: new state tensors (and a new lr tensor), which the
    # first graph does not know; the recaptured one steps them.
    buffer = io.BytesIO()
    torch.save({"model": twin.state_dict(), "optimizer": twin_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    replay(capture(), range(13, 23))


@pytest.mark.parametrize("storage", [dict(state_dtype=torch.bfloat16), dict(state_dtype=torch.bfloat16, kahan=True)],
                         ids=["bf16-state", "kahan"])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_captured_step_draws_new_rounding_bits_at_every_replay(backend, cls, kwargs, storage):
    """Stochastic rounding's bits come from the step count, device data: a captured step replayed 6 times (new
    gradients copied into the captured ones) stores exactly what 6 eager steps of a twin store. A graph that baked in
    the capture's bits would round about half of the elements the other way."""
    backend_or_skip(backend, "cuda")
    dtype = torch.bfloat16 if storage.get("kahan") else torch.float32
    params, twin = make_params(SHAPES, dtype, "cuda"), make_params(SHAPES, dtype, "cuda")
    options = {**kwargs, **storage, "lr": torch.tensor(kwargs["lr"], device="cuda"), "seed": 3}
    opt, twin_opt = cls(params, backend=backend, **options), cls(twin, backend=backend, **options)
    for ps in (params, twin):
        set_grads(ps, 0)
    opt.step()  # warm-up: state exists before the capture
    twin_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(1, 7):
        set_grads(twin, step)
        for p, q in zip(params, twin):
            p.grad.copy_(q.grad)
        graph.replay()
        twin_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == twin_opt.state[q].keys()
        for key, value in twin_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    assert opt.state[params[0]]["step"].item() == 7


# ----------------------------------------------------------------------------- streams
SLEEP_CYCLES = 20_000_000  # about 10 ms at the H200's clock: longer than a step takes to be launched


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_step_on_a_side_stream_matches_the_default_stream(backend, cls, kwargs):
    """Steps alternate between the default stream and a side stream (torch.cuda.stream(s)); the layer table is
    built on the default stream. Each step's gradients are written on the step's stream after a 10 ms sleep
    kernel there, so a step launched on any other stream would read the previous gradients. The result is the
    default-stream twin's, bit for bit."""
    backend_or_skip(backend, "cuda")
    params, twin = make_params(SHAPES, device="cuda"), make_params(SHAPES, device="cuda")
    opt, twin_opt = cls(params, backend=backend, **kwargs), cls(twin, backend=backend, **kwargs)
    set_grads(params, 0)  # gradient tensors that each step overwrites in place
    side = torch.cuda.Stream()
    for step in range(4):
        set_grads(twin, step)
        twin_opt.step()
        stream = side if step % 2 else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            torch.cuda._sleep(SLEEP_CYCLES)
            for p, t in zip(params, twin):
                p.grad.copy_(t.grad)
            opt.step()
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert_matches(params, twin, opt, twin_opt, rtol=0, atol=0)


# ----------------------------------------------------------------------------- launches per step
@pytest.mark.parametrize("backend, per_bucket", [("cuda", 1), ("triton", 2)])
@pytest.mark.parametrize("cls,kwargs", [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))], ids=OPTIMIZER_IDS)
def test_kernel_launches_per_bucket_step(backend, per_bucket, cls, kwargs):
    """A step over two buckets (300 float32 and 300 bfloat16 layers in one param group) puts exactly the
    backend's kernels on the GPU, per bucket: 1 for cuda (the cooperative step kernel), 2 for triton (norms, then
    update); no copy, no memset, no other kernel."""
    backend_or_skip(backend, "cuda")
    shapes = [(64, 33) if i % 2 else (17,) for i in range(300)]
    params = make_params(shapes, device="cuda") + make_params(shapes, dtype=torch.bfloat16, device="cuda")
    opt = cls(params, backend=backend, **kwargs)
    set_grads(params, 0)
    opt.step()  # creates the state and the layer tables
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    device_events = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert len(device_events) == 2 * per_bucket, device_events
    if backend == "cuda":
        assert all("step_kernel" in name for name in device_events), device_events


# ----------------------------------------------------------------------------- two GPUs
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_buckets_on_two_gpus_in_one_optimizer(backend, cls, kwargs):
    """Two param groups, one on cuda:0 and one on cuda:1, stepped while cuda:0 is the current device: each
    bucket is stepped on its own GPU and both match the reference (LAMB's global gradient norm spans both)."""
    backend_or_skip(backend, "cuda:1")
    params = [make_params(SHAPES, device="cuda:0"), make_params(SHAPES, device="cuda:1", seed=1)]
    ref = [make_params(SHAPES, device="cuda:0"), make_params(SHAPES, device="cuda:1", seed=1)]
    opt = cls([{"params": params[0]}, {"params": params[1]}], backend=backend, **kwargs)
    ref_opt = cls([{"params": ref[0]}, {"params": ref[1]}], backend="reference", **kwargs)
    with torch.cuda.device(0):
        for step in range(5):
            set_grads(params[0] + params[1], step)
            set_grads(ref[0] + ref[1], step)
            opt.step()
            ref_opt.step()
    for device in (0, 1):
        torch.cuda.synchronize(device)
    assert_matches(params[0] + params[1], ref[0] + ref[1], opt, ref_opt, rtol=FLOAT32_TOL, atol=FLOAT32_TOL)
    assert all(opt.state[p]["step"].device == p.device for p in params[0] + params[1])
