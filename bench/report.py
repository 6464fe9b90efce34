"""Writing a run down: the stdout table, results.json, summary.md and step_time.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import byte_model

COLUMNS = (  # header, record key, format
    ("contender", "contender", "{}"),
    ("median ms", "median_ms", "{:.3f}"),
    ("min ms", "min_ms", "{:.3f}"),
    ("max ms", "max_ms", "{:.3f}"),
    ("x eager", "speedup_vs_eager", "{:.2f}"),
    ("x foreach", "speedup_vs_foreach", "{:.2f}"),
    ("/ floor", "ratio_to_floor", "{:.2f}"),
    ("/ f32 state", "ratio_to_float32_state", "{:.2f}"),
    ("stepped by", "stepped_by", "{}"),
    ("GB/s", "achieved_GBps", "{:.1f}"),
    ("of yardstick", "fraction_of_yardstick", "{:.0%}"),
    ("dev ops", "device_ops_per_step", "{}"),
    ("extra MB", "extra_memory_bytes", "{}"),
)
LEGEND = ("x eager = eager-loop time / this time; x foreach = foreach time / this time; / floor = this time / "
          "the torch floor's time (fused SGD with momentum for tvlars and lars, fused AdamW for lamb), with its "
          "quartiles in brackets; of yardstick = GB/s of the byte model / GB/s of the yardstick in the same rounds. "
          "Each ratio is the median over the interleaved rounds of the ratio within a round.")
STORAGE_LEGEND = ("+bf16 = our state in bfloat16, stored by stochastic rounding (+bf16-nearest: to nearest), +kahan "
                  "= a bfloat16 Kahan compensation of bfloat16 weights; / f32 state = this time / the same backend's "
                  "time with float32 state, with its quartiles; stepped by = the backend optimizer.chosen_backends "
                  "names for the buckets (a fused backend without a kernel for the storage hands it to foreach).")


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if key == "contender" and value == record.get("floor"):
        return f"{value} (floor)"
    if value is None:
        return "n/a"
    if key == "extra_memory_bytes":
        return f"{value / 2**20:.1f}"
    if key == "ratio_to_floor":
        return _floor_ratio(value, record.get("ratio_to_floor_quartiles"))
    if key == "ratio_to_float32_state":
        return _floor_ratio(value, record.get("ratio_to_float32_state_quartiles"))
    if key == "fraction_of_yardstick" and record.get("share_note"):
        return f"{fmt.format(value)} ({record['share_note']})"
    return fmt.format(value)


def _columns(results: list[dict]) -> list[tuple[str, str, str]]:
    """The columns with a value somewhere in the run (dev ops and extra MB are GPU-only; / f32 state with another
    storage of our state); stepped by where a run has another storage or a backend handed a bucket on."""
    shown = [col for col in COLUMNS if col[1] not in ("contender", "stepped_by")
             and any(r.get(col[1]) is not None for r in results)]
    handed_on = any(r.get("stepped_by") not in (None, r.get("backend")) for r in results)
    if handed_on or _has_storages(results):
        shown.append(next(col for col in COLUMNS if col[1] == "stepped_by"))
    return [COLUMNS[0], *sorted(shown, key=COLUMNS.index)]


def _has_storages(records: list[dict]) -> bool:
    """Whether some record keeps our state otherwise than in float32."""
    return any(r.get("state_dtype") not in (None, "float32") or r.get("kahan") for r in records)


def storage_label(r: dict) -> str:
    """'' for float32 state (and others' optimizers), else e.g. ' bf16-state', ' bf16-state-nearest', ' kahan'."""
    parts = []
    if r.get("state_dtype") == "bfloat16":
        parts.append("bf16-state" + ("-nearest" if r.get("rounding") == "nearest" else ""))
    if r.get("kahan"):
        parts.append("kahan")
    return "".join(" " + part for part in parts)


def _groups(results: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["set"], r["dtype"], r["grads"], r["optimizer"]), []).append(r)
    return groups


def _case(r: dict) -> str:
    return f"{r['set']} {r['dtype']}{' new-grads' if r['grads'] == 'new' else ''} {r['optimizer']}"


def _heading(records: list[dict]) -> str:
    r = records[0]
    bpp = f"{byte_model.bytes_per_param(r['optimizer'], _dtype(r['dtype']))} B/param"
    for state_dtype, kahan in dict.fromkeys((x.get("state_dtype"), bool(x.get("kahan"))) for x in records
                                            if x["kind"] == "ours" and _has_storages([x])):
        other = byte_model.bytes_per_param(r["optimizer"], _dtype(r["dtype"]), _dtype(state_dtype), kahan=kahan)
        bpp += f", {other} with {state_dtype} state{' and kahan' if kahan else ''}"
    grads = ", new gradient tensors before every step" if r["grads"] == "new" else ""
    floor = f"; floor {r['floor']}" if r["floor"] else "; no torch floor runs here"
    params = f"{r['numel'] / 1e6:.2f} M" if r["numel"] >= 10**5 else str(r["numel"])
    return (f"{r['set']} ({r['num_tensors']} tensors, {params} params), {r['dtype']}{grads}, "
            f"{r['optimizer']} ({bpp}){floor}; yardstick {r['yardstick_GBps']:.1f} GB/s")


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _floor_ratio(value: float | None, quartiles: list[float] | None) -> str:
    """The ratio to the floor and, when there were several rounds, its quartiles: how noisy the machine was."""
    if value is None or not quartiles or quartiles[0] == quartiles[1]:
        return _ratio(value)
    return f"{value:.2f} ({quartiles[0]:.2f}-{quartiles[1]:.2f})"


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def headline_lines(run: dict) -> list[str]:
    """One line per (set, dtype, grads, optimizer) and storage: the fastest of our backends and its ratios."""
    lines = ["headline: the fastest of our backends per case, against the eager loop and the torch floor"]
    for h in run["headline"]:
        line = (f"  {_case(h)}{storage_label(h)}: {h['backend']} {h['median_ms']:.3f} ms, "
                f"x eager {_ratio(h['speedup_vs_eager'])}, "
                f"/ floor ({h['floor']}) {_floor_ratio(h['ratio_to_floor'], h.get('ratio_to_floor_quartiles'))}")
        if h.get("ratio_to_float32_state") is not None:
            line += (", / f32 state "
                     + _floor_ratio(h["ratio_to_float32_state"], h.get("ratio_to_float32_state_quartiles")))
        if h.get("stepped_by") not in (None, h["backend"].split("+")[0]):
            line += f" (stepped by {h['stepped_by']})"
        lines.append(line)
    return lines


def _skipped_lines(run: dict) -> list[str]:
    counts: dict[tuple[str, str], int] = {}
    for s in run["skipped"]:  # one line per contender and reason, not per case
        key = (s["contender"], s["reason"])
        counts[key] = counts.get(key, 0) + 1
    return [f"  {contender} ({n} cases): {reason}" for (contender, reason), n in counts.items()]


def text_table(run: dict) -> str:
    """One block per (set, dtype, grads, optimizer), one row per contender, then the skipped cases."""
    yardstick = run["yardstick"]
    lines = [f"yardstick: {yardstick['description']}, timed in every round of every case", LEGEND]
    columns = _columns(run["results"])
    for records in _groups(run["results"]).values():
        rows = [[header for header, _, _ in columns]]
        rows += [[_cell(r, key, fmt) for _, key, fmt in columns] for r in records]
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
        lines += ["", _heading(records)]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths))))
    if run["skipped"]:
        lines += ["", "skipped (results.json lists every case):", *_skipped_lines(run)]
    return "\n".join(lines)


def markdown(run: dict, meta: dict) -> str:
    columns = _columns(run["results"])
    out = [f"# Optimizer step benchmark, {meta['device']}",
           "",
           f"- date: {meta['date']}",
           f"- device: {meta['device_name']}",
           f"- git commit: {meta['git_commit']}",
           f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}",
           f"- dtype(s): {', '.join(meta['dtypes'])}; gradients: {', '.join(meta['grads'])}; "
           f"{meta['warmup']} warm-up + {meta['steps']} timed steps; {meta['cpu_threads']} CPU threads"
           + (f"; 1-minute load average {meta['load_average_at_start']:.2f} at the start, "
              f"{meta['load_average_at_end']:.2f} at the end ({os.cpu_count()} logical cores)"
              if "load_average_at_end" in meta else ""),
           f"- yardstick: {run['yardstick']['description']}, timed in every round; byte model: bench/byte_model.py",
           f"- {LEGEND}",
           "- backends: " + ", ".join(f"{k}: {'yes' if v is None else v}" for k, v in meta["backends"].items())]
    storages = _has_storages(run["results"])
    if "state_dtypes" in meta:
        out.append(f"- our state: {', '.join(meta['state_dtypes'])}; bfloat16 state rounded: "
                   f"{', '.join(meta['rounding'])} (seed {meta['rounding_seed']}); kahan: {', '.join(meta['kahan'])}")
    if storages:
        out.append(f"- {STORAGE_LEGEND}")
    if run.get("headline"):
        extra = " / f32 state | stepped by |" if storages else ""
        out += ["", "## Headline", "",
                "| case | fastest of ours | median ms | x eager | floor | / floor |" + extra,
                "|---|---|---|---|---|---|" + ("---|---|" if storages else "")]
        for h in run["headline"]:
            row = (f"| {_case(h)}{storage_label(h)} | {h['backend']} | {h['median_ms']:.3f} | "
                   f"{_ratio(h['speedup_vs_eager'])} | {h['floor']} | "
                   f"{_floor_ratio(h['ratio_to_floor'], h.get('ratio_to_floor_quartiles'))} |")
            if storages:
                row += (f" {_floor_ratio(h.get('ratio_to_float32_state'), h.get('ratio_to_float32_state_quartiles'))}"
                        f" | {h.get('stepped_by') or 'n/a'} |")
            out.append(row)
    for records in _groups(run["results"]).values():
        out += ["", f"## {_heading(records)}", "",
                "| " + " | ".join(header for header, _, _ in columns) + " |",
                "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(_cell(r, key, fmt) for _, key, fmt in columns) + " |" for r in records]
    if storages or any(d != "float32" for d in meta.get("dtypes", ["float32"])):
        out += ["", bytes_table()]
    if run["skipped"]:
        out += ["", "## Skipped", ""]
        out += [f"- {s['set']} {s['dtype']} {s['grads']} {s['optimizer']} {s['contender']}: {s['reason']}"
                for s in run["skipped"]]
    return "\n".join(out) + "\n"


def bytes_table() -> str:
    """The byte model's bytes per parameter (and footprint) for every configuration, as Markdown."""
    rows = byte_model.configurations()
    names = {"lars": "LARS, TVLARS", "lamb": "LAMB", "sgd": "torch SGD momentum (floor)",
             "adamw": "torch AdamW (floor)"}
    out = ["## Bytes per parameter (bench/byte_model.py)", "",
           "Bytes one step moves per parameter element (reads + writes, both passes), and its footprint: the "
           "distinct bytes it touches (weights, masters or compensations, gradients, state). master = float32 master "
           "weights (4 bytes read, 4 + p written); kahan = a bfloat16 compensation (2 bytes read and written with "
           "the weight); torch's floors keep their state in the parameter dtype.", "",
           "| parameters | state | weights | optimizer | bytes/param | footprint |", "|---|---|---|---|---|---|"]
    out += [f"| {r['param_dtype']} | {r['state_dtype']} | {r['weights']} | {names[r['optimizer']]} | "
            f"{r['bytes_per_param']} | {r['footprint_per_param']} |" for r in rows]
    return "\n".join(out)


def write_json(path: Path, run: dict, meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, **run}, indent=1, default=str))


FAMILY_MARKERS = {"model": "o", "many-tiny": "s", "few-huge": "^", "overhead": "D"}


def plot(path: Path, run: dict) -> str | None:
    """Step time vs parameter count, one panel per optimizer (and dtype, and gradient mode), one colour per
    contender, one marker per set family, with the byte model's time at the yardstick's bandwidth. Returns why
    there is no plot, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not importable ({exc})"
    results = run["results"]
    if not results:
        return "no plot: no results"
    panels = list(dict.fromkeys((r["optimizer"], r["dtype"], r["grads"]) for r in results))
    contender_names = list(dict.fromkeys(r["contender"] for r in results))
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(contender_names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (optimizer, dtype_name, grads) in zip(axes[0], panels):
        mine = [r for r in results if (r["optimizer"], r["dtype"], r["grads"]) == (optimizer, dtype_name, grads)]
        labelled = set()
        for contender, family in dict.fromkeys((r["contender"], r["family"]) for r in mine):
            points = sorted((r["numel"], r["median_ms"]) for r in mine
                            if r["contender"] == contender and r["family"] == family)
            ax.plot(*zip(*points), marker=FAMILY_MARKERS.get(family, "x"), color=colours[contender],
                    label=None if contender in labelled else contender, linewidth=1)
            labelled.add(contender)
        # The yardstick of the rounds that timed each set: the fastest a step of that size could stream from memory.
        yardstick = {r["numel"]: r["yardstick_GBps"] for r in mine}
        sizes = sorted(yardstick)
        ideal = [byte_model.bytes_per_step(optimizer, _dtype(dtype_name), n) / (yardstick[n] * 1e9) * 1e3
                 for n in sizes]
        ax.plot(sizes, ideal, "k--", linewidth=1, label="bytes / yardstick bandwidth (sets in cache can beat it)")
        title = f"{optimizer} ({dtype_name}{', new grads' if grads == 'new' else ''})"
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="step time (ms, median)", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.text(0.01, 0.01, "markers: o named model, s many tiny layers, ^ few huge layers, D one-element layers",
             fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
