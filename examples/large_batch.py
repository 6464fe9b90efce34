"""The TVLARS paper's experiment (Do et al., arXiv 2309.14053), at a scale a 2-core CPU finishes in minutes.

    python examples/large_batch.py                      # digits (ships with scikit-learn), a few minutes
    python examples/large_batch.py --data cifar10 --root DIR --device cuda --epochs 100 \\
        --batch-sizes 1024,4096,16384                   # the paper's setting (ResNet-18 on CIFAR-10)

Trains a small ResNet-style CNN with TVLARS (a sweep of lmbda, with gamma_min and a delay of d_e epochs),
LARS with and without a linear warm-up, LAMB with warm-up and SGD with momentum (the baseline), for each
batch size and seed, and writes to ``--out``:

- ``results.json``: every curve (per epoch: training loss, test loss and accuracy, learning rate) and timings;
- ``summary.md``: final and best test accuracy (mean and spread over seeds), wall time, and the optimizer's
  share of the step time (``optimizer.step`` timed apart from the forward and backward passes);
- ``curves.png``: test accuracy and training loss against epochs, and phi(t) of each TVLARS setting beside
  LARS's warm-up factor.

``--state-dtype bfloat16`` keeps TVLARS's, LARS's and LAMB's state (momentum buffer, LAMB's moments) in bfloat16,
stored by stochastic rounding (``--rounding nearest``: to nearest, the control); each run passes its seed as the
optimizer's ``seed``, so seeds draw independent rounding streams. SGD (the baseline) is unaffected.
``--compare DIR DIR ...`` reads finished runs' ``results.json`` and prints one table of their final accuracies side
by side (for state-dtype comparisons).

Learning rates scale **linearly** with the batch size for TVLARS, LARS and SGD (``lr = base * B / 256``, as
in the authors' code and Goyal et al.) and with its **square root** for LAMB (``base * sqrt(B / 256)``, as in
You et al. 2020). The schedules follow the authors' code: LARS, LAMB and SGD warm up linearly for
``--warmup-epochs`` and then decay by a cosine to 1/1000 of the peak ("LARS without warm-up" keeps the
cosine); TVLARS keeps a constant lr, its decay is phi(t). Nothing is downloaded: CIFAR comes from a folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tvlars_fused import LAMB, LARS, TVLARS, available_backends, phi

REFERENCE_BATCH = 256  # the batch size the base learning rates are given for
# Base learning rates at REFERENCE_BATCH. LARS-type steps are eta * lr * ||w|| per layer (eta = 1e-3).
BASE_LR = {"tvlars": 4.0, "lars": 4.0, "lamb": 1.6e-2, "sgd": 0.4}  # few steps per run: above the usual 1, 0.1
SQRT_SCALED = ("lamb",)
WEIGHT_DECAY = {"tvlars": 5e-4, "lars": 5e-4, "lamb": 0.01, "sgd": 5e-4}
FINAL_LR_FRACTION = 1e-3  # cosine decay ends at this fraction of the peak (the authors' LARS schedule)
CIFAR_FOLDERS = {"cifar10": ("cifar-10-batches-py", ("data_batch_1", "test_batch")),
                 "cifar100": ("cifar-100-python", ("train", "test"))}


class DataError(RuntimeError):
    """The data set asked for cannot be loaded here; the message says what to put where."""


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    name: str
    x_train: Tensor  # float (digits) or uint8 NCHW (CIFAR: normalised per batch, to keep memory small)
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: Tensor
    std: Tensor
    augment: bool  # random crop and flip (CIFAR only: a flipped digit is another digit)

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    def batch(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return (x.to(dtype) - self.mean.to(dtype)) / self.std.to(dtype)


def load_data(name: str, root: str | None = None, device: str | torch.device = "cpu",
              train_size: int | None = None) -> Data:
    """``digits`` (scikit-learn's bundled copy: 1797 8x8 images, a fixed stratified 80/20 split) or CIFAR-10/100
    from ``root`` (torchvision's loader, download=False). Raises DataError at once when it cannot."""
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as exc:
            raise DataError(f"--data digits needs scikit-learn (pip install scikit-learn): {exc}") from exc
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=0,
                                               stratify=y.numpy())
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
        num_classes, augment = 10, False
        mean, std = x_train.mean().reshape(1, 1, 1, 1), x_train.std().reshape(1, 1, 1, 1)
    elif name in CIFAR_FOLDERS:
        x_train, y_train, x_test, y_test, num_classes = _load_cifar(name, root)
        augment = True
        mean = x_train.float().mean(dim=(0, 2, 3), keepdim=True)
        std = x_train.float().std(dim=(0, 2, 3), keepdim=True)
    else:
        raise DataError(f"unknown --data {name!r} (digits, {', '.join(CIFAR_FOLDERS)})")
    if train_size is not None:
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    device = torch.device(device)
    return Data(name, x_train.to(device), y_train.to(device), x_test.to(device), y_test.to(device), num_classes,
                mean.to(device), std.to(device), augment)


def _load_cifar(name: str, root: str | None):
    folder, files = CIFAR_FOLDERS[name]
    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    tarball = f"{folder.replace('-batches-py', '').replace('-python', '')}-python.tar.gz"
    what = (f"put the python version of {label} there: extract {tarball} "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) so that {{root}}/{folder}/{files[0]} exists; "
            "nothing is downloaded at run time")
    if root is None:
        raise DataError(f"--data {name} needs --root DIR: " + what.format(root="DIR"))
    missing = [f for f in files if not (Path(root) / folder / f).is_file()]
    if missing:
        raise DataError(f"--root {root}: {Path(root) / folder / missing[0]} not found; " + what.format(root=root))
    try:
        import torchvision
    except ImportError as exc:
        raise DataError(f"--data {name} needs torchvision (pip install torchvision) to read {root}: {exc}") from exc
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train, test = cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as exc:  # torchvision's md5 check: a file is missing or truncated
        raise DataError(f"--root {root}: torchvision cannot read it ({exc}); " + what.format(root=root)) from exc

    def tensors(ds):
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(ds.targets, dtype=torch.int64))

    return (*tensors(train), *tensors(test), len(train.classes))


def augment_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random 4-pixel-padded crops and horizontal flips (the usual CIFAR augmentation), on x's device."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n, 1), generator=generator)
    dx = torch.randint(0, 9, (n, 1), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy + torch.arange(h)).to(x.device)  # one gather for the whole batch: no per-image launches
    cols = (dx + torch.arange(w)).to(x.device)
    out = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(c, device=x.device).view(1, c, 1, 1),
                 rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    return torch.where(flip.to(x.device).view(n, 1, 1, 1), out.flip(3), out)


# ----------------------------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max-pool, stages doubling the width and halving the resolution.

    ``widths=(64, 128, 256, 512), blocks=2`` is the paper's ResNet-18; the default for digits is
    ``(8, 16, 32), blocks=1`` (8x8 -> 4x4 -> 2x2, 20 k parameters)."""

    def __init__(self, in_channels: int, num_classes: int, widths=(8, 16, 32), blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, c_in = [], widths[0]
        for stage, width in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(c_in, width, 2 if stage > 0 and b == 0 else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class OptSpec:
    """One optimizer setting of the sweep. ``kind``: tvlars, lars, lamb or sgd."""
    kind: str
    warmup: bool = False
    lmbda: float = 0.0
    gamma_min: float = 0.0
    delay_epochs: float = 0.0
    eta: float = 1e-3  # LARS's and TVLARS's trust coefficient

    @property
    def label(self) -> str:
        if self.kind == "tvlars":
            return f"TVLARS lmbda={self.lmbda:g} gamma_min={self.gamma_min:g} d_e={self.delay_epochs:g}"
        name = {"lars": "LARS", "lamb": "LAMB", "sgd": "SGD-momentum"}[self.kind]
        return f"{name} {'warm-up' if self.warmup else 'no warm-up'}"


def peak_lr(kind: str, batch_size: int, scale: float = 1.0) -> float:
    ratio = batch_size / REFERENCE_BATCH
    return scale * BASE_LR[kind] * (math.sqrt(ratio) if kind in SQRT_SCALED else ratio)


def lr_factor(spec: OptSpec, step: int, total_steps: int, warmup_steps: int) -> float:
    """The schedule's multiplier of the peak lr at 0-based ``step``: constant for TVLARS (phi is its
    schedule), else a linear warm-up over ``warmup_steps`` (when ``spec.warmup``) and a cosine decay to
    FINAL_LR_FRACTION over the rest."""
    if spec.kind == "tvlars":
        return 1.0
    warmup_steps = warmup_steps if spec.warmup else 0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cosine + FINAL_LR_FRACTION * (1 - cosine)


STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROUNDINGS = ("stochastic", "nearest")


def make_optimizer(spec: OptSpec, model: nn.Module, lr: float, steps_per_epoch: int, backend: str, *,
                   state_dtype: torch.dtype = torch.float32, rounding: str = "stochastic", seed: int = 0):
    """``state_dtype``, ``rounding`` and ``seed`` (the stochastic rounding stream's) go to TVLARS, LARS and LAMB;
    torch's SGD (the baseline) keeps its float32 state."""
    params = model.parameters()
    storage = dict(backend=backend, state_dtype=state_dtype, rounding=rounding, seed=seed)
    if spec.kind == "tvlars":
        return TVLARS(params, lr=lr, weight_decay=WEIGHT_DECAY["tvlars"], eta=spec.eta, lmbda=spec.lmbda,
                      gamma_min=spec.gamma_min, delay=spec.delay_epochs * steps_per_epoch, **storage)
    if spec.kind == "lars":
        return LARS(params, lr=lr, weight_decay=WEIGHT_DECAY["lars"], eta=spec.eta, **storage)
    if spec.kind == "lamb":
        return LAMB(params, lr=lr, weight_decay=WEIGHT_DECAY["lamb"], **storage)
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY["sgd"])
    raise ValueError(f"unknown optimizer kind {spec.kind!r}")


def default_specs(lmbdas, gamma_mins, delay_epochs) -> list[OptSpec]:
    specs = [OptSpec("tvlars", lmbda=l, gamma_min=g, delay_epochs=d)
             for l in lmbdas for g in gamma_mins for d in delay_epochs]
    return specs + [OptSpec("lars", warmup=True), OptSpec("lars", warmup=False), OptSpec("lamb", warmup=True),
                    OptSpec("sgd", warmup=True)]


# ----------------------------------------------------------------------------------------------- training
@dataclass
class RunResult:
    label: str
    kind: str
    spec: dict
    batch_size: int
    seed: int
    peak_lr: float
    steps_per_epoch: int
    train_loss: list = field(default_factory=list)   # per epoch, mean over its steps
    test_loss: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)     # percent
    lr: list = field(default_factory=list)           # the lr of each epoch's last step
    step_loss: list = field(default_factory=list)    # every step (only when asked: the backend test)
    state_dtype: str = "float32"  # of TVLARS's, LARS's and LAMB's state (SGD's is always float32)
    rounding: str = "stochastic"  # how bfloat16 state is stored
    stepped_by: list = field(default_factory=list)  # optimizer.chosen_backends' backend names (ours only)
    diverged_at_step: int | None = None
    wall_s: float = 0.0
    step_s: float = 0.0       # inside optimizer.step
    fwd_bwd_s: float = 0.0    # forward, loss and backward

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else float("nan")

    @property
    def best_acc(self) -> float:
        return max(self.test_acc) if self.test_acc else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, dtype: torch.dtype, batch: int = 1000) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(data.y_test), batch):
        logits = model(data.batch(data.x_test[i:i + batch], dtype))
        y = data.y_test[i:i + batch]
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train()
    n = len(data.y_test)
    return loss_sum / n, 100.0 * correct / n


def train_run(data: Data, spec: OptSpec, batch_size: int, seed: int, epochs: int, *, backend: str = "auto",
              widths=(8, 16, 32), blocks: int = 1, warmup_epochs: float = 5, lr_scale: float = 1.0,
              dtype: torch.dtype = torch.float32, max_steps: int | None = None, record_steps: bool = False,
              evaluate_every_epoch: bool = True, in_backward: bool = False, progress=None,
              state_dtype: torch.dtype = torch.float32, rounding: str = "stochastic") -> RunResult:
    """One training run. The model's initial weights and the batch order depend only on ``seed`` (and the
    dtype), so two backends given the same arguments see the same model and batches.

    ``max_steps`` stops early (the backend test); ``record_steps`` keeps every step's loss. ``in_backward``: TVLARS,
    LARS and LAMB step inside backward (``step_in_backward()``; the same run, bit for bit), and the step time counts
    only what ``optimizer.step()`` has left. ``state_dtype`` and ``rounding`` set TVLARS's, LARS's and LAMB's state
    storage; their stochastic rounding stream's seed is ``seed``, so that seeds give independent streams."""
    device = data.x_train.device
    n = len(data.y_train)
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} > {n} training samples of {data.name}")
    steps_per_epoch = n // batch_size  # full batches only: every step sees the batch size under study
    total_steps = epochs * steps_per_epoch
    torch.manual_seed(seed)
    model = ResNet(data.in_channels, data.num_classes, widths, blocks).to(device=device, dtype=dtype)
    lr = peak_lr(spec.kind, batch_size, lr_scale)
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (it is also the optimizer's rounding seed), got {seed}")
    optimizer = make_optimizer(spec, model, lr, steps_per_epoch, backend, state_dtype=state_dtype,
                               rounding=rounding, seed=seed)
    if in_backward and spec.kind != "sgd":  # torch's SGD has no step inside backward
        optimizer.step_in_backward()
    order = torch.Generator().manual_seed(seed)
    result = RunResult(spec.label, spec.kind, asdict(spec), batch_size, seed, lr, steps_per_epoch)
    if spec.kind != "sgd":
        result.state_dtype, result.rounding = str(state_dtype).removeprefix("torch."), rounding
        result.stepped_by = sorted({bucket["backend"] for bucket in optimizer.chosen_backends})
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order).to(device)
        losses = []
        for i in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(spec, step, total_steps, warmup_steps)
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = data.x_train[idx]
            if data.augment:
                x = augment_batch(x, order)
            _sync(device)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(data.batch(x, dtype)), data.y_train[idx])
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            _sync(device)
            t1 = time.perf_counter()
            optimizer.step()
            _sync(device)
            t2 = time.perf_counter()
            result.fwd_bwd_s += t1 - t0
            result.step_s += t2 - t1
            value = loss.item()
            losses.append(value)
            if record_steps:
                result.step_loss.append(value)
            step += 1
            if not math.isfinite(value):
                result.diverged_at_step = step
                break
            if max_steps is not None and step >= max_steps:
                break
        result.train_loss.append(statistics.fmean(losses))
        result.lr.append(optimizer.param_groups[0]["lr"])
        if evaluate_every_epoch:
            test_loss, test_acc = evaluate(model, data, dtype)
            result.test_loss.append(test_loss)
            result.test_acc.append(test_acc)
        if progress is not None:
            progress(epoch + 1, epochs, result)
        if result.diverged_at_step is not None or (max_steps is not None and step >= max_steps):
            break
    if result.diverged_at_step is not None:  # chance accuracy from here on: keep the curves' length
        for key in ("train_loss", "test_loss"):
            getattr(result, key).extend([float("nan")] * (epochs - len(getattr(result, key))))
        result.test_acc.extend([100.0 / data.num_classes] * (epochs - len(result.test_acc)))
    result.wall_s = time.perf_counter() - start
    return result


class ProgressBar:
    """One line per run on stderr: redrawn in place on a terminal, printed once at the end otherwise."""

    def __init__(self, prefix: str, stream=sys.stderr, width: int = 24) -> None:
        self.prefix, self.stream, self.width = prefix, stream, width
        self.live = stream.isatty()
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, result: RunResult) -> None:
        finished = done == total or result.diverged_at_step is not None
        if not (self.live or finished):
            return
        filled = round(self.width * done / total)
        acc = f"{result.test_acc[-1]:5.1f}%" if result.test_acc else "  n/a"
        line = (f"{self.prefix} [{'#' * filled}{'.' * (self.width - filled)}] epoch {done}/{total} "
                f"loss {result.train_loss[-1]:.4f} test acc {acc} {time.perf_counter() - self.start:5.1f}s")
        if result.diverged_at_step is not None:
            line += f" diverged at step {result.diverged_at_step}"
        self.stream.write(("\r" if self.live else "") + line + ("\n" if finished else ""))
        self.stream.flush()


# ----------------------------------------------------------------------------------------------- report
def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def summary_table(runs: list[RunResult]) -> str:
    """Markdown: one row per (batch size, optimizer setting), statistics over seeds (± is the sample
    standard deviation)."""
    lines = ["| batch | optimizer | peak lr | final test acc % | best test acc % | diverged | wall s/run "
             "| optimizer.step share |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.batch_size, r.label), []).append(r)
    for (batch, label), rs in groups.items():
        diverged = sum(r.diverged_at_step is not None for r in rs)
        share = sum(r.step_s for r in rs) / max(1e-12, sum(r.step_s + r.fwd_bwd_s for r in rs))
        lines.append(f"| {batch} | {label} | {rs[0].peak_lr:g} | {_mean_spread([r.final_acc for r in rs])} "
                     f"| {_mean_spread([r.best_acc for r in rs])} | {diverged}/{len(rs)} "
                     f"| {statistics.fmean(r.wall_s for r in rs):.1f} | {100 * share:.0f}% |")
    return "\n".join(lines)


def plot(runs: list[RunResult], specs: list[OptSpec], epochs: int, warmup_epochs: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = sorted({r.batch_size for r in runs})
    labels = list(dict.fromkeys(s.label for s in specs))
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(len(batch_sizes), 3, figsize=(17, 4.2 * len(batch_sizes)), squeeze=False)
    for row, batch in zip(axes, batch_sizes):
        for label in labels:
            rs = [r for r in runs if r.batch_size == batch and r.label == label]
            if not rs:
                continue
            x = range(1, epochs + 1)
            for ax, key in ((row[0], "test_acc"), (row[1], "train_loss")):
                curves = torch.tensor([getattr(r, key) for r in rs], dtype=torch.float64)
                mean = curves.mean(0)
                ax.plot(x, mean, color=colours[label], label=label, lw=1.4)
                if len(rs) > 1:
                    ax.fill_between(x, curves.min(0).values, curves.max(0).values, color=colours[label], alpha=0.15)
        spe = next(r.steps_per_epoch for r in runs if r.batch_size == batch)
        steps = torch.arange(epochs * spe)
        for spec in specs:
            if spec.kind == "tvlars":
                values = [phi(t + 1, spec.lmbda, 0.1, spec.delay_epochs * spe, spec.gamma_min) for t in steps.tolist()]
                row[2].plot((steps + 1) / spe, values, color=colours[spec.label], label=f"phi: {spec.label}")
        warm = [lr_factor(OptSpec("lars", warmup=True), t, epochs * spe, round(warmup_epochs * spe))
                for t in steps.tolist()]
        row[2].plot((steps + 1) / spe, warm, color="black", ls="--", label="LARS warm-up + cosine: lr / peak lr")
        row[0].set(title=f"batch {batch}: test accuracy (mean, band: min..max over seeds)", xlabel="epoch",
                   ylabel="%")
        row[1].set(title=f"batch {batch}: training loss", xlabel="epoch", yscale="log")
        row[2].set(title=f"batch {batch} ({spe} steps/epoch): factor on the trust ratio", xlabel="epoch",
                   yscale="log")
        for ax in row:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    axes[0][2].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _state_text(state_dtype: str, rounding: str) -> str:
    if state_dtype == "float32":
        return "float32 (SGD's: float32)"
    return f"{state_dtype}, stored by {rounding} rounding, each run's seed its stream's seed (SGD's: float32)"


def _short_state(state_dtype: str, rounding: str) -> str:
    return state_dtype if state_dtype == "float32" else f"{state_dtype} {rounding}"


def compare(folders: list[str], out: Path) -> int:
    """Markdown tables of finished runs' folders side by side, one column per folder, one row per (batch size,
    optimizer setting): the final test accuracy and the last epoch's training loss (mean ± sample standard
    deviation over seeds), then each other folder's difference from the first, paired by seed (a seed fixes the
    initial weights and the batch order, so the pair differs only by what the folders differ in): the mean of the
    per-seed differences ± its standard error (for the loss: of the per-seed ratios)."""
    loaded = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            print(f"error: --compare: {path} not found (a folder written by this script)", file=sys.stderr)
            return 2
        loaded.append(json.loads(path.read_text()))
    names = [Path(folder).name or folder for folder in folders]  # the columns: the folders' own names
    if len(set(names)) < len(names):
        names = [str(folder) for folder in folders]
    described = [f"- `{n}`: {folder}, {_short_state(d['meta'].get('state_dtype', 'float32'), d['meta'].get('rounding', 'stochastic'))}"
                 f" state, backend {d['meta'].get('backend', '?')} "
                 f"(stepped by: {', '.join(d['meta'].get('stepped_by', [])) or 'n/a'}), "
                 f"commit {d['meta'].get('git_commit', '?')}" for n, folder, d in zip(names, folders, loaded)]
    accuracy = _compare_table(loaded, names, lambda r: r["final_acc"], "{:.1f}", lambda a, b: b - a, "{:+.1f}",
                              "{:.1f}")
    loss = _compare_table(loaded, names, lambda r: r["train_loss"][-1], "{:.2g}", lambda a, b: b / a, "x{:.2f}",
                          "{:.2f}")
    text = ("Final test accuracy %, mean ± sample standard deviation over seeds (n runs); the difference columns: "
            "the mean of the per-seed differences (same seed: same initial weights and batch order) ± its standard "
            "error, over the n seeds both folders ran.\n\n" + "\n".join(described) + "\n\n" + accuracy
            + "\n\nTraining loss of the last epoch (mean over its steps), mean ± sample standard deviation over seeds; "
            "the ratio columns: the mean of the per-seed ratios ± its standard error.\n\n" + loss + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text)
    print(text)
    return 0


def _compare_table(loaded: list[dict], names: list[str], value, fmt: str, paired, paired_fmt: str,
                   se_fmt: str) -> str:
    """One table of ``value(run)`` per folder (mean ± sd) and ``paired(first, other)`` per seed (mean ± se)."""
    tables: list[dict[tuple, dict[int, float]]] = []  # (batch, label) -> {seed: value}
    for d in loaded:
        table: dict[tuple, dict[int, float]] = {}
        for r in d["runs"]:
            table.setdefault((r["batch_size"], r["label"]), {})[r["seed"]] = value(r)
        tables.append(table)
    header = ["batch", "optimizer", *names, *(f"{n} vs {names[0]}" for n in names[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in dict.fromkeys(k for table in tables for k in table):
        cells = [str(key[0]), key[1]]
        for t in tables:
            values = list(t.get(key, {}).values())
            spread = f" ± {fmt.format(statistics.stdev(values))}" if len(values) > 1 else ""
            cells.append(f"{fmt.format(statistics.fmean(values))}{spread} (n={len(values)})" if values else "n/a")
        first = tables[0].get(key, {})
        for t in tables[1:]:
            other = t.get(key, {})
            pairs = [paired(first[seed], other[seed]) for seed in first if seed in other]
            if len(pairs) < 2:
                cells.append("n/a")
                continue
            se = statistics.stdev(pairs) / math.sqrt(len(pairs))
            cells.append(f"{paired_fmt.format(statistics.fmean(pairs))} ± {se_fmt.format(se)} (n={len(pairs)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _git_state() -> tuple[str, list[str]]:
    """The commit the run starts from, and the tracked files that differ from it (they ran as they were)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, text=True, capture_output=True,
                              check=True).stdout
    try:
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
        return git("rev-parse", "--short", "HEAD").strip(), changed
    except (OSError, subprocess.CalledProcessError):
        return "unknown", []


# ----------------------------------------------------------------------------------------------- command line
def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", choices=["digits", *CIFAR_FOLDERS])
    p.add_argument("--root", help="folder holding cifar-10-batches-py/ or cifar-100-python/ (CIFAR only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="backend of TVLARS, LARS and LAMB (default: auto)")
    p.add_argument("--epochs", type=int, default=None, help="default: 20 (digits), 100 (CIFAR)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    p.add_argument("--batch-sizes", type=_ints, default=None,
                   help="comma-separated (default 128,512 for digits: 9%% and 36%% of its 1437 training images; "
                        "1024,4096,16384 for CIFAR)")
    p.add_argument("--lmbdas", type=_floats, default=[0.01, 0.05, 0.25], help="TVLARS lmbda sweep, per step")
    p.add_argument("--gamma-mins", type=_floats, default=[1e-3], help="TVLARS gamma_min values")
    p.add_argument("--delay-epochs", type=_floats, default=[2.0],
                   help="TVLARS d_e values in epochs (delay = d_e * steps per epoch)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up of LARS, LAMB and SGD (default: 20%% of the epochs, the authors' 20/100)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every base learning rate")
    p.add_argument("--only", default="", help="comma-separated kinds to run (tvlars,lars,lamb,sgd; default all)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on the CPU: the digits model's convolutions are too small "
                        "to gain from a second thread, and on a shared machine every op of a multi-threaded run "
                        "waits at its OpenMP barrier for a busy core)")
    p.add_argument("--in-backward", action="store_true",
                   help="TVLARS, LARS and LAMB step inside backward (optimizer.step_in_backward(): each bucket of "
                        "layers as soon as its gradients are ready; the same results, bit for bit)")
    p.add_argument("--state-dtype", default="float32", choices=list(STATE_DTYPES),
                   help="dtype of TVLARS's, LARS's and LAMB's state (momentum buffer, LAMB's moments; SGD's stays "
                        "float32); each run's seed is the optimizer's rounding seed (default float32)")
    p.add_argument("--rounding", default=None, choices=ROUNDINGS,
                   help="how bfloat16 state is stored (default stochastic; only with --state-dtype bfloat16)")
    p.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                   help="train nothing: print (and write to --out/compare.md) one table of the final test accuracy "
                        "of finished runs in these folders (their results.json), side by side")
    p.add_argument("--out", default="examples/out", help="output folder (default examples/out)")
    args = p.parse_args(argv)
    if args.rounding is not None and args.state_dtype != "bfloat16":
        p.error("--rounding: only bfloat16 state is rounded (add --state-dtype bfloat16)")
    args.rounding = args.rounding or "stochastic"
    if any(seed < 0 or seed >= 2**32 for seed in args.seeds):
        p.error(f"--seeds: each seed is also the optimizer's rounding seed, an int in [0, 2**32): {args.seeds}")
    small = args.data == "digits"
    args.epochs = args.epochs or (20 if small else 100)
    args.batch_sizes = args.batch_sizes or ([128, 512] if small else [1024, 4096, 16384])
    args.warmup_epochs = 0.2 * args.epochs if args.warmup_epochs is None else args.warmup_epochs
    args.widths, args.blocks = ((8, 16, 32), 1) if small else ((64, 128, 256, 512), 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare, Path(args.out))
    try:  # fail before any training when the data or the backend cannot be had
        data = load_data(args.data, args.root, args.device)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.backend != "auto":
        reason = available_backends(args.device).get(args.backend, f"unknown backend {args.backend!r}")
        if reason is not None:
            print(f"error: --backend {args.backend}: {reason}", file=sys.stderr)
            return 2
    threads = args.threads or (1 if torch.device(args.device).type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    specs = default_specs(args.lmbdas, args.gamma_mins, args.delay_epochs)
    if args.only:
        specs = [s for s in specs if s.kind in args.only.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(b, s, seed) for b in args.batch_sizes for s in specs for seed in args.seeds]
    commit, changed = _git_state()
    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv)),
        "git_commit": commit, "uncommitted_changes_in": changed,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average_at_start": os.getloadavg()[0],
        "torch": torch.__version__, "device": args.device, "backend": args.backend,
        "torch_threads": torch.get_num_threads(), "data": args.data,
        "train_size": len(data.y_train), "test_size": len(data.y_test),
        "model": {"widths": list(args.widths), "blocks": args.blocks},
        "epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "seeds": args.seeds,
        "batch_sizes": args.batch_sizes, "base_lr_at_batch_256": BASE_LR, "sqrt_scaled": list(SQRT_SCALED),
        "weight_decay": WEIGHT_DECAY, "lr_scale": args.lr_scale, "in_backward": args.in_backward,
        "state_dtype": args.state_dtype, "rounding": args.rounding, "stepped_by": [],
    }
    runs: list[RunResult] = []
    start = time.perf_counter()
    for k, (batch, spec, seed) in enumerate(jobs, 1):
        bar = ProgressBar(f"[{k:2d}/{len(jobs)}] b={batch} seed={seed} {spec.label:<44}")
        runs.append(train_run(data, spec, batch, seed, args.epochs, backend=args.backend, widths=args.widths,
                              blocks=args.blocks, warmup_epochs=args.warmup_epochs, lr_scale=args.lr_scale,
                              in_backward=args.in_backward, progress=bar,
                              state_dtype=STATE_DTYPES[args.state_dtype], rounding=args.rounding))
        meta["stepped_by"] = sorted({b for r in runs for b in r.stepped_by})
        meta["total_wall_s"] = round(time.perf_counter() - start, 1)
        meta["load_average_at_end"] = os.getloadavg()[0]  # other work on the machine slows every run
        runs_json = [{**asdict(r), "final_acc": r.final_acc, "best_acc": r.best_acc} for r in runs]
        (out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs_json}, indent=1) + "\n")
    table = summary_table(runs)
    dirty = f" (plus uncommitted changes in {', '.join(changed)})" if changed else ""
    header = (f"Command: `{meta['command']}`  \nCommit: {commit}{dirty}, {meta['date_utc']} UTC  \n"
              f"Machine: {meta['machine']}, torch {meta['torch']} ({meta['torch_threads']} threads), "
              f"device {args.device}, backend {args.backend} (stepped by: {', '.join(meta['stepped_by']) or 'n/a'})  \n"
              f"Optimizer state of TVLARS, LARS and LAMB: {_state_text(args.state_dtype, args.rounding)}  \n"
              f"Data: {args.data} ({meta['train_size']} train / {meta['test_size']} test), "
              f"{args.epochs} epochs, seeds {args.seeds}; total wall time {meta['total_wall_s']} s "
              f"(1-minute load average {meta['load_average_at_start']:.1f} at the start, "
              f"{meta['load_average_at_end']:.1f} at the end, on {os.cpu_count()} CPUs)\n\n")
    (out / "summary.md").write_text(header + table + "\n")
    print(table)
    try:
        plot(runs, specs, args.epochs, args.warmup_epochs, out / "curves.png")
    except ImportError as exc:
        print(f"no figure: matplotlib is missing ({exc})", file=sys.stderr)
    print(f"wrote {out / 'results.json'}, {out / 'summary.md'}, {out / 'curves.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
