"""Latency bundle export and the device-side runner (tiny blocks, few runs)."""

import csv
import json
import subprocess
import sys

import pytest

from archlab.config import ArchConfig
from archlab.decompose import decompose
from archlab.latency.export import export_bundle, network_key
from archlab.latency.runner import run_bundle
from archlab.latency.table import FIELDS, Protocol, RunnerError, read_table
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


def test_networks_export_in_parallel_processes_in_order(bundle, tmp_path):
    _, cfg = bundle
    nets = [cfg.with_values({"name": f"n{i}", "stages.*.ffn_ratio": 2 + i}) for i in range(2)]
    manifest = export_bundle(tmp_path, [], nets, resolution=RES, name="tiny", jobs=2)
    got = [it for it in manifest["items"] if it["role"] == "network"]
    assert [it["key"] for it in got] == [network_key(c) for c in nets]  # the order asked, whatever finishes first
    assert all((tmp_path / it["file"]).is_file() and it["config"]["name"] == c.name for it, c in zip(got, nets))
    assert json.loads((tmp_path / "manifest.json").read_text())["items"] == manifest["items"]
    r = subprocess.run([sys.executable, "-m", "archlab.cli", "latency", "export", "--ladder", "x.yaml",
                        "--export-jobs", "0", "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--export-jobs: '0' is not an integer >= 1" in r.stderr and "Traceback" not in r.stderr


def test_network_exports_start_together_only_while_their_memory_fits(bundle):
    from archlab.latency.export import export_peak, fits

    _, cfg = bundle
    assert fits([], 100.0, budget=10.0, jobs=2)  # alone, whatever its size
    assert fits([4.0], 6.0, budget=10.0, jobs=2) and not fits([5.0], 6.0, budget=10.0, jobs=2)
    assert not fits([1.0], 1.0, budget=100.0, jobs=1) and not fits([1.0, 1.0], 1.0, budget=100.0, jobs=2)
    small, big = cfg, cfg.with_values({"stages.*.ffn_ratio": 6})
    assert 1e9 < export_peak("onnxruntime", small) < export_peak("onnxruntime", big)
    assert export_peak("executorch-xnnpack", big) > export_peak("onnxruntime", big)  # ExecuTorch's lowering copies more


def test_run_resumes_and_keeps_finished_rows(bundle, tmp_path):
    out, _ = bundle
    table = tmp_path / "dev.csv"
    rows = run_bundle(out, table, "test-cpu", Protocol(threads=1, warmup=1, runs=4, rounds=2), progress=False, limit=2)
    assert len(rows) == 2
    meta, saved = read_table(table)
    assert meta["device"] == "test-cpu" and meta["threads"] == 1 and len(saved) == 2
    rows = run_bundle(out, table, "test-cpu", Protocol(threads=1, warmup=1, runs=4, rounds=2), progress=False)
    keys = [r["key"] for r in rows]
    assert len(keys) == 5 == len(set(keys))  # the rest was added, nothing timed twice
    assert [r["key"] for r in rows[:2]] == [r["key"] for r in saved]
    meta_file = table.with_name(table.stem + ".meta.json")
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "cpu": "Other CPU 9000"}))
    with pytest.raises(RunnerError, match="cpu='Other CPU 9000' \\(this machine: "):  # one device's times per table
        run_bundle(out, table, "test-cpu", Protocol(threads=1, warmup=1, runs=4, rounds=2), progress=False)
    with table.open() as f:
        for r in csv.DictReader(f):
            assert float(r["median_ms"]) > 0 and float(r["min_ms"]) <= float(r["median_ms"]) and int(r["runs"]) == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_refuses_a_table_made_with_other_settings(bundle, tmp_path):
    out, _ = bundle
    table = tmp_path / "dev.csv"
    run_bundle(out, table, "test-cpu", Protocol(threads=1, warmup=0, runs=1, rounds=1), progress=False, limit=1)
    with pytest.raises(RunnerError, match="threads=1"):
        run_bundle(out, table, "test-cpu", Protocol(threads=2, warmup=0, runs=1, rounds=1), progress=False)


def test_malformed_table_is_an_error(tmp_path):
    table = tmp_path / "bad.csv"
    table.write_text("key,latency\nx,1\n")
    (tmp_path / "bad.meta.json").write_text("{}")
    with pytest.raises(RunnerError, match="columns"):
        read_table(table)


def test_runner_works_with_onnxruntime_and_numpy_alone(bundle, tmp_path):
    """The copied runner.py (with the timing and table modules beside it) runs where torch (and archlab) cannot
    be imported."""
    out, _ = bundle
    code = ("import sys; sys.modules['torch'] = None; sys.modules['archlab'] = None; import runpy; "
            f"sys.argv = ['runner.py', {str(out)!r}, '--out', {str(tmp_path / 't.csv')!r}, '--device-name', 'edge', "
            "'--threads', '1', '--runs', '2', '--rounds', '1', '--warmup', '0']; "
            f"runpy.run_path({str(out / 'runner.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with (tmp_path / "t.csv").open() as f:
        assert tuple(csv.DictReader(f).fieldnames) == FIELDS


class _Machine:
    """Stands in for the clock: noisy timings (CV ~0.5) until `quiet`, steady ones after."""

    def __init__(self, monkeypatch, quiet_after_pause: bool, scale_ms: float = 1.0):
        from archlab.latency import timing

        self.quiet, self.scale_ms = False, scale_ms
        monkeypatch.setattr(timing, "_time", self.time)
        monkeypatch.setattr(timing.time, "sleep", self.pause if quiet_after_pause else lambda s: None)

    def pause(self, seconds):
        self.quiet = True

    def time(self, run, n):
        times = [2.0] * n if self.quiet else [1.0, 3.0] * (n // 2) + [1.0] * (n % 2)
        return [t * self.scale_ms for t in times]


def test_noise_gate_times_a_noisy_item_again_and_keeps_the_quiet_attempt(bundle, tmp_path, monkeypatch):
    out, _ = bundle
    machine = _Machine(monkeypatch, quiet_after_pause=True)
    table = tmp_path / "dev.csv"
    rows = run_bundle(out, table, "test-cpu", Protocol(threads=1, warmup=0, runs=4, rounds=2, max_cv=0.1, retries=2, settle_ms=0),
                      progress=False, limit=1)
    assert machine.quiet and float(rows[0]["cv"]) == 0 and float(rows[0]["median_ms"]) == 2.0
    meta, _ = read_table(table)
    assert meta["protocol"]["max_cv"] == 0.1 and meta["protocol"]["retries"] == 2
    assert meta["sessions"][-1] | {"date": None} == {"date": None, "timed": 1, "retimed": 0, "retries": 1, "above_gate": 0}


def test_rows_left_above_the_gate_are_kept_counted_and_redone_in_place(bundle, tmp_path, monkeypatch):
    from archlab.latency.table import noisy_keys
    from archlab.latency.timing import summary

    out, _ = bundle
    machine = _Machine(monkeypatch, quiet_after_pause=False)
    table = tmp_path / "dev.csv"
    rows = run_bundle(out, table, "test-cpu", Protocol(threads=1, warmup=0, runs=4, rounds=2, max_cv=0.1, retries=1, settle_ms=0),
                      progress=False)
    keys = [r["key"] for r in rows]
    assert len(rows) == 5 and noisy_keys(rows, 0.1) == set(keys)  # nothing dropped
    meta, _ = read_table(table)
    assert meta["sessions"][-1]["above_gate"] == 5 and meta["sessions"][-1]["retries"] == 5
    assert "5 above the noise gate" in summary(rows, table, 0.1) and "--redo-noisy" in summary(rows, table, 0.1)

    machine.quiet = True
    redo = set(keys[1:3])
    rows = run_bundle(out, table, "test-cpu", Protocol(threads=1, warmup=0, runs=4, rounds=2, max_cv=0.1, settle_ms=0),
                      progress=False, redo=redo)
    assert [r["key"] for r in rows] == keys  # replaced where they were, not appended
    assert noisy_keys(rows, 0.1) == set(keys) - redo
    meta, saved = read_table(table)
    assert [r["key"] for r in saved] == keys
    assert meta["sessions"][-1] | {"date": None} == {"date": None, "timed": 0, "retimed": 2, "retries": 0, "above_gate": 0}


def test_timer_jitter_on_a_tiny_item_is_not_noise(bundle, tmp_path, monkeypatch):
    from archlab.latency.table import MIN_SPREAD_MS, is_noisy

    out, _ = bundle
    _Machine(monkeypatch, quiet_after_pause=False, scale_ms=MIN_SPREAD_MS / 2)
    rows = run_bundle(out, tmp_path / "dev.csv", "test-cpu", Protocol(threads=1, warmup=0, runs=4, rounds=2, max_cv=0.1, settle_ms=0),
                      progress=False, limit=2)
    assert all(float(r["cv"]) > 0.1 and not is_noisy(r, 0.1) for r in rows)  # CV 50%, spread a quarter of the floor
    assert read_table(tmp_path / "dev.csv")[0]["sessions"][-1]["retries"] == 0


class _Neighbour:
    """Stands in for the clock: every item runs in 2 ms and the reference in 1 ms, except while the
    `busy`-th item is timed: then something runs beside it for the whole item, which leaves the item's
    time and CV alone but reads the reference at 2 ms (until a pause, with `quiet_after_pause`)."""

    def __init__(self, monkeypatch, busy: int, quiet_after_pause: bool):
        from archlab.latency import timing

        self.ref, self.items, self.busy, self.quiet = None, [], busy, False
        monkeypatch.setattr(timing, "_time", self.time)
        monkeypatch.setattr(timing.time, "sleep", self.pause if quiet_after_pause else lambda s: None)

    def pause(self, seconds):
        self.quiet = True

    def time(self, run, n):
        self.ref = self.ref or run  # the runner loads the reference first
        if run is not self.ref and run not in self.items:
            self.items.append(run)
        busy = len(self.items) == self.busy and not self.quiet
        return [(2.0 if busy else 1.0) if run is self.ref else 2.0] * n


def test_an_item_timed_while_its_reference_was_slowed_is_timed_again(bundle, tmp_path, monkeypatch):
    out, _ = bundle
    protocol = Protocol(threads=1, warmup=0, runs=4, rounds=2, max_cv=0.1, retries=2, settle_ms=0)
    _Neighbour(monkeypatch, busy=5, quiet_after_pause=True)
    rows = run_bundle(out, tmp_path / "a.csv", "test-cpu", protocol, progress=False)
    assert [float(r["ref_ms"]) for r in rows] == [1.0] * 5 and float(rows[4]["cv"]) == 0  # the quiet attempt kept
    session = read_table(tmp_path / "a.csv")[0]["sessions"][-1]
    assert session["retries"] == 1 and session["above_gate"] == 0 and "reference_jumps" not in session

    _Neighbour(monkeypatch, busy=5, quiet_after_pause=False)  # busy through every attempt: kept, and said
    rows = run_bundle(out, tmp_path / "b.csv", "test-cpu", protocol, progress=False)
    assert len(rows) == 5 and float(rows[4]["ref_ms"]) == 2.0 and float(rows[4]["norm_ms"]) == 1.0
    session = read_table(tmp_path / "b.csv")[0]["sessions"][-1]
    assert session["retries"] == 2 and session["above_gate"] == 1 and session["reference_jumps"] == [rows[4]["key"]]

    _Neighbour(monkeypatch, busy=2, quiet_after_pause=False)  # too early in a session to know its reference
    rows = run_bundle(out, tmp_path / "c.csv", "test-cpu", protocol, progress=False)
    assert read_table(tmp_path / "c.csv")[0]["sessions"][-1]["retries"] == 0


class _Warmth:
    """Stands in for the clock: any model runs in 3 ms when it runs right after another one (cold), 1 ms
    when it runs again (warm), as the reference did at 2 onnxruntime threads; and 2 ms more when it runs
    with no pause after another one (the other's worker threads still spinning). Records the pauses."""

    def __init__(self, monkeypatch):
        from archlab.latency import timing

        self.last, self.settled, self.pauses, self.calls = None, False, [], []
        monkeypatch.setattr(timing, "_time", self.time)
        monkeypatch.setattr(timing.time, "sleep", self.pause)

    def pause(self, seconds):
        self.pauses.append(seconds)
        self.settled = True

    def time(self, run, n):
        self.calls.append(n)
        out = []
        for _ in range(n):
            out.append((1.0 if run is self.last else 3.0) + (0.0 if self.settled or run is self.last else 2.0))
            self.last, self.settled = run, False
        return out


def test_the_reference_is_timed_warm_and_settled_and_an_old_table_keeps_its_protocol(bundle, tmp_path, monkeypatch):
    out, _ = bundle
    clock = _Warmth(monkeypatch)
    # 2 threads: the pause between the models is on by default (the item is cold in each round: no retry)
    protocol = Protocol(threads=2, warmup=0, runs=4, rounds=2, retries=0)
    rows = run_bundle(out, tmp_path / "new.csv", "test-cpu", protocol, progress=False)
    meta, _ = read_table(tmp_path / "new.csv")
    assert (meta["protocol"]["reference_warmup"],
            meta["protocol"]["settle_ms"], meta["protocol"]["reference_runs"]) == (1, 100.0, 3)
    assert meta["reference_ms"] == 1.0
    assert {float(r["ref_ms"]) for r in rows} == {1.0}  # warm beside every item: norm_ms is the item's own median
    assert all(float(r["norm_ms"]) == float(r["median_ms"]) for r in rows)
    assert clock.pauses == [0.1] * (2 * 2 * len(rows))  # before the item and before the reference, each round
    assert clock.calls.count(3) == 2 * len(rows)  # the reference timed 3 times in each round (items: 2 a round)

    # 1 thread: no pause by default (there it only made each round's first run slower)
    clock.pauses.clear()
    run_bundle(out, tmp_path / "one.csv", "test-cpu", Protocol(threads=1, warmup=0, runs=4, rounds=2, retries=0),
               progress=False, limit=2)
    assert clock.pauses == [] and read_table(tmp_path / "one.csv")[0]["protocol"]["settle_ms"] == 0.0
    assert Protocol(threads=1, settle_ms=50.0).settle == 50.0  # unless asked for

    # a table made before the warm-up was recorded is extended as it was made: the reference cold
    old = tmp_path / "old.csv"
    run_bundle(out, old, "test-cpu", protocol, progress=False, limit=2)
    meta_path = old.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text())
    del meta["protocol"]["reference_warmup"], meta["protocol"]["settle_ms"], meta["protocol"]["reference_runs"]
    meta_path.write_text(json.dumps(meta))
    assert (Protocol.of_table(meta).reference_warmup, Protocol.of_table(meta).settle_ms,
            Protocol.of_table(meta).reference_runs) == (0, 0, 1)
    clock.pauses.clear()
    rows = run_bundle(out, old, "test-cpu", protocol, progress=False)
    assert [float(r["ref_ms"]) for r in rows[2:]] == [5.0] * 3 and clock.pauses == []  # cold, no pause: as it was
    kept = read_table(old)[0]["protocol"]
    assert (kept["reference_warmup"], kept["settle_ms"], kept["reference_runs"]) == (0, 0, 1)
    for bad in ("reference_warmup", "settle_ms", "reference_runs"):
        with pytest.raises(RunnerError, match=bad):
            Protocol(**{bad: -1}).check()


def test_a_missing_or_corrupt_model_is_one_line_naming_the_item(bundle, tmp_path):
    import shutil

    out, _ = bundle
    broken = tmp_path / "bundle"
    shutil.copytree(out, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    item = manifest["items"][1]
    (broken / item["file"]).write_bytes(b"not an onnx model")  # e.g. a partial copy to the device
    with pytest.raises(RunnerError, match=r"cannot load or run") as e:
        run_bundle(broken, tmp_path / "t.csv", "test-cpu", Protocol(threads=1, warmup=0, runs=1, rounds=1),
                   progress=False)
    assert item["key"] in str(e.value) and "\n" not in str(e.value)
    assert len(read_table(tmp_path / "t.csv")[1]) == 1  # the reference row timed before it is kept
    (broken / "manifest.json").write_text("null")
    with pytest.raises(RunnerError, match="not a bundle manifest"):
        run_bundle(broken, tmp_path / "t.csv", "test-cpu", Protocol(threads=1, warmup=0, runs=1, rounds=1),
                   progress=False)


def test_an_interrupted_run_keeps_its_rows_and_resumes(bundle, tmp_path, monkeypatch):
    from archlab.latency import timing

    out, _ = bundle
    table = tmp_path / "dev.csv"
    real, calls = timing._time, [0]

    def interrupted(run, n):
        calls[0] += 1
        if calls[0] == 12:  # partway through the third item
            raise KeyboardInterrupt
        return real(run, n)

    monkeypatch.setattr(timing, "_time", interrupted)
    with pytest.raises(KeyboardInterrupt):  # retries=0: a busy machine's noise gate must not move the interruption
        run_bundle(out, table, "test-cpu", Protocol(threads=1, warmup=0, runs=2, rounds=2, retries=0), progress=False)
    kept = [r["key"] for r in read_table(table)[1]]
    assert 1 <= len(kept) < 5 and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(timing, "_time", real)
    rows = run_bundle(out, table, "test-cpu", Protocol(threads=1, warmup=0, runs=2, rounds=2), progress=False)
    assert [r["key"] for r in rows][:len(kept)] == kept and len({r["key"] for r in rows}) == 5
