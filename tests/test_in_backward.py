"""The step inside backward (``optimizer.step_in_backward()``): bit-identical to ``backward(); step()`` with the same
backend, for every parameter and state tensor after every iteration; gradients freed during backward; nothing
rebuilt in a steady step; and what it refuses, refused before anything is written."""

import contextlib

import pytest
import torch
from torch import nn

from cases import backend_or_skip
from tvlars_fused import LAMB, LARS, TVLARS, _layer_table

OPTIMIZERS = {
    "tvlars": (TVLARS, dict(lr=0.5, lmbda=0.05, weight_decay=1e-2, norm_clip=5.0)),
    "lars": (LARS, dict(lr=0.5, nesterov=True, trust_denominator="sum_of_norms")),
    "lamb": (LAMB, dict(lr=1e-2)),
}
# About 2 KiB of parameters per bucket: the model's layers fall into several buckets per param group.
BUCKET_MB = 2 / 1024


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and every op waits at its OpenMP barrier when the other core is
    busy (the suite runs on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    """A small CNN with a frozen layer, an unused branch and layers of uneven sizes (the largest, ``conv``, sets a
    whole bucket's Triton chunk, which a bucket without it must keep)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.frozen = nn.Conv2d(8, 8, 1)
        self.frozen.requires_grad_(False)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)
        self.unused = nn.Linear(16, 10)  # never called: its layers never get a gradient

    def forward(self, x):
        x = self.frozen(torch.relu(self.bn(self.stem(x))))
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _model(dtype):
    torch.manual_seed(0)
    return Net().to(dtype)


def _optimizer(name, model, backend, dtype):
    cls, kwargs = OPTIMIZERS[name]
    head = list(model.head.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in head)]
    groups = [dict(params=rest), dict(params=head, lr=kwargs["lr"] / 2)]  # two param groups
    return cls(groups, backend=backend, master_weights=dtype == torch.bfloat16, **kwargs)


def _batch(i, dtype):
    g = torch.Generator().manual_seed(i)
    return torch.randn(4, 3, 6, 6, generator=g).to(dtype), torch.randint(0, 10, (4,), generator=g)


def _loss(model, i, dtype):
    device = next(model.parameters()).device
    x, y = _batch(i, dtype)
    return nn.functional.cross_entropy(model(x.to(device)).float(), y.to(device))


def _assert_identical(model, opt, twin, twin_opt, where):
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), f"{where}: parameter {name} differs"
        state, twin_state = opt.state.get(p, {}), twin_opt.state.get(q, {})
        assert state.keys() == twin_state.keys(), f"{where}: state keys of {name}"
        for key in state:
            assert torch.equal(state[key], twin_state[key]), f"{where}: state {key!r} of {name} differs"


def _train_both(name, backend, dtype, iterations, accumulate=True, device="cpu"):
    """The ordinary loop and the loop with the step inside backward, side by side, with an LR scheduler and, on
    every other iteration, two micro-batches of gradient accumulation; compared after every iteration."""
    model, twin = _model(dtype).to(device), _model(dtype).to(device)
    opt, twin_opt = _optimizer(name, model, backend, dtype), _optimizer(name, twin, backend, dtype)
    handle = opt.step_in_backward(bucket_mb=BUCKET_MB)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.7) for o in (opt, twin_opt)]
    for i in range(iterations):
        micro = 2 if accumulate and i % 2 else 1
        for k in range(micro):  # ordinary: accumulate, then step
            _loss(twin, 10 * i + k, dtype).backward()
        twin_opt.step()
        twin_opt.zero_grad()
        for k in range(micro):  # inside backward: the last micro-batch's backward steps
            if k < micro - 1:
                with opt.accumulating():
                    _loss(model, 10 * i + k, dtype).backward()
            else:
                _loss(model, 10 * i + k, dtype).backward()
        opt.step()
        opt.zero_grad()
        for scheduler in schedulers:
            scheduler.step()
        _assert_identical(model, opt, twin, twin_opt, f"{name} {backend} {dtype} iteration {i}")
    return model, opt, handle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16-master"])
@pytest.mark.parametrize("backend", ["reference", "foreach", "cpp"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bit_identical_to_the_ordinary_step(name, backend, dtype):
    backend_or_skip(backend)
    model, opt, handle = _train_both(name, backend, dtype, iterations=20)
    assert len(handle._slots) >= 3  # several buckets: the test compares split buckets with whole ones
    for p in list(model.unused.parameters()) + list(model.frozen.parameters()):
        assert p not in opt.state  # never stepped


# Under the Triton interpreter a launch costs milliseconds per program: a few iterations, two cases.
@pytest.mark.parametrize("name,dtype", [("tvlars", torch.float32), ("lamb", torch.bfloat16)])
def test_bit_identical_to_the_ordinary_step_triton(name, dtype, monkeypatch):
    """Also checks that every layer is chunked as in the ordinary step. The bits alone can hardly show it: norms
    sum float64 squares of float32 values, and other chunks change such a sum by an ulp of float64, which only
    rarely moves the rounding of anything the step writes. Triton's chunk follows the bucket's largest layer."""
    backend_or_skip("triton")
    from tvlars_fused import _triton_backend

    chunks = {}  # parameter (by address) -> the chunk sizes its layer was stepped with
    prepare = _triton_backend.prepare

    def spy(bucket, chunk_size):
        for p in bucket.params:
            chunks.setdefault(p.data_ptr(), set()).add(chunk_size)
        return prepare(bucket, chunk_size)

    monkeypatch.setattr(_triton_backend, "prepare", spy)
    model, opt, _ = _train_both(name, "triton", dtype, iterations=4)
    twin = _model(dtype)
    twin_opt = _optimizer(name, twin, "triton", dtype)
    stepped = [p for p in model.parameters() if p.data_ptr() in chunks]
    chunks_in_backward = [chunks[p.data_ptr()] for p in stepped]
    chunks.clear()
    _loss(twin, 0, dtype).backward()
    twin_opt.step()
    assert chunks_in_backward == [chunks[q.data_ptr()] for p, q in zip(model.parameters(), twin.parameters())
                                  if p in set(stepped)]
    assert len(set.union(*chunks_in_backward)) > 1  # the groups' largest layers differ: so do their chunks


def _steady(opt, model, dtype, iterations, start=0):
    for i in range(start, start + iterations):
        _loss(model, i, dtype).backward()
        opt.step()
        opt.zero_grad()


def test_backward_frees_each_bucket_gradients_and_step_steps_nothing_twice():
    """The bucket of the head (whose gradients are ready first) is stepped and its gradients freed while backward
    still runs; after backward no bucketed layer holds a gradient, so step() has nothing left to step."""
    model = _model(torch.float32)
    opt = _optimizer("tvlars", model, "cpp", torch.float32)
    opt.step_in_backward(bucket_mb=BUCKET_MB)
    _steady(opt, model, torch.float32, 2)
    seen = []
    x, y = _batch(5, torch.float32)
    stem_out = model.stem(x)
    stem_out.register_hook(lambda g: seen.append([p.grad is None for p in model.head.parameters()]))
    out = model.head(torch.relu(model.conv(model.frozen(torch.relu(model.bn(stem_out))))).mean(dim=(2, 3)))
    nn.functional.cross_entropy(out, y).backward()
    assert seen == [[True, True]]  # the stem's gradient is computed after the head was stepped and freed
    assert all(p.grad is None for p in model.parameters())
    steps = {id(p): opt.state[p]["step"].item() for p in opt.state}
    opt.step()  # nothing left: no layer is stepped a second time
    assert {id(p): opt.state[p]["step"].item() for p in opt.state} == steps
    assert set(steps.values()) == {3.0}  # the recording step, one steady step, this backward


def test_a_steady_step_rebuilds_nothing(monkeypatch):
    model = _model(torch.float32)
    opt = _optimizer("lamb", model, "cpp", torch.float32)
    handle = opt.step_in_backward(bucket_mb=BUCKET_MB)
    _steady(opt, model, torch.float32, 3)
    buckets = [slot.bucket for slot in handle._slots]
    builds = []
    original = _layer_table._build
    monkeypatch.setattr(_layer_table, "_build", lambda *a: builds.append(1) or original(*a))
    _steady(opt, model, torch.float32, 3, start=3)
    assert builds == []
    assert [slot.bucket for slot in handle._slots] == buckets and all(
        a is b for a, b in zip(buckets, [slot.bucket for slot in handle._slots]))


def test_a_layer_without_gradient_does_not_block_its_bucket():
    """The conv layer is skipped in some iterations after the recording one: the rest of its bucket is stepped at
    the end of backward, the conv layer not at all, and everything stays bit-identical to the ordinary step."""
    def forward(model, i):
        x, y = _batch(i, torch.float32)
        h = model.frozen(torch.relu(model.bn(model.stem(x))))
        h = torch.relu(model.conv(h)) if i % 3 else h.repeat(1, 2, 1, 1)  # conv unused every third iteration
        return nn.functional.cross_entropy(model.head(h.mean(dim=(2, 3))), y)

    model, twin = _model(torch.float32), _model(torch.float32)
    opt, twin_opt = _optimizer("tvlars", model, "cpp", torch.float32), _optimizer("tvlars", twin, "cpp", torch.float32)
    opt.step_in_backward(bucket_mb=1.0)  # one bucket per group: the conv layer's bucket holds the stem too
    for i in range(1, 8):
        for m, o in ((model, opt), (twin, twin_opt)):
            forward(m, i).backward()
            if o is opt and i > 1:  # stepped by the end of backward, not left to step()
                assert all(p.grad is None for p in m.parameters())
            o.step()
            o.zero_grad()
        _assert_identical(model, opt, twin, twin_opt, f"iteration {i}")
    assert opt.state[model.conv.weight]["step"].item() == 5  # skipped at iterations 3 and 6
    assert opt.state[model.stem.weight]["step"].item() == 7


def test_step_steps_a_layer_that_backward_did_not_reach():
    """A layer unfrozen after the recording backward is in no bucket: step() steps it (once), as the ordinary
    step would."""
    model, twin = _model(torch.float32), _model(torch.float32)
    opt, twin_opt = _optimizer("lars", model, "cpp", torch.float32), _optimizer("lars", twin, "cpp", torch.float32)
    opt.step_in_backward(bucket_mb=BUCKET_MB)
    for i in range(6):
        if i == 2:
            model.frozen.requires_grad_(True)
            twin.frozen.requires_grad_(True)
        for m, o in ((model, opt), (twin, twin_opt)):
            _loss(m, i, torch.float32).backward()
            o.step()
            o.zero_grad()
        _assert_identical(model, opt, twin, twin_opt, f"iteration {i}")
    assert opt.state[model.frozen.weight]["step"].item() == 4


@pytest.mark.parametrize("first", ["in_backward", "ordinary"])
def test_a_checkpoint_moves_between_the_modes(first):
    model, twin = _model(torch.float32), _model(torch.float32)
    opt, twin_opt = _optimizer("lamb", model, "cpp", torch.float32), _optimizer("lamb", twin, "cpp", torch.float32)
    (opt if first == "in_backward" else twin_opt).step_in_backward(bucket_mb=BUCKET_MB)
    _steady(opt, model, torch.float32, 4)
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(opt.state_dict())
    _steady(opt, model, torch.float32, 4, start=4)
    _steady(twin_opt, twin, torch.float32, 4, start=4)
    _assert_identical(model, opt, twin, twin_opt, "after the checkpoint")


def test_remove_goes_back_to_the_ordinary_step():
    model, twin = _model(torch.float32), _model(torch.float32)
    opt, twin_opt = _optimizer("tvlars", model, "cpp", torch.float32), _optimizer("tvlars", twin, "cpp", torch.float32)
    handle = opt.step_in_backward(bucket_mb=BUCKET_MB)
    _steady(opt, model, torch.float32, 3)
    handle.remove()
    _loss(model, 3, torch.float32).backward()
    assert model.head.weight.grad is not None  # backward no longer steps
    opt.step()
    opt.zero_grad()
    _steady(twin_opt, twin, torch.float32, 4)
    _assert_identical(model, opt, twin, twin_opt, "after remove()")
    opt.step_in_backward(bucket_mb=BUCKET_MB)  # and on again


# ----------------------------------------------------------------------------------------------- refusals
def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def _assert_unchanged(model, opt, snapshot):
    params, state = snapshot
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert {id(p): {k: v for k, v in s.items()} for p, s in opt.state.items()}.keys() == state.keys()
    for p, s in opt.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())


def test_refuses_lamb_max_grad_norm():
    model = _model(torch.float32)
    opt = LAMB(model.parameters(), lr=1e-2, max_grad_norm=1.0, backend="cpp")
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.step_in_backward()
    assert opt._in_backward is None
    # Set afterwards (a hand-edit or a loaded checkpoint): refused at the next backward, before any bucket is stepped.
    opt = _optimizer("lamb", model, "cpp", torch.float32)
    opt.step_in_backward(bucket_mb=BUCKET_MB)
    _steady(opt, model, torch.float32, 2)
    opt.param_groups[1]["max_grad_norm"] = 1.0
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="max_grad_norm of param group 1"):
        _loss(model, 2, torch.float32).backward()
    _assert_unchanged(model, opt, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_refuses_a_grad_scaler_before_anything_is_written(dtype):
    """A GradScaler hands its scale to step() (the mode claims AMP support so that it does): refused at the first
    iteration's step(), whose backward only recorded, so nothing was written."""
    model = _model(dtype)
    opt = _optimizer("tvlars", model, "foreach", dtype)
    opt.step_in_backward(bucket_mb=BUCKET_MB)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = _snapshot(model, opt)
    scaler.scale(_loss(model, 0, dtype)).backward()
    with pytest.raises(RuntimeError, match="GradScaler cannot be used with step_in_backward.*bfloat16 needs no scaler"):
        scaler.step(opt)
    _assert_unchanged(model, opt, before)
    assert not opt.state


def test_refuses_a_second_call_and_a_group_added_afterwards():
    model = _model(torch.float32)
    opt = TVLARS(list(model.stem.parameters()), lr=0.1, backend="cpp")
    handle = opt.step_in_backward()
    with pytest.raises(RuntimeError, match="already on"):
        opt.step_in_backward()
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group(dict(params=list(model.head.parameters())))
    assert len(opt.param_groups) == 1
    opt.param_groups.append(dict(opt.param_groups[0], params=list(model.head.parameters())))  # by hand
    _loss(model, 0, torch.float32).backward()  # the recording backward writes nothing
    opt.param_groups.pop()
    opt.step()
    opt.param_groups.append(dict(opt.param_groups[0], params=list(model.head.parameters())))
    before = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="param group was added after step_in_backward"):
        _loss(model, 1, torch.float32).backward()
    _assert_unchanged(model, opt, before)
    opt.param_groups.pop()
    handle.remove()
    opt.add_param_group(dict(params=list(model.head.parameters())))
    opt.step_in_backward()


@pytest.mark.parametrize("bucket_mb", [0, -1.0, float("nan"), "25", True])
def test_refuses_a_bad_bucket_size(bucket_mb):
    opt = TVLARS(_model(torch.float32).parameters(), lr=0.1, backend="cpp")
    with pytest.raises(ValueError, match="bucket_mb"):
        opt.step_in_backward(bucket_mb=bucket_mb)
    assert opt._in_backward is None


def test_refuses_a_second_backward_without_the_first_step():
    """The first backward only records the order: its gradients must be stepped by step() before backward runs
    again, else they would be accumulated into and stepped late."""
    model = _model(torch.float32)
    opt = _optimizer("tvlars", model, "cpp", torch.float32)
    opt.step_in_backward(bucket_mb=BUCKET_MB)
    _loss(model, 0, torch.float32).backward()
    with pytest.raises(RuntimeError, match="without optimizer.step"):
        _loss(model, 1, torch.float32).backward()
    assert not opt.state


# ----------------------------------------------------------------------------------------------- DDP
def _ddp_in_backward_check(rank, world, mesh, name, backend, steps):
    """DDP's buckets (several: a small bucket cap) stepped in its communication hook, against the ordinary step
    under DDP: bit-identical on every rank after every iteration, with no_sync() accumulation on odd iterations."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)  # two ranks on two cores
    model, twin = _model(torch.float32), _model(torch.float32)
    del model.unused, twin.unused  # DDP without find_unused_parameters needs every layer used
    ddp = DDP(model, bucket_cap_mb=1 / 1024, find_unused_parameters=False)
    ddp_twin = DDP(twin, bucket_cap_mb=1 / 1024, find_unused_parameters=False)
    opt, twin_opt = _optimizer(name, model, backend, torch.float32), _optimizer(name, twin, backend, torch.float32)
    opt.step_in_backward(ddp=ddp)
    for i in range(steps):
        micro = 2 if i % 2 else 1
        for k in range(micro):
            last = k == micro - 1
            with contextlib.nullcontext() if last else ddp_twin.no_sync():
                _loss(ddp_twin, 100 * i + 10 * k + rank, torch.float32).backward()
            with contextlib.nullcontext() if last else opt.accumulating():
                _loss(ddp, 100 * i + 10 * k + rank, torch.float32).backward()
        for o in (opt, twin_opt):
            o.step()
            o.zero_grad()
        _assert_identical(model, opt, twin, twin_opt, f"DDP {name} {backend} rank {rank} iteration {i}")
    assert opt._in_backward._ddp_buckets and all(p.grad is None for p in model.parameters())




# ----------------------------------------------------------------------------------------------- FSDP2
def _fsdp_in_backward_check(rank, world, mesh, name, backend, steps):
    """FSDP2 calls the post-accumulate-grad hooks of the sharded parameters after each module's reduce-scatter:
    each bucket of local shards is stepped there, with one all-reduce of its layers' local sums of squares, and
    matches the ordinary sharded step bit for bit."""
    from test_distributed import _model as mlp
    from torch.distributed.fsdp import fully_shard

    models = []
    for _ in range(2):
        model = mlp()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        models.append(model)
    model, twin = models
    cls, kwargs = OPTIMIZERS[name]
    opt = cls(model.parameters(), backend=backend, **kwargs)
    twin_opt = cls(twin.parameters(), backend=backend, **kwargs)
    handle = opt.step_in_backward(bucket_mb=100 / 2 ** 20)
    for i in range(steps):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(i))  # the same batch on every rank
        for m, o in ((model, opt), (twin, twin_opt)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
        _assert_identical(model, opt, twin, twin_opt, f"FSDP2 {name} {backend} rank {rank} iteration {i}")
    assert len(handle._slots) >= 2 and all(slot.bucket.reduce_sums is not None for slot in handle._slots)



def _distributed_check(rank, world, mesh, name, backend, steps):
    _ddp_in_backward_check(rank, world, mesh, name, backend, steps)
    _fsdp_in_backward_check(rank, world, mesh, name, backend, steps)


def test_ddp_and_fsdp2_step_inside_backward():
    """One pair of gloo processes (starting them is the slow part) runs DDP, then FSDP2, for every optimizer, with
    backend auto (cpp: DDP's buckets through the fused op, FSDP2's through its split sums / all-reduce / apply)."""
    from test_distributed import _spawn

    _spawn(_distributed_check, list(OPTIMIZERS), "auto", 4)


# ----------------------------------------------------------------------------------------------- the example
def test_example_trains_the_same_run_inside_backward():
    """examples/large_batch.py --in-backward: the same per-step losses, bit for bit, as its ordinary run (LARS with
    the example's per-step warm-up and cosine schedule, set in param_groups before each step, on the digits data)."""
    import importlib.util
    import sys
    from pathlib import Path

    pytest.importorskip("sklearn")
    path = Path(__file__).resolve().parents[1] / "examples" / "large_batch.py"
    spec = importlib.util.spec_from_file_location("large_batch_in_backward", path)
    lb = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = lb  # dataclasses look their module up by name
    spec.loader.exec_module(lb)
    data = lb.load_data("digits", device="cpu", train_size=128)
    runs = [lb.train_run(data, lb.OptSpec("lars", warmup=True), 32, seed=0, epochs=5, backend="cpp", widths=(4, 8, 16),
                         warmup_epochs=1, record_steps=True, evaluate_every_epoch=False, in_backward=in_backward)
            for in_backward in (False, True)]
    assert len(runs[0].step_loss) == 20 and runs[0].step_loss == runs[1].step_loss
    assert len(set(runs[0].lr)) == 5  # the schedule moved the learning rate


def test_a_new_exclusion_rule_rebuilds_the_buckets():
    """The kept buckets hold each layer's exclusion: a predicate set between iterations must reach them, as it reaches
    the ordinary step's."""
    model, twin = _model(torch.float32), _model(torch.float32)
    opt, twin_opt = _optimizer("lars", model, "cpp", torch.float32), _optimizer("lars", twin, "cpp", torch.float32)
    opt.step_in_backward(bucket_mb=BUCKET_MB)
    for i in range(5):
        if i == 3:
            for o in (opt, twin_opt):
                o.param_groups[0]["exclude"] = lambda p: p.ndim <= 1 or p.shape[0] == 16  # the conv layer too
        for m, o in ((model, opt), (twin, twin_opt)):
            _loss(m, i, torch.float32).backward()
            o.step()
            o.zero_grad()
        _assert_identical(model, opt, twin, twin_opt, f"iteration {i}")


def test_refuses_a_cuda_graph_capture(monkeypatch):
    """Its hooks step from the host as gradients arrive: while a capture is under way (faked here, no GPU needed) the
    first gradient of a backward is refused, saying so, before any bucket is stepped."""
    from tvlars_fused import _in_backward

    model = _model(torch.float32)
    opt = _optimizer("tvlars", model, "cpp", torch.float32)
    opt.step_in_backward(bucket_mb=BUCKET_MB)
    _steady(opt, model, torch.float32, 2)
    monkeypatch.setattr(_in_backward._layer_table, "capturing", lambda device: True)
    before = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        _loss(model, 2, torch.float32).backward()
    _assert_unchanged(model, opt, before)


# ----------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "foreach"])
@pytest.mark.parametrize("name,dtype", [("tvlars", torch.float32), ("lars", torch.bfloat16), ("lamb", torch.float32)])
def test_bit_identical_on_a_gpu(backend, name, dtype):
    """On a GPU the hooks run on autograd's device thread and the launches queue between backward's kernels."""
    backend_or_skip(backend, "cuda")
    _train_both(name, backend, dtype, iterations=20, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_chunks_follow_the_whole_group(backend, monkeypatch):
    """cuda's chunk follows the bucket's total size (8192 elements for this group's 34 M, 4096 for a bucket of its
    small layers alone), triton's its largest layer: every layer must be chunked as in the ordinary step."""
    backend_or_skip(backend, "cuda")
    from tvlars_fused import _cpp_backend, _triton_backend

    module = _cpp_backend if backend == "cuda" else _triton_backend
    chunks = {}
    prepare = module.prepare

    def spy(bucket, chunk_size):
        for p in bucket.params:
            chunks.setdefault(p.data_ptr(), set()).add(chunk_size)
        return prepare(bucket, chunk_size)

    monkeypatch.setattr(module, "prepare", spy)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 8192), nn.ReLU(),
                             nn.Linear(8192, 8)).cuda()

    seen = []
    for in_backward in (False, True):
        model = make()
        opt = TVLARS(model.parameters(), lr=0.1, backend=backend)
        if in_backward:
            opt.step_in_backward(bucket_mb=1.0)  # the 128 MiB layer alone, the small ones in buckets of their own
        chunks.clear()
        for i in range(3):
            model(torch.randn(4, 64, generator=torch.Generator().manual_seed(i)).cuda()).square().mean().backward()
            opt.step()
            opt.zero_grad()
        seen.append([chunks[p.data_ptr()] for p in model.parameters()])
    assert seen[0] == seen[1]


def test_a_compiled_model_steps_inside_backward_without_recompiling(one_thread):
    """torch.compile of the model: the hooks run outside its graphs, the iterations stay bit-identical to the ordinary
    loop with the same compiled model, and once warm (the first backward records the order) nothing recompiles."""
    backend_or_skip("cpp")
    torch._dynamo.reset()
    model, twin = _model(torch.float32), _model(torch.float32)
    opt, twin_opt = _optimizer("lars", model, "cpp", torch.float32), _optimizer("lars", twin, "cpp", torch.float32)
    opt.step_in_backward(bucket_mb=BUCKET_MB)
    compiled, compiled_twin = torch.compile(model), torch.compile(twin)
    for i in range(4):
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            _loss(compiled_twin, i, torch.float32).backward()
            twin_opt.step()
            twin_opt.zero_grad()
            _loss(compiled, i, torch.float32).backward()
            opt.step()
            opt.zero_grad()
        _assert_identical(model, opt, twin, twin_opt, f"compiled model, iteration {i}")
