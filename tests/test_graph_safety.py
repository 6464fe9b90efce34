"""What makes a step legal inside CUDA-graph capture, checked where the CPU can show it.

A captured step may not synchronise with the device (a read-back or a pageable copy kills the capture), and whatever a
captured launch reads (layer table, chunk map, workspace) must outlive the graph. The table is exercised on the ``meta``
device, which records every copy without a GPU, and capture is simulated by patching ``_layer_table.capturing``; the
real recipe runs in the GPU check (tests/test_gpu_*.py).
"""

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from buckets import make_bucket
from cases import SMALL_SHAPES, backend_or_skip, make_params, set_grads
from tvlars_fused import LARS, TVLARS, _layer_table
from tvlars_fused._layer_table import COL_GRAD, prepare


class CopyLog(TorchDispatchMode):
    """Records every copy between devices and every read of a device value on the host."""

    def __init__(self):
        super().__init__()
        self.uploads, self.readbacks = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_", "_copy_from"):
            source = args[1] if name == "copy_" else args[0]
            target = args[0].device if name == "copy_" else kwargs.get("device", source.device)
            if source.device != target:
                (self.readbacks if target.type == "cpu" else self.uploads).append(
                    (name, kwargs.get("non_blocking", args[2] if name == "copy_" and len(args) > 2 else False)))
        if name == "_local_scalar_dense" and args[0].device.type != "cpu":
            self.readbacks.append((name, args[0].device))
        return func(*args, **kwargs)


@pytest.mark.parametrize("lamb", [False, True], ids=["lars", "lamb"])
def test_table_build_and_gradient_rewrite_never_synchronise(lamb):
    bucket = make_bucket(SMALL_SHAPES, lamb=lamb, device="meta")
    with CopyLog() as log:
        covered, table, rest = prepare(bucket, 64)
        rewritten = _layer_table._with_grads(table, list(range(16, 16 * (len(bucket) + 1), 16)))
    assert rest is None and covered is bucket
    assert log.uploads and all(non_blocking for _, non_blocking in log.uploads), log.uploads
    assert not log.readbacks, log.readbacks
    # The host rows are kept, not read back; the rewrite made a new table and left the old rows as they were.
    assert table.layers_host.device.type == "cpu" and table.layers.device.type == "meta"
    assert rewritten is not table and rewritten.layers_host[:, COL_GRAD].tolist()[1] == 32
    assert table.layers_host[:, COL_GRAD].tolist() == [0] * len(bucket)


def _captured_step(monkeypatch, opt, params, step):
    set_grads(params, step)
    monkeypatch.setattr(_layer_table, "capturing", lambda device: True)
    opt.step()
    monkeypatch.setattr(_layer_table, "capturing", lambda device: False)


def test_tables_used_while_capturing_outlive_cache_clears_rebuilds_and_loads(monkeypatch):
    backend_or_skip("cpp")
    params = make_params(SMALL_SHAPES)
    opt = TVLARS(params, lr=0.5, backend="cpp")
    set_grads(params, 0)
    opt.step()
    _captured_step(monkeypatch, opt, params, 1)
    captured = [t for cache in opt._bucket_caches.values() for key, t in cache.items()
                if isinstance(key, tuple) and key[0] == "layer_table"]
    assert captured and all(t.captured for t in captured)
    rows = [t.layers_host.clone() for t in captured]
    refs = [weakref.ref(t) for t in captured]
    del captured
    # A rebuild (new gradients), a checkpoint load and the cache clear a long run of new layer sets triggers.
    for p in params:
        p.grad = p.grad.clone()
    opt.step()
    opt.load_state_dict(opt.state_dict())
    opt._bucket_caches.clear()
    set_grads(params, 3)
    opt.step()
    gc.collect()
    alive = [r() for r in refs]
    assert all(t is not None for t in alive), "a table a captured graph reads was freed"
    for t, before in zip(alive, rows):
        assert torch.equal(t.layers_host, before), "a table a captured graph reads was modified"


def test_reference_backend_and_an_lr_on_another_device_refuse_capture_with_a_reason(monkeypatch):
    params = make_params(SMALL_SHAPES)
    set_grads(params, 0)
    monkeypatch.setattr(_layer_table, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="backend='reference'.*cannot be captured"):
        LARS(params, lr=0.5, backend="reference").step()
    with pytest.raises(RuntimeError, match="float32 tensor"):
        LARS(params, lr=torch.tensor(0.5, dtype=torch.float64), backend="foreach").step()
    assert all(torch.equal(p, q) for p, q in zip(params, make_params(SMALL_SHAPES))), "a refused step wrote"


@pytest.mark.parametrize("backend", ["foreach", "cpp"])
def test_a_first_step_inside_a_capture_is_refused_before_anything_is_written(monkeypatch, backend):
    """State made inside a capture would be made again at every replay: the step count, momentum and masters would
    reset each time. The step says to warm up first, creates nothing, writes nothing; after one ordinary step the
    captured step runs."""
    backend_or_skip(backend)
    params = make_params(SMALL_SHAPES)
    opt = TVLARS(params, lr=0.5, backend=backend)
    set_grads(params, 0)
    monkeypatch.setattr(_layer_table, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 has no optimizer state yet.*warm-up"):
        opt.step()
    assert not opt.state, "state was created inside the capture"
    assert all(torch.equal(p, q) for p, q in zip(params, make_params(SMALL_SHAPES))), "a refused step wrote"
    monkeypatch.setattr(_layer_table, "capturing", lambda device: False)
    opt.step()
    _captured_step(monkeypatch, opt, params, 1)
    assert all(float(s["step"]) == 2 for s in opt.state.values())


def test_a_captured_step_that_would_create_master_weights_is_refused(monkeypatch):
    """A checkpoint saved without master weights, loaded into an optimizer that keeps them: the masters would be
    made inside the capture (and remade from the bf16 weights at every replay)."""
    backend_or_skip("cpp")
    params = [p.detach().bfloat16().requires_grad_() for p in make_params(SMALL_SHAPES)]
    plain = TVLARS(params, lr=0.5, backend="cpp")
    set_grads(params, 0)
    plain.step()
    with_masters = TVLARS(params, lr=0.5, backend="cpp", master_weights=True)
    with_masters.load_state_dict(plain.state_dict())
    before = [p.clone() for p in params]
    monkeypatch.setattr(_layer_table, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 has no master weight yet"):
        with_masters.step()
    assert all("master_weight" not in s for s in with_masters.state.values())
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_a_table_upload_inside_a_capture_needs_a_torch_that_keeps_the_pinned_rows(monkeypatch):
    """Before torch 2.11 the pinned block a captured upload reads may be handed out again while the graph lives: a
    replay would read another table's rows. The upload then refuses, saying how to capture without one."""
    assert not _layer_table.pinned_upload_capturable("2.10.1+cu128")
    assert _layer_table.pinned_upload_capturable("2.11.0+cu130") and _layer_table.pinned_upload_capturable("2.14.1")
    monkeypatch.setattr(_layer_table, "PINNED_UPLOAD_CAPTURABLE", False)
    monkeypatch.setattr(_layer_table, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.11.*zero_grad\(set_to_none=False\)"):
        _layer_table._upload(torch.zeros(3, 10, dtype=torch.int64), torch.device("cuda"))
