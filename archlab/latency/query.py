"""`archlab latency query`: what a target names (a block key, a block YAML, a config or a ladder)
and its predicted latency, as the rows the CLI prints or dumps as JSON."""

from __future__ import annotations

from pathlib import Path

from archlab.decompose import BlockSpec
from archlab.errors import ArchlabError
from archlab.kinds import canonical


def block_from_yaml(data: dict, where: str) -> BlockSpec:
    """A block from its YAML: `kind`, `resolution` and the hyper-parameters."""
    hp = dict(data)
    kind = hp.pop("kind")
    for name, value in hp.items():
        if not isinstance(value, (bool, int, float, str)):
            raise ArchlabError(f"{where}: {name}: a block hyper-parameter must be a number, a string or a bool, got {value!r}")
    size = hp.pop("resolution", None)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ArchlabError(f"{where}: resolution: a block needs its input resolution as a positive integer, got {size!r}")
    return BlockSpec(str(kind), canonical(str(kind), hp), (size, size))


def targets(target: str, row: str | None = None, resolution: int | None = None) -> tuple[list, list]:
    """(blocks, networks): what TARGET names, as BlockSpecs or (row name, ArchConfig, paper ms) triples."""
    from archlab.config import read_yaml
    from archlab.ladder import load_ladder

    if Path(target).is_file():
        data = read_yaml(target)
        if isinstance(data, dict) and "kind" in data:
            return [block_from_yaml(data, target)], []
        if isinstance(data, dict) and {"base", "params"} <= set(data):
            raise ArchlabError(f"{target}: a search space is not one network; `archlab space {target} --sample N "
                               "--json` gives configs to query, or query its blocks (`archlab space --signatures`)")
        ladder = load_ladder(target)
        rows = [ladder.row(row)] if row is not None else ladder.rows
        res = {"latent.resolution": resolution} if resolution else {}
        return [], [(r.name, r.config.with_values(res, where=f"{target}: {r.name}"), r.paper.get("latency_ms"))
                    for r in rows]
    try:
        return [BlockSpec.from_key(target)], []
    except ValueError as e:
        raise ArchlabError(f"TARGET {target!r}: not a file, and {e}") from None


def query(pred, target: str, row: str | None = None, resolution: int | None = None) -> dict:
    """The predicted latency of what `target` names: `kind` (blocks or networks), the predictor's
    settings and `rows` (name, latency_ms, blocks; for several networks, the ratio to the first and
    the paper's ratio where the ladder gives its latency)."""
    blocks, networks = targets(target, row, resolution)
    rows = []
    for spec in blocks:
        ms, source = pred.block(spec)
        rows.append({"name": spec.key, "latency_ms": round(ms, 5), "extrapolated": source == "extrapolated",
                     "blocks": [{"name": spec.key, "key": spec.key, "kind": spec.kind, "latency_ms": round(ms, 5),
                                 "source": source}]})
    base = None
    for name, cfg, paper_ms in networks:
        p = pred.predict(cfg).to_dict()
        p["name"] = name
        base = base or (p["latency_ms"], paper_ms)
        if len(networks) > 1:
            p["ratio_to_first"] = round(p["latency_ms"] / base[0], 4)
            if paper_ms and base[1]:
                p["paper_ratio_to_first"] = round(paper_ms / base[1], 4)
        rows.append(p)
    settings = {k: pred.settings.get(k) for k in ("device", "cpu", "resolution", "threads", "opt_level", "backend",
                                               "runtime_version")}
    return {"kind": "blocks" if blocks else "networks", "calibrated": pred.calibration is not None, **settings,
            "rows": rows}
