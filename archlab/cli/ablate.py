"""`archlab ablate`: run an ablation ladder (cost, predicted and measured latency, K proxy trainings per
row) into a run folder that re-running resumes; `archlab report` turns the folder into the report.
"""

from __future__ import annotations

import argparse
import json
import sys

from archlab.cli.common import (TRIAL_FLAGS, batch_printer, data_config, dataset_args, export_jobs_arg, folder, given,
                                train_args, train_config, trial_args)
from archlab.errors import ArchlabError

# flags whose defaults are AblateSettings' (archlab/ablate.py)
SETTINGS_FLAGS = ("seeds", "table", "threads", "results", *TRIAL_FLAGS)


def add_parser(sub) -> None:
    ab = sub.add_parser("ablate", help="run an ablation ladder: cost, predicted and measured latency, K proxy trainings per row")
    ab.add_argument("ladder", metavar="LADDER", help="ladder YAML (e.g. search_spaces/snapgen_ablation.yaml)")
    ab.add_argument("--seeds", type=int,
                    help="proxy trainings per row (training seeds --seed, --seed+1, ...; a verdict needs at least 3)")
    ab.add_argument("--rows", help="comma-separated row indices or names (default: every row)")
    ab.add_argument("--table", help="latency table to predict from; measured networks are looked up in its folder")
    ab.add_argument("--measure",
                    help="latent resolutions to measure end to end in ORT, comma-separated, or `none` (default 32,128)")
    ab.add_argument("--threads", type=int, help="ORT threads for measuring (default: the table's)")
    export_jobs_arg(ab)
    trial_args(ab, concurrency_help="trainings at once (Ray Tune trials)")
    ab.add_argument("--out", type=folder, help="run folder: settings, cost, latency, checkpoints and (unless --results) results; default runs/ablate-<ladder name>; re-running resumes it")
    ab.add_argument("--results", type=folder,
                    help="keep the per-training results here instead of OUT/results (small files: commit them "
                         "beside the report, and it regenerates, or takes more seeds, without training again)")
    dataset_args(ab)
    train_args(ab)
    ab.add_argument("--json", action="store_true", help="print the runs' results as JSON")
    ab.set_defaults(run=cmd_ablate, resumes=True)


def _resolutions(text: str) -> list[int]:
    """--measure: comma-separated latent resolutions, or `none`."""
    if text.strip().lower() in ("none", ""):
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ArchlabError(f"--measure: {text!r} is not a comma-separated list of resolutions") from None


def cmd_ablate(args: argparse.Namespace) -> int:
    import shlex
    from dataclasses import asdict, replace

    from archlab.ablate import AblateSettings, run_ablation
    from archlab.ladder import load_ladder

    ladder = load_ladder(args.ladder)
    rows = None
    if args.rows:
        rows = sorted({ladder.row(x.strip()).index for x in args.rows.split(",") if x.strip()})
    measure = {} if args.measure is None else {"measure": _resolutions(args.measure)}
    settings = AblateSettings(ladder=args.ladder, rows=rows, export_jobs=args.export_jobs,
                              data=asdict(data_config(args)), command="archlab " + shlex.join(args.argv),
                              **measure, **given(args, *SETTINGS_FLAGS))
    settings = replace(settings, train=asdict(train_config(args, threads=settings.cpus_per_trial)))
    out = args.out or f"runs/ablate-{ladder.name}"
    run = run_ablation(settings, out, progress=sys.stderr.isatty(), on_event=batch_printer())
    done = [r for r in run["results"] if r.get("status") == "ok"]
    if args.json:
        print(json.dumps({"run_dir": run["run_dir"], "finished": len(done), "trainings": len(run["results"]),
                          "results": run["results"], "report": f"archlab report {out}"}, indent=2, default=str))
        return 0 if len(done) == len(run["results"]) else 1
    print(f"{run['run_dir']}: {len(done)} of {len(run['results'])} trainings finished")
    for r in run["results"]:
        if r.get("status") != "ok":
            print(f"  row {r['index']} {r['name']} seed {r['seed']}: {r.get('status')}: {r.get('reason', '')}")
    print(f"report: archlab report {out}")
    return 0 if len(done) == len(run["results"]) else 1
