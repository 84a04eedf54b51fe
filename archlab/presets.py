"""Named proxy presets: how long, how wide, at what resolution and with which scores a design is
trained to judge its quality.

A preset is a set of proxy-training values (the image size and `TrainConfig` fields), named so that
`archlab train`, `search` and `ablate` share it (`--proxy NAME`) and so that its measured ranking
fidelity (`reports/proxy_fidelity.md`) is known. The lab's presets live in `presets.yaml` beside
this file; `--proxy my_presets.yaml:name` reads a preset of one's own from a file of the same shape.
Flags given beside `--proxy` override its values.

    smoke       the README's main job: checks the machinery in about a minute; not a quality verdict
    cpu         what a researcher on a laptop uses (the default)
    reference   the benchmark's long training (8x cpu's compute and more); on a GPU in minutes
    cpu-long, cpu-b64, cpu-anneal
                cpu with twice the steps, twice the batch, a learning rate annealed to zero: the
                levers the fidelity benchmark measured (none ranks closer to the reference)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from archlab.errors import ArchlabError
from archlab.schema import build
from archlab.train_config import TrainConfig, preset_settings

BUILTIN = Path(__file__).with_name("presets.yaml")
DEFAULT = "cpu"


def preset_fields() -> dict[str, type]:
    """What a preset may set: the data resolution and the training settings that change what is learned
    or scored (not the seed, the device or the bookkeeping)."""
    return {"image_size": int, **{k: s["type"] for k, s in preset_settings().items()}}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    image_size: int
    train: dict  # TrainConfig fields

    def train_config(self, **overrides):
        """The TrainConfig of this preset; `overrides` (e.g. seed, device, or flags) win."""
        return TrainConfig(**{**self.train, **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def compute(self) -> int:
        """Training images seen (steps x batch): the unit in which presets are compared."""
        t = TrainConfig(**self.train)
        return t.steps * t.batch

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "image_size": self.image_size, **self.train}


def parse(name: str, raw, where: str) -> Preset:
    """One preset from its YAML mapping; every field is checked (type, range), one line per error."""
    where = f"{where}: {name}"
    if not isinstance(raw, dict):
        raise ArchlabError(f"{where}: a preset must be a mapping of settings, got {raw!r}")
    raw = dict(raw)
    description = raw.pop("description", "")
    if not isinstance(description, str):
        raise ArchlabError(f"{where}: description: must be a string, got {description!r}")
    allowed = preset_fields()
    for key in raw:
        if key not in allowed:
            raise ArchlabError(f"{where}: {key}: not a preset setting (one of {', '.join(sorted(allowed))})")
    if "image_size" not in raw:
        raise ArchlabError(f"{where}: image_size: required (the proxy's resolution in pixels)")
    size = raw.pop("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size & (size - 1):
        raise ArchlabError(f"{where}: image_size: {size!r} must be a power of two >= 8")
    build(TrainConfig, raw, where)  # types and ranges
    train = {k: float(v) if allowed[k] is float else v for k, v in raw.items()}
    return Preset(name, description.strip(), size, train)


@functools.lru_cache(maxsize=8)
def _load_file(path: str) -> dict[str, Preset]:
    from archlab.config import read_yaml

    raw = read_yaml(path)
    if not isinstance(raw, dict) or not raw:
        raise ArchlabError(f"{path}: a presets file must be a mapping of preset names to settings")
    return {str(name): parse(str(name), value, path) for name, value in raw.items()}


def presets(path: str | Path = BUILTIN) -> dict[str, Preset]:
    return dict(_load_file(str(path)))


def get(spec: str | None) -> Preset:
    """A preset by name (`cpu`), or from a file (`FILE.yaml:name`, or `FILE.yaml` holding just one)."""
    spec = spec or DEFAULT
    path, _, name = spec.rpartition(":")
    if not path.endswith((".yaml", ".yml")):
        path, name = (spec, "") if spec.endswith((".yaml", ".yml")) else ("", spec)
    found = presets(path) if path else presets()
    if path and not name:
        if len(found) != 1:
            raise ArchlabError(f"--proxy: {path} holds {len(found)} presets; name one ({path}:NAME)")
        return next(iter(found.values()))
    if name not in found:
        raise ArchlabError(f"--proxy: {name!r} is not a preset of {path or 'the lab'} (it has {', '.join(found)}"
                           f"{'' if path else '; or give FILE.yaml:NAME'})")
    return found[name]
