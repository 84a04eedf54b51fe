"""One CPU-hour of search with the supernet evaluator: how many candidates it scores, and what it costs.

Runs `archlab search --evaluator supernet` once, uninterrupted and alone on the machine, with a fresh
run folder, and measures the whole machine's CPU time over the run (busy jiffies from /proc/stat:
the driver's scoring, Ray, and the `--retrain` trainings, whatever process did it) beside its wall
time. Then it reads the run's outputs and checks what the issue asks of such a search: every scored
candidate within the latency budget by prediction, and the `--retrain` picks trained standalone.
Writes `REPORT/search_hour.{json,md}` and copies the run's trials.csv and summary.md there.

    python benchmarks/search_hour.py --supernet runs/supernet-unet-s0 --dataset ../shared/data/tiny-imagenet-100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy since boot (every core; idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--supernet", required=True, help="a trained supernet folder (archlab supernet train)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--trials", type=int, default=500, help="candidates to score")
    p.add_argument("--retrain", type=int, default=3)
    p.add_argument("--budget-ms", type=float, default=900)
    p.add_argument("--proxy", default="cpu")
    p.add_argument("--sampler", default="tpe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", default="runs/search-hour", help="the run folder (must not exist: the timing needs one "
                                                              "uninterrupted run)")
    p.add_argument("--report", default="reports/weight_sharing")
    args = p.parse_args()
    run = Path(args.run)
    if run.exists():
        print(f"search_hour: {run} exists; the timing needs a fresh, uninterrupted run (remove it or give --run)",
              file=sys.stderr)
        return 2
    argv = [sys.executable, "-m", "archlab.cli", "search", "--evaluator", "supernet", "--supernet", args.supernet,
            "--budget-ms", str(args.budget_ms), "--trials", str(args.trials), "--retrain", str(args.retrain),
            "--proxy", args.proxy, "--dataset", args.dataset, "--val-per-class", str(args.val_per_class),
            "--sampler", args.sampler, "--seed", str(args.seed), "--cpus-per-trial", "1", "--out", str(run)]
    print("$ archlab", shlex.join(argv[3:]), flush=True)
    cpu0, t0 = busy_seconds(), time.monotonic()
    subprocess.run(argv, check=True, cwd=ROOT)
    cpu, wall = busy_seconds() - cpu0, time.monotonic() - t0

    import pandas as pd

    summary = json.loads((run / "summary.json").read_text())
    df = pd.read_csv(run / "trials.csv")
    scored = df[df["state"] == "COMPLETE"]
    retrained = [json.loads(f.read_text()) for f in sorted((run / "trials").glob("trial*.json"))]
    r = {
        "command": "python benchmarks/search_hour.py " + shlex.join(sys.argv[1:]),
        "search_command": "archlab " + shlex.join(argv[3:]),
        "host": f"{cpu_name()}, {os.cpu_count()} cores", "alone": True,
        "wall_minutes": round(wall / 60, 2), "cpu_minutes": round(cpu / 60, 2),
        "scored": int(len(scored)), "rejected_over_budget": int((df["state"] == "REJECTED").sum()),
        "failed": int((df["state"] == "FAIL").sum()),
        "all_within_budget": bool((scored["predicted_ms"] <= args.budget_ms).all()),
        "max_predicted_ms": float(scored["predicted_ms"].max()),
        "median_score_seconds": float(scored["score_seconds"].median()),
        "score_cpu_minutes": round(float(scored["score_seconds"].sum()) / 60, 2),
        "retrained": [{"trial": x.get("trial", x.get("key")), "status": x.get("status"), "val_loss": x.get("val_loss"),
                       "seconds": x.get("seconds")} for x in retrained],
        "best": summary.get("best"),
    }
    r["candidates_per_cpu_hour"] = round(r["scored"] / (cpu / 3600), 1)
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    from archlab.io import write_atomic

    for name in ("trials.csv", "summary.md"):
        shutil.copyfile(run / name, out / f"search_hour_{name}")
    write_atomic(out / "search_hour.json", json.dumps(r, indent=1, default=str) + "\n")
    ok = sum(x["status"] == "ok" for x in r["retrained"])
    md = "\n".join([
        "# One CPU-hour of search with the supernet evaluator", "",
        f"Command: `{r['command']}`", "", f"It ran: `{r['search_command']}`", "",
        f"Timed alone on {r['host']}: the whole machine's busy CPU time over the run (/proc/stat), wall time beside it.",
        "", "| | |", "|---|---|",
        f"| candidates scored (inherited val loss) | {r['scored']} |",
        f"| rejected before scoring (over {args.budget_ms:g} ms predicted) | {r['rejected_over_budget']} |",
        f"| failed | {r['failed']} |",
        f"| every scored candidate within the budget by prediction | {'yes' if r['all_within_budget'] else 'NO'} "
        f"(max {r['max_predicted_ms']:.0f} ms) |",
        f"| median scoring time of a candidate | {r['median_score_seconds']:.2f} s (1 thread) |",
        f"| scoring, summed | {r['score_cpu_minutes']:.1f} CPU-minutes |",
        f"| `--retrain {args.retrain}` picks trained standalone (`{args.proxy}` preset) | {ok} of {len(r['retrained'])} ok |",
        f"| whole search | {r['cpu_minutes']:.1f} CPU-minutes, {r['wall_minutes']:.1f} minutes wall |",
        f"| candidates per CPU-hour, the search's whole cost counted | {r['candidates_per_cpu_hour']:.0f} |",
        "", f"The search's answer: trial {(r['best'] or {}).get('trial')}, ranked by "
        f"{(r['best'] or {}).get('ranked_by')} {(r['best'] or {}).get('val_loss')}.",
        "", "The supernet's own training is not counted here (`weight_sharing.md` amortises it).", ""])
    write_atomic(out / "search_hour.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
