"""I/O helpers: atomic writes (a crash never leaves a half-written file: write a temp file, then
rename), run-folder locks, the cache folder, and progress bars for long loops."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def cache_dir() -> Path:
    """Where datasets and real-set features are cached: $ARCHLAB_CACHE, else runs/cache."""
    return Path(os.environ.get("ARCHLAB_CACHE", "runs/cache"))


def memory_bytes() -> int | None:
    """This machine's physical memory (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_bytes() -> int | None:
    """Memory available to new processes now (Linux's MemAvailable; elsewhere the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return memory_bytes()


def progress_bar(desc: str, unit: str = "item") -> Callable[[Iterable], Iterable]:
    """Wrap a loop in a tqdm bar on stderr, shown only when stderr is a terminal."""
    import sys

    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, unit=unit, leave=False, disable=not sys.stderr.isatty())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path (same folder and suffix) to write to; renamed to `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: str | Path, flag: str = "--out") -> Iterator[None]:
    """Hold `folder` for one run: a second run on it while this one lives is refused in one line
    (ArchlabError naming `flag`). The lock is the kernel's (flock on `folder/.lock`), so a run that is
    killed, even with kill -9, leaves nothing stuck. Where flock is missing (Windows) nothing is held."""
    import datetime as dt
    import socket

    from archlab.errors import ArchlabError

    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ArchlabError(f"{flag}: {folder} is in use by another archlab run ({holder}); wait for it to end "
                               "or stop it, or pick another folder") from None
        if path.exists() and os.path.samestat(os.fstat(f.fileno()), path.stat()):
            break  # else the holder removed the file as we opened it: lock the new one
        f.close()
    try:
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n")
        f.flush()
        yield
    finally:  # the folder is left as it was: no lock file, and a folder made only for the lock removed
        path.unlink(missing_ok=True)
        f.close()
        if created and not any(folder.iterdir()):
            folder.rmdir()


def write_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
