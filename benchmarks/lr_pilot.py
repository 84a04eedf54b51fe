"""Learning-rate pilot behind the presets: validation loss along a short proxy training per lr.

Trains ladder rows at the cpu preset's scale (16 px, width x1/16, batch 32) with each learning rate
and reads the validation loss at several step counts (one run per row and lr, resumed from its
checkpoint between step counts, so a longer reading continues the same run). It is how the presets'
lr was chosen: the one that gets furthest in a few hundred steps without diverging.

    python benchmarks/lr_pilot.py --dataset ../shared/data/tiny-imagenet-100 --out reports/lr_pilot
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--rows", default="baseline,separable-conv")
    p.add_argument("--lrs", default="0.0003,0.001,0.002")
    p.add_argument("--steps", default="100,200,400")
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--work", default="runs/lr_pilot")
    p.add_argument("--out", default="runs/lr_pilot/report")
    args = p.parse_args()
    import torch

    from archlab import presets
    from archlab.data import DataConfig, load_dataset
    from archlab.io import write_atomic
    from archlab.ladder import load_ladder
    from archlab.train import train

    torch.set_num_threads(1)
    pre = presets.get("cpu")
    ladder = load_ladder("search_spaces/snapgen_ablation.yaml")
    data = load_dataset(DataConfig(args.dataset, pre.image_size, None, None, args.val_per_class))
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    for name in args.rows.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            for n in steps:
                t = pre.train_config(steps=n, lr=lr, samples=0, checkpoint_every=min(steps))
                r = train(ladder.row(name).config, data, t, out=Path(args.work) / f"{name}-lr{lr:g}", with_scores=False)
                rows.append({"row": name, "lr": lr, "steps": n, "status": r.status, "val_loss": r.val_loss})
                print(rows[-1], flush=True)
    command = "python benchmarks/lr_pilot.py " + shlex.join(sys.argv[1:])
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    lines = ["# Learning-rate pilot", "", "Validation loss of ladder rows at the `cpu` preset's scale, seed 0, by lr "
             "and step count (one run per row and lr).", "", "```", command, "```", "",
             "| row | lr | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for name in args.rows.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            vals = [r for r in rows if r["row"] == name and r["lr"] == lr]
            lines.append(f"| {name} | {lr:g} | " + " | ".join(
                f"{r['val_loss']:.4f}" if r["val_loss"] is not None else r["status"] for r in vals) + " |")
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
