"""`archlab supernet`: train a search space's weight-shared supernet once (`train`, a Ray Tune trial,
resumable), then score any design it holds with the weights it inherits, in seconds (`eval`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from archlab.cli.common import (TRIAL_FLAGS, Parser, data_config, dataset_args, folder, given, job_printer, positive_int,
                                table, train_args, train_config, trial_args)

STEPS_PER_PRESET_STEP = 8  # a supernet trains many sub-nets: by default 8x its preset's steps
SETTINGS_FLAGS = ("rule", "random_subnets", "distill", "distill_weight", "snapshot_every")
CLUSTER_FLAGS = tuple(f for f in TRIAL_FLAGS if f != "concurrency")  # one supernet is one trial


def add_parser(sub) -> None:
    sn = sub.add_parser("supernet", help="weight sharing: train a space's supernet once, score any design it holds "
                                         "in seconds")
    ssub = sn.add_subparsers(dest="supernet_command", required=True, parser_class=Parser)
    tr = ssub.add_parser("train", help="train the supernet of a search space (a Ray Tune trial; resumes in --out)",
                         description="Train the supernet of a search space at a proxy preset's scale. --steps "
                                     f"defaults to {STEPS_PER_PRESET_STEP}x the preset's (each step trains several sub-nets).")
    tr.add_argument("space", metavar="SPACE", help="a search-space YAML (every design it holds shares the weights)")
    dataset_args(tr)
    train_args(tr)
    tr.add_argument("--rule", help="sub-nets per step: sandwich (the largest, the smallest and --random-subnets random "
                                   "ones; default) or uniform (random ones only)")
    tr.add_argument("--random-subnets", type=int, help="random sub-nets per step (default 2)")
    tr.add_argument("--distill", help="in-place distillation from the largest sub-net: fixed (default), adaptive "
                                      "(SnapGen's task/kd scaling, capped at --distill-weight) or none")
    tr.add_argument("--distill-weight", type=float, help="weight of the distillation loss (default 1)")
    tr.add_argument("--snapshot-every", type=int, metavar="STEPS",
                    help="also keep the scored (EMA) weights every STEPS steps, to score at several lengths")
    trial_args(tr, concurrency_help=None)
    tr.add_argument("--out", type=folder, required=True, help="the supernet's folder (resumes; more --steps trains on)")
    tr.add_argument("--json", action="store_true", help="print the result as JSON")
    tr.set_defaults(run=cmd_train, resumes=True)

    ev = ssub.add_parser("eval", help="score designs with the weights they inherit from a trained supernet")
    ev.add_argument("supernet", metavar="DIR", help="a folder of `archlab supernet train`")
    ev.add_argument("target", metavar="CONFIG_OR_LADDER", help="a config YAML or a ladder YAML (every row, or --row)")
    ev.add_argument("--row", help="only this ladder row (name or 0-based index)")
    ev.add_argument("--images", type=positive_int, help="held-out images of the validation loss (default: the "
                                                         "supernet's preset's)")
    ev.add_argument("--finetune", type=positive_int, metavar="N",
                    help="also train each design N steps from its inherited weights, then score it")
    ev.add_argument("--step", type=int, help="use the weights of this snapshot (default: the final ones)")
    ev.add_argument("--threads", type=positive_int, help="torch threads (default: as the supernet trained)")
    ev.add_argument("--device", default="cpu", help="torch device")
    ev.add_argument("--json", action="store_true", help="print a JSON object with a `rows` list")
    ev.set_defaults(run=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    from archlab.cluster import TrialSettings
    from archlab.supernet import make_settings, run

    base = TrialSettings(data=asdict(data_config(args)), **given(args, *CLUSTER_FLAGS))
    t = train_config(args, threads=base.cpus_per_trial)
    if args.steps is None:
        t = replace(t, steps=STEPS_PER_PRESET_STEP * t.steps)
    options = given(args, *SETTINGS_FLAGS)
    settings = make_settings(args.space, replace(base, train=asdict(t)), args.proxy or "cpu", **options)
    result = run(settings, args.out, on_event=_printer(t.steps))
    if result is None:
        print(f"archlab: the supernet did not finish; continue with the same command (it resumes from {args.out})",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if result["status"] != "ok":
            print(f"archlab: the supernet training {result['status']}: {result.get('reason', 'no reason recorded')}",
                  file=sys.stderr)
            return 1
        minutes = (result["seconds"] + result.get("score_seconds", 0)) * (result.get("threads") or 1) / 60
        print(f"{args.out}: trained {result['steps']} steps ({minutes:.0f} CPU-minutes on {result.get('hardware', '?')})")
        print(f"  largest sub-net: val_loss {result['val_loss_largest']:.4f} ({result['params_largest']:,} params); "
              f"smallest: {result['val_loss_smallest']:.4f} ({result['params_smallest']:,})")
        print(f"  score designs: archlab supernet eval {args.out} CONFIG_OR_LADDER")
    return 0 if result["status"] == "ok" else 1


def _printer(steps: int):
    jobs = job_printer(lambda info: "supernet")

    def on_event(kind: str, job, info: dict | None) -> None:
        if kind == "report":
            losses = ", ".join(f"{k[5:]} {v:.4f}" for k, v in info.items() if k.startswith("loss_"))
            print(f"supernet: step {info['step']}/{steps}: training loss {losses}", file=sys.stderr, flush=True)
        elif kind != "scoring":
            jobs(kind, {"job": job.key, "result": info})
    return on_event


def cmd_eval(args: argparse.Namespace) -> int:
    from archlab.elastic import param_count
    from archlab.ladder import load_ladder
    from archlab.supernet import Supernet

    ladder = load_ladder(args.target)
    rows = [ladder.row(args.row)] if args.row is not None else ladder.rows
    sn = Supernet(args.supernet, step=args.step, device=args.device, threads=args.threads)
    for r in rows:  # every design must be held before any is scored
        sn.check(r.config)
    out = []
    for r in rows:
        s = sn.score(r.config, args.images)
        row = {"name": r.name, "params": param_count(sn.proxy(r.config)),
               "val_loss": s["val_loss"], "seconds": s["seconds"]}
        if args.finetune:
            f = sn.finetune(r.config, args.finetune, args.images)
            row.update(finetuned_val_loss=f["val_loss"], finetune_seconds=f["seconds"])
        out.append(row)
        if not args.json:
            print(f"{r.name}: val_loss {s['val_loss']:.4f} ({s['seconds']:.1f} s)", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"supernet": str(Path(args.supernet)), "step": sn.step, "rows": out}, indent=2))
        return 0
    header = ["design", "params", "inherited val_loss"] + ([f"after {args.finetune} steps"] if args.finetune else [])
    cells = [[r["name"], f"{r['params']:,}", f"{r['val_loss']:.4f}"]
             + ([f"{r['finetuned_val_loss']:.4f}" if r["finetuned_val_loss"] is not None else "diverged"]
                if args.finetune else []) for r in out]
    print(f"{args.supernet} (weights of step {sn.step}), validation loss on "
          f"{args.images or sn.train.val_images} held-out images:")
    print(table(cells, header, "lrr" + ("r" if args.finetune else "")))
    return 0
