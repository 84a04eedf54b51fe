"""`archlab cost`, `show` and `space`: look at a design, a ladder or a search space without training
or timing anything (params, MACs, FLOPs, the config, the block list, a space's choices and samples).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from archlab.cli.common import table
from archlab.errors import ArchlabError


def add_parser(sub) -> None:
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
        print(table([(b["name"], b["key"], f"{b['params'] / 1e6:.3f}", f"{b['macs'] / 1e9:.3f}") for b in blocks[r.index]],
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
    return table(out, header, align="ll" + "r" * (len(header) - 2))


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
        print(table([(s.name, s.skip or "", s.key) for s in specs], ("block", "skip", "signature"), align="lll"))
    else:
        print(row.config.to_yaml(), end="")
    return 0


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
    print(table([(p.path, ", ".join(map(str, p.choices))) for p in space.params], ("parameter", "choices"), align="ll"))
    for i, s in enumerate(result.get("samples", [])):
        print(f"\nsample {i} (seed {args.seed}): " + ", ".join(f"{k}={v}" for k, v in s["point"].items()))
    if args.signatures:
        sigs = result["signatures"]
        print(f"\n{len(sigs)} block signatures:")
        for s in sigs:
            print(f"  {s['key']}")
    return 0
