"""examples/large_batch.py: every backend trains the same model, and a missing CIFAR folder fails at once.

The same training run (the example's own functions: data, model, batch order, schedule) is made with the
``reference`` backend and with each other backend, from the same initial weights, and the per-step training
losses are compared.

The bound, derived. Two float32 runs of the same math give different losses only through rounding: the
backends round their norms, phi and updates in different orders (float64 norm sums, fused multiply-adds), and
from the first step whose update differs by an ulp the runs follow slightly different trajectories. Training
amplifies such differences, and not smoothly: here a perturbation of one ulp can leave the loss unchanged to
1e-7 or, at a bifurcation of the trajectory (step 55 of this run), move it by 3e-2 (measured). So how far
rounding moves a run is measured, not guessed, against exact arithmetic (the reference in float64: model, data
and optimizer; its own rounding, 2^-53, is 2^-29 times smaller):

    env(t) = max over runs m, s <= t of |L_m(s) - L64(s)|

over float32 reference runs m with every rounding-sized perturbation we sample: the plain run, and eta scaled by
1 + 2^-23 and by 1 - 2^-23 (one ulp on every trust ratio at every step: the place and size of the differences
between backends, which a step from identical states shows to be an ulp on a few elements). A backend's
float32 run is one more such run: same forward and backward code, the same kind of roundings in its optimizer
(2^-24 relative each). By the triangle inequality through the float64 run,

    |L_backend(t) - L32_ref(t)| <= |L_backend(t) - L64(t)| + |L64(t) - L32_ref(t)| <= 2 env(t),

plus one ulp of the float32 loss, which each run rounds once at the end and which env(t) can undercount in the
first steps, before the runs part (``bound`` below). The running maximum keeps env(t) from vanishing where
two losses happen to cross. Two limits, honestly: the sample is finite, so a backend meeting a bifurcation
that none of the sampled runs meets would fail (the message names the step); and after the first bifurcation
the bound is wide (3e-2 here), so this test's power is in the steps before it. Per-step agreement of the
backends from identical states is the parity tests' job; this test shows that whole runs stay together.

The bound can fail: ``test_the_bound_sees_a_one_percent_change`` changes TVLARS's lmbda by 1% and requires the
bound to be exceeded (it is, by orders of magnitude, from the first steps, where env is tiny). The run
uses TVLARS with a delay, so it covers phi's exploration phase, its decay and the LARS floor (gamma_min).

Cost on 2 CPU cores: one torch thread, a 5 k-parameter model; the interpreted Triton kernels get a shorter run
with a tiny batch.
"""

from __future__ import annotations

import dataclasses
import json
import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvlars_fused import available_backends

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "large_batch.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("large_batch_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


lb = _load_example()

# TVLARS with phi's exploration (delay 4 epochs = 32 steps), its decay and the gamma_min floor within the run.
SPEC = lb.OptSpec("tvlars", lmbda=0.03, gamma_min=0.01, delay_epochs=4)
WIDTHS = (4, 8, 16)


@dataclasses.dataclass(frozen=True)
class Config:
    train_size: int
    batch_size: int
    steps: int
    lr: float = 2.0  # TVLARS's lr at this tiny batch (the example's batch-size scaling would give a crawl)


COMPILED = Config(train_size=256, batch_size=32, steps=160)  # 8 steps per epoch
INTERPRETED = Config(train_size=64, batch_size=8, steps=12)  # Triton's interpreter: ~1 s of CPU per step


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions gain nothing from a second thread, and lose much when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _data(train_size: int, device: str):
    return lb.load_data("digits", device=device, train_size=train_size)


@functools.lru_cache(maxsize=None)
def losses(config: Config, backend: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
           spec: lb.OptSpec = SPEC) -> torch.Tensor:
    """Per-step training losses of one run (float64 tensor of the float32 or float64 values)."""
    epochs = -(-config.steps // (config.train_size // config.batch_size))
    run = lb.train_run(_data(config.train_size, device), spec, config.batch_size, seed=0, epochs=epochs,
                       backend=backend, widths=WIDTHS, dtype=dtype, warmup_epochs=0, max_steps=config.steps,
                       lr_scale=config.lr / lb.peak_lr(spec.kind, config.batch_size),
                       record_steps=True, evaluate_every_epoch=False)
    values = torch.tensor(run.step_loss, dtype=torch.float64)
    assert len(values) == config.steps and torch.isfinite(values).all(), f"{backend} {dtype}: {values}"
    return values


ONE_ULP_ETA = [dataclasses.replace(SPEC, eta=SPEC.eta * (1 + k * 2.0 ** -23)) for k in (1, -1)]


def bound(config: Config, device: str = "cpu") -> torch.Tensor:
    """2 env(t) + one ulp of the float32 loss (the module docstring derives it)."""
    ref32 = losses(config, "reference", device)
    ref64 = losses(config, "reference", device, torch.float64)
    sampled = [ref32] + [losses(config, "reference", device, spec=spec) for spec in ONE_ULP_ETA]
    env = torch.stack([(run - ref64).abs() for run in sampled]).amax(0).cummax(0).values
    as_float = ref32.to(torch.float32)
    ulp = (torch.nextafter(as_float.abs(), torch.tensor(float("inf"))) - as_float.abs()).to(torch.float64)
    return 2 * env + ulp


def _first_excess(config: Config, other: torch.Tensor, device: str = "cpu") -> str | None:
    """None when ``other`` stays within the bound of the float32 reference at every step, else where not."""
    ref32 = losses(config, "reference", device)
    limit = bound(config, device)
    diff = (other - ref32).abs()
    over = (diff > limit).nonzero()
    if len(over) == 0:
        return None
    t = over[0].item()
    return (f"step {t + 1}: |loss - reference| = {diff[t]:.3e} > bound {limit[t]:.3e} "
            f"(reference {ref32[t]:.7f}, this {other[t]:.7f}; {len(over)} of {config.steps} steps over)")


def _require(backend: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    reason = available_backends(device)[backend]
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("backend,device", [("foreach", "cpu"), ("cpp", "cpu"),
                                            pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])
def test_backend_trains_the_reference_model(backend, device):
    _require(backend, device)
    excess = _first_excess(COMPILED, losses(COMPILED, backend, device), device)
    assert excess is None, f"{backend}: {excess}"


def test_triton_interpreted_trains_the_reference_model():
    _require("triton", "cpu")
    excess = _first_excess(INTERPRETED, losses(INTERPRETED, "triton"))
    assert excess is None, f"triton: {excess}"


@pytest.mark.parametrize("config", [COMPILED, INTERPRETED], ids=["compiled", "interpreted"])
def test_the_bound_sees_a_one_percent_change(config):
    """The comparison can fail: lmbda 1% larger must leave the bound (in both runs' settings)."""
    changed = losses(config, "reference", spec=dataclasses.replace(SPEC, lmbda=SPEC.lmbda * 1.01))
    assert _first_excess(config, changed) is not None


def test_the_compared_run_trains():
    """Agreeing losses prove little unless the run learns: the loss falls by a third over the run."""
    ref64 = losses(COMPILED, "reference", dtype=torch.float64)
    assert ref64[-8:].mean() < 2 / 3 * ref64[:8].mean(), ref64


# ----------------------------------------------------------------------------------------------- CIFAR folder
def test_cifar_without_its_folder_fails_at_once(tmp_path):
    """The command line exits before building anything, saying what to put where."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(EXAMPLE), "--data", "cifar10", "--root", "/nonexistent",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "/nonexistent/cifar-10-batches-py/data_batch_1 not found" in done.stderr
    assert "cifar-10-python.tar.gz" in done.stderr and "nothing is downloaded" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_errors_name_the_folder(tmp_path, name, folder):
    with pytest.raises(lb.DataError, match=f"{name} needs --root DIR: .*DIR/{folder}/"):
        lb.load_data(name, None)
    with pytest.raises(lb.DataError, match=f"{tmp_path}/{folder}/.* not found"):
        lb.load_data(name, str(tmp_path))


def test_cifar_with_corrupt_files_says_what_to_put_there(tmp_path):
    pytest.importorskip("torchvision")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in ("data_batch_1", "test_batch"):
        (folder / f).write_bytes(b"")  # present but not CIFAR: torchvision's checksum fails
    with pytest.raises(lb.DataError, match="torchvision cannot read it .*extract cifar-10-python.tar.gz"):
        lb.load_data("cifar10", str(tmp_path))


def test_cifar_augmentation_crops_and_flips():
    """Each image is a 32x32 window of its 4-pixel zero-padded self, flipped or not, drawn from the generator."""
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    out = lb.augment_batch(x, torch.Generator().manual_seed(1))
    draws = torch.Generator().manual_seed(1)
    dy, dx = (torch.randint(0, 9, (40, 1), generator=draws) for _ in range(2))
    flip = torch.rand(40, generator=draws) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(40):
        window = padded[i, :, dy[i, 0]:dy[i, 0] + 32, dx[i, 0]:dx[i, 0] + 32]
        assert torch.equal(out[i], window.flip(2) if flip[i] else window), i
    assert flip.any() and not flip.all()


def test_cifar_without_torchvision_says_so(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in ("data_batch_1", "test_batch"):
        (folder / f).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now raises ImportError
    with pytest.raises(lb.DataError, match="needs torchvision"):
        lb.load_data("cifar10", str(tmp_path))


# ----------------------------------------------------------------------------------------------- bfloat16 state
@pytest.mark.parametrize("kind", ["tvlars", "lars", "lamb"])
def test_state_dtype_rounding_and_the_runs_seed_reach_the_optimizer(kind, monkeypatch):
    """--state-dtype/--rounding reach TVLARS, LARS and LAMB, the run's seed is the rounding stream's seed (so seeds
    draw independent streams), and the state they keep is bfloat16."""
    made, original = [], lb.make_optimizer

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(lb, "make_optimizer", recording)
    spec = SPEC if kind == "tvlars" else lb.OptSpec(kind, warmup=True)
    run = lb.train_run(_data(64, "cpu"), spec, 32, seed=7, epochs=1, widths=WIDTHS, max_steps=2,
                       evaluate_every_epoch=False, state_dtype=torch.bfloat16, rounding="nearest")
    optimizer, = made
    group = optimizer.param_groups[0]
    assert (group["state_dtype"], group["rounding"], group["seed"]) == (torch.bfloat16, "nearest", 7)
    states = [t for s in optimizer.state.values() for k, t in s.items() if k in ("momentum_buffer", "exp_avg",
                                                                                 "exp_avg_sq")]
    assert states and all(t.dtype == torch.bfloat16 for t in states)
    assert (run.state_dtype, run.rounding) == ("bfloat16", "nearest")
    assert run.stepped_by == sorted({b["backend"] for b in optimizer.chosen_backends}) and run.stepped_by


def test_sgd_baseline_keeps_float32_state():
    model = torch.nn.Linear(3, 2)
    optimizer = lb.make_optimizer(lb.OptSpec("sgd"), model, 0.1, 1, "auto", state_dtype=torch.bfloat16, seed=3)
    assert isinstance(optimizer, torch.optim.SGD)
    run = lb.train_run(_data(64, "cpu"), lb.OptSpec("sgd"), 32, seed=1, epochs=1, widths=WIDTHS, max_steps=1,
                       evaluate_every_epoch=False, state_dtype=torch.bfloat16)
    assert (run.state_dtype, run.stepped_by) == ("float32", [])


def test_state_flags_on_the_command_line(tmp_path):
    args = lb.parse_args(["--state-dtype", "bfloat16", "--rounding", "nearest"])
    assert (args.state_dtype, args.rounding) == ("bfloat16", "nearest")
    assert lb.parse_args(["--state-dtype", "bfloat16"]).rounding == "stochastic"
    assert (lb.parse_args([]).state_dtype, lb.parse_args([]).rounding) == ("float32", "stochastic")
    for bad in (["--rounding", "nearest"], ["--state-dtype", "float16"], ["--seeds", "-1"]):
        with pytest.raises(SystemExit):
            lb.parse_args(bad)


def test_compare_tables_final_accuracies_and_their_difference(tmp_path, capsys):
    def write(folder, state_dtype, accs):
        runs = [dict(batch_size=128, label="LARS warm-up", seed=seed, final_acc=a, train_loss=[1.0, a / 1000])
                for seed, a in enumerate(accs)]
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps(
            {"meta": {"state_dtype": state_dtype, "rounding": "stochastic"}, "runs": runs}))

    write("a", "float32", [90.0, 92.0, 94.0])   # mean 92, sd 2
    write("b", "bfloat16", [95.0, 95.0, 98.0])  # mean 96, sd sqrt(3); per seed +5, +3, +4: sd 1, se 1/sqrt(3)
    assert lb.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    lines = (tmp_path / "c" / "compare.md").read_text().splitlines()
    assert "| batch | optimizer | a | b | b vs a |" in lines
    assert "| 128 | LARS warm-up | 92.0 ± 2.0 (n=3) | 96.0 ± 1.7 (n=3) | +4.0 ± 0.6 (n=3) |" in lines
    # losses 0.090, 0.092, 0.094 against 0.095, 0.095, 0.098: ratios 1.0556, 1.0326, 1.0426
    assert lines[-1] == "| 128 | LARS warm-up | 0.092 ± 0.002 (n=3) | 0.096 ± 0.0017 (n=3) | x1.04 ± 0.01 (n=3) |", \
        lines[-1]
    assert lb.main(["--compare", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "results.json not found" in capsys.readouterr().err
