"""Latency transfer: the lab's measured device adapted to a new one from a few whole networks."""

import json

import numpy as np
import pytest

from archlab import cli
from archlab.latency import transfer
from archlab.latency.predictor import load_for_table
from archlab.latency.table import read_table, write_table
from conftest import ROOT

SOURCE = ROOT / "latency_tables" / "amd-epyc-2c.csv"
HELDOUT = ROOT / "latency_tables" / "amd-epyc-2c.heldout.csv"


def _target(tmp_path, slowdown, name="new-device"):
    """A device that runs every network `slowdown(ms)` times: the source's own measured networks
    (calibration and held-out), re-timed there."""
    meta, rows = read_table(SOURCE)
    hmeta, hrows = read_table(HELDOUT)
    nets = [r for r in rows + hrows if r["role"] == "network"]
    out = []
    for r in nets:
        ms = slowdown(float(r["norm_ms"]))
        out.append({**r, "median_ms": f"{ms:.5f}", "norm_ms": f"{ms:.5f}", "mean_ms": f"{ms:.5f}"})
    path = tmp_path / f"{name}.csv"
    write_table(path, {**meta, "device": name, "networks": {**meta["networks"], **hmeta["networks"]}}, out)
    return path, len(nets)


def test_a_slower_device_is_learnt_from_a_few_networks(tmp_path):
    path, n = _target(tmp_path, lambda ms: 1.6 * ms + 4.0)
    report = transfer.evaluate_tables(SOURCE, [path], [0, 3, 10], draws=5)
    by_n = {row["n"]: row for row in report["targets"][0]["by_n"]}
    held = report["targets"][0]["held_out"]
    assert report["targets"][0]["pool"] == 20 and held == n - 20
    assert by_n[0]["mape"] > 0.35  # the source's own predictions are about 1/1.6 of the time there
    assert by_n[3]["mape"] < 0.05 and by_n[10]["mape"] < 0.04  # a line from 3 networks: the source's own accuracy
    assert by_n[10]["tau"] == pytest.approx(by_n[0]["tau"], abs=0.02)  # a monotone change keeps the ranking


def test_a_transfer_fitted_flat_ranks_nothing_rather_than_nan(tmp_path):
    path, _ = _target(tmp_path, lambda ms: 5000.0 - ms)  # ranks the networks backwards: no line with a >= 0 fits
    report = transfer.evaluate_tables(SOURCE, [path], [0, 3], draws=3)
    by_n = {row["n"]: row for row in report["targets"][0]["by_n"]}
    assert by_n[0]["tau"] < -0.5  # the source's ranking, reversed there
    assert by_n[3]["tau"] == 0.0 and by_n[3]["tau_range"] == [0.0, 0.0]  # flat: one latency for all, no ranking
    assert "ranks nothing" in transfer.markdown(report)


def test_attention_and_the_rest_can_change_speed_differently(tmp_path):
    source = load_for_table(SOURCE)
    meta, rows = read_table(SOURCE)
    cfgs = [transfer.arch_from_dict(meta["networks"][r["key"]]) for r in rows if r["role"] == "network"]
    parts = np.array([transfer.split(source, c) for c in cfgs])
    truth = 2.0 + 3.0 * parts[:, 1] + 0.8 * parts[:, 2]  # attention 3x slower, the rest faster
    t = transfer.fit_transfer(source, parts, truth)
    assert t.method == "groups" and t.factors["attention"] == pytest.approx(3.0, rel=1e-3)
    assert t.factors["rest"] == pytest.approx(0.8, rel=1e-3) and t.loo_mape < 1e-3
    assert transfer.fit_transfer(source, parts[:2], truth[:2]).method == "ratio"
    none = transfer.fit_transfer(source, parts[:0], truth[:0])
    np.testing.assert_allclose(none.apply(parts), parts[:, 0], rtol=1e-9)  # N = 0: the source unchanged


def test_cli_writes_a_usable_predictor_for_the_new_device_and_the_report(tmp_path, capsys):
    path, _ = _target(tmp_path, lambda ms: 2.0 * ms)
    assert cli.main(["latency", "transfer", "--from", str(SOURCE), "--to", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] > 20 and out["method"] in ("ratio", "line", "groups")
    ladder = str(ROOT / "search_spaces" / "snapgen_ablation.yaml")
    assert cli.main(["latency", "query", ladder, "--table", str(path), "--resolution", "32", "--json"]) == 0
    ours = [r["latency_ms"] for r in json.loads(capsys.readouterr().out)["rows"]]
    assert cli.main(["latency", "query", ladder, "--table", str(SOURCE), "--resolution", "32", "--json"]) == 0
    theirs = [r["latency_ms"] for r in json.loads(capsys.readouterr().out)["rows"]]
    assert len(ours) == 8 and all(a / b == pytest.approx(2.0, rel=0.1) for a, b in zip(ours, theirs))

    assert cli.main(["latency", "transfer", "--from", str(SOURCE), "--to", str(path), "--measure", "0,5",
                     "--draws", "3", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "latency_transfer.md").read_text()
    assert "| 5 |" in md and "archlab latency transfer" in md
    assert cli.main(["latency", "transfer", "--from", str(SOURCE), "--to", str(path), "--measure", "0,50"]) == 2
    assert "only 20 pool networks" in capsys.readouterr().err
    assert cli.main(["latency", "transfer", "--from", str(SOURCE), "--to", str(path), "--measure", "0,-3"]) == 2
    assert "integers >= 0" in capsys.readouterr().err
    pred = load_for_table(path)  # the transferred predictor records the networks it was fitted on
    assert pred.calibration.n == len(pred.calibration.digests) > 20 and pred.calibration.raw_range[1] > 0


def test_networks_of_a_table_are_selected_to_time_on_a_new_device(tmp_path):
    from archlab.config import arch_from_dict
    from archlab.errors import ArchlabError
    from archlab.latency.export import export_bundle, network_key, select
    from archlab.latency.runner import run_bundle
    from archlab.latency.table import Protocol
    from conftest import tiny_dict

    cfg = arch_from_dict(tiny_dict(latent=dict(channels=4, resolution=8)))
    export_bundle(tmp_path / "b", [], [cfg], resolution=8)
    run_bundle(tmp_path / "b", tmp_path / "t.csv", "dev", Protocol(threads=1, warmup=0, runs=1, rounds=1), progress=False)
    blocks, nets = select(networks_of=[str(tmp_path / "t.csv")] * 2, resolution=8)
    assert blocks == [] and [network_key(c) for c in nets] == [network_key(cfg)]  # listed twice, timed once
    with pytest.raises(ArchlabError, match="timed its networks at latent 8, not --resolution 32"):
        select(networks_of=[str(tmp_path / "t.csv")], resolution=32)


def test_a_target_table_brings_its_held_out_table(tmp_path):
    """A full table on the target (blocks and the calibration networks) and its `archlab latency evaluate`
    held-out table are one target: their networks together, checked to share settings."""
    meta, rows = read_table(SOURCE)
    hmeta, hrows = read_table(HELDOUT)
    target = tmp_path / "dev.csv"
    write_table(target, {**meta, "device": "dev"}, rows)
    write_table(tmp_path / "dev.heldout.csv", {**hmeta, "device": "dev"}, hrows)
    source = load_for_table(SOURCE)
    _, cfgs, ms = transfer.target_networks(target, source)
    n_nets = sum(r["role"] == "network" for r in rows) + sum(r["role"] == "network" for r in hrows)
    assert len(cfgs) == len(ms) == n_nets
    report = transfer.evaluate_tables(SOURCE, [target], [0], draws=1)
    assert report["targets"][0]["pool"] == 20 and report["targets"][0]["held_out"] == n_nets - 20
    write_table(tmp_path / "dev.heldout.csv", {**hmeta, "device": "dev", "threads": 4}, hrows)
    with pytest.raises(transfer.ArchlabError, match="other threads"):
        transfer.target_networks(target, source)


KIND_SPEED = {"transformer": 1.0, "res": 3.0}  # the new device: residual blocks 3x slower, attention not, the rest 1.2x


def _kind_target(tmp_path, k_blocks):
    """A device whose every block of a kind runs KIND_SPEED times (1.2 for other kinds) its source time and
    whose networks take 3 ms + their blocks' sum, with the source's `k_blocks` busiest blocks timed on it."""
    source = load_for_table(SOURCE)
    meta, rows = read_table(SOURCE)
    hmeta, hrows = read_table(HELDOUT)
    configs = {**meta["networks"], **hmeta["networks"]}
    out = []
    for r in rows + hrows:
        if r["role"] != "network":
            continue
        p = source.predict(transfer.arch_from_dict(configs[r["key"]]))
        ms = 3.0 + sum(KIND_SPEED.get(b.kind, 1.2) * b.ms for b in p.blocks)
        out.append({**r, "median_ms": f"{ms:.6f}", "norm_ms": f"{ms:.6f}", "mean_ms": f"{ms:.6f}"})
    cal = [transfer.arch_from_dict(meta["networks"][key]) for key in source.calibration.networks]
    keys = transfer.key_blocks(source, cal, k_blocks)
    by_key = {r["key"]: r for r in rows}
    for key in keys:
        ms = KIND_SPEED.get(key.split("(")[0], 1.2) * source.measured[key]
        out.append({**by_key[key], "median_ms": f"{ms:.6f}", "norm_ms": f"{ms:.6f}", "mean_ms": f"{ms:.6f}"})
    path = tmp_path / "kinds.csv"
    write_table(path, {**meta, "device": "kinds", "networks": configs}, out)
    return path, source, cal, keys


def test_the_busiest_blocks_of_each_kind_come_first():
    source = load_for_table(SOURCE)
    meta, _ = read_table(SOURCE)
    cal = [transfer.arch_from_dict(meta["networks"][key]) for key in source.calibration.networks]
    keys = transfer.key_blocks(source, cal, 40)
    kinds = [key.split("(")[0] for key in keys]
    used = {b.kind for c in cal for b in source.predict(c).blocks}
    assert len(keys) == len(set(keys)) == 40 and set(kinds) == used  # every kind the networks use is timed
    share = {}
    for c in cal:
        for b in source.predict(c).blocks:
            share[b.key] = share.get(b.key, 0.0) + b.ms
    rest = keys[len(used):]
    assert [share[k] for k in rest] == sorted((share[k] for k in rest), reverse=True)
    assert min(share[k] for k in rest) >= max(share[k] for k in share if k not in keys)  # then the busiest
    assert transfer.key_blocks(source, cal, 3) == keys[:3]


def test_a_few_blocks_timed_on_the_target_learn_how_each_kind_changes_speed(tmp_path, capsys):
    path, source, _, keys = _kind_target(tmp_path, 40)
    report = transfer.evaluate_tables(SOURCE, [path], [0, 10], draws=3, ks=[0, 40])
    got = {(row["k"], row["n"]): row for row in report["targets"][0]["by_n"]}
    assert got[(0, 10)]["mape"] > 0.015  # attention / rest cannot say that res and the other kinds moved apart
    assert got[(40, 10)]["mape"] < 1e-6 and got[(40, 10)]["within_5"] == 1.0  # the kinds' ratios, then groups
    assert got[(40, 0)]["mape"] < got[(0, 0)]["mape"]
    start = transfer.with_blocks(source, transfer.target_blocks(path))
    assert start.settings["blocks_timed"]["kinds"]["transformer"] == pytest.approx(1.0)
    assert start.settings["blocks_timed"]["kinds"]["res"] == pytest.approx(3.0)
    assert start.measured[keys[0]] == pytest.approx(transfer.target_blocks(path)[keys[0]])

    assert cli.main(["latency", "transfer", "--from", str(SOURCE), "--to", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"] == len(keys)  # fitted with the target's blocks
    pred = load_for_table(path)
    meta, rows = read_table(path)
    for r in rows:
        if r["role"] == "network":
            cfg = transfer.arch_from_dict(meta["networks"][r["key"]])
            assert pred.predict(cfg).latency_ms == pytest.approx(float(r["norm_ms"]), rel=1e-6)


def test_blocks_the_target_has_not_timed_are_named(tmp_path, capsys):
    path, *_ = _kind_target(tmp_path, 10)
    assert cli.main(["latency", "transfer", "--from", str(SOURCE), "--to", str(path), "--measure", "0",
                     "--blocks", "0,20", "--out", str(tmp_path)]) == 2
    assert "has not timed 10 of the 20 blocks" in capsys.readouterr().err
    assert cli.main(["latency", "transfer", "--from", str(SOURCE), "--to", str(path), "--measure", "0",
                     "--blocks", "x", "--out", str(tmp_path)]) == 2
    assert "--blocks: 'x'" in capsys.readouterr().err
    with pytest.raises(transfer.ArchlabError, match="--blocks 5000: the pool networks have only"):
        transfer.evaluate_tables(SOURCE, [path], [0], draws=1, ks=[5000])
    nets_only, _ = _target(tmp_path, lambda ms: 2.0 * ms)  # a target that timed whole networks only: K = 0 alone
    report = transfer.evaluate_tables(SOURCE, [nets_only], [0, 3], draws=2, ks=[0, 20])
    assert [(row["k"], row["n"]) for row in report["targets"][0]["by_n"]] == [(0, 0), (0, 3)]
    assert "no blocks timed (K = 0 only)" in transfer.markdown(report)


def test_blocks_of_a_table_are_selected_to_time_on_a_new_device():
    from archlab.latency.export import select

    source = load_for_table(SOURCE)
    meta, _ = read_table(SOURCE)
    cal = [transfer.arch_from_dict(meta["networks"][key]) for key in source.calibration.networks]
    blocks, nets = select(blocks_of=[str(SOURCE)], top_blocks=12, resolution=32)
    assert nets == [] and [b.key for b in blocks] == transfer.key_blocks(source, cal, 12)
