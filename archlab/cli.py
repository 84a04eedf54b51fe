"""The `archlab` command: parses, calls library functions, prints. Bad input: one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from archlab.errors import ArchlabError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ArchlabError as e:
        print(f"archlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("archlab: interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="archlab", description="Architecture search and ablation lab for small, fast diffusion UNets.")
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
    s.set_defaults(run=cmd_show)

    sp = sub.add_parser("space", help="summarise a search space, sample from it, or list its block signatures")
    sp.add_argument("space", metavar="SPACE", help="a search-space YAML")
    sp.add_argument("--sample", type=int, default=0, metavar="N", help="print N random configs")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--signatures", action="store_true", help="list every block signature the space can produce")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(run=cmd_space)

    lat = sub.add_parser("latency", help="latency lab: export ONNX bundles, time them on a device")
    lsub = lat.add_subparsers(dest="latency_command", required=True, parser_class=_Parser)
    ex = lsub.add_parser("export", help="export every block of a space (and ladder rows) to an ONNX bundle")
    ex.add_argument("--space", help="search space whose block signatures to export")
    ex.add_argument("--ladder", help="ladder (or config) whose rows' blocks and whole networks to export")
    ex.add_argument("--networks", type=int, default=0, metavar="N", help="also export N whole networks sampled from the space")
    ex.add_argument("--seed", type=int, default=0, help="seed for --networks")
    ex.add_argument("--resolution", type=int, default=32, help="latent resolution (default 32 = 256 px)")
    ex.add_argument("--opset", type=int, default=20)
    ex.add_argument("--out", required=True, help="bundle folder (resumes if it exists)")
    ex.set_defaults(run=cmd_latency_export)
    rn = lsub.add_parser("run", help="time a bundle here with onnxruntime (the same as the bundle's runner.py)")
    rn.add_argument("bundle")
    rn.add_argument("--out", required=True, help="table CSV, e.g. latency_tables/<device>.csv (resumes)")
    rn.add_argument("--device", required=True, help="a name for this device")
    rn.add_argument("--threads", type=int, default=2)
    rn.add_argument("--opt", default="all", help="graph optimisation level: disabled, basic, extended, all")
    rn.add_argument("--warmup", type=int, default=5)
    rn.add_argument("--runs", type=int, default=30)
    rn.add_argument("--rounds", type=int, default=5)
    rn.set_defaults(run=cmd_latency_run)
    return p


# ---- cost ---------------------------------------------------------------------------------------

def cmd_cost(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from archlab.cost import CONVENTION, ladder_cost, network_cost
    from archlab.ladder import load_ladder

    ladder = load_ladder(args.target)
    if args.row is not None:
        ladder = replace(ladder, rows=(ladder.row(args.row),))
    rows = ladder_cost(ladder, progress=not args.json and sys.stderr.isatty())
    if args.blocks:
        for row, lrow in zip(rows, ladder.rows):
            row["blocks"] = [{"name": s.name, "kind": s.kind, "key": s.key, "params": c.params, "macs": c.macs}
                             for s, c in network_cost(lrow.config).blocks]
    if args.json:
        print(json.dumps({"target": args.target, "ladder": ladder.name, "convention": CONVENTION,
                          "source": ladder.source, "rows": rows}, indent=2))
        return 0
    print(f"{ladder.name}  ({args.target})")
    print(f"{CONVENTION}.")
    if ladder.source:
        print(f"paper: {ladder.source}; params in M, FLOPs in G (convention unconfirmed).")
    print()
    print(_cost_table(rows, with_paper=any(r["paper"] for r in rows)))
    notes = [(r, m) for r in rows for m, ok in r.get("agree", {}).items() if ok is False]
    if notes:
        print("\nWhere our direction disagrees with the paper's:")
        for r, m in notes:
            why = r["why_differs"].get(m, "unexplained: add why_differs to the ladder row")
            print(f"  row {r['index']} {r['name']}, {m}: {why}")
    for row in rows:
        if "blocks" in row:
            print(f"\nblocks of {row['name']}:")
            print(_table([(b["name"], b["key"], f"{b['params'] / 1e6:.3f}", f"{b['macs'] / 1e9:.3f}") for b in row["blocks"]],
                         ("block", "signature", "params M", "MACs G"), align="llrr"))
    return 0


def _pct(before: float | None, after: float | None) -> str:
    if before is None or after is None or not before:
        return ""
    return f"{100 * (after - before) / before:+.1f}%"


def _cost_table(rows: list[dict], with_paper: bool) -> str:
    marks = {True: "ok", False: "DIFF", None: ""}
    header = ["#", "name", "params M", "d", "MACs G", "d", "FLOPs G"]
    if with_paper:
        header += ["paper params M", "d", "paper FLOPs G", "d", "dir params", "dir MACs"]
    out, prev = [], None
    for r in rows:
        line = [str(r["index"]), r["name"], f"{r['params'] / 1e6:.1f}", _pct(prev and prev["params"], r["params"]),
                f"{r['macs'] / 1e9:.1f}", _pct(prev and prev["macs"], r["macs"]), f"{r['flops'] / 1e9:.1f}"]
        if with_paper:
            pp, pf = r["paper"].get("params_m"), r["paper"].get("flops_g")
            before = prev["paper"] if prev else {}
            agree = r.get("agree", {})
            line += ["" if pp is None else f"{pp:g}", _pct(before.get("params_m"), pp),
                     "" if pf is None else f"{pf:g}", _pct(before.get("flops_g"), pf),
                     marks[agree.get("params")], marks[agree.get("macs")]]
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
    if args.blocks:
        specs = decompose(row.config)
        print(_table([(s.name, s.skip or "", s.key) for s in specs], ("block", "skip", "signature"), align="lll"))
    else:
        print(row.config.to_yaml(), end="")
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

def cmd_latency_export(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from archlab.decompose import decompose
    from archlab.latency.export import export_bundle
    from archlab.ladder import load_ladder
    from archlab.space import load_space

    if not args.space and not args.ladder:
        raise ArchlabError("latency export: give --space, --ladder or both")
    res = {"latent.resolution": args.resolution}
    blocks, networks = {}, []
    if args.space:
        space = load_space(args.space)
        space = replace(space, base=space.base.with_values(res, where=args.space))
        blocks.update((s.signature, s) for s in space.block_signatures())
        networks += [cfg for _, cfg in space.sample(args.networks, seed=args.seed)]
    if args.ladder:
        for row in load_ladder(args.ladder).rows:
            cfg = row.config.with_values(res, where=f"{args.ladder}: {row.name}")
            blocks.update((s.signature, s) for s in decompose(cfg))
            networks.append(cfg)
    manifest = export_bundle(args.out, list(blocks.values()), networks, resolution=args.resolution, opset=args.opset,
                             progress=lambda todo: tqdm(todo, desc="exporting", unit="model", disable=not sys.stderr.isatty()))
    print(f"{len(manifest['items'])} models in {args.out} (latent {args.resolution}x{args.resolution}, opset {args.opset})")
    return 0


def cmd_latency_run(args: argparse.Namespace) -> int:
    from archlab.latency.runner import RunnerError, run_bundle

    try:
        rows = run_bundle(args.bundle, args.out, args.device, args.threads, args.opt, args.warmup, args.runs,
                          args.rounds, progress=sys.stderr.isatty())
    except RunnerError as e:
        raise ArchlabError(str(e)) from None
    print(f"{len(rows)} rows in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
