"""The latency predictor: fitting, calibration, queries, errors; and the measure -> fit -> query ->
evaluate path end to end on a tiny space (real ONNX Runtime timings, few runs)."""

import json
import subprocess
import sys
import math

import pytest
import yaml

from archlab import cli
from archlab.config import ArchConfig
from archlab.cost import block_cost
from archlab.decompose import BlockSpec, decompose
from archlab.errors import ArchlabError
from archlab.latency.export import network_key
from archlab.latency.predictor import Predictor, fit, load_for_table, predictor_path
from archlab.latency.table import FIELDS, write_table
from conftest import ROOT, tiny_dict

RES = 8


def truth_ms(spec: BlockSpec) -> float:
    """A made-up device: per-call overhead plus linear in MACs and activations."""
    c = block_cost(spec)
    return 0.02 + 2e-6 * c.macs + 1e-4 * c.acts


def tiny_cfg(name="tiny", **over) -> ArchConfig:
    cfg = ArchConfig.from_dict(tiny_dict(name=name, latent=dict(channels=4, resolution=RES)))
    return cfg.with_values(over) if over else cfg


def write_synthetic(path, blocks, networks, device="synthetic-cpu", resolution=RES, slope=1.1, intercept=0.5):
    rows = []
    for s in blocks:
        ms = truth_ms(s)
        rows.append(dict(key=s.key, kind=s.kind, role="block", median_ms=ms, min_ms=ms, mean_ms=ms, cv=0.01, runs=5,
                         ref_ms=1.0, norm_ms=ms))
    for cfg in networks:
        ms = intercept + slope * sum(truth_ms(s) for s in decompose(cfg))
        rows.append(dict(key=network_key(cfg), kind="network", role="network", median_ms=ms, min_ms=ms, mean_ms=ms,
                         cv=0.01, runs=5, ref_ms=1.0, norm_ms=ms))
    meta = dict(device=device, threads=1, opt_level="all", ort_version="x", resolution=resolution, opset=20,
                bundle="b", reference_ms=1.0, networks={network_key(c): c.to_dict() for c in networks})
    write_table(path, meta, rows)
    return path


VARIANTS = [dict(), {"stages.*.ffn_ratio": 2}, {"stages.*.conv": "separable"}, {"stages.2.transformer_depth": 1},
            {"attention.qk_norm": True}, {"stages.*.expansion": 2, "stages.*.conv": "separable"}]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cfgs = [tiny_cfg(f"v{i}", **v) for i, v in enumerate(VARIANTS)]
    blocks = {s.signature: s for c in cfgs for s in decompose(c)}
    table = tmp_path_factory.mktemp("syn") / "syn.csv"
    write_synthetic(table, list(blocks.values()), cfgs[:4])
    return table, cfgs


def test_fit_recovers_blocks_and_calibration(synthetic):
    table, cfgs = synthetic
    pred = fit(table)
    assert pred.calibration.n == 4
    assert pred.calibration.slope == pytest.approx(1.1, rel=1e-6)
    assert pred.calibration.intercept_ms == pytest.approx(0.5, rel=1e-5)
    assert pred.calibration.raw_mape > 0.05  # the raw sum misses what calibration puts back
    for cfg in cfgs[4:]:  # networks the calibration never saw, all blocks measured
        p = pred.predict(cfg)
        truth = 0.5 + 1.1 * sum(truth_ms(s) for s in decompose(cfg))
        assert p.latency_ms == pytest.approx(truth, rel=1e-6)
        assert {b.source for b in p.blocks} == {"measured"} and not p.extrapolated
    assert pred.predict_many(cfgs[4:]) == pytest.approx([pred.predict(c).latency_ms for c in cfgs[4:]])
    # the kind models themselves fit the (linear) truth
    assert pred.kinds["res"].loo_mape < 0.02 and pred.kinds["transformer"].loo_mape < 0.02


def test_unmeasured_blocks_are_fitted_monotone_or_flagged_extrapolated(synthetic):
    table, _ = synthetic
    pred = fit(table)
    res = [s for s in decompose(tiny_cfg()) if s.kind == "res"][0]
    hp = dict(res.hp)
    inside = BlockSpec("res", tuple({**hp, "expansion": 3, "conv": "separable"}.items()), res.hw)  # not measured
    assert inside.key not in pred.measured
    ms, source = pred.block(inside)
    assert source == "fitted" and ms == pytest.approx(truth_ms(inside), rel=0.1)
    wide = BlockSpec("res", tuple({**hp, "cin": 256, "cout": 256}.items()), (32, 32))
    ms_wide, source = pred.block(wide)
    assert source == "extrapolated" and ms_wide > ms > 0
    # the same block written with its hyper-parameters in another order is the same block
    shuffled = BlockSpec("res", tuple(reversed(res.hp)), res.hw)
    assert pred.block(shuffled) == (pred.measured[res.key], "measured")


def test_blocks_the_predictor_cannot_cover_are_errors(synthetic):
    table, _ = synthetic
    pred = fit(table)
    with pytest.raises(ArchlabError, match="no 'conv3d' blocks"):
        pred.block(BlockSpec("conv3d", (("cin", 4),), (8, 8)))
    res = [s for s in decompose(tiny_cfg()) if s.kind == "res"][0]
    with pytest.raises(ArchlabError, match="missing expansion"):
        pred.block(BlockSpec("res", tuple((k, v) for k, v in res.hp if k != "expansion"), res.hw))
    with pytest.raises(ArchlabError, match="latent 16x16, but the table was measured at 8x8"):
        pred.predict(tiny_cfg().with_values({"latent.resolution": 16}))


def test_predictor_round_trips_as_json(synthetic, tmp_path):
    table, cfgs = synthetic
    pred = fit(table)
    path = pred.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["calibration"]["n"] == 4 and "res" in data["kinds"]
    again = Predictor.load(path)
    for cfg in cfgs:
        assert again.predict(cfg).latency_ms == pytest.approx(pred.predict(cfg).latency_ms, rel=1e-12)


def test_load_for_table_checks_device_and_staleness(synthetic, tmp_path):
    table, cfgs = synthetic
    copy = tmp_path / "t.csv"
    copy.write_text(table.read_text())
    copy.with_suffix(".meta.json").write_text(table.with_suffix(".meta.json").read_text())
    with pytest.raises(ArchlabError, match="latency fit"):
        load_for_table(copy)
    fit(copy).save(predictor_path(copy))
    assert load_for_table(copy, device="synthetic-cpu").calibration.n == 4
    with pytest.raises(ArchlabError, match="measured on device 'synthetic-cpu', not 'phone'"):
        load_for_table(copy, device="phone")
    copy.write_text(copy.read_text().replace(",0.01,", ",0.02,", 1))  # the table changed
    with pytest.raises(ArchlabError, match="another version"):
        load_for_table(copy)


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[1].update(norm_ms="nan"), "norm_ms='nan' is not a positive finite number"),
    (lambda rows: rows[1].update(median_ms="fast"), "median_ms='fast' is not a number"),
    (lambda rows: rows[1].update(key="res(cin=3"), "key: "),
    (lambda rows: rows[1].update(role="guess"), "role='guess'"),
])
def test_malformed_tables_are_one_line_errors(synthetic, tmp_path, edit, message):
    table, _ = synthetic
    import csv

    with table.open() as f:
        rows = list(csv.DictReader(f))
    edit(rows)
    meta = json.loads(table.with_suffix(".meta.json").read_text())
    bad = tmp_path / "bad.csv"
    write_table(bad, meta, rows)
    with pytest.raises(ArchlabError, match=message.replace("(", r"\(").replace("[", r"\[")):
        fit(bad)


def test_missing_columns_is_an_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("key,ms\nx,1\n")
    bad.with_suffix(".meta.json").write_text("{}")
    with pytest.raises(ArchlabError, match="columns"):
        fit(bad)


# ---- end to end, real timings ------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A tiny space measured for real: every block signature plus 2 calibration networks."""
    d = tmp_path_factory.mktemp("e2e")
    base = tiny_dict(latent=dict(channels=4, resolution=RES))
    base["stages"] = base["stages"][:2]
    space = d / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "tiny-space", "base": base,
                                     "params": {"stages.1.ffn_ratio": [2, 3, 4], "stages.1.conv": ["standard", "separable"]}}))
    table = d / "cpu.csv"
    timing = ["--device-name", "test-cpu", "--threads", "1", "--warmup", "0", "--runs", "3", "--rounds", "1"]
    argv = ["latency", "measure", "--space", str(space), "--networks", "2", "--seed", "1", "--resolution", str(RES),
            "--out", str(table), "--bundle", str(d / "bundle"), *timing]
    assert cli.main(argv) == 0
    assert cli.main(["latency", "fit", str(table)]) == 0
    return d, space, table


def test_measure_writes_blocks_and_networks_and_deletes_onnx(measured):
    d, space, table = measured
    import csv

    with table.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FIELDS
        roles = [r["role"] for r in reader]
    assert roles.count("network") == 2 and roles.count("reference") == 1 and roles.count("block") > 10
    assert len(list((d / "bundle" / "onnx").glob("**/*.onnx*"))) == 1  # only the reference is kept
    meta = json.loads(table.with_suffix(".meta.json").read_text())
    assert len(meta["networks"]) == 2


def test_query_cli_on_a_network_and_a_block(measured, tmp_path, capsys):
    d, space, table = measured
    cfg = tmp_path / "net.yaml"
    cfg.write_text(yaml.safe_dump(yaml.safe_load(space.read_text())["base"]))
    capsys.readouterr()
    assert cli.main(["latency", "query", str(cfg), "--table", str(table), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["rows"]
    assert row["latency_ms"] > 0 and out["calibrated"] and out["device"] == "test-cpu"
    assert math.isclose(sum(b["latency_ms"] for b in row["blocks"]), row["raw_sum_ms"], rel_tol=1e-3)
    assert {b["source"] for b in row["blocks"]} == {"measured"}
    key = row["blocks"][2]["key"]
    assert cli.main(["latency", "query", key, "--table", str(table), "--json"]) == 0
    block = json.loads(capsys.readouterr().out)["rows"][0]
    assert block["name"] == key and block["latency_ms"] == row["blocks"][2]["latency_ms"]
    assert cli.main(["latency", "query", str(cfg), "--table", str(table), "--device-name", "other"]) == 2
    assert "not 'other'" in capsys.readouterr().err
    assert cli.main(["latency", "query", "nonsense", "--table", str(table)]) == 2


def test_evaluate_measures_heldout_networks_and_reports(measured, tmp_path, capsys):
    d, space, table = measured
    argv = ["latency", "evaluate", "--space", str(space), "--table", str(table), "--networks", "3", "--seed", "5",
            "--heldout", str(d / "heldout.csv"), "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "latency_eval.json").read_text())
    for key in ("n", "within_5", "within_10", "mape", "kendall_tau", "spearman_rho", "noise_cv"):
        assert key in report
    assert report["n"] == 3 and 0 <= report["within_10"] <= 1 and report["raw_sum"]["n"] == 3
    calib = set(json.loads(table.with_suffix(".meta.json").read_text())["networks"])
    held = {n["key"].split("#")[1] for n in report["networks"]}
    assert not held & {k.split("#")[1] for k in calib}  # disjoint architectures
    assert report["speed"]["per_s_from_configs"] > 0
    assert "latency evaluate" in (tmp_path / "latency_eval.md").read_text()
    meta_file = table.with_suffix(".meta.json")
    meta = meta_file.read_text()
    try:  # a table measured on another CPU: its held-out networks are not timed here
        meta_file.write_text(json.dumps({**json.loads(meta), "cpu": "Other CPU 9000"}))
        capsys.readouterr()
        assert cli.main(argv[:-2] + ["--out", str(tmp_path / "other")]) == 2
        assert "measured on a Other CPU 9000, and this machine is a" in capsys.readouterr().err
        assert not (tmp_path / "other").exists()
    finally:
        meta_file.write_text(meta)


def test_fitted_blocks_survive_the_json_round_trip(synthetic, tmp_path):
    table, _ = synthetic
    pred = fit(table)
    res = [s for s in decompose(tiny_cfg()) if s.kind == "res"][0]
    hp = dict(res.hp)
    blocks = [BlockSpec("res", tuple({**hp, "expansion": 3, "conv": "separable"}.items()), res.hw),
              BlockSpec("res", tuple({**hp, "cin": 256, "cout": 256}.items()), (32, 32))]
    again = Predictor.load(pred.save(tmp_path / "p.json"))
    for b in blocks:
        (ms, source), (ms0, source0) = again.block(b), pred.block(b)
        assert ms == pytest.approx(ms0, rel=1e-12) and source == source0
    assert [again.block(b)[1] for b in blocks] == ["fitted", "extrapolated"]


def test_malformed_predictor_file_is_an_error(tmp_path):
    bad = tmp_path / "p.json"
    for text in ("{not json", json.dumps({"format": 1, "kinds": {"res": {"features": {"call": {"coef_ms": "x"}}}}})):
        bad.write_text(text)
        with pytest.raises(ArchlabError, match="not a readable archlab predictor"):
            Predictor.load(bad)


def test_query_rejects_a_block_yaml_with_a_list_value(measured, tmp_path, capsys):
    _, _, table = measured
    block = tmp_path / "block.yaml"
    block.write_text(yaml.safe_dump({"kind": "res", "resolution": 8, "cin": [16, 32]}))
    assert cli.main(["latency", "query", str(block), "--table", str(table)]) == 2
    assert "cin: a block hyper-parameter must be" in capsys.readouterr().err


def test_calibration_flags_networks_outside_its_range(synthetic):
    table, cfgs = synthetic
    pred = fit(table)
    lo, hi = pred.calibration.raw_range
    assert not pred.predict(cfgs[0]).outside_calibration
    wide = tiny_cfg().with_values({"stages.*.ffn_ratio": 4, "stages.2.transformer_depth": 6})
    p = pred.predict(wide)
    assert (p.raw_sum_ms > hi * 1.25) == p.outside_calibration == p.extrapolated


def test_fit_warns_about_rows_above_the_noise_gate(tmp_path, capsys):
    import csv

    cfg = tiny_cfg("v0")
    table = write_synthetic(tmp_path / "cpu.csv", list({s.signature: s for s in decompose(cfg)}.values()), [])
    capsys.readouterr()
    assert cli.main(["latency", "fit", str(table)]) == 0
    assert "warning" not in capsys.readouterr().err
    with table.open() as f:
        rows = list(csv.DictReader(f))
    rows[3].update(cv="0.4", mean_ms="5.0")  # timed while the machine was busy
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert cli.main(["latency", "fit", str(table)]) == 0
    err = capsys.readouterr().err
    assert "1 of" in err and "--redo-noisy" in err


def test_the_fast_batch_path_gives_the_same_predictions_to_the_last_bit():
    """`predict_many` (segments memoised, configs built by replacing fields) gives exactly what the
    block-by-block `predict` gives, and exactly what archlab gave before the fast path: digests of 300
    space samples' predictions and blocks recorded with the code of commit bad63d5 on the committed
    table (refitting the table changes the first digest)."""
    import hashlib

    from archlab.space import load_space

    pred = load_for_table(ROOT / "latency_tables" / "amd-epyc-2c.csv")
    space = load_space(ROOT / "search_spaces" / "snapgen_unet.yaml").at_resolution(pred.resolution)
    cfgs = [c for _, c in space.sample(300, seed=5)]
    ms = pred.predict_many(cfgs)
    assert hashlib.sha256(",".join(repr(float(x)) for x in ms).encode()).hexdigest()[:16] == "7a53a3dba417f996"
    assert all(pred.predict(c).latency_ms == m for c, m in zip(cfgs, ms))
    blocks = "\n".join(f"{b.key}|{b.name}|{b.stage}|{b.skip}" for c in cfgs for b in decompose(c))
    assert hashlib.sha256(blocks.encode()).hexdigest()[:16] == "68ab03e6ffea6474"
    assert list(pred.predict_many(cfgs[:5])) == list(ms[:5])  # memoised segments: the same numbers again


def test_reading_a_table_and_predicting_imports_neither_torch_nor_onnxruntime():
    code = ("import sys; from archlab.latency.predictor import load_for_table; from archlab.space import load_space; "
            f"p = load_for_table({str(ROOT / 'latency_tables' / 'amd-epyc-2c.csv')!r}); "
            f"s = load_space({str(ROOT / 'search_spaces' / 'snapgen_unet.yaml')!r}).at_resolution(p.resolution); "
            "p.predict_many([c for _, c in s.sample(50, seed=1)]); "
            "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])


def test_beside_ratios_and_fallback_ops_reach_the_report(tmp_path):
    from archlab.latency import evaluate as E

    cfgs = [tiny_cfg(f"v{i}", **v) for i, v in enumerate(VARIANTS[:3])]
    blocks = list({s.signature: s for c in cfgs for s in decompose(c)}.values())
    other = tmp_path / "other.csv"
    write_synthetic(other, blocks, [])
    with pytest.raises(ArchlabError, match="no held-out table"):
        E.beside_ratios(other, cfgs)
    write_synthetic(tmp_path / "other.heldout.csv", [], cfgs[:2])
    with pytest.raises(ArchlabError, match="ladder row 'v2'"):
        E.beside_ratios(other, cfgs)
    write_synthetic(tmp_path / "other.heldout.csv", [], cfgs)
    b = E.beside_ratios(other, cfgs)
    truth = [0.5 + 1.1 * sum(truth_ms(s) for s in decompose(c)) for c in cfgs]
    assert b["measured_ratio"] == pytest.approx([t / truth[0] for t in truth]) and b["measured_ratio"][0] == 1

    rows = [dict(key=s.key, kind=s.kind, role="block") for s in blocks]
    norm = next(s for s in blocks if s.kind == "res")
    meta = {"undelegated": {norm.key: {"aten_native_group_norm_default": 2}}}
    hmeta = {"undelegated": {network_key(cfgs[1]): {"aten_where_self": 1}}}
    u = E.undelegated(rows, meta, hmeta, cfgs)
    assert u["kinds"]["res"]["with_fallback"] == 1 and u["kinds"]["res"]["ops"] == {"aten_native_group_norm_default": 2}
    assert u["kinds"]["res"]["blocks"] == sum(s.kind == "res" for s in blocks)
    assert u["networks"] == 3 and u["networks_with_fallback"] == 1 and u["network_ops"] == ["aten_where_self"]
    assert E.undelegated(rows, {}, {}, cfgs)["networks_with_fallback"] == 0
