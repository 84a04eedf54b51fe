"""The latency lab's runtime backends: bundles for onnxruntime, ExecuTorch-XNNPACK and Core ML, their
runners, and tables that say which runtime made them."""

import json
import subprocess
import sys
import time

import pytest
import torch

from archlab import cli
from archlab.config import arch_from_dict
from archlab.decompose import BlockSpec, decompose
from archlab.errors import ArchlabError
from archlab.latency import backends, timing
from archlab.latency.export import export_bundle
from archlab.latency.runner import run_bundle
from archlab.latency.table import Protocol, RunnerError, read_table, runtime, write_table
from conftest import ROOT, tiny_dict

RES = 8
QUICK = Protocol(threads=1, warmup=0, runs=2, rounds=1)


def _blocks(n=2):
    cfg = arch_from_dict(tiny_dict(latent=dict(channels=4, resolution=RES)))
    return list({s.signature: s for s in decompose(cfg) if s.kind in ("down", "attn_in", "transformer")}.values())[:n]


def test_tables_from_before_backends_are_onnxruntime_tables():
    meta, rows = read_table(ROOT / "latency_tables" / "amd-epyc-2c.csv")
    assert meta["backend"] == "onnxruntime" and meta["runtime_version"] == meta["ort_version"] and rows
    assert runtime(meta) == f"onnxruntime {meta['ort_version']}"


def test_an_old_table_is_extended_by_the_onnxruntime_runner(tmp_path):
    out = tmp_path / "bundle"
    export_bundle(out, _blocks(1), resolution=RES)
    table = tmp_path / "t.csv"
    run_bundle(out, table, "dev", QUICK, progress=False, limit=1)
    meta, rows = read_table(table)
    legacy = {k: v for k, v in meta.items() if k not in ("backend", "runtime_version", "backend_options")}
    write_table(table, {**legacy, "ort_version": meta["runtime_version"]}, rows)  # as tables were written before
    rows = run_bundle(out, table, "dev", QUICK, progress=False)
    assert len(rows) == 2


def test_a_bundle_is_timed_only_by_its_own_backend(tmp_path):
    out = tmp_path / "bundle"
    export_bundle(out, _blocks(1), resolution=RES)

    class Other:
        name, version, options = "executorch-xnnpack", "0", {}

    with pytest.raises(RunnerError, match="a bundle for onnxruntime, not executorch-xnnpack"):
        timing.run_bundle(out, tmp_path / "t.csv", "dev", Other(), QUICK, progress=False)
    pytest.importorskip("executorch", reason="executorch is an optional extra: pip install -e '.[executorch]'")
    with pytest.raises(ArchlabError, match="made with backend='onnxruntime', not 'executorch-xnnpack'"):
        export_bundle(out, [], resolution=RES, backend="executorch-xnnpack")


def test_executorch_bundle_runs_what_torch_runs_and_names_undelegated_ops(tmp_path, monkeypatch):
    pytest.importorskip("executorch", reason="executorch is an optional extra: pip install -e '.[executorch]'")
    from executorch.runtime import Runtime

    blocks = _blocks(3)
    assert blocks[-1].kind == "transformer"
    up = next(s for s in decompose(arch_from_dict(tiny_dict(latent=dict(channels=4, resolution=RES)))) if s.kind == "up")
    rope = arch_from_dict(tiny_dict(latent=dict(channels=4, resolution=RES), attention=dict(head_dim=16, qk_norm=True, rope=True),
                                    stages=[dict(channels=32), dict(channels=64, transformer_depth=1, kv_heads="mqa")]))
    rope = next(s for s in decompose(rope) if s.kind == "transformer")
    assert "rope=1" in rope.key and "kv_heads=1" in rope.key  # its angles (constants) and strided slices, GQA's broadcast
    blocks += [rope, up]  # up: its nearest-neighbour upsample, an op XNNPACK does not take
    out = tmp_path / "bundle"
    built, runnable = {}, BlockSpec.runnable  # the modules and inputs the bundle exported, to check its .pte files
    monkeypatch.setattr(BlockSpec, "runnable", lambda spec, **kw: built.setdefault(spec.key, runnable(spec, **kw)))
    manifest = export_bundle(out, blocks, resolution=RES, backend="executorch-xnnpack")
    assert manifest["backend"] == "executorch-xnnpack" and manifest["opset"] is None
    from executorch.exir.backend.utils import is_same_node
    assert is_same_node.cache_info().currsize == 0  # no lowered graph kept alive after its export
    assert {p.name for p in out.iterdir()} >= {"runner_executorch.py", "timing.py", "table.py", "pte"}
    items = {it["key"]: it for it in manifest["items"]}
    # GroupNorm (the reference res block's), LayerNorm, RMSNorm, attention, RoPE and chunk lowered to ops XNNPACK takes
    assert {k: it["undelegated"] for k, it in items.items() if it["undelegated"]} == {up.key: {"aten_upsample_nearest2d_vec": 1}}

    for spec in blocks:  # a .pte computes what its block computes
        module, inputs = built[spec.key]
        method = Runtime.get().load_program(out / items[spec.key]["file"]).load_method("forward")
        with torch.no_grad():
            torch.testing.assert_close(method.execute(list(inputs))[0], module(*inputs), rtol=1e-4, atol=1e-4)

    table = tmp_path / "et.csv"
    rows = timing.run_bundle(out, table, "dev", backends.get("executorch-xnnpack").backend(), QUICK, progress=False)
    meta, _ = read_table(table)
    assert len(rows) == 6 and all(float(r["median_ms"]) > 0 for r in rows)
    assert (meta["backend"], meta["opset"], meta["backend_options"]) == (
        "executorch-xnnpack", None, backends.get("executorch-xnnpack").lowering)
    assert meta["undelegated"] == {up.key: items[up.key]["undelegated"]}  # the table says what ran outside XNNPACK
    with pytest.raises(RunnerError, match="made with other settings: backend="):  # never mixed with onnxruntime rows
        ort_bundle = tmp_path / "ort"
        export_bundle(ort_bundle, blocks[:1], resolution=RES)
        run_bundle(ort_bundle, table, "dev", QUICK, progress=False)


@pytest.mark.parametrize("kv_heads,scale,mask", [(4, None, None), (1, 0.3, None), (4, None, "bool"), (2, None, "float")])
def test_attention_lowered_as_batched_matmuls_equals_torch_sdpa(kv_heads, scale, mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 8, generator=g) for h in (4, kv_heads, kv_heads))
    if mask == "bool":  # as ASSA's border: some keys masked, never all of a query's
        mask = torch.rand(1, 4, 1, 7, generator=g) > 0.4
        mask[..., 0] = True
    elif mask == "float":
        mask = torch.randn(7, 7, generator=g)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=kv_heads != 4)
    got = backends._sdpa_as_bmm(q, k, v, attn_mask=mask, scale=scale, enable_gqa=kv_heads != 4)
    torch.testing.assert_close(got, want)
    with pytest.raises(ArchlabError, match="causal"):
        backends._sdpa_as_bmm(q, q, q, is_causal=True)


def test_xnnpack_lowering_computes_what_torch_computes():
    """Each decomposition applied before lowering to XNNPACK equals the op it replaces."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 64, 5, 7, generator=g), torch.randn(2, 9, 32, generator=g)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backends._group_norm_by_means(x, 8, w, b, 1e-5), F.group_norm(x, 8, w, b, 1e-5), **close)
    torch.testing.assert_close(backends._group_norm_by_means(x, 64), F.group_norm(x, 64), **close)
    torch.testing.assert_close(backends._layer_norm_by_means(t, [32], w[:32], b[:32]), F.layer_norm(t, [32], w[:32], b[:32]), **close)
    torch.testing.assert_close(backends._layer_norm_by_means(t, [9, 32]), F.layer_norm(t, [9, 32]), **close)
    torch.testing.assert_close(backends._rms_norm_by_means(t, [32], w[:32], 1e-6), F.rms_norm(t, [32], w[:32], 1e-6), **close)
    torch.testing.assert_close(backends._rms_norm_by_means(t, [32]), F.rms_norm(t, [32]), **close)
    for dim in (0, 1, -1, None):
        torch.testing.assert_close(backends._repeat_interleave_by_broadcast(t, 3, dim), t.repeat_interleave(3, dim))
    for got, want in ((backends._chunk_by_slices(t, 3, -1), t.chunk(3, -1)), (backends._split_by_slices(t, 5, 1), t.split(5, 1)),
                      (backends._split_with_sizes_by_slices(t, [4, 20, 8], 2), t.split([4, 20, 8], 2))):
        assert len(got) == len(want)
        for a, c in zip(got, want):
            torch.testing.assert_close(a, c)
    for dim, start, end, step in ((-1, 0, None, 2), (-1, 1, None, 2), (1, 2, -1, 3), (0, -5, 7, 4), (2, 30, 40, 2), (1, 1, 8, 1)):
        want = t[(slice(None),) * (dim % 3) + (slice(start, end, step),)]  # RoPE's pairs; a step that leaves a tail
        torch.testing.assert_close(backends._strided_slice_by_views(t, dim, start, end, step), want)


def test_a_bundle_lowered_otherwise_is_not_extended(tmp_path):
    out = tmp_path / "bundle"
    export_bundle(out, _blocks(1), resolution=RES)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "lowering": {"sdpa": "other"}}))
    with pytest.raises(ArchlabError, match="lowering"):
        export_bundle(out, _blocks(2), resolution=RES)


def test_coreml_bundle_exports_and_its_table_round_trips(tmp_path, capsys):
    ct = pytest.importorskip("coremltools", reason="coremltools is an optional extra: pip install -e '.[coreml]'")
    from archlab.latency.runner_coreml import CoreML

    out = tmp_path / "bundle"
    manifest = export_bundle(out, _blocks(2), resolution=RES, backend="coreml")
    assert manifest["backend"] == "coreml" and (out / "runner_coreml.py").is_file()
    for it in manifest["items"]:
        assert (out / it["file"] / "Manifest.json").is_file()  # an .mlpackage
    spec = ct.models.utils.load_spec(str(out / manifest["items"][1]["file"]))
    assert [i.name for i in spec.description.input] == list(manifest["items"][1]["inputs"])

    if sys.platform != "darwin":  # Core ML itself runs only on macOS
        with pytest.raises(RunnerError, match="only on macOS"):
            CoreML().load(out, manifest["items"][0], 1, "all")
        code = ("import sys; sys.modules['torch'] = None; sys.modules['archlab'] = None; import runpy; "  # the Mac's runner:
                f"sys.argv = ['runner_coreml.py', {str(out)!r}, '--out', {str(tmp_path / 'c.csv')!r}, "  # no torch
                f"'--device-name', 'mac']; runpy.run_path({str(out / 'runner_coreml.py')!r}, run_name='__main__')")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 2 and "runner_coreml.py: error: Core ML runs models only on macOS" in r.stderr
        assert cli.main(["latency", "run", str(out), "--backend", "coreml", "--out", str(tmp_path / "c.csv"),
                         "--device-name", "mac"]) == 2
        assert "copy the bundle to a Mac" in capsys.readouterr().err

    class OnAMac(CoreML):  # what runner_coreml.py writes on a Mac, with the model call stood in for
        def load(self, bundle, item, threads, opt_level):
            return lambda: time.sleep(1e-4)

    table = tmp_path / "mac.csv"
    timing.run_bundle(out, table, "m3-mac", OnAMac("CPU_AND_NE"), QUICK, progress=False)
    meta, rows = read_table(table)
    assert (meta["backend"], meta["backend_options"]) == ("coreml", {"compute_units": "CPU_AND_NE"}) and len(rows) == 3
    with pytest.raises(RunnerError, match="backend_options="):  # other compute units: another table
        timing.run_bundle(out, table, "m3-mac", OnAMac("CPU_ONLY"), QUICK, progress=False, redo=[rows[0]["key"]])


def test_a_missing_runtime_is_one_line_naming_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name.startswith("executorch"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    monkeypatch.setattr(backends.importlib, "import_module", lambda name: no_executorch(name))
    with pytest.raises(ArchlabError, match=r"needs executorch: pip install -e '\.\[executorch\]'"):
        export_bundle("unused", [], resolution=RES, backend="executorch-xnnpack")
