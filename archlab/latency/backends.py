"""The runtimes the latency lab measures through. For each: how a bundle item is exported here (with
torch) and the device-side runner that times it with only its runtime (`timing.py` and `table.py`
beside it). Each runtime beyond onnxruntime is an optional extra (`pip install -e '.[executorch]'`).

- `onnxruntime`: ONNX (opset 20, dynamo exporter), timed by `runner.py`;
- `executorch-xnnpack`: ExecuTorch with the XNNPACK delegate, the CPU path of Android and iOS apps:
  `torch.export` -> `to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])` -> `.pte`, timed by
  `runner_executorch.py`. Ops XNNPACK would leave to ExecuTorch's portable kernels are first rewritten
  with ops it takes, as an app tuned for it would ship them (`_xnnpack_lowering`, named in the table's
  `backend_options`): attention as two batched matmuls and a softmax (torch's own decomposition guards
  fully masked rows with any/eq/where/logical_not over the whole attention matrix and broadcasts with
  expand), GroupNorm, LayerNorm and RMSNorm with means over the last two dims of a 4D view (XNNPACK's
  global average pooling), split and chunk as slices, GQA's repeat_interleave as a broadcast multiply,
  strided slices (RoPE's pairs) as a reshape and a unit slice; what depends on no input is folded first.
  Each op left out cuts the graph into another delegate. What XNNPACK still does not take is recorded per item in the manifest and the table's
  metadata (`undelegated`);
- `coreml`: an ML program (`.mlpackage`) converted by coremltools (works on Linux), timed by
  `runner_coreml.py` with Core ML on macOS (the Mac's, or an attached device's compute units).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
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
    export_copies: float = 3.0  # a network's export peaks near this many copies of its float32 weights (plus a
    # process's own ~1 GB; this default is not measured): how many exports `--export-jobs` runs at once

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
    """scaled_dot_product_attention as softmax(q k^T * scale + mask) v with batched matmuls over (batch x
    heads). A boolean mask adds -inf where it is False (a query with every key masked gets NaN, where torch
    gives 0: the lab's masks, ASSA's border, always keep a query's own tile)."""
    import torch

    if is_causal or dropout_p:
        raise ArchlabError("executorch-xnnpack export: causal attention or dropout is not lowered here")
    if enable_gqa:
        k, v = (_repeat_interleave_by_broadcast(t, q.shape[-3] // t.shape[-3], -3) for t in (k, v))
    *lead, n, d = q.shape
    s = scale if scale is not None else 1.0 / math.sqrt(d)
    q3, k3, v3 = q.reshape(-1, n, d), k.reshape(-1, k.shape[-2], d), v.reshape(-1, v.shape[-2], v.shape[-1])
    scores = torch.bmm(q3 * s, k3.transpose(1, 2))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -math.inf)
        scores = (scores.reshape(*lead, n, -1) + attn_mask).reshape(scores.shape)
    out = torch.bmm(torch.softmax(scores, dim=-1), v3)
    return out.reshape(*lead, n, v.shape[-1])


def _means(x, eps):
    """(x - mean) / sqrt(var + eps) over the last two dims of a 4D x, with means XNNPACK takes (keepdim means
    over dims 2, 3 of a 4D tensor are its global average pooling)."""
    import torch

    d = x - x.mean((2, 3), keepdim=True)
    return d * torch.rsqrt((d * d).mean((2, 3), keepdim=True) + eps)


def _group_norm_by_means(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """aten.group_norm with `_means` (ExecuTorch's XNNPACK leaves native_group_norm to a portable kernel)."""
    out = _means(x.reshape(x.shape[0], num_groups, x.shape[1] // num_groups, -1), eps).reshape(x.shape)
    affine = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    out = out * weight.reshape(affine) if weight is not None else out
    return out + bias.reshape(affine) if bias is not None else out


def _layer_norm_by_means(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    """aten.layer_norm with `_means` over a (1, rows, features, 1) view (native_layer_norm is not delegated)."""
    out = _means(x.reshape(1, -1, math.prod(normalized_shape), 1), eps).reshape(x.shape)
    out = out * weight if weight is not None else out
    return out + bias if bias is not None else out


def _rms_norm_by_means(x, normalized_shape, weight=None, eps=None):
    """aten.rms_norm with a mean XNNPACK takes (its mean over the last dim of a 4D tensor is not delegated)."""
    import torch

    x4 = x.reshape(1, -1, math.prod(normalized_shape), 1)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    out = (x4 * torch.rsqrt((x4 * x4).mean((2, 3), keepdim=True) + eps)).reshape(x.shape)
    return out * weight if weight is not None else out


def _split_by_slices(x, split_size, dim=0):
    """aten.split (and chunk) as slices: XNNPACK takes slice_copy, not split_with_sizes_copy."""
    n = x.shape[dim]
    return [x.narrow(dim, i, min(split_size, n - i)) for i in range(0, n, split_size)]


def _split_with_sizes_by_slices(x, split_sizes, dim=0):
    starts = [sum(split_sizes[:i]) for i in range(len(split_sizes))]
    return [x.narrow(dim, i, n) for i, n in zip(starts, split_sizes)]


def _chunk_by_slices(x, chunks, dim=0):
    return _split_by_slices(x, -(-x.shape[dim] // chunks), dim)


def _strided_slice_by_views(x, dim=0, start=None, end=None, step=1):
    """A slice with a step (RoPE's x[..., 1::2]) as a reshape that gives the step a dimension of its own and a
    unit slice of it: XNNPACK's static slice takes step 1 only."""
    import torch

    slice_copy = torch.ops.aten.slice_copy.Tensor
    n = x.shape[dim]
    start, end, _ = slice(start, end).indices(n)  # python's clamping of the bounds
    if step == 1:
        return slice_copy(x, dim, start, end)
    dim %= x.dim()
    count = max(0, -(-(end - start) // step))
    lo = min(start, n - count * step)  # groups of `step` from lo; ours is column start - lo (< step)
    if lo < 0:  # count * step > n: pad the tail (never for RoPE's even widths)
        x = torch.cat([x, x.new_zeros(x.shape[:dim] + (-lo,) + x.shape[dim + 1:])], dim)
        lo = 0
    grouped = slice_copy(x, dim, lo, lo + count * step).reshape(x.shape[:dim] + (count, step) + x.shape[dim + 1:])
    col = start - lo
    return slice_copy(grouped, dim + 1, col, col + 1).reshape(grouped.shape[:dim + 1] + grouped.shape[dim + 2:])


def _repeat_interleave_by_broadcast(x, repeats, dim=None, output_size=None):
    """aten.repeat_interleave with an int count as a broadcast multiply by ones and reshapes (GQA's K/V
    heads): its own decomposition is unsqueeze + expand, which XNNPACK leaves to portable kernels."""
    import torch

    if dim is None:
        x, dim = x.reshape(-1), 0
    dim %= x.dim()
    shape = tuple(x.shape)
    spread = x.reshape(shape[:dim + 1] + (1,) + shape[dim + 1:])
    ones = torch.ones((1,) * (dim + 1) + (repeats,) + (1,) * (len(shape) - dim - 1), dtype=x.dtype, device=x.device)
    return (spread * ones).reshape(shape[:dim] + (shape[dim] * repeats,) + shape[dim + 1:])


def _xnnpack_lowering() -> dict:
    """The decompositions applied before lowering to XNNPACK (the Runtime's `lowering` names them): each
    computes what torch's op computes with ops XNNPACK delegates, as an app tuned for it would ship."""
    import torch

    aten = torch.ops.aten
    return {aten.scaled_dot_product_attention.default: _sdpa_as_bmm, aten.group_norm.default: _group_norm_by_means,
            aten.layer_norm.default: _layer_norm_by_means, aten.rms_norm.default: _rms_norm_by_means,
            aten.split.Tensor: _split_by_slices,
            aten.split_with_sizes.default: _split_with_sizes_by_slices, aten.chunk.default: _chunk_by_slices,
            aten.repeat_interleave.self_int: _repeat_interleave_by_broadcast, aten.slice.Tensor: _strided_slice_by_views}


def export_pte(module, inputs: tuple, folder: Path, opset: int) -> tuple[str, dict]:
    """A `.pte` lowered to XNNPACK, and the ops left outside it ({op: count}; none when all delegate)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.backend.utils import is_same_node
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    try:
        with _quiet():
            program = torch.export.export(module.eval(), inputs).run_decompositions(_xnnpack_lowering())
            program = constant_prop_pass(program)  # what depends on no input (RoPE's angles) computed once
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            info = get_delegation_info(edge.exported_program().graph_module)
            program = edge.to_executorch()
    finally:  # executorch 1.5's partitioner memoises node comparisons without bound, keeping every graph it
        is_same_node.cache_clear()  # lowered alive (~2x its weights: 15 GB over a UNet table's 302 blocks)
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
            lowering={"sdpa": "bmm", "norms": "means", "split": "slices", "repeat_interleave": "broadcast",
                      "strided_slice": "views", "constants": "folded"},
            export_copies=3.5),  # measured once (2026-12-03): a 771M-parameter UNet peaked at 10.5 GB (3.1 copies)
    Runtime("coreml", "coreml", "runner_coreml", "CoreML", "coremltools", "coreml", export_coreml, here=False),
)}


def get(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ArchlabError(f"--backend: {name!r} is not one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]
