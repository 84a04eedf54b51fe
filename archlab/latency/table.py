"""Latency tables: the CSV of timed items and its `.meta.json`, read and written the same way by the
lab (host) and by a bundle's runner (device). Standard library only: reading a table imports no
runtime and no torch, and a bundle carries this file beside its runner."""

from __future__ import annotations

import csv
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("key", "kind", "role", "median_ms", "min_ms", "mean_ms", "cv", "runs", "ref_ms", "norm_ms")
# must match to extend a table
SETTINGS = ("device", "threads", "opt_level", "backend", "backend_options", "runtime_version", "resolution", "opset")
MAX_CV, RETRIES = 0.10, 2  # the noise gate: re-time an item whose run-to-run CV is above MAX_CV, up to RETRIES times
MIN_SPREAD_MS = 0.1  # ... unless its spread (std) is below this: timer jitter on a tiny item, not a busy machine
REF_JUMP = 0.25  # ... or the reference beside it ran this far off the session's recent reference (something ran beside)


class RunnerError(ValueError):
    """Bad bundle, bad table or bad settings: one line, exit status 2."""


OPT_LEVELS = ("disabled", "basic", "extended", "all")  # onnxruntime's graph optimisation levels


@dataclass(frozen=True)
class Protocol:
    """How a runner times items (runner.py's docstring explains each): one record for the runner, the
    CLI, the held-out evaluation and the ablation, and what a table's metadata keeps."""
    threads: int = 2  # the runtime's threads (onnxruntime: intra-op; XNNPACK: its threadpool)
    opt_level: str = "all"  # onnxruntime's graph optimisation (the other backends take only "all")
    warmup: int = 5
    runs: int = 30
    rounds: int = 5
    budget_s: float = 10.0  # about this many seconds per item
    max_cv: float = MAX_CV  # the noise gate
    retries: int = RETRIES
    reference_warmup: int = 1  # untimed reference runs before its timed one in each round
    # pause when the timing switches between the item and the reference; None: 100 ms with more than one
    # thread (worker threads spin after a run), none at 1 (a pause there made each round's first run slower)
    settle_ms: float | None = None
    reference_runs: int = 3  # timed reference runs in each round (ref_ms: their median over the rounds)

    def check(self) -> "Protocol":
        if self.opt_level not in OPT_LEVELS:
            raise RunnerError(f"--opt: {self.opt_level!r} is not one of {', '.join(OPT_LEVELS)}")
        if self.threads < 1 or self.rounds < 1 or self.warmup < 0 or self.runs < self.rounds or self.budget_s <= 0:
            raise RunnerError(f"need threads >= 1, warmup >= 0, runs >= rounds >= 1 and budget_s > 0 (got "
                              f"{self.threads}, {self.warmup}, {self.runs}, {self.rounds}, {self.budget_s})")
        if not self.max_cv > 0 or self.retries < 0 or self.reference_warmup < 0 or self.settle < 0 or self.reference_runs < 1:
            raise RunnerError(f"need max_cv > 0, retries >= 0, reference_warmup >= 0, settle_ms >= 0 and "
                              f"reference_runs >= 1 (got {self.max_cv}, {self.retries}, {self.reference_warmup}, "
                              f"{self.settle}, {self.reference_runs})")
        return self

    @property
    def settle(self) -> float:
        """The pause in ms (settle_ms, or its default for the threads)."""
        return self.settle_ms if self.settle_ms is not None else (100.0 if self.threads > 1 else 0.0)

    @classmethod
    def of_table(cls, meta: dict) -> "Protocol":
        """The protocol a table was measured with (its metadata), to extend it or time beside it alike."""
        p = meta.get("protocol", {})
        return cls(int(meta["threads"]), meta["opt_level"], p.get("warmup", 5), p.get("runs", 30), p.get("rounds", 5),
                   p.get("budget_s", 10.0), p.get("max_cv", MAX_CV), p.get("retries", RETRIES),
                   # tables made before these were recorded timed the reference once per round, cold, with no
                   # pause between the models
                   p.get("reference_warmup", 0), p.get("settle_ms", 0.0), p.get("reference_runs", 1))


def read_table(path: Path) -> tuple[dict, list[dict]]:
    """(settings, rows) of an existing table; ({}, []) if there is none."""
    meta_path = path.with_suffix(".meta.json")
    if not path.exists():
        return {}, []
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise RunnerError(f"{path}: has no readable metadata file {meta_path.name}") from None
    if not isinstance(meta, dict):
        raise RunnerError(f"{meta_path}: is not a metadata object")
    upgrade(meta)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise RunnerError(f"{path}: columns {reader.fieldnames} are not {list(FIELDS)}")
        rows = list(reader)
    return meta, rows


def upgrade(meta: dict) -> dict:
    """A table's metadata (or a predictor's copy of it) from before backends, read as onnxruntime's (in place)."""
    if "backend" not in meta:
        meta.update(backend="onnxruntime", runtime_version=meta.get("ort_version"))
    meta.setdefault("backend_options", {})
    return meta


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_table(path: Path, meta: dict, rows: list[dict]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path.with_suffix(".meta.json"), json.dumps(meta, indent=2) + "\n")
    write_atomic(path, buf.getvalue())


def is_noisy(row: dict, max_cv: float) -> bool:
    """Above the noise gate: a run-to-run CV over `max_cv` and a spread that is more than timer jitter."""
    cv = float(row["cv"])
    return cv > max_cv and cv * float(row["mean_ms"]) > MIN_SPREAD_MS


def noisy_keys(rows: list[dict], max_cv: float) -> set[str]:
    """Keys of the rows above the noise gate."""
    return {r["key"] for r in rows if is_noisy(r, max_cv)}


def runtime(meta: dict) -> str:
    """The runtime a table (or a record of one) was timed with, in words: `onnxruntime 1.32.0`."""
    return f"{meta.get('backend') or 'onnxruntime'} {meta.get('runtime_version') or meta.get('ort_version')}"


def cpu_model() -> str:
    """This machine's CPU model, in words."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
