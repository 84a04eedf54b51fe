"""How many candidates per second the latency predictor answers, as a search asks it: space points
(each built into a config, then predicted) through the batch API, on the committed table.

- cold: a freshly loaded predictor on its first N points (nothing memoised yet, the decomposition's
  segment cache cleared too);
- warm: N new points after the predictor has answered W others (a search some minutes in: the
  decomposition segments and block latencies it meets are memoised).

Each phase is timed `--rounds` times on fresh predictors and new points (median reported), with the
rate from configs (prediction only) and from points (config building included). It also checks that
the batch answers equal `Predictor.predict`'s block-by-block answers to the last bit. Run it alone.

    python benchmarks/query_speed.py --out reports/query_speed
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def phase(pred, space, rng: random.Random, n: int) -> dict:
    points = [space.sample_point(rng) for _ in range(n)]
    t0 = time.perf_counter()
    cfgs = [space.config(p) for p in points]
    t1 = time.perf_counter()
    ms = pred.predict_many(cfgs)
    t2 = time.perf_counter()
    return {"per_s_from_configs": n / (t2 - t1), "per_s_from_points": n / (t2 - t0), "cfgs": cfgs, "ms": ms}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default="latency_tables/amd-epyc-2c.csv")
    p.add_argument("--space", default="search_spaces/snapgen_unet.yaml")
    p.add_argument("--n", type=int, default=2000, help="points timed per phase")
    p.add_argument("--warm", type=int, default=20000, help="points answered before the warm phase")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="runs/query_speed")
    args = p.parse_args()

    from archlab import decompose
    from archlab.latency.predictor import Predictor, predictor_path
    from archlab.latency.table import cpu_model
    from archlab.space import load_space

    table = ROOT / args.table
    space = load_space(ROOT / args.space)
    res = {"cold": [], "warm": []}
    exact = True
    for r in range(args.rounds):
        rng = random.Random(1000 + r)
        decompose.cache_clear()  # cold: nothing memoised in this process either
        pred = Predictor.load(predictor_path(table))
        sp = space.at_resolution(pred.resolution)
        cold = phase(pred, sp, rng, args.n)
        for _ in range(args.warm // args.n):
            phase(pred, sp, rng, args.n)
        warm = phase(pred, sp, rng, args.n)
        for ph in (cold, warm):
            exact &= all(pred.predict(c).latency_ms == m for c, m in zip(ph["cfgs"][:200], ph["ms"][:200]))
        res["cold"].append(cold)
        res["warm"].append(warm)
        print(f"round {r + 1}/{args.rounds}: cold {cold['per_s_from_points']:,.0f} points/s, "
              f"warm {warm['per_s_from_points']:,.0f} points/s", file=sys.stderr, flush=True)
    summary = {name: {k: statistics.median(x[k] for x in runs) for k in ("per_s_from_configs", "per_s_from_points")}
               for name, runs in res.items()}
    result = {"table": args.table, "space": args.space, "n": args.n, "warm_after": args.warm, "rounds": args.rounds,
              "python": platform.python_version(), "cpu": cpu_model(), "same_as_block_by_block": exact, **summary,
              "command": "python benchmarks/query_speed.py " + shlex.join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "query_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Latency predictor: candidates per second", "",
          f"The batch API on `{args.table}` answering points of `{args.space}` ({args.n:,} points per phase, median of "
          f"{args.rounds} rounds, each on a freshly loaded predictor; {result['cpu']}, Python {result['python']}, alone "
          "on the machine). From points: building each config included, as a search does.", "",
          "Regenerate:", "", "```", result["command"], "```", "",
          "| phase | candidates/s from points | from configs |", "|---|---:|---:|",
          f"| cold: a fresh predictor's first {args.n:,} points | {summary['cold']['per_s_from_points']:,.0f} | "
          f"{summary['cold']['per_s_from_configs']:,.0f} |",
          f"| warm: {args.n:,} new points after {args.warm:,} | {summary['warm']['per_s_from_points']:,.0f} | "
          f"{summary['warm']['per_s_from_configs']:,.0f} |", "",
          f"Batch answers equal to `Predictor.predict`'s block-by-block answers, to the last bit: "
          f"{'yes' if exact else 'NO'} (200 points per phase and round checked; a test compares 300 more with the "
          "answers of the code before the fast path)."]
    (out / "query_speed.md").write_text("\n".join(md) + "\n")
    print(f"cold {summary['cold']['per_s_from_points']:,.0f} points/s, warm {summary['warm']['per_s_from_points']:,.0f} "
          f"points/s; same answers: {exact}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
