"""Device-side latency runner for ExecuTorch with the XNNPACK delegate: the CPU path Android and iOS
apps use. Needs executorch's Python runtime (which needs torch) and the standard library.

Copy a bundle exported for it (`archlab latency export --backend executorch-xnnpack`: `manifest.json`,
`pte/`, this file, `timing.py` and `table.py`) to the device, then::

    python runner_executorch.py BUNDLE --out table.csv --device-name my-phone-board [--threads 2]

How items are timed is `timing.py`'s, the same for every backend. `--threads` sizes XNNPACK's
threadpool (through executorch's only handle on it, `_unsafe_reset_threadpool`, experimental in
executorch 1.5); `--opt` does not apply. Ops the XNNPACK partitioner left outside the delegate run on
ExecuTorch's portable kernels; the manifest lists them per item and the table's metadata keeps them.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import torch
from executorch.extension.pybindings import portable_lib
from executorch.runtime import Runtime

try:  # in the lab
    from archlab.latency import timing
    from archlab.latency.table import RunnerError
except ImportError:  # in a bundle on a device: timing.py and table.py beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import timing  # type: ignore
    from table import RunnerError  # type: ignore


class ExecuTorchXnnpack:
    name, options = "executorch-xnnpack", {}

    def __init__(self):
        self.version = importlib.metadata.version("executorch")
        self.runtime = Runtime.get()
        if not self.runtime.backend_registry.is_available("XnnpackBackend"):
            raise RunnerError("this executorch build has no XNNPACK backend")
        self.threads = None

    def load(self, bundle: Path, item: dict, threads: int, opt_level: str):
        if opt_level != "all":
            raise RunnerError(f"--opt {opt_level}: graph optimisation levels are onnxruntime's; ExecuTorch takes only all")
        if threads != self.threads:
            portable_lib._unsafe_reset_threadpool(threads)
            if portable_lib._threadpool_get_thread_count() != threads:
                raise RunnerError(f"XNNPACK's threadpool did not take {threads} threads")
            self.threads = threads
        program = self.runtime.load_program(bundle / item["file"])
        method = program.load_method("forward")
        g = torch.Generator().manual_seed(0)
        names = sorted(item["inputs"], key=lambda n: int(n[2:]))  # in0, in1, ...: the model's positional inputs
        inputs = [torch.randn(item["inputs"][n], generator=g) for n in names]
        return lambda: (program, method.execute(inputs))  # the program outlives its method


if __name__ == "__main__":
    sys.exit(timing.main(lambda args: ExecuTorchXnnpack(), "runner_executorch.py"))
