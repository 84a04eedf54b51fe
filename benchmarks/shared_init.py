"""Does sharing the initial weights of common blocks narrow the ablation's intervals?

Reads two `archlab ablate` folders made with the same ladder, data and proxy but `--init shared` and
`--init sequential` (one generator for the whole model, in build order: two designs share no initial
weights), and compares, per score, over the ladder's row-to-row changes and the seeds both have:

- the correlation over seeds of two adjacent rows' scores (what pairing by seed can exploit);
- the half-width of the paired 95% interval of the change, and of the unpaired (Welch) one;
- how many of the changes each resolves (interval excluding 0).

Writes `<out>/shared_init.md` and `.json`.

    python benchmarks/shared_init.py --shared runs/ablate-tin100 --sequential runs/ablate-tin100-seqinit --out reports
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

SCORES = ("val_loss", "fid", "kid")


def changes(run_dir: Path, seeds: int) -> dict:
    from archlab.report import load_run, rows
    from archlab.stats import compare

    run = load_run(run_dir)
    summary = rows(run)
    out = {"init": run["settings"].train.get("init", "sequential"), "seeds": seeds, "scores": {}}
    for key in SCORES:
        comps = []
        for a, b in zip(summary, summary[1:]):
            c = compare(a.scores[key].seeds[:seeds], b.scores[key].seeds[:seeds])
            if c.paired is None or c.unpaired is None:
                continue
            comps.append({"row": b.name, "mean": c.mean, "correlation": c.correlation,
                          "paired_half_width": c.paired.half_width, "unpaired_half_width": c.unpaired.half_width,
                          "paired_resolves": c.paired.excludes_zero, "unpaired_resolves": c.unpaired.excludes_zero})
        med = (lambda k: statistics.median([c[k] for c in comps if c[k] is not None]) if comps else None)
        out["scores"][key] = {"changes": comps, "median_correlation": med("correlation"),
                              "median_paired_half_width": med("paired_half_width"),
                              "median_unpaired_half_width": med("unpaired_half_width"),
                              "paired_resolved": sum(c["paired_resolves"] for c in comps),
                              "unpaired_resolved": sum(c["unpaired_resolves"] for c in comps)}
    return out


def _f(v, fmt=".3g") -> str:
    return "-" if v is None else format(v, fmt)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", required=True, help="ablate folder trained with --init shared")
    p.add_argument("--sequential", required=True, help="ablate folder trained with --init sequential")
    p.add_argument("--seeds", type=int, default=3, help="the first N seeds of each (both must have them)")
    p.add_argument("--out", default="runs/shared-init")
    args = p.parse_args()
    from archlab.io import write_atomic

    command = "python benchmarks/shared_init.py " + shlex.join(sys.argv[1:])
    result = {"command": command, "shared": changes(Path(args.shared), args.seeds),
              "sequential": changes(Path(args.sequential), args.seeds)}
    lines = ["# Shared initialisation of common blocks: does it narrow the ablation's intervals?", "",
             f"The SnapGen ladder's {len(result['shared']['scores']['val_loss']['changes'])} row-to-row changes, "
             f"{args.seeds} seeds each, trained twice with the same proxy and data: once with `--init shared` (every "
             "module's initial weights drawn from a generator seeded by (seed, its path in the model), so adjacent "
             "rows start their common blocks identically) and once with `--init sequential` (one generator in build "
             "order: the first block that differs shifts every later draw). Both share batches, timesteps and noise "
             "seed by seed. Medians over the changes.", "", "```", command, "```", "",
             "| score | init | correlation of adjacent rows over seeds | paired 95% half-width | unpaired 95% "
             "half-width | changes resolved paired / unpaired |", "|---|---|---|---|---|---|"]
    for key in SCORES:
        for init in ("shared", "sequential"):
            s = result[init]["scores"][key]
            n = len(s["changes"])
            lines.append(f"| {key} | {init} | {_f(s['median_correlation'], '.2f')} | {_f(s['median_paired_half_width'])} | "
                         f"{_f(s['median_unpaired_half_width'])} | {s['paired_resolved']} / {s['unpaired_resolved']} "
                         f"of {n} |")
    out = Path(args.out)
    write_atomic(out / "shared_init.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out / "shared_init.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'shared_init.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
