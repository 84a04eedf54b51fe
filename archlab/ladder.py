"""Ablation ladders: an ordered list of designs, each a diff on the row above, with the paper's
numbers beside it. A plain config file loads as a one-row ladder, so every command that takes
CONFIG_OR_LADDER handles both the same way.

Ladder YAML::

    name: snapgen-ablation
    source: SnapGen (arXiv 2412.09619), Table ...
    base: {...}                        # a full config (any family): row 0 unless row 0 has its own `set`
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
from typing import Any, Literal

from archlab.config import Config, arch_from_dict, read_yaml
from archlab.errors import ArchlabError
from archlab.schema import build, setting

PAPER_KEYS = ("fid", "val_loss", "params_m", "flops_g", "latency_ms")
METRICS = ("params", "macs", "latency", "fid")  # what why_differs may explain (paper flops compare with our MACs;
# `fid` explains a disagreement of any quality score: FID, KID or validation loss)


@dataclass(frozen=True)
class LadderRow:
    index: int
    name: str
    config: Config
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

    def configs(self, resolution: int | None = None) -> list[Config]:
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


@dataclass(frozen=True)
class _RowSpec:
    """A ladder row as written in the YAML."""
    name: str = setting(valid=bool, rule="a non-empty string")
    change: str = ""
    set: dict[str, Any] | None = None  # dotted path -> value, applied to the row above (or to `config`)
    config: dict[str, Any] | None = None  # a full config instead of the row above (e.g. another family)
    paper: dict[Literal[PAPER_KEYS], float] = field(default_factory=dict)
    why_differs: dict[Literal[METRICS], str] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class _LadderSpec:
    """A ladder file as written."""
    base: dict  # the full config of the first row
    rows: list[_RowSpec] = setting(valid=bool, rule="a non-empty list of rows")
    name: str | None = None
    source: str = ""
    setting: str = ""
    choices: Any = None  # notes on the choices the paper leaves open


def load_ladder(path: str | Path) -> Ladder:
    """Load a ladder file, or a single config file as a one-row ladder."""
    where = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ArchlabError(f"{where}: must be a mapping (a config, or a ladder with `base` and `rows`), got {type(data).__name__}")
    if "rows" not in data:  # a single config; from_dict names any unknown key
        cfg = arch_from_dict(data, where)
        return Ladder(cfg.name, (LadderRow(0, cfg.name, cfg),), path=where)
    spec = build(_LadderSpec, data, where)
    current = arch_from_dict(spec.base, f"{where}: base")
    rows: list[LadderRow] = []
    for i, raw in enumerate(spec.rows):
        at = f"{where}: rows[{i}]"
        if any(r.name == raw.name for r in rows):
            raise ArchlabError(f"{at}.name: {raw.name!r} is used by an earlier row")
        if raw.config is not None:  # a fresh start (e.g. another family), then `set` on it
            current = arch_from_dict({**raw.config, "name": raw.name}, f"{at}.config")
        current = current.with_values({"name": raw.name, **(raw.set or {})}, f"{at}.set")
        rows.append(LadderRow(i, raw.name, current, raw.change, dict(raw.paper),
                              {k: " ".join(v.split()) for k, v in raw.why_differs.items()}, raw.note.strip()))
    return Ladder(spec.name or Path(path).stem, tuple(rows), spec.source, spec.setting, where)
