"""Ablation ladders: an ordered list of designs, each a diff on the row above, with the paper's
numbers beside it. A plain ArchConfig file loads as a one-row ladder, so every command that takes
CONFIG_OR_LADDER handles both the same way.

Ladder YAML::

    name: snapgen-ablation
    source: SnapGen (arXiv 2412.09619), Table ...
    base: {...}                        # a full ArchConfig: row 0 unless row 0 has its own `set`
    rows:
      - name: baseline
        change: SDXL-style UNet, thinner and shorter
        paper: {fid: 3.76, params_m: 741, flops_g: 684, latency_ms: 1426}
      - name: no-highres-sa
        change: remove self-attention at the high-resolution stages
        set: {stages.1.self_attention: false}     # dotted paths; `stages.*.conv` = every stage
        paper: {...}
        why_differs: {params: "..."}              # where our direction disagrees with the paper's
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archlab.config import ArchConfig, read_yaml
from archlab.errors import ArchlabError

PAPER_KEYS = ("fid", "params_m", "flops_g", "latency_ms")
ROW_KEYS = ("name", "change", "set", "paper", "why_differs", "note")
LADDER_KEYS = ("name", "source", "setting", "choices", "base", "rows")
METRICS = ("params", "macs", "latency", "fid")  # what why_differs may explain (paper flops compare with our MACs;
# `fid` explains a disagreement of any quality score: FID, KID or validation loss)


@dataclass(frozen=True)
class LadderRow:
    index: int
    name: str
    config: ArchConfig
    change: str = ""
    paper: dict[str, float] = field(default_factory=dict)
    why_differs: dict[str, str] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Ladder:
    name: str
    rows: tuple[LadderRow, ...]
    source: str = ""
    setting: str = ""
    path: str = ""

    def configs(self, resolution: int | None = None) -> list[ArchConfig]:
        """Every row's config, at another latent resolution if given."""
        if resolution is None:
            return [r.config for r in self.rows]
        return [r.config.with_values({"latent.resolution": resolution}, where=f"{self.path}: {r.name}") for r in self.rows]

    def row(self, name_or_index: str | int) -> LadderRow:
        """A row by name or 0-based index (also accepts the string form of an index)."""
        for r in self.rows:
            if r.name == name_or_index or str(r.index) == str(name_or_index):
                return r
        names = ", ".join(f"{r.index}={r.name}" for r in self.rows)
        raise ArchlabError(f"--row: {name_or_index!r} is not a row of {self.path or self.name} (rows: {names})")


def load_ladder(path: str | Path) -> Ladder:
    """Load a ladder file, or a single ArchConfig file as a one-row ladder."""
    where = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ArchlabError(f"{where}: must be a mapping (an ArchConfig, or a ladder with `base` and `rows`), got {type(data).__name__}")
    if "rows" not in data:  # a single config; from_dict names any unknown key
        cfg = ArchConfig.from_dict(data, where)
        return Ladder(cfg.name, (LadderRow(0, cfg.name, cfg),), path=where)
    for key in data:
        if key not in LADDER_KEYS:
            raise ArchlabError(f"{where}: {key}: unknown key (allowed: {', '.join(LADDER_KEYS)})")
    if "base" not in data:
        raise ArchlabError(f"{where}: base: missing required key (the full config of the first row)")
    rows_data = data["rows"]
    if not isinstance(rows_data, list) or not rows_data:
        raise ArchlabError(f"{where}: rows: must be a non-empty list, got {rows_data!r}")

    current = ArchConfig.from_dict(data["base"], f"{where}: base")
    rows: list[LadderRow] = []
    for i, raw in enumerate(rows_data):
        at = f"{where}: rows[{i}]"
        if not isinstance(raw, dict):
            raise ArchlabError(f"{at}: must be a mapping, got {raw!r}")
        for key in raw:
            if key not in ROW_KEYS:
                raise ArchlabError(f"{at}.{key}: unknown key (allowed: {', '.join(ROW_KEYS)})")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ArchlabError(f"{at}.name: must be a non-empty string, got {name!r}")
        if any(r.name == name for r in rows):
            raise ArchlabError(f"{at}.name: {name!r} is used by an earlier row")
        changes = raw.get("set")
        changes = {} if changes is None else changes
        if not isinstance(changes, dict):
            raise ArchlabError(f"{at}.set: must be a mapping of dotted paths to values, got {changes!r}")
        current = current.with_values({"name": name, **changes}, f"{at}.set")
        rows.append(LadderRow(i, name, current, str(raw.get("change", "")),
                              _paper(raw.get("paper"), f"{at}.paper"),
                              _why(raw.get("why_differs"), f"{at}.why_differs"), str(raw.get("note", "")).strip()))
    return Ladder(str(data.get("name", Path(path).stem)), tuple(rows), str(data.get("source", "")),
                  str(data.get("setting", "")), where)


def _paper(value: Any, at: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ArchlabError(f"{at}: must be a mapping, got {value!r}")
    for k, v in value.items():
        if k not in PAPER_KEYS:
            raise ArchlabError(f"{at}.{k}: unknown key (allowed: {', '.join(PAPER_KEYS)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ArchlabError(f"{at}.{k}: must be a number, got {v!r}")
    return dict(value)


def _why(value: Any, at: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ArchlabError(f"{at}: must be a mapping of metric to reason, got {value!r}")
    for k, v in value.items():
        if k not in METRICS:
            raise ArchlabError(f"{at}.{k}: unknown metric (allowed: {', '.join(METRICS)})")
        if not isinstance(v, str):
            raise ArchlabError(f"{at}.{k}: must be a string, got {v!r}")
    return {k: " ".join(v.split()) for k, v in value.items()}
