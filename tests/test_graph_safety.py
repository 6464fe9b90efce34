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
