"""Device-side latency runner for Core ML (macOS: the Mac's own compute units, or those of an attached
iPhone or iPad through Xcode's device support). Needs coremltools and numpy (and the standard library).

Copy a bundle exported for it (`archlab latency export --backend coreml`: `manifest.json`, `coreml/`,
this file, `timing.py` and `table.py`) to the Mac, then::

    python runner_coreml.py BUNDLE --out table.csv --device-name m3-mac --compute-units ALL

How items are timed is `timing.py`'s, the same for every backend; the compute units are part of the
table's identity (`backend_options`). `--threads` and `--opt` do not apply (Core ML schedules its own).
Bring the table back and fit it like any other: `archlab latency fit --table table.csv`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

try:  # in the lab
    from archlab.latency import timing
    from archlab.latency.table import RunnerError
except ImportError:  # in a bundle on a device: timing.py and table.py beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import timing  # type: ignore
    from table import RunnerError  # type: ignore

UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


class CoreML:
    name = "coreml"

    def __init__(self, compute_units: str = "ALL"):
        import coremltools as ct

        if compute_units not in UNITS:
            raise RunnerError(f"--compute-units: {compute_units!r} is not one of {', '.join(UNITS)}")
        self.ct, self.version, self.options = ct, ct.__version__, {"compute_units": compute_units}

    def load(self, bundle: Path, item: dict, threads: int, opt_level: str):
        if sys.platform != "darwin":
            raise RunnerError("Core ML runs models only on macOS: copy the bundle to a Mac")
        units = self.ct.ComputeUnit[self.options["compute_units"]]
        model = self.ct.models.MLModel(str(bundle / item["file"]), compute_units=units)
        rng = np.random.default_rng(0)
        feeds = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in item["inputs"].items()}
        return lambda: model.predict(feeds)


def _options(p) -> None:
    p.add_argument("--compute-units", default="ALL", choices=UNITS, help="where Core ML may run the models")


if __name__ == "__main__":
    sys.exit(timing.main(lambda args: CoreML(args.compute_units), "runner_coreml.py", options=_options))
