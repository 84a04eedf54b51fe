"""Faster proxy steps? Training steps/s of the cpu preset's model under candidate speed-ups, paired.

Each round times every variant on the same design, batch and thread count, one after the other
(order rotated per round), and the ratio to the baseline is taken within the round, so the
machine's drift between rounds cancels; the report gives the median ratio and every round's.

Variants (each keeps the training the same up to float rounding):
- `baseline`: what `archlab.train` does today;
- `fused-adamw`: AdamW(fused=True), one kernel for the whole update instead of a loop over tensors;
- `channels-last`: model and inputs in channels_last memory format;
- `compile`: torch.compile of the model (inductor; compile time reported apart, not in steps/s).

    python benchmarks/step_speed.py --rounds 5 --out reports/step_speed     # alone on the machine
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("baseline", "fused-adamw", "channels-last", "compile")


def make(variant: str, arch, classes: int):
    from archlab.train import ProxyModel

    model = ProxyModel(arch, classes, init_seed=0)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if variant == "fused-adamw" else {}))
    if variant == "channels-last":
        model = model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    fn = torch.compile(model) if variant == "compile" else model
    return model, fn, ema, opt, start


def time_steps(variant: str, arch, batch: int, steps: int, classes: int = 100) -> dict:
    from archlab.train import flow_loss

    model, fn, ema, opt, start = make(variant, arch, classes)
    g = torch.Generator().manual_seed(0)
    res = arch.latent.resolution
    x = torch.randn(batch, 3, res, res, generator=g)
    eps = torch.randn(x.shape, generator=g)
    if variant == "channels-last":
        x, eps = x.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
    y, t = torch.randint(0, classes, (batch,), generator=g), torch.rand(batch, generator=g)

    def step():
        loss = flow_loss(fn, x, y, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 0.001)

    step()  # warm-up (and compilation)
    warm = time.perf_counter() - start
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"steps_per_s": steps / (time.perf_counter() - t0), "first_step_s": warm}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant and round")
    p.add_argument("--proxy", default="cpu")
    p.add_argument("--row", default="baseline", help="ladder row to train")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="runs/step_speed")
    args = p.parse_args()
    from archlab import presets
    from archlab.io import write_atomic
    from archlab.ladder import load_ladder
    from archlab.train import proxy_arch

    torch.set_num_threads(args.threads)
    pre = presets.get(args.proxy)
    t = pre.train_config()
    arch = proxy_arch(load_ladder("search_spaces/snapgen_ablation.yaml").row(args.row).config, pre.image_size, t)
    variants = args.variants.split(",")
    rounds = []
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        rounds.append({v: time_steps(v, arch, t.batch, args.steps) for v in order})
        print(f"round {r}: " + ", ".join(f"{v} {rounds[-1][v]['steps_per_s']:.2f}/s" for v in variants), flush=True)
    summary = {}
    for v in variants:
        ratios = [rd[v]["steps_per_s"] / rd["baseline"]["steps_per_s"] for rd in rounds]
        summary[v] = {"median_steps_per_s": statistics.median(rd[v]["steps_per_s"] for rd in rounds),
                      "median_ratio": statistics.median(ratios), "ratios": ratios,
                      "first_step_s": statistics.median(rd[v]["first_step_s"] for rd in rounds)}
    command = "python benchmarks/step_speed.py " + shlex.join(sys.argv[1:])
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"command": command, "proxy": args.proxy, "row": args.row,
                                                       "batch": t.batch, "image_size": pre.image_size,
                                                       "threads": args.threads, "variants": summary}, indent=1) + "\n")
    lines = ["# Training step speed-ups at proxy scale", "",
             f"Ladder row `{args.row}` at the `{args.proxy}` preset's scale ({pre.image_size} px, width x{t.width_mult}, "
             f"batch {t.batch}), {args.threads} thread(s), {args.rounds} rounds of {args.steps} steps per variant, timed "
             "alone on the machine. Ratio: steps/s over the baseline's in the same round.", "", "```", command, "```", "",
             "| variant | steps/s (median) | ratio to baseline (median) | per-round ratios | first step (s) |",
             "|---|---|---|---|---|"]
    for v, s in summary.items():
        lines.append(f"| {v} | {s['median_steps_per_s']:.2f} | {s['median_ratio']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in s['ratios'])} | {s['first_step_s']:.1f} |")
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
