"""Export blocks (by signature) and whole networks to an ONNX bundle for `runner.py`.

A bundle is a folder: `manifest.json` (items with key, kind, role, file and input shapes), `onnx/`
(one folder per model: `model.onnx`, and `model.onnx.data` beside it for models over 2 GB) and a
copy of `runner.py`, so it can be copied to a device that has only onnxruntime and numpy.
Exporting resumes: items already in the manifest are skipped; the manifest is rewritten
atomically after each item.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from archlab.config import ArchConfig
from archlab.decompose import BlockSpec
from archlab.errors import ArchlabError
from archlab.latency import runner, table
from archlab.models import build_model

FORMAT = 1
DEFAULT_OPSET = 20


def reference_block(resolution: int) -> BlockSpec:
    """The fixed block every bundle times beside each item, to take out the machine's drift."""
    hp = (("cin", 256), ("cout", 256), ("temb_dim", 1024), ("conv", "standard"), ("expansion", 1), ("groups", 32))
    return BlockSpec("res", hp, (resolution // 2, resolution // 2), name="reference")


def network_key(cfg: ArchConfig) -> str:
    """A stable key for a whole network: its name and its architecture digest."""
    return f"network({cfg.name})#{cfg.digest()}"


def _export(module: torch.nn.Module, inputs: tuple, folder: Path, opset: int) -> dict[str, list[int]]:
    """Export to `folder/model.onnx` (plus `model.onnx.data` for models over protobuf's 2 GB), atomically:
    into a temporary folder that is renamed when complete."""
    names = [f"in{i}" for i in range(len(inputs))]
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    tmp.mkdir(parents=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(module.eval(), inputs, str(tmp / "model.onnx"), input_names=names, opset_version=opset,
                          dynamo=True, external_data=False)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return {n: list(t.shape) for n, t in zip(names, inputs)}


def select(space: str | None = None, ladder: str | None = None, networks: int = 0, seed: int = 0,
           resolution: int = 32, ladder_networks: bool = False) -> tuple[list[BlockSpec], list[ArchConfig]]:
    """What a table measures: every block signature a search space (and a ladder's rows) can produce at
    `resolution`, plus `networks` whole networks sampled from the space (and the ladder's rows with
    `ladder_networks`). Returns (blocks, networks)."""
    from archlab.decompose import decompose
    from archlab.ladder import load_ladder
    from archlab.space import load_space

    if not space and not ladder:
        raise ArchlabError("give --space, --ladder or both")
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
    return list(blocks.values()), nets


def export_bundle(out_dir: str | Path, blocks: list[BlockSpec], networks: list[ArchConfig] = (), *,
                  resolution: int, opset: int = DEFAULT_OPSET, name: str = "", progress=None) -> dict:
    """Export every block and network not yet in the bundle at `out_dir`; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    ref = reference_block(resolution)
    manifest = {"format": FORMAT, "name": name or out.name, "resolution": resolution, "opset": opset,
                "reference": ref.key, "items": []}
    if path.exists():
        old = runner.load_manifest(out)
        for key in ("resolution", "opset", "reference"):
            if old[key] != manifest[key]:
                raise ArchlabError(f"{out}: bundle was made with {key}={old[key]!r}, not {manifest[key]!r}")
        manifest["items"] = old["items"]
    done = {it["key"] for it in manifest["items"]}
    for spec in blocks:
        if spec.hw[0] > resolution:
            raise ArchlabError(f"block {spec.key} is larger than the bundle's latent resolution {resolution}")

    todo: list[tuple[str, str, str, object]] = [(ref.key, "res", "reference", ref)]
    todo += [(s.key, s.kind, "block", s) for s in blocks]
    todo += [(network_key(c), "network", "network", c) for c in networks]
    todo = [t for t in todo if t[0] not in done]
    for key, kind, role, obj in (progress(todo) if progress else todo):
        if isinstance(obj, BlockSpec):
            module, inputs = obj.runnable(batch=1)
        else:
            cfg: ArchConfig = obj  # type: ignore[assignment]
            if cfg.latent.resolution != resolution:
                raise ArchlabError(f"network {cfg.name}: latent resolution {cfg.latent.resolution}, bundle {resolution}")
            module = build_model(cfg)
            g = torch.Generator().manual_seed(0)
            inputs = (torch.randn(1, cfg.latent.channels, resolution, resolution, generator=g),
                      torch.tensor([500.0]),
                      torch.randn(1, cfg.conditioning.context_len, cfg.conditioning.context_dim, generator=g))
        folder = f"onnx/{hashlib.sha1(key.encode()).hexdigest()[:16]}"
        shapes = _export(module, inputs, out / folder, opset)
        file = f"{folder}/model.onnx"
        item = {"key": key, "kind": kind, "role": role, "file": file, "inputs": shapes}
        if role == "network":
            item["config"] = obj.to_dict()
        manifest["items"].append(item)
        table.write_atomic(path, json.dumps(manifest, indent=1) + "\n")
    for code in (runner.__file__, table.__file__):  # the device-side runner and the table module it reads with
        table.write_atomic(out / Path(code).name, Path(code).read_text())
    if not path.exists():
        table.write_atomic(path, json.dumps(manifest, indent=1) + "\n")
    return manifest
