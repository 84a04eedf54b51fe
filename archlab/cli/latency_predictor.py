"""`archlab latency transfer`, `fit`, `query` and `evaluate`: the latency predictor's commands (fit a
measured table, move a predictor to a new device, predict a design, benchmark on held-out networks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from archlab.cli.common import export_jobs_arg, folder, table
from archlab.errors import ArchlabError
from archlab.io import progress_bar


def add_parsers(lsub) -> None:
    """The predictor's subcommands of `archlab latency` (its subparsers `lsub`)."""
    tf = lsub.add_parser("transfer", help="a new device's predictor from a measured device's and a few whole "
                                          "networks timed on the new one (or, with --measure, how accurate that is)")
    tf.add_argument("--from", dest="source", required=True, help="the measured device's table (fitted)")
    tf.add_argument("--to", dest="targets", action="append", required=True, metavar="TABLE",
                    help="whole networks timed on the new device (`archlab latency measure --networks-of SOURCE ...`); "
                         "writes TABLE's predictor. Repeat with --measure to evaluate several devices")
    tf.add_argument("--measure", help="evaluate instead: comma-separated N (e.g. 0,3,5,10,20); fits on N of the "
                                      "target's networks that the source calibrated on, scores the target's others")
    tf.add_argument("--blocks", default="0", metavar="K,...",
                    help="with --measure: also with K blocks timed on the target, e.g. 0,10,40 (the K that carry most "
                         "of the pool's time: `archlab latency measure --blocks-of SOURCE --top-blocks K`)")
    tf.add_argument("--draws", type=int, default=20, help="random sets of N networks per N (with --measure)")
    tf.add_argument("--out", type=folder, default="reports", help="with --measure: where latency_transfer.{md,json} go")
    tf.add_argument("--json", action="store_true")
    tf.set_defaults(run=cmd_latency_transfer)
    ft = lsub.add_parser("fit", help="fit the predictor of a table (writes <table>.predictor.json)")
    ft.add_argument("table", help="a measured table, e.g. latency_tables/<device>.csv")
    ft.add_argument("--json", action="store_true", help="print the fit's summary as JSON")
    ft.set_defaults(run=cmd_latency_fit)
    q = lsub.add_parser("query", help="predicted latency of a block, a network config or every row of a ladder")
    q.add_argument("target", metavar="TARGET",
                   help="a block key (kind(name=value,...)@HxW, see `archlab show X --blocks`), a block YAML "
                        "(kind, resolution and hyper-parameters), an ArchConfig YAML or a ladder YAML")
    q.add_argument("--table", required=True, help="the measured table whose fitted predictor to use")
    q.add_argument("--device-name", dest="device", help="refuse a table measured on another device (its name)")
    q.add_argument("--row", help="only this ladder row (name or 0-based index)")
    q.add_argument("--resolution", type=int, help="set the networks' latent resolution (must be the table's)")
    q.add_argument("--blocks", action="store_true", help="print every block's latency for ladders too")
    q.add_argument("--json", action="store_true", help="print a JSON object with a `rows` list")
    q.set_defaults(run=cmd_latency_query)
    ev = lsub.add_parser("evaluate", help="benchmark the predictor on held-out networks measured end to end")
    ev.add_argument("--space", required=True, help="search space to sample held-out networks from")
    ev.add_argument("--table", required=True, help="the fitted table")
    ev.add_argument("--heldout", help="table of held-out measurements (default <table>.heldout.csv; resumes)")
    ev.add_argument("--ladder", help="also measure and predict every row of this ladder")
    ev.add_argument("--beside", action="append", default=[], metavar="TABLE",
                    help="another evaluated table (e.g. another runtime on this device): its measured ladder ratios "
                         "beside this table's (with --ladder)")
    ev.add_argument("--networks", type=int, default=50, metavar="N", help="held-out networks (default 50)")
    export_jobs_arg(ev)
    ev.add_argument("--seed", type=int, default=2, help="seed of the held-out sample (default 2)")
    ev.add_argument("--out", type=folder, default="runs/latency-eval",
                    help="folder for latency_eval.json and latency_eval.md (the lab's committed one: --out reports)")
    ev.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    ev.set_defaults(run=cmd_latency_evaluate)


def _counts(flag: str, text: str) -> list[int]:
    try:
        out = [int(n) for n in text.split(",")]
    except ValueError:
        out = [-1]
    if min(out) < 0:
        raise ArchlabError(f"{flag}: {text!r} is not a comma-separated list of integers >= 0")
    return out


def cmd_latency_transfer(args: argparse.Namespace) -> int:
    import shlex

    from archlab.latency import transfer

    if args.measure is None:
        if len(args.targets) != 1:
            raise ArchlabError("--to: one target table to fit a predictor for (several only with --measure)")
        pred, path = transfer.fit_for_table(args.source, args.targets[0])
        t = pred.settings["transfer"]
        if args.json:
            print(json.dumps({"predictor": str(path), **t}, indent=2))
        else:
            print(f"{path}: {args.source} transferred by {t['method']} from {t['n']} networks and {t['blocks']} blocks "
                  f"(attention x{t['factors']['attention']:.3f}, rest x{t['factors']['rest']:.3f}, "
                  f"+{t['intercept_ms']:.2f} ms)")
        return 0
    ns, ks = _counts("--measure", args.measure), _counts("--blocks", args.blocks)
    if args.draws < 1:
        raise ArchlabError(f"--draws: must be >= 1, got {args.draws}")
    report = transfer.evaluate_tables(args.source, args.targets, ns, args.draws,
                                      command="archlab " + shlex.join(args.argv), ks=ks)
    js, md = transfer.write_report(report, args.out)
    print(json.dumps(report, indent=2) if args.json else f"wrote {md} and {js}")
    return 0


def cmd_latency_fit(args: argparse.Namespace) -> int:
    from archlab.latency.predictor import fit, predictor_path, read_checked_table
    from archlab.latency.table import MAX_CV, noisy_keys

    pred = fit(args.table, progress=progress_bar("fitting kinds", "kind"))
    path = pred.save(predictor_path(args.table))
    meta, rows = read_checked_table(args.table)
    gate = meta.get("protocol", {}).get("max_cv", MAX_CV)
    noisy = noisy_keys(rows, gate)
    if args.json:
        print(json.dumps({"predictor": str(path), "measured_blocks": len(pred.measured), "kinds": len(pred.kinds),
                          "rows": len(rows), "noisy_rows": len(noisy), "max_cv": gate}, indent=2))
    else:
        print(f"{path}: {len(pred.measured)} measured blocks, {len(pred.kinds)} kind models")
    if noisy:
        print(f"warning: {len(noisy)} of {len(rows)} rows have a run-to-run CV above {gate:.0%} (timed while the "
              f"machine was busy); time them again with `archlab latency measure ... --redo-noisy` and fit again",
              file=sys.stderr)
    if args.json:
        return 0
    print(table([(k, m.n, "" if m.loo_mape is None else f"{100 * m.loo_mape:.1f}%",
                  ", ".join(f"{f}={c:.3g}" for f, c in zip(m.features, m.coef) if c))
                 for k, m in sorted(pred.kinds.items())], ("kind", "rows", "LOO MAPE", "ms per unit"), align="lrrl"))
    c = pred.calibration
    if c is None:
        print("no whole networks in the table: predictions are raw block sums (uncalibrated)")
    else:
        loo = "" if c.loo_mape is None else f", leave-one-out MAPE {100 * c.loo_mape:.1f}%"
        print(f"calibration on {c.n} networks: measured = {c.intercept_ms:.2f} ms + {c.slope:.4f} x sum(blocks) "
              f"(raw sum MAPE {100 * c.raw_mape:.1f}%{loo})")
    return 0


def cmd_latency_query(args: argparse.Namespace) -> int:
    from archlab.latency.predictor import load_for_table
    from archlab.latency.query import query

    pred = load_for_table(args.table, device=args.device)
    out = query(pred, args.target, row=args.row, resolution=args.resolution)
    rows, blocks = out["rows"], out["kind"] == "blocks"
    if args.json:
        print(json.dumps({"target": args.target, "table": args.table, **{k: v for k, v in out.items() if k != "kind"}},
                         indent=2))
        return 0
    print(f"{args.target}: predicted on {out['device']} ({out['threads']} thread(s), "
          f"latent {pred.resolution}x{pred.resolution}) from {args.table}")
    if blocks:
        for r in rows:
            print(f"{r['latency_ms']:.4f} ms  {r['blocks'][0]['source']}  {r['name']}")
        return 0
    if len(rows) > 1:
        header = ["row", "latency ms", "raw sum ms", "ratio"] + (["paper ratio"] if any("paper_ratio_to_first" in r for r in rows) else [])
        print(table([[r["name"], f"{r['latency_ms']:.2f}", f"{r['raw_sum_ms']:.2f}", f"{r['ratio_to_first']:.3f}"]
                     + ([f"{r['paper_ratio_to_first']:.3f}" if "paper_ratio_to_first" in r else ""] if len(header) > 4 else [])
                     for r in rows], header, align="l" + "r" * (len(header) - 1)))
    for r in rows if (len(rows) == 1 or args.blocks) else []:
        src = ", ".join(f"{n} {s}" for s, n in r["sources"].items() if n)
        print(f"\n{r['name']}: {r['latency_ms']:.2f} ms (sum of blocks {r['raw_sum_ms']:.2f} ms, calibrated; {src})")
        print(table([(b["name"], f"{b['latency_ms']:.3f}", f"{100 * b['latency_ms'] / r['raw_sum_ms']:.1f}%",
                      b["source"], b["key"]) for b in r["blocks"]],
                    ("block", "ms", "share", "source", "signature"), align="lrrll"))
    if any(r.get("extrapolated") for r in rows):
        print("\nwarning: some blocks are outside the shapes the table covers (source `extrapolated`)", file=sys.stderr)
    return 0


def _maybe(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def cmd_latency_evaluate(args: argparse.Namespace) -> int:
    import shlex

    from archlab.latency.evaluate import evaluate, write_report
    from archlab.ladder import load_ladder
    from archlab.space import load_space

    heldout = args.heldout or str(Path(args.table).with_suffix(".heldout.csv"))
    report = evaluate(load_space(args.space), args.table, heldout, Path("runs") / "bundles" / Path(heldout).stem,
                      n=args.networks, seed=args.seed, ladder=load_ladder(args.ladder) if args.ladder else None,
                      beside=args.beside, progress=progress_bar("exporting", "model"), export_jobs=args.export_jobs)
    command = "archlab " + " ".join(shlex.quote(a) for a in args.argv)
    js, md = write_report(report, args.out, command)
    if args.json:
        print(json.dumps({**report, "files": [str(js), str(md)]}, indent=2, default=str))
        return 0
    print(f"{report['n']} held-out networks: MAPE {100 * report['mape']:.1f}%, within ±10% {100 * report['within_10']:.0f}%, "
          f"Kendall tau {_maybe(report['kendall_tau'], '.3f')} (raw block sum: MAPE {100 * report['raw_sum']['mape']:.1f}%); "
          f"noise CV {100 * report['noise_cv']:.1f}%")
    print(f"wrote {js} and {md}")
    return 0
