"""``python -m bench``: time one optimizer step of every backend side by side; see bench/README.md."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import harness, report
from .param_sets import DEFAULT_SETS, all_sets


def _csv(value: str) -> list[str]:
    return [item for item in value.split(",") if item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    sets = all_sets()
    table = harness.contenders()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--optimizers", type=_csv, default=list(harness.OPTIMIZERS),
                        help=f"comma-separated, from {','.join(harness.OPTIMIZERS)} (default: all)")
    parser.add_argument("--backends", type=_csv, default=[n for n, c in table.items() if c.kind != "torch"],
                        help="comma-separated contenders: our backends, the eager loop, foreach+compile, "
                             f"peers and torch's optimizers, from {','.join(table)} (default: all but torch's; "
                             "the torch floor of each optimizer always runs; the ones that cannot run here are "
                             "listed as skipped with the reason)")
    parser.add_argument("--sets", type=_csv, default=None,
                        help=f"comma-separated parameter sets, from {','.join(sets)} "
                             f"(default on cpu: {','.join(DEFAULT_SETS['cpu'])}; "
                             f"on cuda: {','.join(DEFAULT_SETS['cuda'])})")
    parser.add_argument("--dtype", type=_csv, default=["float32"],
                        help="comma-separated parameter dtypes: float32, bfloat16, float16 (default: float32)")
    parser.add_argument("--state-dtypes", type=_csv, default=["float32"],
                        help="comma-separated dtypes of our optimizers' state: float32, bfloat16; each of our backends "
                             "runs once per state dtype, in the same rounds (default: float32)")
    parser.add_argument("--rounding", type=_csv, default=["stochastic"],
                        help="comma-separated: how bfloat16 state is stored, stochastic and/or nearest; each one a "
                             "contender (default: stochastic)")
    parser.add_argument("--kahan", type=_csv, default=["off"],
                        help="comma-separated off and/or on: on adds contenders with a bfloat16 Kahan compensation "
                             "of the weights (bfloat16 parameters only; skipped with the reason for others) "
                             "(default: off)")
    parser.add_argument("--bytes-table", action="store_true",
                        help="print the byte model's bytes per parameter for every configuration and exit")
    parser.add_argument("--grads", type=_csv, default=["same"],
                        help="comma-separated: same (the gradient tensors stay from step to step) and/or new (new "
                             "gradient tensors before every step, as after zero_grad(set_to_none=True) and "
                             "backward; made outside the timed region) (default: same)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default: 3)")
    parser.add_argument("--compile-sets", type=_csv, default=["resnet50"],
                        help="sets on which foreach+compile runs, each compile costing tens of seconds "
                             "(default: resnet50; '' for none)")
    parser.add_argument("--time-budget", type=float, default=float("inf"),
                        help="seconds after which cases not yet started are skipped (default: none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 keeps CPU numbers steady "
                             "on a machine shared with other work")
    parser.add_argument("--training", action="store_true",
                        help="time whole training iterations (forward, backward, step) of real models instead: "
                             "torch's fused optimizer, ours, ours with the step inside backward (bench/training.py); "
                             "uses --device, --optimizers, --steps (rounds), --warmup, --threads, --out")
    parser.add_argument("--workloads", type=_csv, default=None,
                        help="with --training: resnet18-32px, bert6-512, tiny (default: resnet18-32px,bert6-512)")
    parser.add_argument("--profile", action="store_true",
                        help="with --training: also profile one iteration inside backward and one after it, and count "
                             "the optimizer's kernels that run before backward's last kernel ends (traces in --out)")
    parser.add_argument("--bucket-mb", type=float, default=25.0,
                        help="with --training: bucket size of the step inside backward, MiB (default: 25)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"),
                        help="folder for results.json, summary.md, step_time.png (default: bench/out)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.sets is None:
        args.sets = list(DEFAULT_SETS[args.device.type])
    for option, chosen, known in (("--sets", args.sets, sets), ("--backends", args.backends, table),
                                  ("--optimizers", args.optimizers, harness.OPTIMIZERS)):
        unknown = [name for name in chosen if name not in known]
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    unknown = [name for name in args.grads if name not in harness.GRADS]
    if unknown or not args.grads:
        parser.error(f"--grads: {', '.join(unknown) or 'empty'} (known: {', '.join(harness.GRADS)})")
    for name in args.dtype:
        if not isinstance(getattr(torch, name, None), torch.dtype) or not getattr(torch, name).is_floating_point:
            parser.error(f"--dtype: {name} is not a floating-point torch dtype")
    for option, chosen, known in (("--state-dtypes", args.state_dtypes, ("float32", "bfloat16")),
                                  ("--rounding", args.rounding, ("stochastic", "nearest")),
                                  ("--kahan", args.kahan, ("off", "on"))):
        unknown = [name for name in chosen if name not in known]
        if unknown or not chosen:
            parser.error(f"{option}: {', '.join(unknown) or 'empty'} (known: {', '.join(known)})")
    args.storages = harness.storages(args.state_dtypes, args.rounding, [k == "on" for k in args.kahan])
    if args.steps < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--steps and --threads must be >= 1, --warmup >= 0")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bytes_table:
        print(report.bytes_table())
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.training:
        from . import training

        return training.main(args)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = harness.environment(args.device)
    meta.update(dtypes=args.dtype, grads=args.grads, steps=args.steps, warmup=args.warmup,
                argv=sys.argv[1:] if argv is None else argv,
                load_average_at_start=os.getloadavg()[0])  # other work on a shared machine slows every contender
    if args.storages != [harness.FLOAT32_STATE]:
        meta.update(state_dtypes=args.state_dtypes, rounding=args.rounding, kahan=args.kahan,
                    rounding_seed=harness.STORAGE_SEED)
    json_path = args.out / "results.json"
    config = harness.RunConfig(
        device=args.device, sets=[all_sets()[name] for name in args.sets], optimizers=args.optimizers,
        contenders=args.backends, dtypes=[getattr(torch, name) for name in args.dtype], warmup=args.warmup,
        steps=args.steps, compile_sets=set(args.compile_sets), time_budget_s=args.time_budget,
        grads=tuple(args.grads), storages=tuple(args.storages),
        # Written after every case, so a run killed by an outer timeout still leaves its numbers.
        on_case=lambda partial: report.write_json(json_path, partial, {**meta, "partial": True}),
    )
    run = harness.run(config)
    meta["load_average_at_end"] = os.getloadavg()[0]
    report.write_json(json_path, run, meta)
    (args.out / "summary.md").write_text(report.markdown(run, meta))
    print(report.text_table(run))
    why_no_plot = report.plot(args.out / "step_time.png", run)
    print(f"\nwrote {json_path}, {args.out / 'summary.md'}"
          + (f"\n{why_no_plot}" if why_no_plot else f", {args.out / 'step_time.png'}"))
    print("\n" + "\n".join(report.headline_lines(run)))  # the run ends with its headline
    return 0


if __name__ == "__main__":
    sys.exit(main())
