"""`archlab train`: one proxy training (rectified flow) of a design, scored by FID, KID and validation
loss; its run folder holds a checkpoint it resumes from and `result.json`.
"""

from __future__ import annotations

import argparse
import json
import sys

from archlab.cli.common import data_config, dataset_args, folder, preset, train_args, train_config


def add_parser(sub) -> None:
    tr = sub.add_parser("train", help="train a design at proxy scale (rectified flow) and score it: FID, KID, val loss")
    tr.add_argument("target", metavar="CONFIG_OR_LADDER", help="an ArchConfig YAML or a ladder YAML (with --row)")
    tr.add_argument("--row", help="ladder row (name or 0-based index); default: the last row")
    dataset_args(tr)
    train_args(tr, threads=True)
    tr.add_argument("--out", type=folder, help="run folder: checkpoint (resumed from) and result.json")
    tr.add_argument("--json", action="store_true", help="print the result as a JSON object")
    tr.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from archlab.data import load_dataset
    from archlab.ladder import load_ladder
    from archlab.train import train

    args.resumes = args.out is not None  # an interrupted training continues from its folder
    ladder = load_ladder(args.target)
    row = ladder.row(args.row) if args.row is not None else ladder.rows[-1]
    tcfg = train_config(args, args.threads)
    tcfg.validate()  # before the data set is decoded
    data = load_dataset(data_config(args), progress=sys.stderr.isatty())
    result = train(row.config, data, tcfg, out=args.out, progress=sys.stderr.isatty())
    out = {**result.to_dict(), "design": row.name, "target": args.target, "dataset": data.describe(),
           "proxy": preset(args).name, "train": asdict(tcfg)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{row.name} on {data.source} ({data.num_classes} classes, {data.resolution}px, proxy {preset(args).name}), {result.steps} steps "
              f"in {result.seconds:.0f}s: {result.status}{' (' + result.reason + ')' if result.reason else ''}")
        if result.status == "ok":
            print(f"  val_loss {result.val_loss:.4f}" + (f"  FID {result.fid:.2f}  KID {result.kid:.4f} +- {result.kid_std:.4f}"
                                                         f"  [{result.fid_extractor}, {tcfg.samples} samples]"
                                                         if result.fid is not None else ""))
    return 0 if result.status == "ok" else 1
