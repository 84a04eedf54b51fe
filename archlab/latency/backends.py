"""The runtimes the latency lab measures through. For each: how a bundle item is exported here (with
torch) and the device-side runner that times it with only its runtime (`timing.py` and `table.py`
beside it). Each runtime beyond onnxruntime is an optional extra (`pip install -e '.[executorch]'`).

- `onnxruntime`: ONNX (opset 20, dynamo exporter), timed by `runner.py`;
- `executorch-xnnpack`: ExecuTorch with the XNNPACK delegate, the CPU path of Android and iOS apps:
  `torch.export` -> `to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])` -> `.pte`, timed by
  `runner_executorch.py`. Attention is lowered as two batched matmuls and a softmax (`_sdpa_as_bmm`,
  the table's `backend_options: {"sdpa": "bmm"}`), as an app would ship it: torch's own decomposition
  of scaled_dot_product_attention guards fully masked rows (any/eq/where/logical_not/full_like over
  the whole attention matrix) and broadcasts with expand, ops XNNPACK leaves to portable kernels; the
  lab's attention has no mask, so the values are the same. The ops XNNPACK still does not take (they
  run on ExecuTorch's portable CPU kernels) are recorded per item in the manifest and the table's
  metadata (`undelegated`);
- `coreml`: an ML program (`.mlpackage`) converted by coremltools (works on Linux), timed by
  `runner_coreml.py` with Core ML on macOS (the Mac's, or an attached device's compute units).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from archlab.errors import ArchlabError


@dataclass(frozen=True)
class Runtime:
    name: str
    folder: str  # where the bundle keeps the exported models
    runner: str  # the device-side runner's module (shipped in the bundle as its file)
    factory: str  # the runner's Backend class
    requires: str  # the package the export and the runner need
    extra: str  # the optional extra that installs it ("": a core dependency)
    export: Callable = field(repr=False, default=None)  # (module, inputs, folder, opset) -> (file in folder, item extras)
    here: bool = True  # can this machine (Linux) time it?
    lowering: dict = field(default_factory=dict)  # how the exporter lowers what it could lower otherwise: part of a
    # bundle's and a table's identity (the table's backend_options), so models lowered otherwise never mix

    def backend(self, **options):
        """The runner's Backend (imports the runtime)."""
        self.check()
        module = importlib.import_module(f"archlab.latency.{self.runner}")
        return getattr(module, self.factory)(**options)

    def check(self) -> None:
        try:
            importlib.import_module(self.requires)
        except ImportError:
            how = f"pip install -e '.[{self.extra}]'" if self.extra else "pip install -e ."
            raise ArchlabError(f"--backend {self.name}: needs {self.requires}: {how}") from None


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch.export", "executorch", "coremltools"):
            logging.getLogger(name).setLevel(logging.ERROR)
        yield


def export_onnx(module, inputs: tuple, folder: Path, opset: int) -> tuple[str, dict]:
    import torch

    with _quiet():
        torch.onnx.export(module.eval(), inputs, str(folder / "model.onnx"), input_names=_names(inputs),
                          opset_version=opset, dynamo=True, external_data=False)
    return "model.onnx", {}


def _sdpa_as_bmm(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as softmax(q k^T * scale) v with batched matmuls over (batch x heads)."""
    import math

    import torch

    if attn_mask is not None or is_causal or dropout_p:
        raise ArchlabError("executorch-xnnpack export: attention with a mask, causal or dropout is not lowered here")
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], -3) for t in (k, v))
    *lead, n, d = q.shape
    s = scale if scale is not None else 1.0 / math.sqrt(d)
    q3, k3, v3 = q.reshape(-1, n, d), k.reshape(-1, k.shape[-2], d), v.reshape(-1, v.shape[-2], v.shape[-1])
    out = torch.bmm(torch.softmax(torch.bmm(q3 * s, k3.transpose(1, 2)), dim=-1), v3)
    return out.reshape(*lead, n, v.shape[-1])


def export_pte(module, inputs: tuple, folder: Path, opset: int) -> tuple[str, dict]:
    """A `.pte` lowered to XNNPACK, and the ops left outside it ({op: count}; none when all delegate)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    with _quiet():
        program = torch.export.export(module.eval(), inputs).run_decompositions(
            {torch.ops.aten.scaled_dot_product_attention.default: _sdpa_as_bmm})
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        info = get_delegation_info(edge.exported_program().graph_module)
        program = edge.to_executorch()
    (folder / "model.pte").write_bytes(program.buffer)
    ops = info.get_operator_delegation_dataframe()
    left = {r.op_type: int(r.occurrences_in_non_delegated_graphs) for r in ops.itertuples()
            if r.op_type not in ("Total", "getitem") and int(r.occurrences_in_non_delegated_graphs) > 0}  # getitem: tuple access
    return "model.pte", {"undelegated": left}


def export_coreml(module, inputs: tuple, folder: Path, opset: int) -> tuple[str, dict]:
    """An ML program (float16 compute, iOS 17 and later) from the torch.export graph."""
    import coremltools as ct
    import torch

    with _quiet():
        program = torch.export.export(module.eval(), inputs).run_decompositions({})
        model = ct.convert(program, inputs=[ct.TensorType(name=n, shape=tuple(t.shape)) for n, t in zip(_names(inputs), inputs)],
                           convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17)
        model.save(str(folder / "model.mlpackage"))
    return "model.mlpackage", {}


def _names(inputs: tuple) -> list[str]:
    return [f"in{i}" for i in range(len(inputs))]


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("onnxruntime", "onnx", "runner", "OnnxRuntime", "onnxruntime", "", export_onnx),
    Runtime("executorch-xnnpack", "pte", "runner_executorch", "ExecuTorchXnnpack", "executorch", "executorch", export_pte,
            lowering={"sdpa": "bmm"}),
    Runtime("coreml", "coreml", "runner_coreml", "CoreML", "coremltools", "coreml", export_coreml, here=False),
)}


def get(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ArchlabError(f"--backend: {name!r} is not one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]
