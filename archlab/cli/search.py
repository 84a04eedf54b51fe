"""`archlab search`: latency-constrained architecture search (Optuna on Ray Tune): the predictor
rejects candidates over the budget, the rest get proxy trainings; `--resume` continues a run folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from archlab.cli.common import (TRIAL_FLAGS, data_config, dataset_args, folder, given, job_printer, train_args,
                                train_config, trial_args)
from archlab.errors import ArchlabError

# flags whose defaults are SearchSettings' (archlab/search.py)
SETTINGS_FLAGS = ("trials", "objective", "sampler", "storage", "evaluator", "supernet", "eval_images", "retrain",
                  *TRIAL_FLAGS)


def add_parser(sub) -> None:
    se = sub.add_parser("search", help="latency-constrained architecture search: Optuna on Ray Tune, proxy trainings")
    se.add_argument("--space", default="search_spaces/snapgen_unet.yaml", help="search space YAML")
    se.add_argument("--table", default="latency_tables/amd-epyc-2c.csv", help="measured latency table (fitted)")
    se.add_argument("--budget-ms", type=float, help="predicted-latency budget; candidates over it are never trained")
    se.add_argument("--trials", type=int, help="candidates to train (rejected ones do not count)")
    se.add_argument("--objective", help="val_loss, fid or kid (minimised)")
    se.add_argument("--multi", action="store_true", help="optimise (objective, predicted latency) for a Pareto front")
    se.add_argument("--sampler", help="tpe, nsga2 or random")
    trial_args(se, concurrency_help="trials at once")
    se.add_argument("--storage", help="Optuna storage URL (default: a journal file in the run folder)")
    se.add_argument("--no-asha", action="store_true", help="no early stopping on the training curve")
    se.add_argument("--evaluator", help="train (default): a proxy training per candidate; supernet: the validation loss "
                                        "with the weights inherited from --supernet, seconds a candidate")
    se.add_argument("--supernet", metavar="DIR", help="a folder of `archlab supernet train` over --space")
    se.add_argument("--eval-images", type=int, help="held-out images of an inherited score (default 128)")
    se.add_argument("--retrain", type=int, metavar="K", help="then train the K best candidates standalone with --proxy "
                                                             "(--evaluator supernet; default 0)")
    se.add_argument("--out", type=folder, help="run folder (default runs/search-<date>-<time>)")
    se.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted search (all other flags come from it)")
    dataset_args(se)
    train_args(se)
    se.add_argument("--json", action="store_true", help="print the search's summary as JSON")
    se.set_defaults(run=cmd_search)


def _search_printer(every: int = 25):
    rejected, best = [0], [None]
    jobs = job_printer(lambda info: f"trial {info['trial']} ({info.get('predicted_ms') or 0:.0f} ms predicted)")

    def on_event(kind: str, info: dict) -> None:
        if kind == "rejected":
            rejected[0] += 1
            return
        if kind == "scored":  # a candidate scored with inherited weights: a line every `every`
            if best[0] is None or info["val_loss"] < best[0][0]:
                best[0] = (info["val_loss"], info["trial"], info["predicted_ms"])
            if info["finished"] % every == 0 or info["finished"] == info["trials"]:
                v, n, ms = best[0]
                print(f"scored {info['finished']}/{info['trials']} ({rejected[0]} over the budget rejected): best "
                      f"inherited val_loss {v:.4f} (trial {n}, {ms:.0f} ms predicted); {info['seconds']:.1f} s a candidate",
                      file=sys.stderr, flush=True)
            return
        if kind == "start" and rejected[0]:
            print(f"  {rejected[0]} candidate(s) over the budget rejected before training", file=sys.stderr)
            rejected[0] = 0
        jobs(kind, info)
    return on_event


def _size(run_dir: Path) -> int:
    return sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())


def cmd_search(args: argparse.Namespace) -> int:
    import datetime as dt
    from dataclasses import asdict, replace

    from archlab.search import LATENCY, SearchSettings, run_search

    if args.resume:
        out, settings = args.resume, None
    else:
        if args.budget_ms is None:
            raise ArchlabError("--budget-ms: required (e.g. archlab latency query on a design you like gives a scale)")
        settings = SearchSettings(space=args.space, table=args.table, budget_ms=args.budget_ms, multi=args.multi,
                                  seed=args.seed, asha=not args.no_asha, data=asdict(data_config(args)),
                                  **given(args, *SETTINGS_FLAGS))
        settings = replace(settings, train=asdict(train_config(args, threads=settings.cpus_per_trial)))
        out = args.out or f"runs/search-{dt.datetime.now():%Y%m%d-%H%M%S}"
    args.resume_command = f"archlab search --resume {out}"  # what an interrupted search says
    summary = run_search(settings, out, resume=bool(args.resume), on_event=_search_printer())
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 1 if "stopped" in summary else 0
    run = Path(summary["run_dir"])
    o = summary["settings"]["objective"]
    if "inherited" in summary:
        i = summary["inherited"]
        print(f"{run}: {i['scored']} scored with inherited weights, {summary['rejected_over_budget']} rejected over the "
              f"budget, {summary['failed']} failed; {i['retrained']} retrained standalone")
    else:
        print(f"{run}: {summary['trained']} trained, {summary['rejected_over_budget']} rejected over the budget, "
              f"{summary['stopped_early']} stopped early, {summary['failed']} failed; early stopping {summary['asha']}")
    if "best" in summary:
        b = summary["best"]
        print(f"best: trial {b['trial']}, {b['ranked_by'].replace('_', ' ')} {b[o]:.4g} at {b[LATENCY]:.0f} ms "
              f"predicted -> {b['config']}")
    print(f"files: {run / 'summary.md'}, {run / 'trials.csv'}, {run / 'pareto.png'}, {run / 'best'}/ "
          f"({_size(run) / 2 ** 20:.1f} MB in the run folder)")
    print(f"study: optuna-dashboard {run / 'optuna.journal'}; training curves: tensorboard --logdir {run / 'ray'}")
    if "stopped" in summary:
        print(summary["stopped"], file=sys.stderr)
        return 1
    return 0
