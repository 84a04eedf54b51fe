"""The timing protocol every runtime backend's runner shares. Standard library only: a bundle carries
this file, `table.py` and its backend's runner (`runner.py` for onnxruntime, `runner_executorch.py`,
`runner_coreml.py`), and the runner needs nothing else but its runtime.

A backend (`Backend`) says how to load one bundle item and run it once; the protocol is the same for all
of them. For a noisy machine: fixed threads, sequential execution, the same settings for blocks and
whole networks; an untimed first run, then up to `warmup` more warm-up runs (fewer for slow items: about
1 s of them at most); then `rounds` rounds that each time the item k times and the bundle's reference
model `reference_runs` times (default 3), after `reference_warmup` untimed runs of it (default 1), so
every item has the reference timed right beside it, and warm; and, with more than one thread, a pause of
`settle_ms` (default 100 ms) whenever the timing switches from one model to the other. Measured on the
2-core EPYC: run cold, right after another model, the reference read 8-11% slow at 1 onnxruntime thread
and 3x slow at 2 (median over 78 networks); with more than one thread, a session's worker threads keep
spinning for a while after a run and take the cores from the next session's, so even warm, timed right
after a network, the reference read 7.7 ms against 3.3 ms back to back (2 threads, medians of 8), and
3.4 ms after a 50 ms pause (10 ms was not enough); the network itself read 9% faster with the pause.
Without them both errors went into `norm_ms`. At 1 thread (no worker threads) the pause only hurt: it
made each round's first run slower (first / rest 1.38 against 1.21 back to back) and raised the CV of
11 of 13 blocks (median 1.45x; 13 blocks of the DiT table, 2 x 5 rounds each way, alone), so there it
is 0 by default. At 2 threads a single reference run still varies by about 11% (its CV as an
item), so each round times it 3 times (15 runs per item, about 45 ms for this reference). Tables made
before the warm-up, the pause or the reference's runs were recorded keep their protocol when extended,
so each table stays one protocol. k is `runs // rounds`, lowered for slow items so that one item takes
about `budget_s` seconds (a whole network is not run 30 times), never below 1. Recorded per item:
median, min, mean, coefficient of variation, and the reference's median in the same rounds (`ref_ms`);
`norm_ms` rescales the median by (session reference median / local reference median) to take out the
machine's drift.

Noise gate: an item whose run-to-run CV is above `max_cv` (and whose spread is above `MIN_SPREAD_MS`,
so that timer jitter on a microsecond item does not count) was timed while something else ran (the
reference's drift then over- or under-corrects it too), so it is timed again, after a pause, up to
`retries` more times; the attempt with the lowest CV is kept. An item still above the gate is kept
with its CV (never dropped) and counted in the metadata's `sessions` log; `--redo-noisy` re-times the
rows of an existing table that are above the gate, in place. The reference guards the gate's blind
spot: something running beside for the whole item leaves the item's CV low but its `norm_ms` wrong
(a test run beside one whole network slowed the reference 1.8x and the network 3%, which put its
`norm_ms` 45% low), so an attempt whose reference median is more than `REF_JUMP` (25%) off the
median of the session's last 9 items' references (once 3 are timed) is retried too, and if every
attempt is, its key is listed under `reference_jumps` in the session's log.

The table is rewritten atomically (temp file + rename) after each item, so an interrupted run keeps
every finished row; running again resumes. A table made with other settings (backend and its version,
threads, optimisation level, device) is refused, not mixed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Collection, Protocol as _Protocol

try:  # in the lab
    from archlab.latency.table import (MAX_CV, OPT_LEVELS, REF_JUMP, RETRIES, SETTINGS, Protocol, RunnerError,
                                       cpu_model, is_noisy, noisy_keys, read_table, write_table)
except ImportError:  # in a bundle on a device: table.py beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from table import (MAX_CV, OPT_LEVELS, REF_JUMP, RETRIES, SETTINGS, Protocol, RunnerError,  # type: ignore
                       cpu_model, is_noisy, noisy_keys, read_table, write_table)


class Backend(_Protocol):
    """A runtime the lab times through: its name (a table's `backend`), its version, the options it runs
    with (e.g. Core ML's compute units; part of a table's identity), and how to load one bundle item so
    that calling the result runs it once."""
    name: str
    version: str
    options: dict

    def load(self, bundle: Path, item: dict, threads: int, opt_level: str) -> Callable[[], object]: ...


def load_manifest(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunnerError(f"{path}: cannot read the bundle manifest: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("items"), list):
        raise RunnerError(f"{path}: not a bundle manifest (an object with an `items` list)")
    for key in ("format", "items", "reference", "resolution", "opset"):
        if key not in manifest:
            raise RunnerError(f"{path}: manifest has no {key!r}")
    for i, item in enumerate(manifest["items"]):
        missing = {"key", "kind", "role", "file", "inputs"} - set(item)
        if missing:
            raise RunnerError(f"{path}: items[{i}] lacks {', '.join(sorted(missing))}")
    return manifest


def load_item(backend: Backend, bundle: Path, item: dict, threads: int, opt_level: str) -> tuple[Callable, float]:
    """(run, ms of a first run) of a bundle item; a missing, corrupt or failing model is a RunnerError."""
    try:
        run = backend.load(bundle, item, threads, opt_level)
        return run, _time(run, 1)[0]
    except RunnerError:
        raise
    except Exception as e:  # runtimes' errors have no common base class
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunnerError(f"{item['key']}: {backend.name} cannot load or run {bundle / item['file']}: {first}") from None


def _time(run: Callable, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def run_bundle(bundle: str | Path, out: str | Path, device: str, backend: Backend, protocol: Protocol = Protocol(), *,
               progress: bool = True, limit: int | None = None, reference_ms: float | None = None,
               redo: Collection[str] = (), retry_pause_s: float = 2.0) -> list[dict]:
    """Time every item of a bundle not yet in the table at `out` through `backend`; returns all rows.

    `protocol`: how items are timed. `reference_ms` (for a new table) fixes the reference speed that
    `norm_ms` is expressed in, e.g. another table's, so that two tables made at different times compare;
    by default the reference is timed at the start of the table's first session. `redo`: keys of rows to
    time again, replaced in place (e.g. `noisy_keys(rows, max_cv)`).
    """
    bundle, out = Path(bundle), Path(out)
    p = protocol.check()
    manifest = load_manifest(bundle)
    made_for = manifest.get("backend", "onnxruntime")
    if made_for != backend.name:
        raise RunnerError(f"{bundle}: a bundle for {made_for}, not {backend.name}: export one with --backend {backend.name}")
    settings = {"device": device, "threads": p.threads, "opt_level": p.opt_level, "backend": backend.name,
                "backend_options": {**backend.options, **manifest.get("lowering", {})}, "runtime_version": backend.version,
                "resolution": manifest["resolution"], "opset": manifest["opset"],
                "bundle": manifest.get("name", bundle.name)}
    meta, rows = read_table(out)
    if meta:
        clash = [f"{k}={meta.get(k)!r} (now {settings[k]!r})" for k in SETTINGS if meta.get(k) != settings[k]]
        here = cpu_model()
        if meta.get("cpu", here) != here:  # a table holds one device's times
            clash.append(f"cpu={meta['cpu']!r} (this machine: {here!r})")
        if clash:
            raise RunnerError(f"{out}: made with other settings: {', '.join(clash)}; write to another table")
    else:
        meta = {**settings, "cpu": cpu_model(), "platform": platform.platform(), "python": platform.python_version(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "protocol": {"warmup": p.warmup, "runs": p.runs, "rounds": p.rounds, "budget_s": p.budget_s,
                             "statistic": "median", "normalised_by": manifest["reference"]}}
    done = {r["key"] for r in rows} - set(redo)
    todo = [it for it in manifest["items"] if it["key"] not in done][:limit]
    if not todo:
        return rows
    meta.setdefault("protocol", {}).update(max_cv=p.max_cv, retries=p.retries)
    ref_warmup = meta["protocol"].setdefault("reference_warmup", p.reference_warmup if not rows else 0)
    settle_s = meta["protocol"].setdefault("settle_ms", p.settle if not rows else 0.0) / 1e3
    settle = (lambda: time.sleep(settle_s)) if settle_s else (lambda: None)
    ref_runs = meta["protocol"].setdefault("reference_runs", p.reference_runs if not rows else 1)
    session = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "timed": 0, "retimed": 0,
               "retries": 0, "above_gate": 0}
    meta.setdefault("sessions", []).append(session)
    position = {r["key"]: i for i, r in enumerate(rows)}

    ref_item = next((it for it in manifest["items"] if it["key"] == manifest["reference"]), None)
    if ref_item is None:
        raise RunnerError(f"{bundle}: reference {manifest['reference']!r} is not among the items")
    ref, _ = load_item(backend, bundle, ref_item, p.threads, p.opt_level)
    _time(ref, p.warmup)
    session_ref = meta.setdefault("reference_ms", reference_ms or statistics.median(_time(ref, max(p.rounds, 5))))

    recent: list[float] = []  # the references of this session's items, not disturbed

    def disturbed(row: dict) -> bool:
        if is_noisy(row, p.max_cv):
            return True
        base = statistics.median(recent[-9:]) if len(recent) >= 3 else None
        return base is not None and abs(float(row["ref_ms"]) / base - 1) > REF_JUMP

    bar = _progress(len(todo), progress)
    for it in todo:
        run, first = load_item(backend, bundle, it, p.threads, p.opt_level)
        _time(run, min(p.warmup, max(0, round(1000 / first) - 1)))  # up to `warmup` more, about 1 s at most
        per_round = max(1, min(p.runs // p.rounds, round(p.budget_s * 1e3 / (p.rounds * first))))
        row = None
        for attempt in range(1 + p.retries):
            if attempt:
                session["retries"] += 1
                time.sleep(retry_pause_s * attempt)  # let whatever disturbed the last attempt pass
            times, ref_times = [], []
            for _ in range(p.rounds):
                settle()
                times += _time(run, per_round)
                settle()
                _time(ref, ref_warmup)
                ref_times += _time(ref, ref_runs)
            got = _row(it, times, ref_times, session_ref)
            if row is None or (disturbed(got), float(got["cv"])) < (disturbed(row), float(row["cv"])):
                row = got
            if not disturbed(row):
                break
        if disturbed(row):
            session["above_gate"] += 1
            if not is_noisy(row, p.max_cv):
                session.setdefault("reference_jumps", []).append(it["key"])
        else:
            recent.append(float(row["ref_ms"]))
        if it["key"] in position:  # a noisy row re-timed: replace it where it was
            rows[position[it["key"]]] = row
            session["retimed"] += 1
        else:
            position[it["key"]] = len(rows)
            rows.append(row)
            session["timed"] += 1
        if "config" in it:  # a whole network: keep its config, so a predictor can be calibrated on it
            meta.setdefault("networks", {})[it["key"]] = it["config"]
        if it.get("undelegated"):  # ops the runtime's accelerated path does not take (e.g. XNNPACK's)
            meta.setdefault("undelegated", {})[it["key"]] = it["undelegated"]
        write_table(out, meta, rows)  # every finished row survives an interruption
        bar(it["key"])
    return rows


def _row(item: dict, times: list[float], ref_times: list[float], session_ref: float) -> dict:
    med, local_ref, mean = statistics.median(times), statistics.median(ref_times), statistics.fmean(times)
    return {"key": item["key"], "kind": item["kind"], "role": item["role"], "median_ms": f"{med:.5f}",
            "min_ms": f"{min(times):.5f}", "mean_ms": f"{mean:.5f}", "cv": f"{statistics.pstdev(times) / mean:.5f}",
            "runs": len(times), "ref_ms": f"{local_ref:.5f}", "norm_ms": f"{med * session_ref / local_ref:.5f}"}


def _progress(total: int, enabled: bool):
    count = [0]
    start = time.time()

    def step(key: str) -> None:
        count[0] += 1
        if enabled:
            eta = (time.time() - start) / count[0] * (total - count[0])
            print(f"\r[{count[0]}/{total}] eta {eta:5.0f}s  {key[:70]:<70}", end="", file=sys.stderr, flush=True)
            if count[0] == total:
                print(file=sys.stderr)

    return step


def summary(rows: list[dict], out: str | Path, max_cv: float = MAX_CV) -> str:
    """One line: rows in the table, and how many are above the noise gate (with the way to re-time them)."""
    noisy = len(noisy_keys(rows, max_cv))
    return f"{len(rows)} rows in {out}" + (f"; {noisy} above the noise gate (CV > {max_cv:.0%}): run again with "
                                           "--redo-noisy when the machine is quiet" if noisy else "")


def main(backend_of: Callable[[argparse.Namespace], Backend], name: str, argv: list[str] | None = None,
         options: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """A runner's command line: `python NAME BUNDLE --out table.csv --device-name my-phone [...]`;
    `options` adds a backend's own flags, which `backend_of(args)` reads."""
    p = argparse.ArgumentParser(prog=name, description="Time an archlab bundle on this device.")
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="table CSV to write (resumes if it exists)")
    p.add_argument("--device-name", dest="device", required=True, help="a name for this device, recorded in the table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--opt", default="all", choices=OPT_LEVELS, help="onnxruntime's graph optimisation (others: all)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=10.0, help="seconds per item; slow items get fewer runs")
    p.add_argument("--max-cv", type=float, default=MAX_CV, help="noise gate: re-time an item above this run-to-run CV")
    p.add_argument("--retries", type=int, default=RETRIES, help="re-timings of an item above the gate")
    p.add_argument("--redo-noisy", action="store_true", help="re-time the table's rows that are above the gate")
    if options:
        options(p)
    args = p.parse_args(argv)
    try:
        redo = noisy_keys(read_table(Path(args.out))[1], args.max_cv) if args.redo_noisy else ()
        protocol = Protocol(args.threads, args.opt, args.warmup, args.runs, args.rounds, args.budget_s, args.max_cv,
                            args.retries)
        rows = run_bundle(args.bundle, args.out, args.device, backend_of(args), protocol, progress=sys.stderr.isatty(),
                          redo=redo)
    except RunnerError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    print(summary(rows, args.out, args.max_cv))
    return 0
