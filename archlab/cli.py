"""The `archlab` command: parses, calls library functions, prints. Bad input: one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from archlab.errors import ArchlabError
from archlab.io import progress_bar


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _folder(path: str) -> str:
    """An output folder: new, or an existing folder (never an existing file)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


def _file(path: str) -> str:
    """An output file: new, or an existing file (never a folder)."""
    if Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    return path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _name(name: str) -> str:
    """A file-name stem: letters, digits, `_`, `-` and `.` only (no folders)."""
    if not name or not all(c.isalnum() or c in "_-." for c in name) or name.startswith("."):
        raise argparse.ArgumentTypeError(f"{name!r} is not a file name (letters, digits, _ - .)")
    return name


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except ArchlabError as e:
        print(f"archlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("archlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `archlab ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="archlab", description="Architecture search and ablation lab for small, fast diffusion backbones (UNet and DiT).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("cost", help="params, MACs and FLOPs of a config or of every row of a ladder")
    c.add_argument("target", metavar="CONFIG_OR_LADDER", help="an ArchConfig YAML or a ladder YAML")
    c.add_argument("--row", help="only this ladder row (name or 0-based index)")
    c.add_argument("--blocks", action="store_true", help="also list every block with its params and MACs")
    c.add_argument("--json", action="store_true", help="print a JSON object with a `rows` list")
    c.set_defaults(run=cmd_cost)

    s = sub.add_parser("show", help="print the full config of a config or ladder row, or its block list")
    s.add_argument("target", metavar="CONFIG_OR_LADDER")
    s.add_argument("--row", help="ladder row (name or 0-based index); default: the last row")
    s.add_argument("--blocks", action="store_true", help="print the block decomposition instead of the config")
    s.add_argument("--json", action="store_true", help="print the config (or the block list) as JSON")
    s.set_defaults(run=cmd_show)

    sp = sub.add_parser("space", help="summarise a search space, sample from it, or list its block signatures")
    sp.add_argument("space", metavar="SPACE", help="a search-space YAML")
    sp.add_argument("--sample", type=int, default=0, metavar="N", help="print N random configs")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--signatures", action="store_true", help="list every block signature the space can produce")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(run=cmd_space)

    tr = sub.add_parser("train", help="train a design at proxy scale (rectified flow) and score it: FID, KID, val loss")
    tr.add_argument("target", metavar="CONFIG_OR_LADDER", help="an ArchConfig YAML or a ladder YAML (with --row)")
    tr.add_argument("--row", help="ladder row (name or 0-based index); default: the last row")
    _dataset_args(tr)
    _train_args(tr, threads=True)
    tr.add_argument("--out", type=_folder, help="run folder: checkpoint (resumed from) and result.json")
    tr.add_argument("--json", action="store_true", help="print the result as a JSON object")
    tr.set_defaults(run=cmd_train)

    se = sub.add_parser("search", help="latency-constrained architecture search: Optuna on Ray Tune, proxy trainings")
    se.add_argument("--space", default="search_spaces/snapgen_unet.yaml", help="search space YAML")
    se.add_argument("--table", default="latency_tables/amd-epyc-2c.csv", help="measured latency table (fitted)")
    se.add_argument("--budget-ms", type=float, help="predicted-latency budget; candidates over it are never trained")
    se.add_argument("--trials", type=int, default=6, help="candidates to train (rejected ones do not count)")
    se.add_argument("--objective", default="val_loss", help="val_loss, fid or kid (minimised)")
    se.add_argument("--multi", action="store_true", help="optimise (objective, predicted latency) for a Pareto front")
    se.add_argument("--sampler", default="tpe", help="tpe, nsga2 or random")
    se.add_argument("--cpus-per-trial", type=int, default=2)
    se.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial (with --device cuda; fractions share one)")
    se.add_argument("--concurrency", type=int, default=1, help="trials at once")
    se.add_argument("--address", help="attach to a running Ray cluster (e.g. auto or HOST:6379)")
    se.add_argument("--storage", help="Optuna storage URL (default: a journal file in the run folder)")
    se.add_argument("--no-asha", action="store_true", help="no early stopping on the training curve")
    se.add_argument("--out", type=_folder, help="run folder (default runs/search-<date>-<time>)")
    se.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted search (all other flags come from it)")
    _dataset_args(se)
    _train_args(se)
    se.add_argument("--json", action="store_true", help="print the search's summary as JSON")
    se.set_defaults(run=cmd_search)

    ab = sub.add_parser("ablate", help="run an ablation ladder: cost, predicted and measured latency, K proxy trainings per row")
    ab.add_argument("ladder", metavar="LADDER", help="ladder YAML (e.g. search_spaces/snapgen_ablation.yaml)")
    ab.add_argument("--seeds", type=int, default=3,
                    help="proxy trainings per row (training seeds --seed, --seed+1, ...; a verdict needs at least 3)")
    ab.add_argument("--rows", help="comma-separated row indices or names (default: every row)")
    ab.add_argument("--table", default="latency_tables/amd-epyc-2c.csv",
                    help="latency table to predict from; measured networks are looked up in its folder")
    ab.add_argument("--measure", default="32,128",
                    help="latent resolutions to measure end to end in ORT, comma-separated, or `none` (default 32,128)")
    ab.add_argument("--threads", type=int, help="ORT threads for measuring (default: the table's)")
    _export_jobs_arg(ab)
    ab.add_argument("--cpus-per-trial", type=int, default=2)
    ab.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial (with --device cuda; fractions share one)")
    ab.add_argument("--concurrency", type=int, default=1, help="trainings at once (Ray Tune trials)")
    ab.add_argument("--address", help="attach to a running Ray cluster (e.g. auto or HOST:6379)")
    ab.add_argument("--out", type=_folder, help="run folder: settings, cost, latency, checkpoints and (unless --results) results; default runs/ablate-<ladder name>; re-running resumes it")
    ab.add_argument("--results", type=_folder,
                    help="keep the per-training results here instead of OUT/results (small files: commit them "
                         "beside the report, and it regenerates, or takes more seeds, without training again)")
    _dataset_args(ab)
    _train_args(ab)
    ab.add_argument("--json", action="store_true", help="print the runs' results as JSON")
    ab.set_defaults(run=cmd_ablate)

    fi = sub.add_parser("fidelity", help="proxy fidelity: rank a panel of designs with each proxy preset and with a long "
                                         "reference training; Kendall tau, noise, cost (resumable)")
    fi.add_argument("--ladder", default="search_spaces/snapgen_ablation.yaml", help="ladder whose rows join the panel")
    fi.add_argument("--space", default="search_spaces/snapgen_unet.yaml", help="search space sampled for the panel")
    fi.add_argument("--space-samples", type=int, default=8, help="seeded samples of --space in the panel (default 8)")
    fi.add_argument("--panel-seed", type=int, default=0)
    fi.add_argument("--presets", default="smoke,cpu", help="presets compared, comma-separated (default smoke,cpu)")
    fi.add_argument("--reference", default="reference", help="the long training ranked against (default reference)")
    fi.add_argument("--default-preset", default="cpu", help="the lab's default CPU preset (reported as such)")
    fi.add_argument("--seeds", type=int, default=3, help="seeds per preset and design (default 3)")
    fi.add_argument("--reference-seeds", type=int, default=1)
    fi.add_argument("--only", help="train only these presets now (e.g. --only reference on a GPU machine)")
    fi.add_argument("--no-train", action="store_true", help="train nothing: analyse the results there are")
    fi.add_argument("--results", type=_folder, default="runs/fidelity/results",
                    help="folder of the trainings' result files (reports/proxy_fidelity/results holds the lab's)")
    fi.add_argument("--work", type=_folder, default="runs/fidelity", help="checkpoints and Ray state")
    fi.add_argument("--out", type=_folder, default="runs/fidelity/report", help="where to write proxy_fidelity.{md,json,png}")
    fi.add_argument("--cpus-per-trial", type=int, default=1)
    fi.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial (with --device cuda)")
    fi.add_argument("--concurrency", type=int, default=2, help="trainings at once (default 2)")
    fi.add_argument("--device", default="cpu", help="torch device of every training")
    fi.add_argument("--address", help="attach to a running Ray cluster")
    _dataset_args(fi, image_size=False)
    fi.add_argument("--json", action="store_true", help="print the analysis as JSON")
    fi.set_defaults(run=cmd_fidelity)

    rp = sub.add_parser("report", help="write the ablation report (Markdown, CSV, plots) from an ablate folder")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `archlab ablate`")
    rp.add_argument("--out", type=_folder, default="runs/report",
                    help="where to write NAME.md, NAME.csv and the plots (default runs/report; the lab's "
                         "committed report is --out reports)")
    rp.add_argument("--name", default="ablation", type=_name,
                    help="the report's file names (default ablation; e.g. snapgenpp_ablation for the SnapGen++ ladder)")
    rp.add_argument("--json", action="store_true", help="print the report's files and tally as JSON")
    rp.set_defaults(run=cmd_report)

    da = sub.add_parser("data", help="load a dataset and summarise it; --export writes a prepared copy")
    _dataset_args(da)
    da.add_argument("--export", type=_file, metavar="FILE.pt", help="write the prepared set (uint8) for other machines")
    da.add_argument("--json", action="store_true")
    da.set_defaults(run=cmd_data)

    lat = sub.add_parser("latency", help="latency lab: export bundles, time them on a device, fit and query predictors")
    lsub = lat.add_subparsers(dest="latency_command", required=True, parser_class=_Parser)
    ex = lsub.add_parser("export", help="export blocks and networks to a bundle (to time on another device)")
    _selection_args(ex)
    _backend_arg(ex)
    _export_jobs_arg(ex)
    ex.add_argument("--opset", type=int, default=20, help="ONNX opset (onnxruntime bundles)")
    ex.add_argument("--out", type=_folder, required=True, help="bundle folder (resumes if it exists)")
    ex.add_argument("--json", action="store_true", help="print the bundle's summary as JSON")
    ex.set_defaults(run=cmd_latency_export)
    rn = lsub.add_parser("run", help="time a bundle here (the same as the bundle's own runner)")
    rn.add_argument("bundle")
    _backend_arg(rn)
    rn.add_argument("--out", type=_file, required=True, help="table CSV, e.g. latency_tables/<device>.csv (resumes)")
    _timing_args(rn)
    rn.add_argument("--json", action="store_true", help="print the table's rows as JSON")
    rn.set_defaults(run=cmd_latency_run)
    ms = lsub.add_parser("measure", help="export and time here, in chunks (resumes; deletes timed model files)")
    _selection_args(ms)
    _backend_arg(ms)
    _export_jobs_arg(ms)
    ms.add_argument("--out", type=_file, required=True, help="table CSV, e.g. latency_tables/<device>.csv (resumes)")
    ms.add_argument("--bundle", help="scratch bundle folder (default runs/bundles/<table name>)")
    ms.add_argument("--keep-onnx", action="store_true", help="keep the exported model files")
    ms.add_argument("--opset", type=int, default=20)
    _timing_args(ms)
    ms.add_argument("--json", action="store_true", help="print the table's rows as JSON")
    ms.set_defaults(run=cmd_latency_measure)
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
    tf.add_argument("--out", type=_folder, default="reports", help="with --measure: where latency_transfer.{md,json} go")
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
    _export_jobs_arg(ev)
    ev.add_argument("--seed", type=int, default=2, help="seed of the held-out sample (default 2)")
    ev.add_argument("--out", type=_folder, default="runs/latency-eval",
                    help="folder for latency_eval.json and latency_eval.md (the lab's committed one: --out reports)")
    ev.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    ev.set_defaults(run=cmd_latency_evaluate)
    return p


def _dataset_args(p: argparse.ArgumentParser, image_size: bool = True) -> None:
    p.add_argument("--dataset", default="synthetic",
                   help="`synthetic` (embedded default), an ImageNet-style folder, or a prepared .pt set")
    if image_size:
        p.add_argument("--image-size", type=int, help="proxy resolution in pixels (default: the --proxy preset's)")
    p.add_argument("--classes", type=int, help="use the first N classes")
    p.add_argument("--per-class", type=int, help="train images per class")
    p.add_argument("--val-per-class", type=int, help="validation images per class")


def _train_args(p: argparse.ArgumentParser, threads: bool = False) -> None:
    from archlab.presets import DEFAULT, presets
    from archlab.train_config import preset_settings

    p.add_argument("--proxy", metavar="PRESET",
                   help=f"proxy preset: {', '.join(presets())} (default {DEFAULT}; reports/proxy_fidelity.md has "
                        "their measured fidelity), or FILE.yaml:NAME; the flags below override its values")

    for name, s in preset_settings().items():
        p.add_argument("--" + name.replace("_", "-"), type=s["type"], choices=s["choices"] or None,
                       help=f"{s['help']} (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="steps between a training's checkpoints, where a stopped run resumes (default 200)")
    if threads:  # search and ablate: a trial's threads are its --cpus-per-trial
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: these proxies gain little from more, and on a busy 2-core "
                            "machine 2 threads ran up to 10x slower)")


def _preset(args: argparse.Namespace):
    from archlab import presets

    return presets.get(getattr(args, "proxy", None))


def _data_config(args: argparse.Namespace):
    from archlab.data import DataConfig

    size = getattr(args, "image_size", None) or _preset(args).image_size
    return DataConfig(args.dataset, size, args.classes, args.per_class, args.val_per_class)


def _train_config(args: argparse.Namespace, threads: int):
    """The --proxy preset's training, with every flag the user gave on top."""
    from archlab.train_config import preset_settings

    over = {name: getattr(args, name) for name in preset_settings()}
    return _preset(args).train_config(**over, seed=args.seed, device=args.device, threads=threads,
                                      checkpoint_every=args.checkpoint_every)


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
    p.add_argument("--top-blocks", type=_positive_int, default=40, metavar="K", help="how many blocks --blocks-of takes (default 40)")
    p.add_argument("--resolution", type=int, default=32, help="latent resolution (default 32 = 256 px)")


def _export_jobs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export-jobs", type=_positive_int, default=1, metavar="N",
                   help="at most N whole networks exported at once, each in its own process (default 1; exporting "
                        "is mostly single-threaded, but holds several copies of a network's weights: a network "
                        "starts beside others only while their estimated peaks fit in 90%% of the memory available)")


def _backend_arg(p: argparse.ArgumentParser) -> None:
    from archlab.latency.backends import RUNTIMES

    p.add_argument("--backend", default="onnxruntime", choices=list(RUNTIMES),
                   help="the runtime: onnxruntime (default), executorch-xnnpack ('.[executorch]'), coreml ('.[coreml]'; "
                        "timed on macOS by the bundle's runner_coreml.py)")


def _timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-name", dest="device", required=True,
                   help="a name for this device, recorded in the table (--device is a torch device elsewhere)")
    p.add_argument("--threads", type=int, default=2, help="the runtime's threads (default 2)")
    p.add_argument("--opt", default="all", help="onnxruntime's graph optimisation level: disabled, basic, extended, all")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=30, help="timed runs per item (fewer for slow items, see --budget-s)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds; each also times the reference beside the item (3 runs, after a warm-up and a pause)")
    p.add_argument("--budget-s", type=float, default=10.0, help="about this many seconds per item")
    p.add_argument("--max-cv", type=float,
                   help="noise gate: time an item again when its run-to-run CV is above this (default 0.10)")
    p.add_argument("--retries", type=int, help="re-timings of an item above the gate (default 2)")
    p.add_argument("--redo-noisy", action="store_true",
                   help="also time again the table's rows that are above the gate (replaced in place)")


# ---- cost ---------------------------------------------------------------------------------------

def cmd_cost(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from archlab.cost import CONVENTION, ladder_cost, network_cost
    from archlab.ladder import load_ladder
    from archlab.verdict import Verdict

    ladder = load_ladder(args.target)
    if args.row is not None:
        ladder = replace(ladder, rows=(ladder.row(args.row),))
    rows = ladder_cost(ladder, progress=not args.json and sys.stderr.isatty())
    blocks = {r.index: [{"name": s.name, "kind": s.kind, "key": s.key, "params": c.params, "macs": c.macs}
                        for s, c in network_cost(lrow.config).blocks]
              for r, lrow in zip(rows, ladder.rows)} if args.blocks else {}
    if args.json:
        print(json.dumps({"target": args.target, "ladder": ladder.name, "convention": CONVENTION, "source": ladder.source,
                          "rows": [{**r.to_dict(), **({"blocks": blocks[r.index]} if blocks else {})} for r in rows]},
                         indent=2))
        return 0
    print(f"{ladder.name}  ({args.target})")
    print(f"{CONVENTION}.")
    if ladder.source:
        print(f"paper: {ladder.source}; params in M, FLOPs in G (convention unconfirmed).")
    print()
    print(_cost_table(rows, with_paper=any(r.paper for r in rows)))
    notes = [(r, c) for r in rows for c in r.changes if c.verdict is Verdict.DISAGREE]
    if notes:
        print("\nWhere our direction disagrees with the paper's:")
        for r, c in notes:
            print(f"  row {r.index} {r.name}, {c.metric}: {c.reason}")
    for r in rows if blocks else []:
        print(f"\nblocks of {r.name}:")
        print(_table([(b["name"], b["key"], f"{b['params'] / 1e6:.3f}", f"{b['macs'] / 1e9:.3f}") for b in blocks[r.index]],
                     ("block", "signature", "params M", "MACs G"), align="llrr"))
    return 0


def _pct(before: float | None, after: float | None) -> str:
    from archlab.verdict import relative

    rel = relative(before, after)
    return "" if rel is None else f"{100 * rel:+.1f}%"


def _cost_table(rows: list, with_paper: bool) -> str:
    header = ["#", "name", "params M", "d", "MACs G", "d", "FLOPs G"]
    if with_paper:
        header += ["paper params M", "d", "paper FLOPs G", "d", "dir params", "dir MACs"]
    out, prev = [], None
    for r in rows:
        line = [str(r.index), r.name, f"{r.params / 1e6:.1f}", _pct(prev and prev.params, r.params),
                f"{r.macs / 1e9:.1f}", _pct(prev and prev.macs, r.macs), f"{r.flops / 1e9:.1f}"]
        if with_paper:
            pp, pf = r.paper.get("params_m"), r.paper.get("flops_g")
            before = prev.paper if prev else {}
            line += ["" if pp is None else f"{pp:g}", _pct(before.get("params_m"), pp),
                     "" if pf is None else f"{pf:g}", _pct(before.get("flops_g"), pf)]
            line += [c.verdict.mark for c in r.changes] or ["", ""]
        out.append(line)
        prev = r
    return _table(out, header, align="ll" + "r" * (len(header) - 2))


def _table(rows: list[Sequence[str]], header: Sequence[str], align: str) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def fmt(cells: Sequence[Any]) -> str:
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


# ---- show ---------------------------------------------------------------------------------------

def cmd_show(args: argparse.Namespace) -> int:
    from archlab.decompose import decompose
    from archlab.ladder import load_ladder

    ladder = load_ladder(args.target)
    row = ladder.row(args.row) if args.row is not None else ladder.rows[-1]
    if args.json:
        out = ([{"name": b.name, "skip": b.skip, "kind": b.kind, "key": b.key} for b in decompose(row.config)]
               if args.blocks else row.config.to_dict())
        print(json.dumps(out, indent=2))
    elif args.blocks:
        specs = decompose(row.config)
        print(_table([(s.name, s.skip or "", s.key) for s in specs], ("block", "skip", "signature"), align="lll"))
    else:
        print(row.config.to_yaml(), end="")
    return 0


# ---- train --------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from archlab.data import load_dataset
    from archlab.ladder import load_ladder
    from archlab.train import train

    ladder = load_ladder(args.target)
    row = ladder.row(args.row) if args.row is not None else ladder.rows[-1]
    tcfg = _train_config(args, args.threads)
    tcfg.validate()  # before the data set is decoded
    data = load_dataset(_data_config(args), progress=sys.stderr.isatty())
    result = train(row.config, data, tcfg, out=args.out, progress=sys.stderr.isatty())
    out = {**result.to_dict(), "design": row.name, "target": args.target, "dataset": data.describe(),
           "proxy": _preset(args).name, "train": asdict(tcfg)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{row.name} on {data.source} ({data.num_classes} classes, {data.resolution}px, proxy {_preset(args).name}), {result.steps} steps "
              f"in {result.seconds:.0f}s: {result.status}{' (' + result.reason + ')' if result.reason else ''}")
        if result.status == "ok":
            print(f"  val_loss {result.val_loss:.4f}" + (f"  FID {result.fid:.2f}  KID {result.kid:.4f} +- {result.kid_std:.4f}"
                                                         f"  [{result.fid_extractor}, {tcfg.samples} samples]"
                                                         if result.fid is not None else ""))
    return 0 if result.status == "ok" else 1


def _minutes(result: dict | None) -> str:
    if not result:
        return ""
    return f"{((result.get('seconds') or 0) + (result.get('score_seconds') or 0)) / 60:.1f} min"


def _scores(result: dict) -> str:
    return ", ".join(f"{k} {result[k]:.4g}" for k in ("val_loss", "fid", "kid") if result.get(k) is not None)


def _job_printer(label=lambda info: info["job"]):
    """One line per trial event on stderr, instead of Ray's repeated status table."""
    def on_event(kind: str, info: dict) -> None:
        r = info.get("result") or {}
        what = label(info)
        line = {"start": f"{what}: started",
                "scoring": f"{what}: trained {r.get('steps')} steps; scoring (validation loss"
                           + (f", {r['samples']} samples for FID/KID)" if r.get("samples") else ")"),
                "done": f"{what}: {r.get('status')} {_scores(r)} ({_minutes(r)}){' ' + r.get('reason', '') if r.get('status') != 'ok' else ''}",
                "stopped": f"{what}: stopped early (ASHA)",
                "error": f"{what}: failed: {r.get('reason', '')}"}.get(kind)
        if line:
            print(line, file=sys.stderr, flush=True)
    return on_event


def _search_printer():
    rejected = [0]
    jobs = _job_printer(lambda info: f"trial {info['trial']} ({info.get('predicted_ms') or 0:.0f} ms predicted)")

    def on_event(kind: str, info: dict) -> None:
        if kind == "rejected":
            rejected[0] += 1
            return
        if kind == "start" and rejected[0]:
            print(f"  {rejected[0]} candidate(s) over the budget rejected before training", file=sys.stderr)
            rejected[0] = 0
        jobs(kind, info)
    return on_event


def _batch_printer():
    """Progress lines for a batch of jobs (ablate, fidelity): the trials engine's (kind, job, info)."""
    printer = _job_printer()
    return lambda kind, job, info: printer(kind, {"job": job.key, **job.meta, "result": info})


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def cmd_search(args: argparse.Namespace) -> int:
    import datetime as dt
    from dataclasses import asdict

    from archlab.search import LATENCY, SearchSettings, run_search

    if args.resume:
        out, settings = args.resume, None
    else:
        if args.budget_ms is None:
            raise ArchlabError("--budget-ms: required (e.g. archlab latency query on a design you like gives a scale)")
        settings = SearchSettings(space=args.space, table=args.table, budget_ms=args.budget_ms, trials=args.trials,
                                  objective=args.objective, multi=args.multi, sampler=args.sampler, seed=args.seed,
                                  cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                                  concurrency=args.concurrency, address=args.address, storage=args.storage,
                                  asha=not args.no_asha, data=asdict(_data_config(args)),
                                  train=asdict(_train_config(args, threads=args.cpus_per_trial)))
        out = args.out or f"runs/search-{dt.datetime.now():%Y%m%d-%H%M%S}"
    try:
        summary = run_search(settings, out, resume=bool(args.resume), on_event=_search_printer())
    except KeyboardInterrupt:
        print(f"archlab: interrupted; continue with: archlab search --resume {out}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 1 if "stopped" in summary else 0
    run = Path(summary["run_dir"])
    o = summary["settings"]["objective"]
    print(f"{run}: {summary['trained']} trained, {summary['rejected_over_budget']} rejected over the budget, "
          f"{summary['stopped_early']} stopped early, {summary['failed']} failed; early stopping {summary['asha']}")
    if "best" in summary:
        b = summary["best"]
        print(f"best: trial {b['trial']}, {o} {b[o]:.4g} at {b[LATENCY]:.0f} ms predicted -> {b['config']}")
    print(f"files: {run / 'summary.md'}, {run / 'trials.csv'}, {run / 'pareto.png'}, {run / 'best'}/ "
          f"({_size(run) / 2 ** 20:.1f} MB in the run folder)")
    print(f"study: optuna-dashboard {run / 'optuna.journal'}; training curves: tensorboard --logdir {run / 'ray'}")
    if "stopped" in summary:
        print(summary["stopped"], file=sys.stderr)
        return 1
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    import shlex
    from dataclasses import asdict

    from archlab.ablate import AblateSettings, run_ablation
    from archlab.ladder import load_ladder

    ladder = load_ladder(args.ladder)
    rows = None
    if args.rows:
        rows = sorted({ladder.row(x.strip()).index for x in args.rows.split(",") if x.strip()})
    if args.measure.strip().lower() in ("none", ""):
        measure = []
    else:
        try:
            measure = [int(x) for x in args.measure.split(",")]
        except ValueError:
            raise ArchlabError(f"--measure: {args.measure!r} is not a comma-separated list of resolutions") from None
    settings = AblateSettings(ladder=args.ladder, seeds=args.seeds, rows=rows, table=args.table, measure=measure,
                              results=args.results or "",
                              threads=args.threads, export_jobs=args.export_jobs, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                              concurrency=args.concurrency,
                              address=args.address, data=asdict(_data_config(args)),
                              train=asdict(_train_config(args, threads=args.cpus_per_trial)),
                              command="archlab " + shlex.join(args.argv))
    out = args.out or f"runs/ablate-{ladder.name}"
    run = run_ablation(settings, out, progress=sys.stderr.isatty(), on_event=_batch_printer())
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


def cmd_fidelity(args: argparse.Namespace) -> int:
    import shlex
    from dataclasses import asdict

    from archlab.fidelity import FidelitySettings, run, write_report

    def names(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    settings = FidelitySettings(ladder=args.ladder, space=args.space, space_samples=args.space_samples,
                                panel_seed=args.panel_seed, presets=names(args.presets), reference=args.reference,
                                default_preset=args.default_preset, seeds=args.seeds, reference_seeds=args.reference_seeds,
                                cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                                concurrency=args.concurrency, address=args.address,
                                data=asdict(_data_config(args)),  # each preset sets its own resolution
                                train={"device": args.device})
    only = [] if args.no_train else (names(args.only) if args.only else None)
    analysis = run(settings, args.results, args.work, only=only, on_event=_batch_printer())
    argv, skip = [], False  # the regenerating command: without the flags that only choose what to train now
    for a in args.argv:
        if skip or a == "--no-train" or a.startswith("--only="):
            skip = False
        elif a == "--only":
            skip = True
        else:
            argv.append(a)
    command = "archlab " + shlex.join(argv)
    paths = write_report(analysis, settings, args.out, command)
    if args.json:
        print(json.dumps(analysis, indent=2))
        return 0
    d = analysis["presets"][settings.default_preset]["scores"]["val_loss"]
    print(f"{len(analysis['designs'])} designs; {len(analysis['missing'])} trainings not finished")
    for name, e in analysis["presets"].items():
        taus = ", ".join(f"{k} tau {v['kendall_tau']:.2f}" for k, v in e["scores"].items() if v.get("kendall_tau") is not None)
        cost = e["cpu_minutes_per_design"]
        print(f"  {name}: {'%.1f CPU-min per training' % cost if cost is not None else 'no CPU runs'}"
              f"{'; ' + taus if taus else ''}")
    if d.get("kendall_tau") is not None:
        print(f"default preset {settings.default_preset}: val loss Kendall tau {d['kendall_tau']:.2f} vs the reference")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if not analysis["missing"] else 1


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


def cmd_data(args: argparse.Namespace) -> int:
    from archlab.data import load_dataset, save_dataset

    data = load_dataset(_data_config(args), progress=sys.stderr.isatty())
    info = data.describe()
    if args.export:
        info["exported"] = str(save_dataset(data, args.export))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


# ---- space --------------------------------------------------------------------------------------

def cmd_space(args: argparse.Namespace) -> int:
    from archlab.space import load_space

    space = load_space(args.space)
    if args.sample < 0:
        raise ArchlabError(f"--sample: must be >= 0, got {args.sample}")
    result: dict[str, Any] = {"name": space.name, "size": space.size,
                              "params": {p.path: list(p.choices) for p in space.params}}
    if args.sample:
        result["samples"] = [{"point": pt, "config": cfg.to_dict()} for pt, cfg in space.sample(args.sample, args.seed)]
    if args.signatures:
        result["signatures"] = [{"kind": s.kind, "key": s.key, "stage": s.stage} for s in space.block_signatures()]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{space.name}  ({args.space}): {len(space.params)} parameters, {space.size:,} configs")
    print(_table([(p.path, ", ".join(map(str, p.choices))) for p in space.params], ("parameter", "choices"), align="ll"))
    for i, s in enumerate(result.get("samples", [])):
        print(f"\nsample {i} (seed {args.seed}): " + ", ".join(f"{k}={v}" for k, v in s["point"].items()))
    if args.signatures:
        sigs = result["signatures"]
        print(f"\n{len(sigs)} block signatures:")
        for s in sigs:
            print(f"  {s['key']}")
    return 0


# ---- latency ------------------------------------------------------------------------------------

def _selection(args: argparse.Namespace) -> tuple[list, list]:
    from archlab.latency.export import select

    return select(space=args.space, ladder=args.ladder, networks=args.networks, seed=args.seed,
                  resolution=args.resolution, ladder_networks=args.ladder_networks, networks_of=args.networks_of,
                  blocks_of=args.blocks_of, top_blocks=args.top_blocks)


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


def _timing(args: argparse.Namespace):
    """The timing protocol the flags give."""
    from archlab.latency.table import MAX_CV, RETRIES, Protocol

    return Protocol(args.threads, args.opt, args.warmup, args.runs, args.rounds, args.budget_s,
                    MAX_CV if args.max_cv is None else args.max_cv, RETRIES if args.retries is None else args.retries)


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


def _print_rows(args: argparse.Namespace, rows: list, max_cv: float) -> None:
    from archlab.latency.timing import summary

    print(json.dumps({"table": args.out, "rows": rows}, indent=2, default=str) if args.json
          else summary(rows, args.out, max_cv))


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
    print(_table([(k, m.n, "" if m.loo_mape is None else f"{100 * m.loo_mape:.1f}%",
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
        print(_table([[r["name"], f"{r['latency_ms']:.2f}", f"{r['raw_sum_ms']:.2f}", f"{r['ratio_to_first']:.3f}"]
                      + ([f"{r['paper_ratio_to_first']:.3f}" if "paper_ratio_to_first" in r else ""] if len(header) > 4 else [])
                      for r in rows], header, align="l" + "r" * (len(header) - 1)))
    for r in rows if (len(rows) == 1 or args.blocks) else []:
        src = ", ".join(f"{n} {s}" for s, n in r["sources"].items() if n)
        print(f"\n{r['name']}: {r['latency_ms']:.2f} ms (sum of blocks {r['raw_sum_ms']:.2f} ms, calibrated; {src})")
        print(_table([(b["name"], f"{b['latency_ms']:.3f}", f"{100 * b['latency_ms'] / r['raw_sum_ms']:.1f}%",
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


if __name__ == "__main__":
    sys.exit(main())
