"""Writing a run down: the stdout table, results.json, summary.md and step_time.png."""

from __future__ import annotations

import json
from pathlib import Path

from . import byte_model

COLUMNS = (  # header, record key, format
    ("contender", "contender", "{}"),
    ("median ms", "median_ms", "{:.3f}"),
    ("min ms", "min_ms", "{:.3f}"),
    ("max ms", "max_ms", "{:.3f}"),
    ("x eager", "speedup_vs_eager", "{:.2f}"),
    ("x foreach", "speedup_vs_foreach", "{:.2f}"),
    ("/ sgd", "ratio_to_sgd", "{:.2f}"),
    ("GB/s", "achieved_GBps", "{:.1f}"),
    ("of copy", "fraction_of_copy_bandwidth", "{:.0%}"),
    ("dev ops", "device_ops_per_step", "{}"),
    ("extra MB", "extra_memory_bytes", "{}"),
)


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None:
        return "n/a"
    if key == "extra_memory_bytes":
        return f"{value / 2**20:.1f}"
    return fmt.format(value)


def _groups(results: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["set"], r["dtype"], r["optimizer"]), []).append(r)
    return groups


def _heading(records: list[dict]) -> str:
    r = records[0]
    bpp = byte_model.bytes_per_param(r["optimizer"], _dtype(r["dtype"]))
    return (f"{r['set']} ({r['num_tensors']} tensors, {r['numel'] / 1e6:.2f} M params), {r['dtype']}, "
            f"{r['optimizer']} ({bpp} B/param)")


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def text_table(run: dict) -> str:
    """One block per (set, dtype, optimizer), one row per contender, then the skipped cases."""
    lines = [f"copy bandwidth: {run['copy_bandwidth'] / 1e9:.1f} GB/s "
             "(x eager = eager-loop time / this time; x foreach = foreach time / this time; "
             "/ sgd = this time / SGD floor time)"]
    for records in _groups(run["results"]).values():
        rows = [[header for header, _, _ in COLUMNS]]
        rows += [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in records]
        widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
        lines += ["", _heading(records)]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths))))
    if run["skipped"]:
        lines += ["", "skipped (results.json lists every case):"]
        counts: dict[tuple[str, str], int] = {}
        for s in run["skipped"]:  # one line per contender and reason, not per case
            key = (s["contender"], s["reason"])
            counts[key] = counts.get(key, 0) + 1
        lines += [f"  {contender} ({n} cases): {reason}" for (contender, reason), n in counts.items()]
    return "\n".join(lines)


def markdown(run: dict, meta: dict) -> str:
    out = [f"# Optimizer step benchmark, {meta['device']}",
           "",
           f"- date: {meta['date']}",
           f"- device: {meta['device_name']}",
           f"- git commit: {meta['git_commit']}",
           f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}",
           f"- dtype(s): {', '.join(meta['dtypes'])}; {meta['warmup']} warm-up + {meta['steps']} timed steps",
           f"- copy bandwidth: {run['copy_bandwidth'] / 1e9:.1f} GB/s; byte model: bench/byte_model.py",
           "- backends: " + ", ".join(f"{k}: {'yes' if v is None else v}" for k, v in meta["backends"].items())]
    for records in _groups(run["results"]).values():
        out += ["", f"## {_heading(records)}", "",
                "| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
                "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(_cell(r, key, fmt) for _, key, fmt in COLUMNS) + " |" for r in records]
    if run["skipped"]:
        out += ["", "## Skipped", ""]
        out += [f"- {s['set']} {s['dtype']} {s['optimizer']} {s['contender']}: {s['reason']}"
                for s in run["skipped"]]
    return "\n".join(out) + "\n"


def write_json(path: Path, run: dict, meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, **run}, indent=1, default=str))


FAMILY_MARKERS = {"model": "o", "many-tiny": "s", "few-huge": "^"}


def plot(path: Path, run: dict) -> str | None:
    """Step time vs parameter count, one panel per optimizer, one colour per contender, one marker per set
    family, with the byte model's floor at copy bandwidth. Returns why there is no plot, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not importable ({exc})"
    results = run["results"]
    if not results:
        return "no plot: no results"
    panels = list(dict.fromkeys((r["optimizer"], r["dtype"]) for r in results))
    contender_names = list(dict.fromkeys(r["contender"] for r in results))
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(contender_names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (optimizer, dtype_name) in zip(axes[0], panels):
        mine = [r for r in results if (r["optimizer"], r["dtype"]) == (optimizer, dtype_name)]
        labelled = set()
        for contender, family in dict.fromkeys((r["contender"], r["family"]) for r in mine):
            points = sorted((r["numel"], r["median_ms"]) for r in mine
                            if r["contender"] == contender and r["family"] == family)
            ax.plot(*zip(*points), marker=FAMILY_MARKERS.get(family, "x"), color=colours[contender],
                    label=None if contender in labelled else contender, linewidth=1)
            labelled.add(contender)
        sizes = sorted({r["numel"] for r in mine})
        dtype = _dtype(dtype_name)
        floor = [byte_model.bytes_per_step(optimizer, dtype, n) / run["copy_bandwidth"] * 1e3 for n in sizes]
        ax.plot(sizes, floor, "k--", linewidth=1, label="bytes / copy bandwidth")
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="step time (ms, median)",
               title=f"{optimizer} ({dtype_name})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.text(0.01, 0.01, "markers: o named model, s many tiny layers, ^ few huge layers", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
