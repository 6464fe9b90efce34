"""The benchmark harness's own logic (bench/): parameter sets, byte model, ratios, the eager baseline's math,
and a tiny end-to-end run of ``python -m bench``. Fast enough for the default suite."""

import json

import pytest
import torch

from bench import __main__ as cli
from bench import byte_model, harness
from bench.eager_loop import EagerLoopLAMB, EagerLoopLARS
from bench.param_sets import all_sets, bert_large_shapes, resnet50_shapes
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


@pytest.mark.parametrize("optimizer,dtype,expected", [
    ("lars", torch.float32, 28), ("tvlars", torch.float32, 28), ("tvlars", torch.bfloat16, 18),
    ("lamb", torch.float32, 40), ("lamb", torch.float16, 32), ("sgd", torch.float32, 20),
    ("sgd", torch.bfloat16, 10),
])
def test_byte_model(optimizer, dtype, expected):
    assert byte_model.bytes_per_param(optimizer, dtype) == expected
    assert byte_model.bytes_per_step(optimizer, dtype, 1000) == 1000 * expected


def test_copy_bytes_count_read_and_write():
    assert byte_model.copy_bytes(10) == 80
    assert byte_model.copy_bytes(10, torch.bfloat16) == 40


def test_ratios():
    def record(optimizer, contender, median_ms):
        return dict(set="s", dtype="float32", optimizer=optimizer, contender=contender, median_ms=median_ms,
                    bytes_per_step=2_000_000)

    results = [record("sgd", "sgd-foreach", 1.0), record("lars", "eager-loop", 8.0), record("lars", "foreach", 2.0)]
    harness.add_ratios(results, copy_bandwidth_bps=4e9, sgd_floor="sgd-foreach")
    foreach = results[2]
    assert foreach["speedup_vs_eager"] == pytest.approx(4.0)
    assert foreach["ratio_to_sgd"] == pytest.approx(2.0)
    assert foreach["achieved_GBps"] == pytest.approx(1.0)  # 2 MB in 2 ms
    assert foreach["fraction_of_copy_bandwidth"] == pytest.approx(0.25)
    assert results[0]["speedup_vs_eager"] is None  # SGD has no eager loop of its own


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


def test_tiny_run_writes_table_json_and_summary(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--sets", "tiny", "--optimizers", "lars", "--backends", "eager-loop,foreach,triton,sgd-foreach",
                     "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny (5 tensors" in printed and "eager-loop" in printed and "28 B/param" in printed

    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["device"] == "cpu" and "partial" not in data["meta"]
    rows = {(r["optimizer"], r["contender"]): r for r in data["results"]}
    assert set(rows) == {("sgd", "sgd-foreach"), ("lars", "eager-loop"), ("lars", "foreach")}
    foreach = rows["lars", "foreach"]
    assert foreach["steps"] == 2 and foreach["numel"] == 2410 and foreach["bytes_per_step"] == 2410 * 28
    assert foreach["min_ms"] <= foreach["median_ms"] <= foreach["max_ms"]
    assert foreach["speedup_vs_eager"] == pytest.approx(rows["lars", "eager-loop"]["median_ms"] / foreach["median_ms"])
    assert foreach["ratio_to_sgd"] is not None and foreach["device_ops_per_step"] is None
    assert rows["lars", "eager-loop"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert foreach["speedup_vs_foreach"] == pytest.approx(1.0)
    assert rows["lars", "eager-loop"]["speedup_vs_foreach"] == pytest.approx(
        foreach["median_ms"] / rows["lars", "eager-loop"]["median_ms"])
    assert [s["contender"] for s in data["skipped"]] == ["triton"]  # the Triton interpreter is not timed
    assert (out / "summary.md").read_text().startswith("# Optimizer step benchmark, cpu")


def test_time_budget_skips_cases_not_yet_started(tmp_path):
    config = harness.RunConfig(device=torch.device("cpu"), sets=[all_sets()["tiny"]], optimizers=["lars"],
                               contenders=["foreach"], dtypes=[torch.float32], warmup=0, steps=1,
                               compile_sets=set(), time_budget_s=-1.0)
    run = harness.run(config)
    assert run["results"] == []
    assert [s["reason"] for s in run["skipped"]] == ["time budget of -1 s spent before this case"]


def test_contenders_are_timed_in_interleaved_rounds_and_a_failure_is_reported(monkeypatch):
    calls = []

    def fake(name, fails=False):
        def build(optimizer, params):
            def step():
                if fails and calls.count(name) >= 1:
                    raise RuntimeError("kernel exploded")
                calls.append(name)
            return step
        return harness.Contender(name, "ours", ("lars",), build, lambda optimizer, device: None)

    table = {c.name: c for c in (fake("a"), fake("b"), fake("c", fails=True))}
    monkeypatch.setattr(harness, "contenders", lambda: table)
    monkeypatch.setattr(harness, "copy_bandwidth", lambda device, numel: 1e9)
    config = harness.RunConfig(device=torch.device("cpu"), sets=[all_sets()["tiny"]], optimizers=["lars"],
                               contenders=["a", "b", "c"], dtypes=[torch.float32], warmup=1, steps=3,
                               compile_sets=set(), time_budget_s=60)
    run = harness.run(config)
    # first step and one warm-up each, then one step of each per round: a load that comes and goes hits both
    assert calls == ["a", "a", "b", "b", "c"] + ["a", "b"] * 3
    assert [r["contender"] for r in run["results"]] == ["a", "b"]
    assert [(s["contender"], s["reason"]) for s in run["skipped"]] == [("c", "failed: RuntimeError: kernel exploded")]


def test_memory_check_counts_weights_once(monkeypatch):
    monkeypatch.setattr(harness, "_available_bytes", lambda device: 30 * 2**30)
    big, cpu = all_sets()["few-huge-1G"], torch.device("cpu")
    # fresh: 1 Gi params x (8 weights+grads + 8 state + 12 temporaries) = 28 GiB, too much with the 20% margin
    assert harness.does_not_fit(big, torch.float32, cpu, contenders=1) is not None
    # weights and gradients already made (they are in the 30 GiB that is no longer free): 20 GiB more fits
    assert harness.does_not_fit(big, torch.float32, cpu, contenders=1, params_made=True) is None
    assert harness.does_not_fit(big, torch.float32, cpu, contenders=2, params_made=True) is not None
