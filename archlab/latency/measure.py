"""Measure here: export to a scratch bundle and time it with the runner, in chunks, resumably.

This is `archlab latency export` followed by `archlab latency run` on the same machine, done in
chunks so that a table of many whole networks (1-3 GB of ONNX each at paper width) never needs all
of them on disk at once: after a chunk is timed, its ONNX files are deleted (unless `keep_onnx`).
Items already in the table are skipped, so an interrupted measurement resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from archlab.config import Config
from archlab.decompose import BlockSpec
from archlab.errors import ArchlabError
from archlab.io import write_atomic
from archlab.latency import backends, timing
from archlab.latency.export import export_bundle, network_key
from archlab.latency.table import Protocol, RunnerError, noisy_keys, read_table

BLOCK_CHUNK = 64
NETWORK_CHUNK = 4


def measure(table: str | Path, bundle: str | Path, *, blocks: list[BlockSpec] = (), networks: list[Config] = (),
            resolution: int, device: str, protocol: Protocol = Protocol(), opset: int = 20, keep_onnx: bool = False,
            reference_ms: float | None = None, redo_noisy: bool = False, progress=None,
            backend: str = "onnxruntime", export_jobs: int = 1) -> list[dict]:
    """Time every block and network not yet in `table` with `protocol` through `backend` (a runtime this
    machine can run); returns all rows of the table.

    `progress(items)` wraps the export loop (e.g. tqdm); the runner prints its own progress when
    `progress` is given. `reference_ms`, `redo_noisy` (re-time the listed blocks and networks whose
    rows are above the noise gate): see `timing.run_bundle`. `export_jobs`: whole networks exported at
    once (exports only: nothing is timed while they run).
    """
    runtime = backends.get(backend)
    if not runtime.here:
        raise ArchlabError(f"--backend {backend}: cannot be timed on this machine (export a bundle and run its "
                           f"{runtime.runner}.py where it can)")
    try:
        return _measure(Path(table), Path(bundle), blocks, networks, resolution, device, protocol, opset, keep_onnx,
                        reference_ms, progress, redo_noisy, runtime, export_jobs)
    except RunnerError as e:  # a bad table, bundle or settings: one line for every caller
        raise ArchlabError(str(e)) from None


def _measure(table, bundle, blocks, networks, resolution, device, protocol, opset, keep_onnx, reference_ms, progress,
             redo_noisy, runtime, export_jobs) -> list[dict]:
    _, rows = read_table(table)
    redo = noisy_keys(rows, protocol.max_cv) if redo_noisy else set()
    backend = runtime.backend() if blocks or networks else None
    done = {r["key"] for r in rows} - redo
    todo_blocks = [b for b in blocks if b.key not in done]
    todo_nets = [c for c in networks if network_key(c) not in done]
    chunks = [(todo_blocks[i:i + BLOCK_CHUNK], []) for i in range(0, len(todo_blocks), BLOCK_CHUNK)]
    chunks += [([], todo_nets[i:i + NETWORK_CHUNK]) for i in range(0, len(todo_nets), NETWORK_CHUNK)]
    for n, (chunk_blocks, chunk_nets) in enumerate(chunks, 1):
        if progress:
            print(f"chunk {n}/{len(chunks)}: {len(chunk_blocks)} blocks, {len(chunk_nets)} networks", flush=True)
        export_bundle(bundle, chunk_blocks, chunk_nets, resolution=resolution, opset=opset, name=table.stem,
                      progress=progress, backend=runtime.name, jobs=export_jobs)
        keys = {b.key for b in chunk_blocks} | {network_key(c) for c in chunk_nets}
        rows = timing.run_bundle(bundle, table, device, backend, protocol, progress=progress is not None,
                                 reference_ms=reference_ms, redo=redo & keys)
        if not keep_onnx:
            prune_bundle(bundle, {r["key"] for r in rows})
    return rows if chunks else read_table(table)[1]


def prune_bundle(bundle: Path, keys: set[str]) -> None:
    """Delete the ONNX folders (and manifest entries) of items in `keys`; the reference stays."""
    manifest = timing.load_manifest(bundle)
    keep = []
    for it in manifest["items"]:
        if it["key"] in keys and it["key"] != manifest["reference"]:
            shutil.rmtree((bundle / it["file"]).parent, ignore_errors=True)
        else:
            keep.append(it)
    manifest["items"] = keep
    write_atomic(bundle / "manifest.json", json.dumps(manifest, indent=1) + "\n")


