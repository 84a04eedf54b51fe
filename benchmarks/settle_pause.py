"""Does a pause between the item and the reference help the timing? (`Protocol.settle_ms`)

Times items of an exported onnxruntime bundle with the protocol's rounds (k runs of the item, then the
reference's warm-up run and 3 timed runs), once with no pause and once with `--pause-ms` before each
switch, in alternating order, twice each; reports per item the run-to-run CV, the median, and the
first run of each round against the rest. Run it alone (nothing else on the machine). On the 2-core
EPYC at 1 thread (2026-12-03, this procedure on 13 blocks of a DiT-table bundle: 10 that the table had
above the noise gate, 3 below) the pause raised the CV of 11 of 13 blocks (median 1.45x) and made each
round's first run slower (first / rest 1.38 against 1.21), so `Protocol` pauses only with more than one
thread. Any bundle (`archlab latency export`):

    python benchmarks/settle_pause.py runs/bundles/amd-epyc-2c.dit --threads 1 --items 13
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from archlab.latency.runner import OnnxRuntime
from archlab.latency.timing import _time, load_item, load_manifest


def rounds(run, ref, per_round: int, pause_s: float, n_rounds: int = 5) -> dict:
    times, first, rest = [], [], []
    for _ in range(n_rounds):
        time.sleep(pause_s)
        t = _time(run, per_round)
        times += t
        first.append(t[0])
        rest += t[1:]
        time.sleep(pause_s)
        _time(ref, 1)
        _time(ref, 3)
    return {"cv": statistics.pstdev(times) / statistics.fmean(times), "median": statistics.median(times),
            "first_over_rest": statistics.median(first) / statistics.median(rest)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--items", type=int, default=13, help="the bundle's first N items (not the reference)")
    ap.add_argument("--pause-ms", type=float, default=100.0)
    ap.add_argument("--out", type=Path, help="write the per-item results here as JSON")
    args = ap.parse_args(argv)
    manifest = load_manifest(args.bundle)
    backend = OnnxRuntime()
    ref_item = next(it for it in manifest["items"] if it["key"] == manifest["reference"])
    ref, _ = load_item(backend, args.bundle, ref_item, args.threads, "all")
    _time(ref, 5)
    out = []
    for it in [it for it in manifest["items"] if it["key"] != manifest["reference"]][:args.items]:
        run, first = load_item(backend, args.bundle, it, args.threads, "all")
        _time(run, min(5, max(0, round(1000 / first) - 1)))
        per_round = max(2, min(6, round(10e3 / (5 * first))))
        got = {0.0: [], args.pause_ms: []}
        for rep in range(2):
            for pause in (list(got) if rep == 0 else list(got)[::-1]):
                got[pause].append(rounds(run, ref, per_round, pause / 1e3))
        row = {"key": it["key"], **{f"{m}_{'pause' if p else 'none'}": statistics.fmean(g[m] for g in v)
                                     for p, v in got.items() for m in ("cv", "median", "first_over_rest")}}
        out.append(row)
        print(f"{it['key'][:60]:60s} CV {row['cv_none']:.3f} -> {row['cv_pause']:.3f}  median x"
              f"{row['median_pause'] / row['median_none']:.3f}  first/rest {row['first_over_rest_none']:.2f} -> "
              f"{row['first_over_rest_pause']:.2f}", flush=True)
    higher = sum(r["cv_pause"] > r["cv_none"] for r in out)
    print(f"{len(out)} items at {args.threads} thread(s): the pause raised the CV of {higher}; median CV ratio "
          f"{statistics.median(r['cv_pause'] / r['cv_none'] for r in out):.2f}; first/rest "
          f"{statistics.median(r['first_over_rest_none'] for r in out):.2f} -> "
          f"{statistics.median(r['first_over_rest_pause'] for r in out):.2f}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
