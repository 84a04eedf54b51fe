"""Device-side latency runner for onnxruntime. Needs only onnxruntime and numpy (and the standard library).

Copy a bundle exported for onnxruntime (`archlab latency export`: its `manifest.json`, its `onnx/`
folder, this file, `timing.py` and `table.py`) to the target device, then::

    python runner.py BUNDLE --out table.csv --device-name my-phone-board [--threads 2] [--runs 30]

How items are timed (warm-up, rounds beside the reference model, the noise gate, an atomic and
resumable table) is `timing.py`'s, the same for every backend. onnxruntime runs with `threads`
intra-op threads, one inter-op thread, sequential execution and graph optimisation `--opt`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

try:  # in the lab
    from archlab.latency import timing
    from archlab.latency.table import Protocol, RunnerError
except ImportError:  # in a bundle on a device: timing.py and table.py beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import timing  # type: ignore
    from table import Protocol, RunnerError  # type: ignore

ORT_LEVELS = {  # Protocol.opt_level -> onnxruntime's setting
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxRuntime:
    name, version, options = "onnxruntime", ort.__version__, {}

    def load(self, bundle: Path, item: dict, threads: int, opt_level: str):
        session = make_session(bundle / item["file"], threads, opt_level)
        feeds = make_feeds(session, item["inputs"])
        return lambda: session.run(None, feeds)


def make_session(model: Path, threads: int, opt_level: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ORT_LEVELS[opt_level]
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def make_feeds(session: ort.InferenceSession, shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        if inp.name not in shapes:
            raise RunnerError(f"model input {inp.name!r} has no shape in the manifest")
        feeds[inp.name] = rng.standard_normal(shapes[inp.name]).astype(np.float32)
    return feeds


def run_bundle(bundle: str | Path, out: str | Path, device: str, protocol: Protocol = Protocol(), **kwargs) -> list[dict]:
    """`timing.run_bundle` with onnxruntime."""
    return timing.run_bundle(bundle, out, device, OnnxRuntime(), protocol, **kwargs)


if __name__ == "__main__":
    sys.exit(timing.main(lambda args: OnnxRuntime(), "runner.py"))
