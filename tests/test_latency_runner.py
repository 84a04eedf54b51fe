"""Latency bundle export and the device-side runner (tiny blocks, few runs)."""

import csv
import json
import subprocess
import sys

import pytest

from archlab.config import ArchConfig
from archlab.decompose import decompose
from archlab.latency.export import export_bundle, network_key
from archlab.latency.runner import FIELDS, RunnerError, read_table, run_bundle
from conftest import tiny_dict

RES = 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg = ArchConfig.from_dict(tiny_dict(latent=dict(channels=4, resolution=RES)))
    blocks = {s.signature: s for s in decompose(cfg) if s.kind in ("res", "transformer", "down")}
    out = tmp_path_factory.mktemp("bundle")
    export_bundle(out, list(blocks.values())[:3], [cfg], resolution=RES, name="tiny")
    return out, cfg


def test_bundle_has_manifest_models_and_runner(bundle):
    out, cfg = bundle
    manifest = json.loads((out / "manifest.json").read_text())
    roles = [it["role"] for it in manifest["items"]]
    assert roles == ["reference", "block", "block", "block", "network"]
    assert all((out / it["file"]).is_file() for it in manifest["items"])
    assert manifest["items"][-1]["key"] == network_key(cfg)
    assert (out / "runner.py").is_file()


def test_export_resumes_without_redoing(bundle):
    out, cfg = bundle
    before = {p.name: p.stat().st_mtime_ns for p in (out / "onnx").rglob("*.onnx")}
    export_bundle(out, [], [cfg], resolution=RES, name="tiny")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "onnx").rglob("*.onnx")} == before


def test_run_resumes_and_keeps_finished_rows(bundle, tmp_path):
    out, _ = bundle
    table = tmp_path / "dev.csv"
    rows = run_bundle(out, table, "test-cpu", threads=1, warmup=1, runs=4, rounds=2, progress=False, limit=2)
    assert len(rows) == 2
    meta, saved = read_table(table)
    assert meta["device"] == "test-cpu" and meta["threads"] == 1 and len(saved) == 2
    rows = run_bundle(out, table, "test-cpu", threads=1, warmup=1, runs=4, rounds=2, progress=False)
    keys = [r["key"] for r in rows]
    assert len(keys) == 5 == len(set(keys))  # the rest was added, nothing timed twice
    assert [r["key"] for r in rows[:2]] == [r["key"] for r in saved]
    with table.open() as f:
        for r in csv.DictReader(f):
            assert float(r["median_ms"]) > 0 and float(r["min_ms"]) <= float(r["median_ms"]) and int(r["runs"]) == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_refuses_a_table_made_with_other_settings(bundle, tmp_path):
    out, _ = bundle
    table = tmp_path / "dev.csv"
    run_bundle(out, table, "test-cpu", threads=1, warmup=0, runs=1, rounds=1, progress=False, limit=1)
    with pytest.raises(RunnerError, match="threads=1"):
        run_bundle(out, table, "test-cpu", threads=2, warmup=0, runs=1, rounds=1, progress=False)


def test_malformed_table_is_an_error(tmp_path):
    table = tmp_path / "bad.csv"
    table.write_text("key,latency\nx,1\n")
    (tmp_path / "bad.meta.json").write_text("{}")
    with pytest.raises(RunnerError, match="columns"):
        read_table(table)


def test_runner_works_with_onnxruntime_and_numpy_alone(bundle, tmp_path):
    """The copied runner.py runs where torch (and archlab) cannot be imported."""
    out, _ = bundle
    code = ("import sys; sys.modules['torch'] = None; sys.modules['archlab'] = None; import runpy; "
            f"sys.argv = ['runner.py', {str(out)!r}, '--out', {str(tmp_path / 't.csv')!r}, '--device', 'edge', "
            "'--threads', '1', '--runs', '2', '--rounds', '1', '--warmup', '0']; "
            f"runpy.run_path({str(out / 'runner.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with (tmp_path / "t.csv").open() as f:
        assert tuple(csv.DictReader(f).fieldnames) == FIELDS
