"""The benchmark's storage options (--state-dtypes, --rounding, --kahan, --bytes-table): the byte model's bfloat16
state, Kahan and master rows, our contenders built with the storage they are named for, and what the report shows.
Fast: a tiny set, foreach and reference only."""

import json

import pytest
import torch

from bench import __main__ as cli
from bench import byte_model, harness, report
from bench.param_sets import all_sets

BF16 = harness.Storage(torch.bfloat16)
BF16_NEAREST = harness.Storage(torch.bfloat16, "nearest")


@pytest.mark.parametrize("optimizer,dtype,state,weights,expected", [
    # LARS: 2 passes, (w + g) + (w + g + buf in, w + buf out)
    ("lars", torch.float32, torch.float32, "plain", 28), ("lars", torch.float32, torch.bfloat16, "plain", 24),
    ("tvlars", torch.bfloat16, torch.float32, "plain", 18), ("lars", torch.bfloat16, torch.bfloat16, "plain", 14),
    ("lars", torch.bfloat16, torch.float32, "master", 26), ("lars", torch.bfloat16, torch.bfloat16, "master", 22),
    ("lars", torch.bfloat16, torch.float32, "kahan", 24), ("lars", torch.bfloat16, torch.bfloat16, "kahan", 20),
    # LAMB: (w + g + m, v in and out) + (w + m + v in, w out)
    ("lamb", torch.float32, torch.float32, "plain", 40), ("lamb", torch.float32, torch.bfloat16, "plain", 28),
    ("lamb", torch.bfloat16, torch.float32, "plain", 32), ("lamb", torch.bfloat16, torch.bfloat16, "plain", 20),
    ("lamb", torch.float16, torch.float32, "master", 40), ("lamb", torch.bfloat16, torch.bfloat16, "master", 28),
    ("lamb", torch.bfloat16, torch.float32, "kahan", 38), ("lamb", torch.bfloat16, torch.bfloat16, "kahan", 26),
])
def test_byte_model_counts_state_dtype_masters_and_compensation(optimizer, dtype, state, weights, expected):
    flags = dict(kahan=weights == "kahan", master=weights == "master")
    assert byte_model.bytes_per_param(optimizer, dtype, state, **flags) == expected
    assert byte_model.bytes_per_step(optimizer, dtype, 10, state, **flags) == 10 * expected


def test_footprint_counts_state_dtype_masters_and_compensation():
    assert byte_model.footprint_bytes("lars", torch.float32, 10, torch.bfloat16) == 10 * (4 + 4 + 2)
    assert byte_model.footprint_bytes("lamb", torch.bfloat16, 10, torch.bfloat16, kahan=True) == 10 * (2 + 2 + 2 + 4)
    assert byte_model.footprint_bytes("lars", torch.bfloat16, 10, master=True) == 10 * (2 + 2 + 4 + 4)


@pytest.mark.parametrize("call,match", [
    (lambda: byte_model.bytes_per_param("sgd", torch.float32, torch.bfloat16), "torch's state"),
    (lambda: byte_model.bytes_per_param("lars", torch.float32, kahan=True), "kahan needs bfloat16"),
    (lambda: byte_model.bytes_per_param("lars", torch.float32, master=True), "master weights are for"),
    (lambda: byte_model.bytes_per_param("lars", torch.bfloat16, kahan=True, master=True), "one or the other"),
    (lambda: byte_model.bytes_per_param("lamb", torch.float32, torch.float16), "float32 or bfloat16"),
])
def test_byte_model_refuses_what_the_optimizers_refuse(call, match):
    with pytest.raises(ValueError, match=match):
        call()


class _FakeBucket:
    """What the Triton backend's element_bytes reads of a bucket."""

    def __init__(self, optimizer, dtype, state_dtype, weights):
        self.params = [torch.empty(1, dtype=dtype)]
        self.states = [[torch.empty(1, dtype=state_dtype)]] * (2 if optimizer == "lamb" else 1)
        self.comps = [torch.empty(1, dtype=torch.bfloat16)] if weights == "kahan" else None
        self.masters = [torch.empty(1)] if weights == "master" else None


def test_byte_model_agrees_with_the_triton_backends_element_bytes():
    """Two models of one traffic, written apart: every configuration the table lists gives the same bytes."""
    try:
        from tvlars_fused import _triton_backend
    except Exception as exc:  # no triton in this environment
        pytest.skip(f"tvlars_fused._triton_backend not importable: {exc}")
    rows = [r for r in byte_model.configurations() if r["optimizer"] in ("lars", "lamb")]
    assert len(rows) == 24
    for r in rows:
        bucket = _FakeBucket(r["optimizer"], getattr(torch, r["param_dtype"]), getattr(torch, r["state_dtype"]),
                             r["weights"])
        assert _triton_backend.element_bytes(bucket) == r["bytes_per_param"], r


def test_bytes_table_lists_every_configuration(capsys):
    assert cli.main(["--bytes-table"]) == 0
    text = capsys.readouterr().out
    assert "| bfloat16 | bfloat16 | kahan | LARS, TVLARS | 20 | 8 |" in text
    assert "| float32 | bfloat16 | plain | LAMB | 28 | 12 |" in text
    assert "| float32 | float32 | plain | torch SGD momentum (floor) | 20 | 12 |" in text
    assert "| bfloat16 | bfloat16 | plain | torch AdamW (floor) | 14 | 8 |" in text
    assert "| float16 | float32 | kahan" not in text  # Kahan is for bfloat16 parameters only


def test_storages_expand_state_dtypes_roundings_and_kahan():
    assert harness.storages(["float32"], ["stochastic"], [False]) == [harness.FLOAT32_STATE]
    both = harness.storages(["float32", "bfloat16"], ["stochastic", "nearest"], [False, True])
    assert [s.suffix for s in both] == ["", "+kahan", "+bf16", "+bf16+kahan", "+bf16-nearest", "+bf16-nearest+kahan"]
    assert cli.parse_args([]).storages == [harness.FLOAT32_STATE]  # the default run is today's
    assert [s.suffix for s in cli.parse_args(["--state-dtypes", "bfloat16", "--rounding", "nearest"]).storages] == \
        ["+bf16-nearest"]
    for bad in (["--state-dtypes", "float16"], ["--rounding", "up"], ["--kahan", "yes"], ["--state-dtypes", ""]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


def test_default_groups_keep_their_contenders_and_storages_add_ours_only():
    config = harness.RunConfig(device=torch.device("cpu"), sets=[all_sets()["tiny"]], optimizers=["lars"],
                               contenders=["eager-loop", "foreach", "reference"], dtypes=[torch.float32], warmup=0,
                               steps=1, compile_sets=set(), time_budget_s=1.0)
    (*_, group), = harness._groups(config)
    assert [c.name for c in group] == ["eager-loop", "reference", "foreach", "sgd-fused"]
    config.storages = (harness.FLOAT32_STATE, BF16, BF16_NEAREST)
    (*_, group), = harness._groups(config)
    assert [c.name for c in group] == ["eager-loop", "reference", "reference+bf16", "reference+bf16-nearest",
                                       "foreach", "foreach+bf16", "foreach+bf16-nearest", "sgd-fused"]


@pytest.mark.parametrize("storage", [BF16, BF16_NEAREST])
@pytest.mark.parametrize("optimizer,keys", [("lars", ("momentum_buffer",)), ("lamb", ("exp_avg", "exp_avg_sq"))])
def test_a_storage_contender_keeps_the_state_it_is_named_for(storage, optimizer, keys):
    params = harness.make_params(all_sets()["tiny"], torch.float32, torch.device("cpu"))
    step = harness.with_storage(harness.contenders()["foreach"], storage).build(optimizer, params)
    step()
    opt = step.__self__
    group = opt.param_groups[0]
    assert (group["state_dtype"], group["rounding"], group["seed"]) == (torch.bfloat16, storage.rounding,
                                                                        harness.STORAGE_SEED)
    assert all(opt.state[p][k].dtype == torch.bfloat16 for p in params for k in keys)
    assert harness.stepped_by(step) == "foreach"


def test_stepped_by_names_the_backend_that_steps_the_buckets():
    params = harness.make_params(all_sets()["tiny"], torch.float32, torch.device("cpu"))
    assert harness.stepped_by(harness.contenders()["reference"].build("lamb", params)) == "reference"
    assert harness.stepped_by(harness.contenders()["sgd-fused"].build("lars", params)) is None  # torch's
    cpp = harness.contenders()["cpp"]
    if cpp.why_not("lars", torch.device("cpu")) is None:  # the cpp kernels step bfloat16 state themselves
        for storage in (BF16, BF16_NEAREST):
            assert harness.stepped_by(harness.with_storage(cpp, storage).build("lamb", params)) == "cpp"


def _record(contender, round_ms, backend=None, kind="ours", **storage):
    return dict(set="s", dtype="float32", grads="same", optimizer="lars", contender=contender, kind=kind,
                median_ms=sorted(round_ms)[len(round_ms) // 2], round_ms=round_ms, bytes_per_step=10**6,
                footprint_bytes=10**9, floor="sgd-fused", yardstick_GBps=4.0, num_tensors=2, numel=10**5,
                backend=backend, stepped_by=backend, state_dtype=storage.get("state_dtype", "float32"),
                rounding=storage.get("rounding"), kahan=storage.get("kahan", False))


def test_a_storage_is_compared_with_float32_state_of_its_backend_in_the_same_rounds():
    results = [_record("sgd-fused", [1.0, 2.0, 1.0], kind="torch", state_dtype=None),
               _record("cpp", [2.0, 4.0, 2.0], backend="cpp"),
               _record("cpp+bf16", [1.0, 3.0, 3.0], backend="cpp", state_dtype="bfloat16", rounding="stochastic"),
               _record("foreach+bf16", [9.0, 9.0, 9.0], backend="foreach", state_dtype="bfloat16",
                       rounding="stochastic")]
    harness.add_ratios(results, cache_bytes=None)
    sgd, cpp, bf16, foreach_bf16 = results
    assert bf16["ratio_to_float32_state"] == pytest.approx(0.75)  # median of 1/2, 3/4, 3/2
    assert bf16["ratio_to_floor"] == pytest.approx(1.5)  # median of 1, 1.5, 3
    assert cpp["ratio_to_float32_state"] is None and foreach_bf16["ratio_to_float32_state"] is None  # no pair
    lines = harness.headline(results)
    assert [(h["backend"], h["state_dtype"]) for h in lines] == [("cpp", "float32"), ("cpp+bf16", "bfloat16")]
    text = report.headline_lines({"headline": lines})
    assert text[2].startswith("  s float32 lars bf16-state: cpp+bf16 3.000 ms, x eager n/a, / floor (sgd-fused) 1.50")
    assert ", / f32 state 0.75 (" in text[2] and "stepped by" not in text[2]
    lines[1]["stepped_by"] = "foreach"  # a fused backend that handed its bucket on says so
    assert report.headline_lines({"headline": lines})[2].endswith("(stepped by foreach)")


def test_a_run_with_bf16_state_records_it_and_the_table_shows_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--sets", "tiny", "--optimizers", "lars,lamb", "--backends", "foreach", "--state-dtypes",
                     "float32,bfloat16", "--rounding", "stochastic,nearest", "--kahan", "off,on", "--steps", "2",
                     "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    ours = {(r["optimizer"], r["contender"]): r for r in data["results"] if r["kind"] == "ours"}
    assert set(ours) == {(o, c) for o in ("lars", "lamb") for c in ("foreach", "foreach+bf16", "foreach+bf16-nearest")}
    for (optimizer, name), r in ours.items():
        state = torch.bfloat16 if "bf16" in name else torch.float32
        assert r["bytes_per_step"] == byte_model.bytes_per_step(optimizer, torch.float32, r["numel"], state)
        assert r["stepped_by"] == "foreach" and r["backend"] == "foreach"
        assert (r["ratio_to_float32_state"] is None) == (name == "foreach")
        assert r["rounding"] == ("nearest" if "nearest" in name else "stochastic" if "bf16" in name else None)
    assert {(s["contender"], s["reason"]) for s in data["skipped"]} == {
        (f"foreach{suffix}+kahan", "kahan=True needs bfloat16 parameters") for suffix in ("", "+bf16", "+bf16-nearest")}
    assert data["meta"]["state_dtypes"] == ["float32", "bfloat16"] and data["meta"]["rounding_seed"] == 1234
    summary = (out / "summary.md").read_text()
    assert "| tiny float32 lamb bf16-state-nearest | foreach+bf16-nearest |" in summary
    assert "lars (28 B/param, 24 with bfloat16 state)" in summary
    assert "## Bytes per parameter" in summary and "/ f32 state" in summary
    printed = capsys.readouterr().out
    assert "stepped by" in printed and "/ f32 state" in printed


def test_the_default_table_gains_no_storage_columns(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--sets", "tiny", "--optimizers", "lars", "--backends", "foreach", "--steps", "1", "--warmup",
                     "0", "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "/ f32 state" not in summary and "stepped by" not in summary and "Bytes per parameter" not in summary
    assert "lars (28 B/param);" in summary
    record = next(r for r in json.loads((out / "results.json").read_text())["results"] if r["contender"] == "foreach")
    assert (record["state_dtype"], record["stepped_by"]) == ("float32", "foreach")
