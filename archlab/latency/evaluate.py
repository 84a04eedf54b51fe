"""Benchmark the predictor on held-out networks measured end to end (`archlab latency evaluate`).

Held-out networks are sampled from the search space with their own seed and must not share an
architecture with any network of the fitted table (the calibration set): the sample skips those.
They are measured into a table of their own (same device, threads, optimisation level and protocol
as the fitted table, and the same reference speed, so `norm_ms` is in the same units), which
resumes like any table. The report compares predicted with measured milliseconds, calibrated and
raw block sums side by side, next to the measurement noise, and times the query paths.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from archlab.config import ArchConfig
from archlab.errors import ArchlabError
from archlab.io import write_atomic
from archlab.latency import backends
from archlab.latency.export import network_key
from archlab.latency.measure import measure
from archlab.latency.predictor import TARGET, Predictor, load_for_table, predictor_path, read_checked_table
from archlab.latency.table import Protocol, cpu_model, noisy_keys, runtime
from archlab.ladder import Ladder
from archlab.space import SearchSpace


def errors(pred: np.ndarray, meas: np.ndarray) -> dict:
    """Accuracy of predictions against measurements: relative errors and rank agreement."""
    from scipy.stats import kendalltau, spearmanr

    rel = pred / meas - 1

    def num(x) -> float | None:  # JSON has no NaN (a rank statistic of constant values)
        return None if math.isnan(x) else float(x)

    return {"n": int(len(rel)), "mape": float(np.mean(np.abs(rel))), "rmspe": float(np.sqrt(np.mean(rel ** 2))),
            "max_ape": float(np.max(np.abs(rel))), "bias": float(np.mean(rel)),
            "within_5": float(np.mean(np.abs(rel) <= 0.05)), "within_10": float(np.mean(np.abs(rel) <= 0.10)),
            "kendall_tau": num(kendalltau(pred, meas).statistic), "spearman_rho": num(spearmanr(pred, meas).statistic)}


def throughput(pred: Predictor, space: SearchSpace, n: int = 2000, seed: int = 7) -> dict:
    """Candidates per second of the batch API, from configs and from space points (config included)."""
    rng = random.Random(seed)
    points = [space.sample_point(rng) for _ in range(n)]
    t0 = time.perf_counter()
    cfgs = [space.config(p) for p in points]
    t1 = time.perf_counter()
    pred.predict_many(cfgs[:50])  # warm the block memo as a search would after its first candidates
    t2 = time.perf_counter()
    pred.predict_many(cfgs)
    t3 = time.perf_counter()
    return {"candidates": n, "per_s_from_configs": n / (t3 - t2), "per_s_from_points": n / (t3 - t2 + t1 - t0)}


def evaluate(space: SearchSpace, table: str | Path, heldout_table: str | Path, bundle: str | Path, *, n: int = 50,
             seed: int = 2, ladder: Ladder | None = None, beside: Sequence[str | Path] = (), progress=None,
             export_jobs: int = 1) -> dict:
    """Predict and measure `n` held-out networks of `space` (and the `ladder`'s rows) on the table's device.
    `beside`: other evaluated tables (e.g. another runtime on the same device) whose measured ladder ratios
    the report shows next to this table's."""
    if n < 3:
        raise ArchlabError(f"--networks: {n}; an evaluation needs at least 3 held-out networks")
    table = Path(table)
    pred = load_for_table(table)
    meta, table_rows = read_checked_table(table)
    res = pred.resolution
    space = space.at_resolution(res)
    calibrated = set(pred.calibration.digests) if pred.calibration else set()
    nets = [cfg for _, cfg in space.sample(n, seed, prefix="heldout", avoid=calibrated)]
    ladder_cfgs = ladder.configs(res) if ladder is not None else []
    for cfg in nets + ladder_cfgs:  # anything the predictor cannot cover fails now, not after measuring
        pred.predict(cfg)
    here = cpu_model()
    if meta.get("cpu", here) != here and backends.get(meta["backend"]).here:
        raise ArchlabError(f"{table}: measured on a {meta['cpu']}, and this machine is a {here}: time its "
                           "held-out networks on the table's device")
    if Path(heldout_table).is_file():  # and a held-out table from other settings too
        check_same_settings(read_checked_table(heldout_table)[0], meta, heldout_table, table)

    protocol = Protocol.of_table(meta)  # held-out networks timed as the table's blocks were
    gate = protocol.max_cv
    measure(heldout_table, bundle, networks=nets + ladder_cfgs, resolution=res, device=meta["device"], protocol=protocol,
            opset=int(meta["opset"] or 20), reference_ms=float(meta["reference_ms"]), progress=progress,
            backend=meta["backend"], export_jobs=export_jobs)
    hmeta, hrows = read_checked_table(heldout_table, device=meta["device"], resolution=res)
    check_same_settings(hmeta, meta, heldout_table, table)
    by_key = {r["key"]: r for r in hrows}

    def measured(cfgs: list[ArchConfig]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        got = [by_key[network_key(c)] for c in cfgs]
        return (np.array([float(r[TARGET]) for r in got]), np.array([float(r["median_ms"]) for r in got]),
                np.array([float(r["cv"]) for r in got]))

    predictions = [pred.predict(c) for c in nets]
    cal, raw = np.array([p.latency_ms for p in predictions]), np.array([p.raw_sum_ms for p in predictions])
    meas, meas_raw, cvs = measured(nets)
    ref_ratio = np.array([float(by_key[network_key(c)]["ref_ms"]) for c in nets]) / float(meta["reference_ms"])

    sources = {k: sum(p.to_dict(False)["sources"][k] for p in predictions) for k in ("measured", "fitted", "extrapolated")}
    report = {
        **errors(cal, meas),
        "block_sources": sources,
        "noise_cv": float(np.median(cvs)),
        "noise": {"median_run_cv": float(np.median(cvs)), "max_run_cv": float(np.max(cvs)),
                  "reference_drift": {"min": float(ref_ratio.min()), "median": float(np.median(ref_ratio)),
                                      "max": float(ref_ratio.max())},
                  "table_rows": len(table_rows), "table_median_cv": float(np.median([float(r["cv"]) for r in table_rows])),
                  "table_rows_above_gate": len(noisy_keys(table_rows, gate)), "gate_cv": gate,
                  "what": "run_cv: each network's run-to-run coefficient of variation; reference_drift: the "
                          "reference block's local median over the fitted table's, per network (1 = no drift); "
                          "table_*: the fitted table's rows (blocks and calibration networks)"},
        "raw_sum": errors(raw, meas),
        "against_unnormalised_median": errors(cal, meas_raw),
        "calibration": {"intercept_ms": pred.calibration.intercept_ms, "slope": pred.calibration.slope,
                        "n_networks": pred.calibration.n, "loo_mape": pred.calibration.loo_mape}
        if pred.calibration else None,
        "blocks": {k: {"n": m.n, "loo_mape": m.loo_mape} for k, m in sorted(pred.kinds.items())},
        "networks": [{"name": c.name, "key": network_key(c), "predicted_ms": round(float(p), 3),
                      "raw_sum_ms": round(float(r), 3), "measured_ms": round(float(m), 3), "run_cv": round(float(v), 4)}
                     for c, p, r, m, v in zip(nets, cal, raw, meas, cvs)],
        "setup": {"device": meta["device"], "cpu": meta.get("cpu"), "threads": meta["threads"],
                  "opt_level": meta["opt_level"], "runtime": runtime(meta), "resolution": res,
                  "table": str(table), "heldout_table": str(heldout_table), "space": space.path, "seed": seed,
                  "calibration_networks": len(calibrated), "date": _dt.date.today().isoformat()},
    }
    if ladder is not None:
        report["ladder"] = ladder_rows(pred, ladder, ladder_cfgs, *measured(ladder_cfgs)[:2])
        report["beside"] = [beside_ratios(b, ladder_cfgs) for b in beside]
    elif beside:
        raise ArchlabError("--beside compares the ladder's measured ratios: give --ladder too")
    report["undelegated"] = undelegated(table_rows, meta, hmeta, nets + ladder_cfgs)
    report["speed"] = speed(table, space, ladder_cfgs[-1] if ladder_cfgs else nets[0])
    return report


def ladder_rows(pred: Predictor, ladder: Ladder, cfgs: list[ArchConfig], meas: np.ndarray, meas_raw: np.ndarray) -> list[dict]:
    out = []
    calibrated = set(pred.calibration.digests) if pred.calibration else set()
    for row, cfg, m, mr in zip(ladder.rows, cfgs, meas, meas_raw):
        p = pred.predict(cfg)
        out.append({"index": row.index, "name": row.name, "in_calibration": cfg.digest() in calibrated,
                    "predicted_ms": p.latency_ms, "raw_sum_ms": p.raw_sum_ms,
                    "measured_ms": float(m), "measured_median_ms": float(mr), "error": p.latency_ms / float(m) - 1,
                    "paper_latency_ms": row.paper.get("latency_ms")})
    base = out[0]
    for r in out:
        r["predicted_ratio"] = r["predicted_ms"] / base["predicted_ms"]
        r["measured_ratio"] = r["measured_ms"] / base["measured_ms"]
        pl, bl = r["paper_latency_ms"], base["paper_latency_ms"]
        r["paper_ratio"] = pl / bl if pl and bl else None
    return out


def beside_ratios(table: str | Path, cfgs: list[ArchConfig]) -> dict:
    """Another table's measured latency of the ladder rows over its baseline's, from its held-out table
    (`archlab latency evaluate --ladder` measured them there)."""
    meta, _ = read_checked_table(table)
    heldout = Path(table).with_suffix(".heldout.csv")
    if not heldout.is_file():
        raise ArchlabError(f"--beside: {table} has no held-out table ({heldout}); run archlab latency evaluate --ladder on it")
    _, rows = read_checked_table(heldout)
    by_key = {r["key"]: float(r[TARGET]) for r in rows}
    missing = [c.name for c in cfgs if network_key(c) not in by_key]
    if missing:
        raise ArchlabError(f"--beside: {heldout} has no measurement of ladder row {missing[0]!r} at this resolution; "
                           f"run archlab latency evaluate --ladder on {table}")
    ms = [by_key[network_key(c)] for c in cfgs]
    return {"table": str(table), "runtime": runtime(meta), "threads": meta.get("threads"), "device": meta.get("device"),
            "cpu": meta.get("cpu"), "measured_ms": ms, "measured_ratio": [m / ms[0] for m in ms]}


def undelegated(table_rows: list[dict], meta: dict, hmeta: dict, cfgs: list[ArchConfig]) -> dict:
    """Where the runtime's accelerated path (a delegate, e.g. XNNPACK) left ops to its fallback kernels:
    per block kind, how many of the table's blocks and which ops; and how many of the measured networks."""
    left = {**meta.get("undelegated", {}), **hmeta.get("undelegated", {})}
    kinds: dict = {}
    for r in table_rows:
        if r["role"] != "block":
            continue
        k = kinds.setdefault(r["kind"], {"blocks": 0, "with_fallback": 0, "ops": {}})
        k["blocks"] += 1
        if r["key"] in left:
            k["with_fallback"] += 1
            for op, count in left[r["key"]].items():
                k["ops"][op] = k["ops"].get(op, 0) + count
    nets = [left.get(network_key(c)) for c in cfgs]
    return {"kinds": kinds, "networks": len(nets), "networks_with_fallback": sum(bool(x) for x in nets),
            "network_ops": sorted({op for x in nets if x for op in x})}


def speed(table: Path, space: SearchSpace, cfg: ArchConfig) -> dict:
    """Query time of one network (fresh predictor loaded from disk, as the CLI does) and batch rates."""
    t0 = time.perf_counter()
    fresh = Predictor.load(predictor_path(table))
    fresh.predict(cfg)
    t1 = time.perf_counter()
    return {"query_one_network_s": t1 - t0, "query_network": cfg.name, **throughput(fresh, space)}


def write_report(report: dict, out_dir: str | Path, command: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "command": command}
    js = write_atomic(out / "latency_eval.json", json.dumps(report, indent=1) + "\n")
    md = write_atomic(out / "latency_eval.md", markdown(report))
    return js, md


def check_same_settings(hmeta: dict, meta: dict, heldout: str | Path, table: Path) -> None:
    clash = [k for k in ("device", "cpu", "threads", "opt_level", "backend", "backend_options", "runtime_version",
                         "resolution", "opset", "reference_ms")
             if hmeta.get(k) != meta.get(k)]
    if clash:
        raise ArchlabError(f"{heldout}: made with other {', '.join(clash)} than {table}; use a new held-out table")


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def markdown(r: dict) -> str:
    s = r["setup"]
    cal, raw = r, r["raw_sum"]
    lines = [
        "# Latency predictor: held-out evaluation",
        "",
        f"Device `{s['device']}` ({s['cpu']}), {s.get('runtime') or runtime(s)}, {s['threads']} thread(s), "
        f"graph optimisation `{s['opt_level']}`, latent {s['resolution']}x{s['resolution']} "
        f"({8 * s['resolution']} px), {s['date']}.",
        f"{r['n']} networks sampled from `{s['space']}` (seed {s['seed']}), none sharing an architecture with the "
        f"{s['calibration_networks']} calibration networks of `{s['table']}`; measured end to end into "
        f"`{s['heldout_table']}`.",
        "",
        "Regenerate (measures what the held-out table lacks, then predicts):",
        "",
        f"    {r['command']}",
        "",
        "## Accuracy on held-out networks",
        "",
        "| predictor | MAPE | RMSPE | max APE | bias | within ±5% | within ±10% | Kendall τ | Spearman ρ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in (("calibrated (the predictor)", cal), ("raw sum of blocks", raw),
                    ("calibrated, vs un-normalised medians", r["against_unnormalised_median"])):
        lines.append(f"| {name} | {_pct(e['mape'])} | {_pct(e['rmspe'])} | {_pct(e['max_ape'])} | {_pct(e['bias'])} | "
                     f"{_pct(e['within_5'])} | {_pct(e['within_10'])} | {_num(e['kendall_tau'])} | {_num(e['spearman_rho'])} |")
    src = r["block_sources"]
    lines += ["", f"Blocks of the held-out networks: {src['measured']} measured, {src['fitted']} fitted, "
                  f"{src['extrapolated']} extrapolated. The table covers every block the space can produce, so this "
                  "tests the block sums and the calibration; the per-kind models that cover unmeasured blocks are "
                  "checked by leave-one-out below."]
    n = r["noise"]
    d = n["reference_drift"]
    lines += [
        "",
        f"Measurement noise: median run-to-run CV {_pct(n['median_run_cv'])} (max {_pct(n['max_run_cv'])}); the "
        f"reference block took {d['min']:.3f}-{d['max']:.3f}x (median {d['median']:.3f}x) its time in the fitted "
        "table, which `norm_ms` divides out.",
    ]
    if "table_rows" in n:
        lines[-1] += (f" The fitted table's {n['table_rows']} rows: median CV {_pct(n['table_median_cv'])}, "
                      f"{n['table_rows_above_gate']} above the {_pct(n['gate_cv'])} noise gate.")
    if r.get("calibration"):
        c = r["calibration"]
        lines += ["", f"Calibration: measured = {c['intercept_ms']:.2f} ms + {c['slope']:.4f} x sum(blocks), fitted on "
                      f"{c['n_networks']} networks (leave-one-out MAPE {_pct(c['loo_mape'])})."]
    lines += ["", "## Block models (leave-one-out error within each kind)", "", "| kind | rows | LOO MAPE |", "|---|---:|---:|"]
    lines += [f"| {k} | {b['n']} | {_pct(b['loo_mape']) or 'n/a (< 3 rows)'} |" for k, b in r["blocks"].items()]
    if r.get("ladder"):
        lines += ["", "## Ablation ladder at this resolution",
                  "",
                  "The paper's latencies are an iPhone at 1024 px (128x128 latent); ours are this CPU at "
                  f"{8 * s['resolution']} px, so compare ratios to the baseline, not milliseconds. At a "
                  f"{s['resolution']}x{s['resolution']} latent the attention maps are small, so removing self-attention "
                  "saves far less than at 128x128. No ladder row is among the calibration networks"
                  + ("." if not any(x["in_calibration"] for x in r["ladder"]) else
                     " except those marked (calibration)."),
                  "", "| # | row | predicted ms | measured ms | error | predicted / base | measured / base | paper / base |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        others = r.get("beside") or []
        lines[-2] = lines[-2].replace(" paper / base |", "".join(
            f" measured / base, {b['runtime']}" + ("" if b.get("device") in (None, s["device"]) else f", {b['device']}")
            + " |" for b in others) + " paper / base |")
        lines[-1] += "---:|" * len(others)
        for i, x in enumerate(r["ladder"]):
            paper = "" if x["paper_ratio"] is None else f"{x['paper_ratio']:.3f}"
            lines.append(f"| {x['index']} | {x['name']}{' (calibration)' if x['in_calibration'] else ''} | {x['predicted_ms']:.1f} | {x['measured_ms']:.1f} | "
                         f"{_pct(x['error'])} | {x['predicted_ratio']:.3f} | {x['measured_ratio']:.3f} | "
                         + "".join(f"{b['measured_ratio'][i]:.3f} | " for b in others) + f"{paper} |")
        for b in others:
            where = ("the same device" if (b.get("device"), b.get("cpu")) == (s["device"], s["cpu"])
                     else f"device `{b.get('device')}` ({b.get('cpu')})")
            lines += ["", f"Beside: `{b['table']}` ({b['runtime']}, {b['threads']} thread(s)), the same rows measured "
                          f"end to end on {where} (its held-out table)."]
    u = r.get("undelegated") or {}
    if any(k["with_fallback"] for k in u.get("kinds", {}).values()) or u.get("networks_with_fallback"):
        lines += ["", "## Ops outside the runtime's accelerated path", "",
                  "Ops the delegate did not take run on the runtime's fallback kernels, and their time is in every "
                  "number above (recorded per item at export; the table's metadata keeps them as `undelegated`). "
                  f"{u['networks_with_fallback']} of the {u['networks']} measured networks have some: "
                  f"{', '.join(u['network_ops']) or '-'}.", "",
                  "| kind | blocks | with fallback ops | ops (count over those blocks) |", "|---|---:|---:|---|"]
        for kind, k in sorted(u["kinds"].items()):
            ops = ", ".join(f"{op} {c}" for op, c in sorted(k["ops"].items(), key=lambda x: -x[1])) or "-"
            lines.append(f"| {kind} | {k['blocks']} | {k['with_fallback']} | {ops} |")
    sp = r["speed"]
    lines += ["", "## Speed", "",
              f"- one network query (`{sp['query_network']}`), loading the predictor from disk: "
              f"{1e3 * sp['query_one_network_s']:.1f} ms",
              f"- batch API (`Predictor.predict_many`), {sp['candidates']} candidates: "
              f"{sp['per_s_from_configs']:,.0f}/s from configs, {sp['per_s_from_points']:,.0f}/s from space points "
              "(building each config included)",
              "", "## Networks", "", "| network | predicted ms | raw sum ms | measured ms | error | run CV |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {x['name']} | {x['predicted_ms']:.1f} | {x['raw_sum_ms']:.1f} | {x['measured_ms']:.1f} | "
              f"{_pct(x['predicted_ms'] / x['measured_ms'] - 1)} | {_pct(x['run_cv'])} |" for x in r["networks"]]
    return "\n".join(lines) + "\n"
