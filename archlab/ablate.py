"""The ablation ladder, rebuilt by the lab: every row costed, timed and trained.

`run_ablation(settings, run_dir)` fills a run folder with everything `archlab report` needs:

- `ablate.json`: the settings (ladder, dataset, proxy training, seeds, latency tables) and every
  invocation's provenance (time, command, git commit, package versions). A folder made with
  another ladder (its designs), dataset or training is refused, so results never mix.
- `cost.json`: params / MACs / FLOPs of every row at paper scale (`cost.network_cost`).
- `latency.json`: per row, the latency predicted from the committed table, and measured end to end
  in ONNX Runtime at each resolution of `measure` (default 32x32 and the paper's 128x128 latent).
  Measured networks are looked up in the device's tables first (`<tables>/<device>*.csv` made with
  the same device, resolution and threads); missing ones are measured into
  `<tables>/<device>.ladder<res>-<threads>t.csv` and stay there, so a ladder is timed once per device.
- `results/<row>/seed<k>.json`: one proxy training (FID, KID, validation loss) per row and seed (in
  `settings.results` instead when given: a small folder to commit beside the report, so the report
  regenerates, and more seeds are added, without training again), run by the trials engine (`archlab.trials`) as Ray Tune trials, `concurrency` at a time. A finished
  (row, seed) is never trained again; an interrupted one continues from its checkpoint in
  `train/<row>/seed<k>/`. A run that diverges or raises is recorded with its status and reason, not
  dropped; one that raised is retried by the next invocation.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from archlab.cluster import TrialSettings
from archlab.errors import ArchlabError
from archlab.io import folder_lock, write_atomic
from archlab.ladder import Ladder, load_ladder
from archlab.schema import at_least, build, require_mapping, setting
from archlab.trials import RUN_ONLY, Job, read, run_job, run_jobs

log = logging.getLogger(__name__)

DEFAULT_TABLE = "latency_tables/amd-epyc-2c.csv"
PACKAGES = ("torch", "onnxruntime", "onnx", "optuna", "ray", "torchmetrics", "fvcore", "numpy", "pandas")


@dataclass
class AblateSettings(TrialSettings):
    ladder: str
    seeds: int = setting(3, valid=at_least(1), rule=">= 1")
    rows: list[int] | None = None  # row indices to run (default: all)
    table: str = DEFAULT_TABLE  # predictor table; measured tables are looked up beside it
    measure: list[int] = field(default_factory=lambda: [32, 128])  # latent resolutions to time end to end
    threads: int | None = setting(None, valid=at_least(1), rule=">= 1")  # ORT threads for measuring (default: the table's)
    export_jobs: int = setting(1, valid=at_least(1), rule=">= 1")  # networks exported at once for measuring
    results: str = ""  # per-training results folder (default: the run folder's results/)
    ladder_sha: str = ""
    command: str = ""

    def validate(self, ladder: Ladder) -> None:
        self.validate_trials()
        for res in self.measure:
            if res < 8 or res & (res - 1):
                raise ArchlabError(f"--measure: {res} is not a power-of-two latent resolution >= 8")
        for i in self.rows or []:
            if not 0 <= i < len(ladder.rows):
                raise ArchlabError(f"--rows: {i} is not a row of {ladder.path} (0..{len(ladder.rows) - 1})")

    def selected(self, ladder: Ladder):
        return [r for r in ladder.rows if self.rows is None or r.index in self.rows]


def identity(values: dict) -> dict:
    """What makes two folders' results comparable (the ladder aside): data and training settings,
    less those that do not change what a training learns; the same dataset folder mounted elsewhere
    is the same data."""
    out = {k: v for k, v in values.items() if k not in RUN_ONLY}
    if out.get("spec", "synthetic") != "synthetic":
        out["spec"] = Path(out["spec"]).name
    return out


def read_settings(path: Path) -> tuple[AblateSettings, list[dict]]:
    """The settings saved in an ablation folder and its invocations; a damaged file is a one-line error."""
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ArchlabError(f"{path}: not a readable ablation settings file ({str(e).splitlines()[0][:120]})") from None
    raw = require_mapping(raw, str(path))
    history = raw.pop("invocations", [])
    return build(AblateSettings, raw, str(path)), history


def ladder_sha(ladder: Ladder) -> str:
    """The identity of a ladder's designs: its rows' names and architectures. The paper's numbers and
    the `why_differs` notes are annotations: editing them keeps a folder's results valid, and the
    report shows the new text."""
    rows = [(r.name, r.config.digest()) for r in ladder.rows]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def row_dir(row) -> str:
    return f"{row.index:02d}-{row.name}"


def results_dir(settings: AblateSettings, run_dir: Path) -> Path:
    return Path(settings.results) if settings.results else run_dir / "results"


def result_path(results: Path, row, seed: int) -> Path:
    return results / row_dir(row) / f"seed{seed}.json"


def provenance(command: str = "") -> dict:
    """Who made this: the command, git commit (and whether the tree had uncommitted changes), versions."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
            "git_commit": commit or None, "git_dirty": dirty, "python": sys.version.split()[0], "packages": versions}


# ---- settings and the run folder ------------------------------------------------------------------

def open_run(settings: AblateSettings, run_dir: Path) -> tuple[AblateSettings, Ladder]:
    """Check the settings against the ladder and against what the folder already holds; save them."""
    ladder = load_ladder(settings.ladder)  # a bad row fails here, with its one line
    settings.ladder = str(Path(settings.ladder).resolve())
    settings.table = str(Path(settings.table).resolve())
    settings.ladder_sha = ladder_sha(ladder)
    settings.locate_data()
    settings.validate(ladder)
    saved, history = run_dir / "ablate.json", []
    if saved.is_file():
        old, history = read_settings(saved)
        _same_study(old, settings, run_dir, "--out")
        settings.results = settings.results or old.results  # a results folder given once is kept
        settings.seeds = max(settings.seeds, old.seeds)  # asking for fewer seeds keeps the others
        if settings.rows is not None:  # and another selection of rows adds to the earlier one
            settings.rows = None if old.rows is None else sorted(set(old.rows) | set(settings.rows))
    if settings.results:
        settings.results = str(Path(settings.results).resolve())
    results = results_dir(settings, run_dir)
    if settings.results and (results / "ablate.json").is_file():  # a results folder kept apart, e.g. committed
        _same_study(read_settings(results / "ablate.json")[0], settings, results, "--results")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = json.dumps({**asdict(settings), "invocations": history + [provenance(settings.command)]}, indent=1) + "\n"
    write_atomic(saved, record)
    if settings.results:
        results.mkdir(parents=True, exist_ok=True)
        write_atomic(results / "ablate.json", record)
    return settings, ladder


def _same_study(old: AblateSettings, settings: AblateSettings, folder: Path, flag: str) -> None:
    """Refuse a folder whose results were made with another ladder, dataset or training."""
    if old.ladder_sha != settings.ladder_sha:
        raise ArchlabError(f"{flag}: {folder} holds results of another ladder ({old.ladder}, "
                           f"sha {old.ladder_sha}); pick another folder")
    for key in ("data", "train"):
        ours, theirs = identity(getattr(settings, key)), identity(getattr(old, key))
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise ArchlabError(f"{flag}: {folder} holds results made with other {key} settings "
                               f"({', '.join(diff)}); pick another folder")


# ---- cost and latency ----------------------------------------------------------------------------

def cost_rows(ladder: Ladder, selected, run_dir: Path, progress: bool = False) -> dict[int, dict]:
    """Params / MACs / FLOPs at paper scale of the selected rows, cached in `cost.json` by the ladder's sha."""
    from tqdm import tqdm

    from archlab.cost import network_cost

    path, sha = run_dir / "cost.json", ladder_sha(ladder)
    cached = json.loads(path.read_text()) if path.is_file() else {}
    rows = {int(k): v for k, v in cached.get("rows", {}).items()} if cached.get("ladder_sha") == sha else {}
    todo = [r for r in selected if r.index not in rows]
    for r in tqdm(todo, desc="costing", unit="row", disable=not progress, leave=False):
        c = network_cost(r.config)
        rows[r.index] = {"index": r.index, "name": r.name, "params": c.params, "macs": c.macs, "flops": c.flops}
    if todo or not cached:
        write_atomic(path, json.dumps({"ladder_sha": sha, "rows": rows}, indent=1) + "\n")
    return rows


def measured_tables(folder: Path, device: str, resolution: int, threads: int,
                    backend: str = "onnxruntime") -> list[tuple[Path, dict, list[dict]]]:
    """Every table in `folder` made on `device` with `backend` at `resolution` with `threads` (and full
    graph optimisation, as the predictor's), with its rows. Each table records its runtime's version."""
    from archlab.latency.table import RunnerError, read_table

    found = []
    for path in sorted(folder.glob(f"{device}*.csv")):
        try:
            meta, rows = read_table(path)
        except RunnerError:
            continue  # not a latency table (the predictor's own table is read, checked, elsewhere)
        if (meta.get("device"), meta.get("backend"), meta.get("resolution"), meta.get("threads"), meta.get("opt_level")) == \
                (device, backend, resolution, threads, "all"):
            found.append((path, meta, rows))
    return found


def latency_rows(selected, settings: AblateSettings, run_dir: Path, progress: bool = False) -> dict:
    """Predicted and measured latency of the selected rows; measures what no table of the device holds yet.

    Measured latency is the median of the end-to-end runs (`median_ms`). A new table at the
    predictor's resolution shares its reference speed (so `norm_ms` compares across the two); at
    another resolution the reference block is another size, and the table keeps its own."""
    from archlab.io import cache_dir, progress_bar
    from archlab.latency.export import network_key
    from archlab.latency.measure import measure
    from archlab.latency.predictor import load_for_table
    from archlab.latency.table import Protocol, runtime

    pred = load_for_table(settings.table)
    device, threads = pred.settings["device"], settings.threads or pred.settings["threads"]
    backend = pred.settings.get("backend", "onnxruntime")
    suffix = "" if backend == "onnxruntime" else f".{backend}"  # the onnxruntime tables keep their names
    folder = Path(settings.table).parent
    out = {"device": device, "cpu": pred.settings.get("cpu"), "runtime": runtime(pred.settings),
           "threads": threads, "table": Path(settings.table).name, "predicted_resolution": pred.resolution,
           "predicted_error": pred.calibration.loo_mape if pred.calibration else None,
           "resolutions": [str(r) for r in settings.measure], "rows": {}}
    for row in selected:
        p = pred.predict(row.config.with_values({"latent.resolution": pred.resolution}, where=row.name))
        out["rows"][row.index] = {"index": row.index, "name": row.name, "predicted_ms": p.latency_ms,
                                  "predicted_raw_ms": p.raw_sum_ms, "measured": {},
                                  "predicted_flag": "extrapolated" if p.extrapolated else
                                  ("outside calibration" if p.outside_calibration else "")}
    for res in settings.measure:
        cfgs = [r.config.with_values({"latent.resolution": res}, where=r.name) for r in selected]
        keys = [network_key(c) for c in cfgs]

        def lookup():
            hits = {}
            for path, meta, rows in measured_tables(folder, device, res, threads, backend):
                for r in rows:
                    if r["key"] in keys and r["key"] not in hits:
                        hits[r["key"]] = {"ms": float(r["median_ms"]), "norm_ms": float(r["norm_ms"]),
                                          "cv": float(r["cv"]), "runs": int(r["runs"]), "table": path.name,
                                          "runtime": runtime(meta)}
            return hits

        hits = lookup()
        missing = [c for c, k in zip(cfgs, keys) if k not in hits]
        if missing:
            table = folder / f"{device}{suffix}.ladder{res}-{threads}t.csv"
            if progress:
                print(f"measuring {len(missing)} ladder networks at {res}x{res} latent into {table}", file=sys.stderr)
            # whole paper-width networks take seconds (32x32) to tens of seconds (128x128) a run: the untimed
            # first run is the warm-up, then one run in each of two rounds, each next to the reference block
            measure(table, cache_dir() / "bundles" / f"ablate-{device}{suffix}-{res}", networks=missing, resolution=res,
                    device=device, protocol=Protocol(threads=threads, warmup=0, runs=2, rounds=2, budget_s=10.0),
                    reference_ms=pred.settings.get("reference_ms") if res == pred.resolution else None,
                    progress=progress_bar("exporting", "model") if progress else None, backend=backend,
                    export_jobs=settings.export_jobs)
            hits = lookup()
        for row, k in zip(selected, keys):
            out["rows"][row.index]["measured"][str(res)] = hits[k]
    write_atomic(run_dir / "latency.json", json.dumps(out, indent=1) + "\n")
    return out


# ---- proxy trainings ----------------------------------------------------------------------------

def jobs(settings: AblateSettings, ladder: Ladder, run_dir: Path) -> list[Job]:
    """One training per selected row and seed: `results/<row>/seed<k>.json`, checkpoint in `train/`."""
    out, results = [], results_dir(settings, run_dir)
    for r in settings.selected(ladder):
        for k in range(settings.seeds):
            train = {**settings.train, "seed": settings.train["seed"] + k}
            out.append(Job(key=f"{row_dir(r)}-seed{k}", arch=r.config.to_dict(), data=settings.data, train=train,
                           result=str(result_path(results, r, k)), workdir=str(run_dir / "train" / row_dir(r) / f"seed{k}"),
                           meta={"index": r.index, "name": r.name, "seed": k, "train_seed": train["seed"]}))
    return out


def run_one(settings: AblateSettings, row_index: int, seed: int, run_dir: Path) -> dict:
    """Train one (row, seed) here, without Ray (cached like every job)."""
    ladder = load_ladder(settings.ladder)
    (job,) = [j for j in jobs(settings, ladder, run_dir) if j.meta["index"] == row_index and j.meta["seed"] == seed]
    return run_job(job)


def results(settings: AblateSettings, ladder: Ladder, run_dir: Path) -> list[dict]:
    """Every (row, seed) result asked for; one that never finished is `missing` (the run stopped)."""
    return [read(j.result) or {**j.meta, "status": "missing",
                               "reason": "no result: the ablation stopped before this run finished"}
            for j in jobs(settings, ladder, run_dir)]


def run_ablation(settings: AblateSettings, run_dir: str | Path, progress: bool = False, on_event=None) -> dict:
    """Cost, time and train every selected row; returns what `archlab report` reads. `on_event`:
    the trials engine's progress events (a training started or ended). One run at a time holds the
    folder."""
    run_dir = Path(run_dir).resolve()
    with folder_lock(run_dir):
        return _run_ablation(settings, run_dir, progress, on_event)


def _run_ablation(settings: AblateSettings, run_dir: Path, progress: bool, on_event) -> dict:
    settings, ladder = open_run(settings, run_dir)
    selected = settings.selected(ladder)
    cost = cost_rows(ladder, selected, run_dir, progress)
    latency = latency_rows(selected, settings, run_dir, progress)
    run_jobs(jobs(settings, ladder, run_dir), settings, run_dir, name="ablate", on_event=on_event)
    return {"run_dir": str(run_dir), "cost": cost, "latency": latency, "results": results(settings, ladder, run_dir)}
