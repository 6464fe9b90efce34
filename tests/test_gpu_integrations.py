"""Training stacks on CUDA parameters, for both GPU backends (``cuda`` and ``triton``): a real
``GradScaler("cuda")`` whose inf/NaN step is skipped in-kernel with no host synchronisation, ``torch.compile``
of the step, bfloat16 parameters with float32 master weights, and checkpoints moved between the GPU and the CPU.
Every test skips with the reason where there is no GPU.
"""

import io
from contextlib import contextmanager

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from cases import SHAPES, SMALL_SHAPES, assert_matches, backend_or_skip, make_params, set_grads
from test_integrations import compiled_matches_eager_without_graph_breaks, master_weights_follow_the_float32_run
from tvlars_fused import LAMB, TVLARS, available_backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

GPU_BACKENDS = ["cuda", "triton"]
OPTIMIZERS = [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2, max_grad_norm=1.0))]
OPTIMIZER_IDS = ["tvlars", "lamb"]
FLOAT32_TOL = 1e-5  # the spec's float32 contract on a GPU (tests/test_gpu_parity.py)
# CUDA runtime and driver calls that block the host until the device has caught up.
BLOCKING_CALLS = frozenset(("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                            "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize"))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).cuda()


def _batch(step):
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(step)).cuda()


@contextmanager
def no_host_sync():
    """Fails when the block synchronises the host with the device. torch's sync debug mode raises at any
    synchronising call torch makes (``.item()``, a copy to or from pageable memory, ``synchronize``), and the
    profiler's trace must show no blocking CUDA runtime or driver call inside the block and no device-to-host
    copy: calls that an extension or Triton's launcher make without going through torch."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")
        try:
            with record_function("no_host_sync"):
                yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # The profiler synchronises when it stops, so only the calls inside the block's range count.
    block = next(e for e in prof.events() if e.name == "no_host_sync" and e.device_type == DeviceType.CPU)
    inside = [e for e in prof.events() if e.device_type == DeviceType.CPU
              and block.time_range.start <= e.time_range.start <= block.time_range.end]
    blocking = [e.name for e in inside if e.name in BLOCKING_CALLS]
    blocking += [e.name for e in prof.events() if "DtoH" in e.name]
    assert not blocking, blocking


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grad_scaler_skips_an_inf_and_nan_step_in_kernel_without_host_sync(backend, cls, kwargs):
    """GradScaler("cuda") hands the fused backend its scale and inf flag: finite steps equal unscaled training;
    a step whose gradients hold an inf and a NaN in one layer writes nothing (parameters, state, step counts)
    and backs the scale off; neither that step nor a finite one synchronises the host."""
    backend_or_skip(backend, "cuda")
    scaled_model, plain_model = _model(), _model()
    opt = cls(scaled_model.parameters(), backend=backend, **kwargs)
    plain_opt = cls(plain_model.parameters(), backend=backend, **kwargs)
    assert opt._step_supports_amp_scaling
    # A power-of-two scale: scaling and unscaling are exact, so both runs see the same gradients.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, growth_interval=1000)
    for step in range(4):
        x = _batch(step)
        opt.zero_grad(set_to_none=False)  # the same gradient tensors each step: the layer table stays cached
        scaler.scale(scaled_model(x).square().mean()).backward()
        if step == 0:
            scaler.step(opt)  # creates the state and the layer table (host-to-device copies)
        else:
            with no_host_sync():
                scaler.step(opt)
        scaler.update()
        plain_opt.zero_grad(set_to_none=False)
        plain_model(x).square().mean().backward()
        plain_opt.step()
    for p, q in zip(scaled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    params = list(scaled_model.parameters())
    before = [p.detach().clone() for p in params]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    opt.zero_grad(set_to_none=False)
    scaler.scale(scaled_model(_batch(9)).square().mean()).backward()
    params[0].grad[0, 0] = float("inf")
    params[0].grad[0, 1] = float("nan")
    scale = scaler.get_scale()
    with no_host_sync():
        scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    for p, b, s in zip(params, before, state_before):
        assert torch.equal(p.detach(), b)
        assert opt.state[p].keys() == s.keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, s[key]), key

    opt.zero_grad(set_to_none=False)  # a finite step after the skipped one moves the weights again
    scaler.scale(scaled_model(_batch(10)).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(params[0].detach(), before[0])


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_compiled_cuda_step_matches_eager_without_graph_breaks(cls, kwargs):
    """torch.compile(opt.step) with backend="cuda" on CUDA parameters: the op is traced into one graph (no
    graph break) and gives the eager step's result."""
    compiled_matches_eager_without_graph_breaks(cls, kwargs, "cuda", "cuda")


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_compiled_triton_step_runs_outside_the_graph(cls, kwargs):
    """torch.compile(opt.step) with backend="triton" on CUDA parameters: the Triton step runs eagerly outside
    the graph, and its steps follow the reference backend's to the float32 contract."""
    backend_or_skip("triton", "cuda")
    params, ref_params = make_params(SMALL_SHAPES, device="cuda"), make_params(SMALL_SHAPES, device="cuda")
    opt = cls(params, backend="triton", **kwargs)
    ref_opt = cls(ref_params, backend="reference", **kwargs)
    compiled_step = torch.compile(opt.step)
    for step in range(3):
        set_grads(params, step)
        set_grads(ref_params, step)
        compiled_step()
        ref_opt.step()
    assert_matches(params, ref_params, opt, ref_opt, rtol=FLOAT32_TOL, atol=FLOAT32_TOL)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bf16_master_weights_follow_the_float32_run(backend, cls, kwargs):
    """bfloat16 CUDA parameters with master_weights=True: the float32 masters follow a float32 reference run
    on the same gradients to the float32 contract, and each parameter is its master rounded once."""
    master_weights_follow_the_float32_run(cls, kwargs, torch.bfloat16, backend, SHAPES, "cuda", rtol=FLOAT32_TOL,
                                          atol=FLOAT32_TOL)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_checkpoint_moves_cuda_to_cpu_to_cuda_between_backends(cls, kwargs):
    """Three steps with backend="cuda", a checkpoint (torch.save, loaded on the CPU) loaded into a CPU
    optimizer (cpp, else foreach) for three steps, then loaded back onto the GPU with backend="triton" for
    three more: every state tensor lands on its parameter's device in float32, and the nine steps equal one
    uninterrupted reference run on the GPU to the float32 contract."""
    backend_or_skip("cuda", "cuda")
    backend_or_skip("triton", "cuda")
    cpu_backend = "cpp" if available_backends("cpu")["cpp"] is None else "foreach"
    values = [p.detach() for p in make_params(SHAPES)]
    saved, step = None, 0
    for device, backend in [("cuda", "cuda"), ("cpu", cpu_backend), ("cuda", "triton")]:
        params = [v.to(device, copy=True).requires_grad_() for v in values]
        opt = cls(params, backend=backend, **kwargs)
        if saved is not None:
            opt.load_state_dict(torch.load(io.BytesIO(saved), map_location="cpu"))
            for p in params:
                for key, value in opt.state[p].items():
                    assert value.device == p.device and value.dtype == torch.float32, (backend, key)
        for _ in range(3):
            set_grads(params, step)
            opt.step()
            step += 1
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        saved = buffer.getvalue()
        values = [p.detach() for p in params]
    ref = make_params(SHAPES, device="cuda")
    ref_opt = cls(ref, backend="reference", **kwargs)
    for k in range(step):
        set_grads(ref, k)
        ref_opt.step()
    assert_matches(params, ref, opt, ref_opt, rtol=FLOAT32_TOL, atol=FLOAT32_TOL)
