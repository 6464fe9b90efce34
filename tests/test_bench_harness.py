"""The benchmark harness's own logic (bench/): parameter sets, byte model, ratios, the eager baseline's math,
and a tiny end-to-end run of ``python -m bench``. Fast enough for the default suite."""

import json
import statistics

import pytest
import torch

from bench import __main__ as cli
from bench import byte_model, harness, report
from bench.eager_loop import EagerLoopLAMB, EagerLoopLARS
from bench.param_sets import DEFAULT_SETS, all_sets, bert_large_shapes, resnet50_shapes
from tvlars_fused import LAMB, LARS, TVLARS


def test_resnet50_set_is_torchvision_resnet50():
    sets = all_sets()
    assert sets["resnet50"].num_tensors == 161
    assert sets["resnet50"].numel == 25_557_032
    assert resnet50_shapes()[:4] == [(64, 3, 7, 7), (64,), (64,), (64, 64, 1, 1)]
    assert resnet50_shapes()[-2:] == [(1000, 2048), (1000,)]


def test_resnet50_shapes_match_timm_model():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):  # shapes only, no memory
        model = timm.create_model("resnet50")
    assert [tuple(p.shape) for p in model.parameters()] == resnet50_shapes()


def test_bert_large_set():
    shapes = bert_large_shapes()
    assert len(shapes) == 391  # 5 embedding tensors + 24 layers x 16 + pooler weight and bias
    assert all_sets()["bert-large"].numel == 335_141_888  # Hugging Face's BertModel, bert-large-uncased


def test_synthetic_sets_have_their_totals():
    sets = all_sets()
    assert sets["many-tiny-1M"].numel == 2**20 and sets["many-tiny-1M"].num_tensors == 256
    assert sets["few-huge-1G"].numel == 2**30 and sets["few-huge-1G"].num_tensors == 4


def test_host_overhead_set_is_2000_one_element_layers_and_runs_by_default():
    overhead = all_sets()["many-tiny-2000x1"]
    assert overhead.num_tensors == 2000 and overhead.numel == 2000
    assert all(len(shape) == 2 for shape in overhead.shapes)  # 2-D: not excluded from the trust ratio
    assert "many-tiny-2000x1" in DEFAULT_SETS["cpu"] and "many-tiny-2000x1" in DEFAULT_SETS["cuda"]


@pytest.mark.parametrize("optimizer,dtype,expected", [
    ("lars", torch.float32, 28), ("tvlars", torch.float32, 28), ("tvlars", torch.bfloat16, 18),
    ("lamb", torch.float32, 40), ("lamb", torch.float16, 32), ("sgd", torch.float32, 20),
    ("sgd", torch.bfloat16, 10), ("adamw", torch.float32, 28), ("adamw", torch.bfloat16, 14),
])
def test_byte_model(optimizer, dtype, expected):
    assert byte_model.bytes_per_param(optimizer, dtype) == expected
    assert byte_model.bytes_per_step(optimizer, dtype, 1000) == 1000 * expected


@pytest.mark.parametrize("optimizer,dtype,expected", [
    ("lars", torch.float32, 12), ("lamb", torch.float32, 16), ("sgd", torch.bfloat16, 6), ("adamw", torch.float32, 16),
])
def test_footprint_is_weights_gradients_and_state(optimizer, dtype, expected):
    assert byte_model.footprint_bytes(optimizer, dtype, 10) == 10 * expected


def test_yardstick_bytes_count_two_reads_and_one_write():
    assert byte_model.yardstick_bytes(10) == 120


def test_yardstick_arrays_are_well_past_the_last_level_cache(monkeypatch):
    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda device: 2**20)
    assert harness.make_yardstick(torch.device("cpu")).bytes == byte_model.yardstick_bytes(2**24)  # the least
    monkeypatch.setattr(harness, "last_level_cache_bytes", lambda device: 2**25)
    yardstick = harness.make_yardstick(torch.device("cpu"))
    assert yardstick.bytes == byte_model.yardstick_bytes(2**25)  # each float32 array 4x the cache
    assert "32 MiB last-level cache" in yardstick.description


def _record(optimizer, contender, median_ms, floor, grads="same", kind="ours", footprint_bytes=10**9):
    return dict(set="s", dtype="float32", grads=grads, optimizer=optimizer, contender=contender, kind=kind,
                median_ms=median_ms, round_ms=[median_ms], bytes_per_step=2_000_000, footprint_bytes=footprint_bytes, floor=floor,
                yardstick_GBps=4.0, num_tensors=2, numel=10**5)


def test_ratios_are_against_the_floor_of_the_same_rounds():
    results = [_record("lars", "sgd-fused", 1.0, "sgd-fused", kind="torch"),
               _record("lars", "eager-loop", 8.0, "sgd-fused", kind="baseline"),
               _record("lars", "foreach", 2.0, "sgd-fused"),
               _record("lamb", "adamw-fused", 4.0, "adamw-fused", kind="torch"),
               _record("lamb", "foreach", 2.0, "adamw-fused"),
               _record("lars", "sgd-fused", 0.5, "sgd-fused", grads="new", kind="torch"),
               _record("lars", "foreach", 2.0, "sgd-fused", grads="new")]
    harness.add_ratios(results, cache_bytes=2**20)
    lars, lamb, lars_new = results[2], results[4], results[6]
    assert lars["speedup_vs_eager"] == pytest.approx(4.0)
    assert lars["ratio_to_floor"] == pytest.approx(2.0)  # SGD for the LARS family
    assert lamb["ratio_to_floor"] == pytest.approx(0.5)  # AdamW for LAMB
    assert lars_new["ratio_to_floor"] == pytest.approx(4.0)  # the floor timed with new gradients too
    assert lars["achieved_GBps"] == pytest.approx(1.0)  # 2 MB in 2 ms
    assert lars["fraction_of_yardstick"] == pytest.approx(0.25) and lars["share_note"] is None
    assert results[0]["ratio_to_floor"] == pytest.approx(1.0) and results[0]["speedup_vs_eager"] == pytest.approx(8.0)
    assert results[3]["speedup_vs_eager"] is None  # no eager loop in the LAMB rounds


@pytest.mark.parametrize("footprint,note", [
    (2**20, "data in cache"), (3 * 2**20, "data partly in cache"),
    (2**30, "above the yardstick in this run: a noisy machine?"),
])
def test_a_share_above_100_percent_always_has_its_reason(footprint, note):
    fast = _record("lars", "cpp", 0.1, "sgd-fused", footprint_bytes=footprint)  # 20 GB/s against a 4 GB/s yardstick
    harness.add_ratios([fast], cache_bytes=2**20)
    assert fast["fraction_of_yardstick"] == pytest.approx(5.0) and fast["share_note"] == note
    cells = report.text_table({"results": [fast], "skipped": [], "yardstick": {"description": "d"}})
    assert f"500% ({note})" in cells
    assert "500% (" in report.markdown({"results": [fast], "skipped": [], "yardstick": {"description": "d"},
                                        "headline": harness.headline([fast])}, _META)


_META = dict(device="cpu", date="d", device_name="n", git_commit="c", torch="t", triton="t", python="p",
             dtypes=["float32"], grads=["same"], warmup=1, steps=2, cpu_threads=2, backends={})


def test_headline_names_the_fastest_of_our_backends_with_both_ratios():
    results = [_record("lars", "eager-loop", 0.5, "sgd-fused", kind="baseline"),  # faster, but not ours
               _record("lars", "foreach", 4.0, "sgd-fused"), _record("lars", "cpp", 2.0, "sgd-fused"),
               _record("lars", "sgd-fused", 1.0, "sgd-fused", kind="torch"),
               _record("lamb", "cpp", 3.0, "adamw-fused"), _record("lamb", "triton", 6.0, "adamw-fused"),
               _record("lamb", "adamw-fused", 1.5, "adamw-fused", kind="torch")]
    harness.add_ratios(results, cache_bytes=None)
    lines = harness.headline(results)
    assert [(h["optimizer"], h["backend"]) for h in lines] == [("lars", "cpp"), ("lamb", "cpp")]
    assert lines[0]["speedup_vs_eager"] == pytest.approx(0.25) and lines[0]["ratio_to_floor"] == pytest.approx(2.0)
    assert lines[1]["speedup_vs_eager"] is None and lines[1]["ratio_to_floor"] == pytest.approx(2.0)
    text = report.headline_lines({"headline": lines})
    assert text[1] == "  s float32 lars: cpp 2.000 ms, x eager 0.25, / floor (sgd-fused) 2.00"
    assert text[2] == "  s float32 lamb: cpp 3.000 ms, x eager n/a, / floor (adamw-fused) 2.00"


def _stepped(opt_cls, kwargs, steps=3):
    gen = torch.Generator().manual_seed(1)
    shapes = [(8, 4, 3, 3), (16,), (33, 7), (5,)]
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    opt = opt_cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("name,ours,eager", [
    ("tvlars", (TVLARS, harness.HYPER["tvlars"]), (EagerLoopLARS, harness.HYPER["tvlars"])),
    ("lars", (LARS, harness.HYPER["lars"]), (EagerLoopLARS, harness.HYPER["lars"])),
    ("lamb", (LAMB, harness.HYPER["lamb"]), (EagerLoopLAMB, harness.HYPER["lamb"])),
])
def test_eager_loop_computes_what_we_compute(name, ours, eager):
    """The speed-up against the eager loop compares implementations of one algorithm, not two algorithms."""
    ours_cls, ours_kwargs = ours
    expected = _stepped(ours_cls, dict(ours_kwargs, backend="reference"))
    got = _stepped(*eager)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_a_set_too_big_for_memory_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(harness, "_available_bytes", lambda device: 4 * 2**30)
    reason = harness.does_not_fit(all_sets()["bert-large"], torch.float32, torch.device("cpu"), contenders=1)
    assert reason is not None and "GiB" in reason
    assert harness.does_not_fit(all_sets()["resnet50"], torch.float32, torch.device("cpu"), contenders=6) is None


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        cli.parse_args(["--sets", "resnet51"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--backends", "foreach,fastest"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--grads", "same,fresh"])
    assert cli.parse_args(["--grads", "new,same"]).grads == ["new", "same"]


def test_tiny_run_writes_table_json_and_summary(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--sets", "tiny", "--optimizers", "lars", "--backends", "eager-loop,foreach,triton",
                     "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny (5 tensors, 2410 params)" in printed and "eager-loop" in printed and "28 B/param" in printed
    assert "sgd-fused (floor)" in printed and "dev ops" not in printed  # all n/a on the CPU: left out
    assert printed.rstrip().splitlines()[-1].startswith("  tiny float32 lars: ")  # the run ends with the headline

    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["device"] == "cpu" and "partial" not in data["meta"]
    rows = {(r["optimizer"], r["contender"]): r for r in data["results"]}
    assert set(rows) == {("lars", "eager-loop"), ("lars", "foreach"), ("lars", "sgd-fused")}  # the floor always runs
    foreach, floor = rows["lars", "foreach"], rows["lars", "sgd-fused"]
    assert foreach["steps"] == 2 and foreach["numel"] == 2410 and foreach["bytes_per_step"] == 2410 * 28
    assert floor["steps"] == 2 and floor["bytes_per_step"] == 2410 * 20 and floor["floor"] == "sgd-fused"
    assert foreach["min_ms"] <= foreach["median_ms"] <= foreach["max_ms"]
    eager = rows["lars", "eager-loop"]

    def per_round(numerator, denominator):  # two rounds: the median of the two ratios is their mean
        return sum(a / b for a, b in zip(numerator["round_ms"], denominator["round_ms"])) / 2

    assert len(foreach["round_ms"]) == 2 and statistics.median(foreach["round_ms"]) == foreach["median_ms"]
    assert foreach["speedup_vs_eager"] == pytest.approx(per_round(eager, foreach))
    assert foreach["ratio_to_floor"] == pytest.approx(per_round(foreach, floor))
    low, high = sorted(a / b for a, b in zip(foreach["round_ms"], floor["round_ms"]))
    assert foreach["ratio_to_floor_quartiles"] == pytest.approx([low + (high - low) / 4, low + 3 * (high - low) / 4])
    assert foreach["device_ops_per_step"] is None
    assert eager["speedup_vs_eager"] == pytest.approx(1.0)
    assert foreach["speedup_vs_foreach"] == pytest.approx(1.0)
    assert eager["speedup_vs_foreach"] == pytest.approx(per_round(foreach, eager))
    assert all(r["share_note"] for r in data["results"] if r["fraction_of_yardstick"] > 1)
    assert data["headline"][0]["backend"] == "foreach" and data["headline"][0]["floor"] == "sgd-fused"
    assert [s["contender"] for s in data["skipped"]] == ["triton"]  # the Triton interpreter is not timed
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Optimizer step benchmark, cpu") and "## Headline" in summary


def test_time_budget_skips_cases_not_yet_started(tmp_path):
    config = harness.RunConfig(device=torch.device("cpu"), sets=[all_sets()["tiny"]], optimizers=["lars"],
                               contenders=["foreach"], dtypes=[torch.float32], warmup=0, steps=1,
                               compile_sets=set(), time_budget_s=-1.0)
    run = harness.run(config)
    assert run["results"] == []
    assert [(s["contender"], s["reason"]) for s in run["skipped"]] == [
        (name, "time budget of -1 s spent before this case") for name in ("foreach", "sgd-fused")]


class _FakeClock:
    """Stands in for perf_counter: time moves only when a fake step says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_table(calls, clock, durations, fails=()):
    """Fake contenders a, b, c and a fake floor sgd-fused; each call of a step is logged, and moves the clock by
    the next of its durations (the first step and the warm-up step included)."""

    def fake(name, kind="ours"):
        def build(optimizer, params):
            def step():
                if name in fails and calls.count(name) >= 1:
                    raise RuntimeError("kernel exploded")
                calls.append(name)
                clock.now += durations[name].pop(0)
            return step
        return harness.Contender(name, kind, ("lars",), build, lambda optimizer, device: None,
                                 "sgd" if kind == "torch" else None)

    return {c.name: c for c in (fake("a"), fake("b"), fake("c"), fake("sgd-fused", "torch"))}


def _fake_yardstick(calls, clock):
    def step():
        calls.append("yardstick")
        clock.now += 2.0

    return harness.Yardstick(step, bytes=8e9, description="fake", cache_bytes=None)


def test_floor_and_yardstick_are_interleaved_with_the_contenders_and_share_their_statistic(monkeypatch):
    calls, clock = [], _FakeClock()
    durations = {"a": [0, 0, 1.0, 5.0, 2.0], "b": [0, 0, 4.0, 4.0, 4.0], "c": [0],
                 "sgd-fused": [0, 0, 3.0, 30.0, 1.0]}
    table = _fake_table(calls, clock, durations, fails=("c",))
    monkeypatch.setattr(harness, "contenders", lambda: table)
    monkeypatch.setattr(harness, "make_yardstick", lambda device: _fake_yardstick(calls, clock))
    monkeypatch.setattr(harness, "_clock", clock)
    config = harness.RunConfig(device=torch.device("cpu"), sets=[all_sets()["tiny"]], optimizers=["lars"],
                               contenders=["a", "b", "c"], dtypes=[torch.float32], warmup=1, steps=3,
                               compile_sets=set(), time_budget_s=60)
    run = harness.run(config)
    # First step and one warm-up each (c fails in its warm-up), then rounds of one step each, the floor among
    # them, the yardstick closing each round; the order rotates so that no one always follows the yardstick.
    assert calls == ["a", "a", "b", "b", "c", "sgd-fused", "sgd-fused",
                     "a", "b", "sgd-fused", "yardstick", "b", "sgd-fused", "a", "yardstick",
                     "sgd-fused", "a", "b", "yardstick"]
    records = {r["contender"]: r for r in run["results"]}
    assert list(records) == ["a", "b", "sgd-fused"]
    assert records["a"]["median_ms"] == pytest.approx(2000) and records["sgd-fused"]["median_ms"] == pytest.approx(3000)
    # Ratios within each round (1/3, 5/30, 2/1), then their median and quartiles: the slow second round slowed
    # both a and the floor, and its ratio is as good as the others (the ratio of medians would be 2/3).
    assert records["a"]["ratio_to_floor"] == pytest.approx(1 / 3)
    assert records["a"]["ratio_to_floor_quartiles"] == pytest.approx([0.25, (1 / 3 + 2) / 2])
    assert records["a"]["round_ms"] == pytest.approx([1000, 5000, 2000])
    assert records["a"]["yardstick_GBps"] == pytest.approx(4.0)  # 8 GB in a median of 2 s
    assert records["sgd-fused"]["bytes_per_step"] == 2410 * 20  # the floor's own byte model
    assert [(s["contender"], s["reason"]) for s in run["skipped"]] == [("c", "failed: RuntimeError: kernel exploded")]


def test_new_grads_are_new_tensors_made_before_each_step_outside_the_timed_region(monkeypatch):
    events, clock = [], _FakeClock()
    seen = []

    def build(optimizer, params):
        def step():
            events.append("step")
            seen.append(params[0].grad)  # kept alive, so that no id is reused
        return step

    table = {"a": harness.Contender("a", "ours", ("lars",), build, lambda optimizer, device: None),
             "sgd-fused": harness.Contender("sgd-fused", "torch", ("lars",), build, lambda o, d: None, "sgd")}
    renew = harness.renew_grads
    monkeypatch.setattr(harness, "contenders", lambda: table)
    monkeypatch.setattr(harness, "make_yardstick", lambda device: _fake_yardstick([], clock))
    monkeypatch.setattr(harness, "_clock", lambda: events.append("clock") or clock())
    monkeypatch.setattr(harness, "renew_grads", lambda params, grads: events.append("renew") or renew(params, grads))
    params = harness.make_params(all_sets()["tiny"], torch.float32, torch.device("cpu"))
    originals = [p.grad for p in params]
    monkeypatch.setattr(harness, "make_params", lambda *args: params)
    config = harness.RunConfig(device=torch.device("cpu"), sets=[all_sets()["tiny"]], optimizers=["lars"],
                               contenders=["a"], dtypes=[torch.float32], warmup=1, steps=2, compile_sets=set(),
                               time_budget_s=60, grads=("new",))
    run = harness.run(config)
    # first step and warm-up of a and the floor, then 2 rounds of (a, floor, the yardstick: no new gradients)
    assert events == ["renew", "step"] * 4 + (["renew", "clock", "step", "clock"] * 2 + ["clock", "clock"]) * 2
    assert len({id(g) for g in seen}) == len(seen) == 8
    assert all(torch.equal(g, originals[0]) for g in seen)  # new tensors, the same values
    assert [p.grad for p in params] == originals  # the set's own gradients are back for the next case
    assert {r["grads"] for r in run["results"]} == {"new"}


def test_progress_line_says_when_it_compiles_and_warnings_wait_for_its_end(monkeypatch, capsys):
    import warnings

    def build(optimizer, params):
        def step():
            warnings.warn("a CPU-only fallback", UserWarning)
        return step

    table = {"foreach+compile": harness.Contender("foreach+compile", "compiled", ("lars",), build, lambda o, d: None),
             "sgd-fused": harness.Contender("sgd-fused", "torch", ("lars",), build, lambda o, d: None, "sgd")}
    monkeypatch.setattr(harness, "contenders", lambda: table)
    monkeypatch.setattr(harness, "make_yardstick", lambda device: _fake_yardstick([], _FakeClock()))
    config = harness.RunConfig(device=torch.device("cpu"), sets=[all_sets()["tiny"]], optimizers=["lars"],
                               contenders=["foreach+compile"], dtypes=[torch.float32], warmup=0, steps=1,
                               compile_sets={"tiny"}, time_budget_s=60)
    harness.run(config)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[  1/1] tiny float32 lars: compiling foreach+compile ... (first step)"
    assert lines[1].startswith("[  1/1] tiny float32 lars: foreach+compile ") and "(first step " in lines[1]
    assert "sgd-fused (floor)" in lines[1] and "yardstick" in lines[1]
    assert lines[2:] == ["  warning: UserWarning: a CPU-only fallback"]


def test_memory_check_counts_weights_once(monkeypatch):
    monkeypatch.setattr(harness, "_available_bytes", lambda device: 30 * 2**30)
    big, cpu = all_sets()["few-huge-1G"], torch.device("cpu")
    # fresh: 1 Gi params x (8 weights+grads + 8 state + 12 temporaries) = 28 GiB, too much with the 20% margin
    assert harness.does_not_fit(big, torch.float32, cpu, contenders=1) is not None
    # weights and gradients already made (they are in the 30 GiB that is no longer free): 20 GiB more fits
    assert harness.does_not_fit(big, torch.float32, cpu, contenders=1, params_made=True) is None
    assert harness.does_not_fit(big, torch.float32, cpu, contenders=2, params_made=True) is not None


def test_pytest_benchmark_cases_include_each_optimizers_floor_and_the_overhead_set():
    from bench import test_bench_steps

    assert ("many-tiny-2000x1", "tvlars", "sgd-fused") in test_bench_steps.CASES
    assert ("many-tiny-2000x1", "lamb", "adamw-fused") in test_bench_steps.CASES
    assert ("many-tiny-2000x1", "lamb", "sgd-fused") not in test_bench_steps.CASES


def test_ratios_are_taken_within_rounds_and_printed_with_their_quartiles():
    # Rounds 4 and 5 were slowed for both sides: their ratios (2.0) are as good as the others', while the ratio of
    # the medians (3 / 1) would be 3.0.
    assert harness.paired_ratio([1.0, 2.0, 3.0, 40.0, 50.0], [1.0, 1.0, 1.0, 20.0, 25.0]) == pytest.approx((2, 2, 2))
    median, q1, q3 = harness.paired_ratio([1.0, 3.0, 2.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert (median, q1, q3) == pytest.approx((3.0, 2.0, 4.0))
    assert harness.paired_ratio([1.0], [0.0]) is None and harness.paired_ratio(None, [1.0]) is None
    ours = _record("lars", "cpp", 3.0, "sgd-fused") | {"round_ms": [1.0, 3.0, 2.0, 4.0, 5.0]}
    floor = _record("lars", "sgd-fused", 1.0, "sgd-fused", kind="torch") | {"round_ms": [1.0] * 5}
    harness.add_ratios([ours, floor], cache_bytes=None)
    assert ours["ratio_to_floor_quartiles"] == pytest.approx([2.0, 4.0])
    assert "3.00 (2.00-4.00)" in report.text_table({"results": [ours, floor], "skipped": [],
                                                    "yardstick": {"description": "d"}})
    line = report.headline_lines({"headline": harness.headline([ours, floor])})[1]
    assert line.endswith("/ floor (sgd-fused) 3.00 (2.00-4.00)")
