"""`archlab latency`: the latency lab. Here the group's parser and the measuring commands: `export`
(a bundle to time on another device), `run` (time a bundle here) and `measure` (export and time here,
in chunks); the predictor's commands are in `latency_predictor`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from archlab.cli.latency_predictor import add_parsers as add_predictor_parsers
from archlab.cli.common import Parser, defaults, export_jobs_arg, folder, out_file, positive_int
from archlab.errors import ArchlabError
from archlab.io import progress_bar


def add_parser(sub) -> None:
    lat = sub.add_parser("latency", help="latency lab: export bundles, time them on a device, fit and query predictors")
    lsub = lat.add_subparsers(dest="latency_command", required=True, parser_class=Parser)
    ex = lsub.add_parser("export", help="export blocks and networks to a bundle (to time on another device)")
    _selection_args(ex)
    _backend_arg(ex)
    export_jobs_arg(ex)
    ex.add_argument("--opset", type=int, default=20, help="ONNX opset (onnxruntime bundles)")
    ex.add_argument("--out", type=folder, required=True, help="bundle folder (resumes if it exists)")
    ex.add_argument("--json", action="store_true", help="print the bundle's summary as JSON")
    ex.set_defaults(run=cmd_latency_export)
    rn = lsub.add_parser("run", help="time a bundle here (the same as the bundle's own runner)")
    rn.add_argument("bundle")
    _backend_arg(rn)
    rn.add_argument("--out", type=out_file, required=True, help="table CSV, e.g. latency_tables/<device>.csv (resumes)")
    _timing_args(rn)
    rn.add_argument("--json", action="store_true", help="print the table's rows as JSON")
    rn.set_defaults(run=cmd_latency_run)
    ms = lsub.add_parser("measure", help="export and time here, in chunks (resumes; deletes timed model files)")
    _selection_args(ms)
    _backend_arg(ms)
    export_jobs_arg(ms)
    ms.add_argument("--out", type=out_file, required=True, help="table CSV, e.g. latency_tables/<device>.csv (resumes)")
    ms.add_argument("--bundle", help="scratch bundle folder (default runs/bundles/<table name>)")
    ms.add_argument("--keep-onnx", action="store_true", help="keep the exported model files")
    ms.add_argument("--opset", type=int, default=20)
    _timing_args(ms)
    ms.add_argument("--json", action="store_true", help="print the table's rows as JSON")
    ms.set_defaults(run=cmd_latency_measure)
    add_predictor_parsers(lsub)


def _selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", help="search space: every block signature it can produce")
    p.add_argument("--networks", type=int, default=0, metavar="N", help="also N whole networks sampled from --space")
    p.add_argument("--seed", type=int, default=0, help="seed for --networks")
    p.add_argument("--ladder", help="ladder (or config): every block of its rows")
    p.add_argument("--ladder-networks", action="store_true", help="also every ladder row as a whole network")
    p.add_argument("--networks-of", action="append", default=[], metavar="TABLE",
                   help="also the whole networks that TABLE timed (e.g. a measured device's, to transfer its predictor)")
    p.add_argument("--blocks-of", action="append", default=[], metavar="TABLE",
                   help="also the --top-blocks blocks that carry most of TABLE's calibration networks' time (fitted "
                        "TABLE; timed on a new device, they let `archlab latency transfer` rescale each block kind)")
    p.add_argument("--top-blocks", type=positive_int, default=40, metavar="K", help="how many blocks --blocks-of takes (default 40)")
    p.add_argument("--resolution", type=int, default=32, help="latent resolution (default 32 = 256 px)")


def _backend_arg(p: argparse.ArgumentParser) -> None:
    from archlab.latency.backends import RUNTIMES

    p.add_argument("--backend", default="onnxruntime", choices=list(RUNTIMES),
                   help="the runtime: onnxruntime (default), executorch-xnnpack ('.[executorch]'), coreml ('.[coreml]'; "
                        "timed on macOS by the bundle's runner_coreml.py)")


def _timing_args(p: argparse.ArgumentParser) -> None:
    """The timing protocol's flags; their defaults are Protocol's (archlab/latency/table.py)."""
    from archlab.latency.table import Protocol

    d = defaults(Protocol)
    p.add_argument("--device-name", dest="device", required=True,
                   help="a name for this device, recorded in the table (--device is a torch device elsewhere)")
    p.add_argument("--threads", type=int, default=d["threads"], help=f"the runtime's threads (default {d['threads']})")
    p.add_argument("--opt", default=d["opt_level"],
                   help="onnxruntime's graph optimisation level: disabled, basic, extended, all")
    p.add_argument("--warmup", type=int, default=d["warmup"])
    p.add_argument("--runs", type=int, default=d["runs"], help="timed runs per item (fewer for slow items, see --budget-s)")
    p.add_argument("--rounds", type=int, default=d["rounds"],
                   help="rounds; each also times the reference beside the item (3 runs, after a warm-up and a pause)")
    p.add_argument("--budget-s", type=float, default=d["budget_s"], help="about this many seconds per item")
    p.add_argument("--max-cv", type=float, default=d["max_cv"],
                   help=f"noise gate: time an item again when its run-to-run CV is above this (default {d['max_cv']:.2f})")
    p.add_argument("--retries", type=int, default=d["retries"],
                   help=f"re-timings of an item above the gate (default {d['retries']})")
    p.add_argument("--redo-noisy", action="store_true",
                   help="also time again the table's rows that are above the gate (replaced in place)")


def _selection(args: argparse.Namespace) -> tuple[list, list]:
    from archlab.latency.export import select

    return select(space=args.space, ladder=args.ladder, networks=args.networks, seed=args.seed,
                  resolution=args.resolution, ladder_networks=args.ladder_networks, networks_of=args.networks_of,
                  blocks_of=args.blocks_of, top_blocks=args.top_blocks)


def _timing(args: argparse.Namespace):
    """The timing protocol the flags give."""
    from archlab.latency.table import Protocol

    return Protocol(args.threads, args.opt, args.warmup, args.runs, args.rounds, args.budget_s, args.max_cv,
                    args.retries)


def _print_rows(args: argparse.Namespace, rows: list, max_cv: float) -> None:
    from archlab.latency.timing import summary

    print(json.dumps({"table": args.out, "rows": rows}, indent=2, default=str) if args.json
          else summary(rows, args.out, max_cv))


def cmd_latency_export(args: argparse.Namespace) -> int:
    from archlab.latency.export import export_bundle

    blocks, networks = _selection(args)
    manifest = export_bundle(args.out, blocks, networks, resolution=args.resolution, opset=args.opset,
                             progress=progress_bar("exporting", "model"), backend=args.backend, jobs=args.export_jobs)
    undelegated = sorted({op for it in manifest["items"] for op in it.get("undelegated", {})})
    if args.json:
        print(json.dumps({"out": args.out, "backend": args.backend, "models": len(manifest["items"]),
                          "resolution": args.resolution, "opset": manifest["opset"], "undelegated_ops": undelegated},
                         indent=2))
        return 0
    opset = f", opset {args.opset}" if manifest["opset"] else ""
    print(f"{len(manifest['items'])} models in {args.out} for {args.backend} (latent {args.resolution}x{args.resolution}{opset})"
          + (f"; ops outside the delegate: {', '.join(undelegated)}" if undelegated else ""))
    return 0


def cmd_latency_run(args: argparse.Namespace) -> int:
    from archlab.latency import backends
    from archlab.latency.table import RunnerError, noisy_keys, read_table
    from archlab.latency.timing import run_bundle

    protocol = _timing(args)
    runtime = backends.get(args.backend)
    if not runtime.here:
        raise ArchlabError(f"--backend {args.backend}: cannot run on this machine; copy the bundle to a Mac and run its "
                           f"{runtime.runner}.py there")
    try:
        redo = noisy_keys(read_table(Path(args.out))[1], protocol.max_cv) if args.redo_noisy else ()
        rows = run_bundle(args.bundle, args.out, args.device, runtime.backend(), protocol, progress=sys.stderr.isatty(),
                          redo=redo)
    except RunnerError as e:
        raise ArchlabError(str(e)) from None
    _print_rows(args, rows, protocol.max_cv)
    return 0


def cmd_latency_measure(args: argparse.Namespace) -> int:
    from archlab.latency.measure import measure

    blocks, networks = _selection(args)
    bundle = args.bundle or str(Path("runs") / "bundles" / Path(args.out).stem)
    protocol = _timing(args)
    rows = measure(args.out, bundle, blocks=blocks, networks=networks, resolution=args.resolution, device=args.device,
                   protocol=protocol, opset=args.opset, keep_onnx=args.keep_onnx, redo_noisy=args.redo_noisy,
                   progress=progress_bar("exporting", "model"), backend=args.backend, export_jobs=args.export_jobs)
    _print_rows(args, rows, protocol.max_cv)
    return 0
