"""`archlab report`: write the ablation report (Markdown, CSV, plots) from a folder that `archlab
ablate` wrote, each change's direction set beside the paper's.
"""

from __future__ import annotations

import argparse
import json

from archlab.cli.common import file_name, folder


def add_parser(sub) -> None:
    rp = sub.add_parser("report", help="write the ablation report (Markdown, CSV, plots) from an ablate folder")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `archlab ablate`")
    rp.add_argument("--out", type=folder, default="runs/report",
                    help="where to write NAME.md, NAME.csv and the plots (default runs/report; the lab's "
                         "committed report is --out reports)")
    rp.add_argument("--name", default="ablation", type=file_name,
                    help="the report's file names (default ablation; e.g. snapgenpp_ablation for the SnapGen++ ladder)")
    rp.add_argument("--json", action="store_true", help="print the report's files and tally as JSON")
    rp.set_defaults(run=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    import shlex
    from dataclasses import asdict

    from archlab.report import tally, write_report

    rep = write_report(args.run_dir, args.out, command="archlab " + shlex.join(args.argv), name=args.name)
    t = tally(rep["changes"])
    if args.json:
        print(json.dumps({"out": rep["out"], "rows": [asdict(r) for r in rep["rows"]],
                          "changes": [asdict(c) for c in rep["changes"]], "directions": t}, indent=2))
        return 0
    print(f"{rep['out']}/{args.name}.md, {args.name}.csv and plots: {len(rep['rows'])} rows; directions: {t['agree']} agree "
          f"with the paper, {t['disagree']} disagree, {t['noise']} within noise")
    return 0
