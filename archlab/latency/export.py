"""Export blocks (by signature) and whole networks to a bundle for one runtime's runner.

A bundle is a folder: `manifest.json` (its backend; items with key, kind, role, file and input
shapes), one folder per model under the backend's folder (`onnx/`, `pte/`, `coreml/`; see
`archlab.latency.backends`), and copies of the backend's runner, `timing.py` and `table.py`, so it can
be copied to a device that has only that runtime. Exporting resumes: items already in the manifest
are skipped; the manifest is rewritten atomically after each item.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from archlab.config import Config
from archlab.decompose import BlockSpec
from archlab.errors import ArchlabError
from archlab.io import available_memory_bytes
from archlab.latency import backends, table, timing
from archlab.models import build_model

FORMAT = 1
DEFAULT_OPSET = 20


def reference_block(resolution: int) -> BlockSpec:
    """The fixed block every bundle times beside each item, to take out the machine's drift."""
    hp = (("cin", 256), ("cout", 256), ("temb_dim", 1024), ("conv", "standard"), ("expansion", 1), ("groups", 32))
    return BlockSpec("res", hp, (resolution // 2, resolution // 2), name="reference")


def network_key(cfg: Config) -> str:
    """A stable key for a whole network: its name and its architecture digest."""
    return f"network({cfg.name})#{cfg.digest()}"


def _export(runtime: backends.Runtime, module: torch.nn.Module, inputs: tuple, folder: Path, opset: int) -> tuple[str, dict]:
    """Export into `folder` for `runtime`, atomically: into a temporary folder that is renamed when
    complete. Returns (the model's file in the folder, the item's extra fields)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    tmp.mkdir(parents=True)
    file, extra = runtime.export(module, inputs, tmp, opset)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return file, extra


def network_inputs(cfg: Config) -> tuple:
    """A whole network's example inputs (fixed values): latent, timestep, context."""
    g = torch.Generator().manual_seed(0)
    res = cfg.latent.resolution
    return (torch.randn(1, cfg.latent.channels, res, res, generator=g), torch.tensor([500.0]),
            torch.randn(1, cfg.conditioning.context_len, cfg.conditioning.context_dim, generator=g))


def _export_network(backend: str, config: dict, folder: str, opset: int) -> tuple[str, dict, dict]:
    from archlab.config import arch_from_dict

    cfg = arch_from_dict(config)
    inputs = network_inputs(cfg)
    file, extra = _export(backends.get(backend), build_model(cfg), inputs, Path(folder), opset)
    return file, extra, {f"in{i}": list(t.shape) for i, t in enumerate(inputs)}


IN_PROCESS_PARAMS = 50_000_000  # networks smaller than this export in the calling process (a process costs seconds)


def _params(cfg: Config) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return sum(p.numel() for p in build_model(cfg).parameters())


def _export_networks(backend: str, items: list[tuple[Config, Path]], opset: int, jobs: int, progress=None,
                     memory: float | None = None):
    """Export whole networks, each in a process of its own, at most `jobs` at a time (with one job, networks all
    under IN_PROCESS_PARAMS in this process); yields (file, extra, input shapes) per item, in order. A
    paper-scale network's export holds several copies of its weights at once (the runtime's `export_copies`:
    ExecuTorch's lowering peaks near 11 GB for a 3 GB UNet), and a process that exported one does not give that
    memory back to the next. So a network starts beside others only while the exports' estimated peaks fit in
    `memory` (default: 90% of the memory available now); one too big for that runs alone. The exports are
    single-threaded Python for the most part, so on a machine with cores and memory to spare `jobs` > 1
    divides their time."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    if not items:
        return
    if jobs == 1 and all(_params(cfg) < IN_PROCESS_PARAMS for cfg, _ in items):  # small (tests, proxies): no process
        for cfg, folder in (progress(items) if progress else items):
            yield _export_network(backend, cfg.to_dict(), str(folder), opset)
        return
    budget = memory if memory is not None else 0.9 * (available_memory_bytes() or float("inf"))
    peaks = [export_peak(backend, cfg) for cfg, _ in items]
    waiting, running, finished = list(range(len(items))), {}, {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        for i, (cfg, folder) in enumerate(progress(items) if progress else items):
            while i not in finished:
                while waiting and fits([peaks[j] for j in running], peaks[waiting[0]], budget, jobs):
                    j = waiting.pop(0)
                    running[j] = pool.submit(_export_network, backend, items[j][0].to_dict(), str(items[j][1]), opset)
                wait(running.values(), return_when=FIRST_COMPLETED)
                finished.update({j: running.pop(j) for j in [j for j, f in running.items() if f.done()]})
            try:
                yield finished.pop(i).result()
            except BrokenProcessPool:
                shutil.rmtree(folder.with_name(f".{folder.name}.tmp"), ignore_errors=True)
                raise ArchlabError(f"network {cfg.name}: its {backend} export process died (out of memory? exporting "
                                   "holds several copies of the weights; fewer --export-jobs)") from None


def fits(running: list[float], peak: float, budget: float, jobs: int) -> bool:
    """May an export of estimated `peak` bytes start beside exports of `running` peaks? Under `jobs` of them
    and within `budget` bytes; alone, always."""
    return not running or (len(running) < jobs and sum(running) + peak <= budget)


def export_peak(backend: str, cfg: Config) -> float:
    """Estimated peak memory (bytes) of exporting `cfg` in a process of its own: the runtime's `export_copies`
    of its float32 weights plus the process's own ~1 GB (torch and the runtime imported)."""
    return 1e9 + backends.get(backend).export_copies * 4 * _params(cfg)


def select(space: str | None = None, ladder: str | None = None, networks: int = 0, seed: int = 0,
           resolution: int = 32, ladder_networks: bool = False,
           networks_of: list[str] = (), blocks_of: list[str] = (), top_blocks: int = 40
           ) -> tuple[list[BlockSpec], list[Config]]:
    """What a table measures: every block signature a search space (and a ladder's rows) can produce at
    `resolution`, plus `networks` whole networks sampled from the space (and the ladder's rows with
    `ladder_networks`), plus the whole networks other tables timed (`networks_of`: to time a measured
    device's networks on a new one), plus the `top_blocks` blocks that carry most of the calibration
    networks' time in other tables' predictors (`blocks_of`: `transfer.key_blocks`). Returns (blocks,
    networks)."""
    from archlab.config import arch_from_dict
    from archlab.decompose import decompose
    from archlab.ladder import load_ladder
    from archlab.latency.predictor import load_for_table, read_checked_table
    from archlab.latency.transfer import key_blocks
    from archlab.space import load_space

    if not space and not ladder and not networks_of and not blocks_of:
        raise ArchlabError("give --space, --ladder, --networks-of, --blocks-of or a combination")
    if networks and not space:
        raise ArchlabError("--networks samples from a search space: give --space")
    blocks, nets = {}, []
    if space:
        sp = load_space(space).at_resolution(resolution)
        blocks.update((s.signature, s) for s in sp.block_signatures())
        nets += [cfg for _, cfg in sp.sample(networks, seed=seed)]
    if ladder:
        for cfg in load_ladder(ladder).configs(resolution):
            blocks.update((s.signature, s) for s in decompose(cfg))
            if ladder_networks:
                nets.append(cfg)
    for path in networks_of:
        meta, rows = read_checked_table(path)
        if int(meta["resolution"]) != resolution:
            raise ArchlabError(f"--networks-of: {path} timed its networks at latent {meta['resolution']}, not "
                               f"--resolution {resolution}")
        configs = meta.get("networks", {})
        for r in rows:
            if r["role"] == "network":
                if r["key"] not in configs:
                    raise ArchlabError(f"--networks-of: {path}: network {r['key']} has no config in its metadata")
                nets.append(arch_from_dict(configs[r["key"]], f"{path}: {r['key']}"))
    for path in blocks_of:
        source = load_for_table(path)
        if source.resolution != resolution:
            raise ArchlabError(f"--blocks-of: {path} was measured at latent {source.resolution}, not --resolution {resolution}")
        if source.calibration is None:
            raise ArchlabError(f"--blocks-of: {path} has no calibration networks whose busiest blocks to take")
        meta, _ = read_checked_table(path)
        cfgs = [arch_from_dict(meta["networks"][key], f"{path}: {key}") for key in source.calibration.networks]
        for spec in map(BlockSpec.from_key, key_blocks(source, cfgs, top_blocks)):
            blocks.setdefault(spec.signature, spec)
    return list(blocks.values()), list({network_key(c): c for c in nets}.values())  # a network listed twice: once


def export_bundle(out_dir: str | Path, blocks: list[BlockSpec], networks: list[Config] = (), *,
                  resolution: int, opset: int = DEFAULT_OPSET, name: str = "", progress=None,
                  backend: str = "onnxruntime", jobs: int = 1) -> dict:
    """Export every block and network not yet in the bundle at `out_dir` for `backend`'s runner (whole
    networks `jobs` at a time, see `_export_networks`); returns the manifest."""
    runtime = backends.get(backend)
    runtime.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    ref = reference_block(resolution)
    manifest = {"format": FORMAT, "name": name or out.name, "backend": backend, "resolution": resolution,
                "opset": opset if backend == "onnxruntime" else None, "lowering": runtime.lowering, "reference": ref.key,
                "items": []}
    if path.exists():
        try:
            old = timing.load_manifest(out)
        except table.RunnerError as e:
            raise ArchlabError(str(e)) from None
        old.setdefault("backend", "onnxruntime")  # a bundle from before backends
        old.setdefault("lowering", {})  # or from before lowering choices
        for key in ("backend", "resolution", "opset", "lowering", "reference"):
            if old[key] != manifest[key]:
                raise ArchlabError(f"{out}: bundle was made with {key}={old[key]!r}, not {manifest[key]!r}")
        manifest["items"] = old["items"]
    done = {it["key"] for it in manifest["items"]}
    for spec in blocks:
        if spec.hw[0] > resolution:
            raise ArchlabError(f"block {spec.key} is larger than the bundle's latent resolution {resolution}")

    def folder(key: str) -> str:
        return f"{runtime.folder}/{hashlib.sha1(key.encode()).hexdigest()[:16]}"

    def add(key: str, kind: str, role: str, file: str, shapes: dict, extra: dict, config: dict | None = None) -> None:
        item = {"key": key, "kind": kind, "role": role, "file": f"{folder(key)}/{file}", "inputs": shapes, **extra}
        if config is not None:
            item["config"] = config
        manifest["items"].append(item)
        table.write_atomic(path, json.dumps(manifest, indent=1) + "\n")

    specs = [s for s in [ref, *blocks] if s.key not in done]
    for spec in (progress(specs) if progress else specs):
        module, inputs = spec.runnable(batch=1)
        file, extra = _export(runtime, module, inputs, out / folder(spec.key), opset)
        add(spec.key, spec.kind, "reference" if spec is ref else "block", file,
            {f"in{i}": list(t.shape) for i, t in enumerate(inputs)}, extra)
    nets = [c for c in networks if network_key(c) not in done]
    for cfg in nets:
        if cfg.latent.resolution != resolution:
            raise ArchlabError(f"network {cfg.name}: latent resolution {cfg.latent.resolution}, bundle {resolution}")
    exported = _export_networks(backend, [(c, out / folder(network_key(c))) for c in nets], opset, jobs, progress)
    for cfg, (file, extra, shapes) in zip(nets, exported):
        add(network_key(cfg), "network", "network", file, shapes, extra, cfg.to_dict())
    here = Path(__file__).parent  # the device-side runner, and the protocol and table modules it runs with
    for code in (here / f"{runtime.runner}.py", here / "timing.py", here / "table.py"):
        table.write_atomic(out / code.name, code.read_text())
    if not path.exists():
        table.write_atomic(path, json.dumps(manifest, indent=1) + "\n")
    return manifest
