"""How fast the `archlab` command answers `--help`: the parser is built without importing torch,
Ray, Optuna or ONNX Runtime (each command imports what it needs when it runs).

Times each command's `--help` as a fresh process, `--rounds` times, interleaved with a bare
`python -c pass` (the interpreter's own start-up) so both see the same machine; reports the medians,
and whether any heavy library was imported (`python -X importtime`). Run it alone: a training beside
it makes every number slower.

    python benchmarks/cli_startup.py --rounds 15 --out reports/cli_startup
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["train", "--help"], ["search", "--help"], ["ablate", "--help"], ["latency", "query", "--help"])
HEAVY = ("torch", "ray", "optuna", "onnxruntime", "pandas", "matplotlib", "fvcore", "torchmetrics")


def wall(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t


def heavy_imports(args: list[str]) -> list[str]:
    """The heavy libraries `archlab ARGS` imports (from `python -X importtime`)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "archlab", *args], capture_output=True, text=True,
                         cwd=ROOT).stderr
    names = {line.split("|")[-1].strip().split(".")[0] for line in out.splitlines() if line.startswith("import time:")}
    return sorted(names & set(HEAVY))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="runs/cli_startup", help="folder for cli_startup.md and cli_startup.json")
    args = p.parse_args()
    exe = str(Path(sys.executable).with_name("archlab"))
    cases = {"python -c pass": [sys.executable, "-c", "pass"]}
    cases.update({"archlab " + " ".join(c): [exe, *c] for c in COMMANDS})
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds):
        for name, argv in cases.items():
            times[name].append(wall(argv))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    rows = [{"command": name, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
             "heavy_imports": heavy_imports(cases[name][1:]) if name.startswith("archlab") else []}
            for name, ts in times.items()]
    result = {"rounds": args.rounds, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
              "command": "python benchmarks/cli_startup.py " + shlex.join(sys.argv[1:]), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# `archlab --help` start-up time", "",
             f"Each command run as a fresh process, {args.rounds} rounds interleaved with the interpreter's own start-up "
             "(`python -c pass`), alone on the machine; median, min and max wall seconds. Heavy imports: which of "
             f"{', '.join(HEAVY)} the command imported (`python -X importtime`).", "",
             "Regenerate:", "", "```", result["command"], "```", "",
             "| command | median s | min s | max s | heavy imports |", "|---|---:|---:|---:|---|"]
    lines += [f"| `{r['command']}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
              f"{', '.join(r['heavy_imports']) or 'none'} |" for r in rows]
    (out / "cli_startup.md").write_text("\n".join(lines) + "\n")
    for r in rows:
        print(f"{r['command']}: {r['median_s']:.3f} s (heavy imports: {', '.join(r['heavy_imports']) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
