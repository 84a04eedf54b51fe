"""`archlab data`: load a dataset as the trainings would, summarise it, and optionally write a prepared
copy (a .pt file) for other machines.
"""

from __future__ import annotations

import argparse
import json
import sys

from archlab.cli.common import data_config, dataset_args, out_file


def add_parser(sub) -> None:
    da = sub.add_parser("data", help="load a dataset and summarise it; --export writes a prepared copy")
    dataset_args(da)
    da.add_argument("--export", type=out_file, metavar="FILE.pt", help="write the prepared set (uint8) for other machines")
    da.add_argument("--json", action="store_true")
    da.set_defaults(run=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    from archlab.data import load_dataset, save_dataset

    data = load_dataset(data_config(args), progress=sys.stderr.isatty())
    info = data.describe()
    if args.export:
        info["exported"] = str(save_dataset(data, args.export))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0
