"""Atomic writes: a crash never leaves a half-written file (write a temp file, then rename)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Where datasets and real-set features are cached: $ARCHLAB_CACHE, else runs/cache."""
    return Path(os.environ.get("ARCHLAB_CACHE", "runs/cache"))


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically."""
    import torch

    path = Path(path)
    tmp = _tmp(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path
