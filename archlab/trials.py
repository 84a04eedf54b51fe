"""One engine for the lab's batches of proxy trainings: keyed jobs whose results are JSON files,
cached, resumable, run as Ray Tune trials.

A `Job` is one training: a design (an ArchConfig as a dict), the data, the training settings, and
where its result and its checkpoint live. `run_jobs` runs every job that has no standing result,
`concurrency` at a time; `archlab ablate` and the proxy-fidelity benchmark are both lists of jobs.

- A finished result is never trained again (a diverged one neither: the same seed would diverge
  again). Results are also kept by content (`<cache>/trainings/<hash>.json`, the hash of the design,
  the data and every training setting that changes the result), so a training that another batch
  already ran (the ablation's rows in the fidelity benchmark, say) is reused, not repeated. A job that raised (out of memory, a lost node) is recorded as `failed` with its reason and
  run again by the next invocation; an interrupted one continues from its checkpoint.
- Every result records what made it: the hardware (CPU model, or GPU name), threads, seconds of
  training and of scoring, so a report can say which machine made which number.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from archlab.io import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    key: str  # unique within a batch (Ray's trial name)
    arch: dict  # ArchConfig.to_dict() (a supernet job: {"space": the space's mapping})
    data: dict  # DataConfig fields
    train: dict  # TrainConfig fields
    result: str  # the result JSON
    workdir: str  # the checkpoint folder
    meta: dict = field(default_factory=dict)  # copied into the result (row, seed, preset, ...)
    task: str = "train"  # train: archlab.train.train; supernet: archlab.supernet.train_supernet
    options: dict = field(default_factory=dict)  # the task's own settings (a supernet's sampling rule, ...)


def read(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(path: str | Path) -> bool:
    """A result that stands: trained, or diverged (the same seed would diverge again)."""
    r = read(path)
    return r is not None and r.get("status") != "failed"


def hardware(device: str) -> str:
    """The machine a training ran on, in words: the GPU's name, or the CPU's model."""
    import torch

    from archlab.latency.table import cpu_model

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def ray_node() -> str | None:
    """The Ray node this process runs on (its node id), or None outside Ray."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray only to ask
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


RUN_ONLY = ("device", "threads", "report_every", "checkpoint_every")  # do not change what a training learns


def content_key(job: Job) -> str:
    """The identity of a training: design, data and every setting that changes its result."""
    data = dict(job.data)
    if data.get("spec") != "synthetic":
        data["spec"] = str(Path(data["spec"]).resolve())
    train = {k: v for k, v in job.train.items() if k not in RUN_ONLY}
    what = [job.arch, data, train] + ([job.task, job.options] if job.task != "train" else [])
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def cached(job: Job) -> Path:
    from archlab.io import cache_dir

    return cache_dir() / "trainings" / f"{content_key(job)}.json"


def run_job(job: Job, on_report: Callable[[int, dict], None] | None = None) -> dict:
    """Train one job and write its result; a standing result is returned as it is, and one that the
    content cache holds is copied. A training that raises becomes a result with status `failed` and
    the reason, so a batch never loses a job."""
    from archlab.config import arch_from_dict
    from archlab.data import DataConfig, load_dataset
    from archlab.train import TrainConfig, train

    if is_done(job.result):
        return read(job.result)
    if job.task == "train" and is_done(cached(job)):  # a supernet's result is nothing without its weights
        result = {**_content(read(cached(job))), **job.meta, "key": job.key, "reused": str(cached(job))}
        write_atomic(job.result, json.dumps(result, indent=1) + "\n")
        return result
    t = TrainConfig(**job.train)
    start = time.time()
    base = {**job.meta, "key": job.key, "hardware": hardware(t.device), "device": t.device, "threads": t.threads,
            "node": ray_node(), "finished_at": None}
    try:
        data = load_dataset(DataConfig(**job.data))
        if job.task == "supernet":
            from archlab import supernet

            result = {**base, **supernet.run_job(job, data, t, on_report)}
        else:
            result = {**base, **train(arch_from_dict(job.arch), data, t, out=job.workdir, on_report=on_report).to_dict()}
    except Exception as e:  # noqa: BLE001 - any failure of one training is a result, not a crash of the batch
        log.exception("%s failed", job.key)
        result = {**base, "status": "failed", "reason": f"{type(e).__name__}: {e}"[:500], "seconds": time.time() - start}
    result["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    text = json.dumps(result, indent=1) + "\n"
    write_atomic(job.result, text)
    if result["status"] != "failed" and job.task == "train":
        _file(job, result)
    return result


def _file(job: Job, result: dict) -> None:
    """Keep a standing result in the content cache, without its batch's names."""
    write_atomic(cached(job), json.dumps(_content(result, job), indent=1) + "\n")


def _content(result: dict, job: Job | None = None) -> dict:
    """A result as the content cache keeps it: without what names it in one batch (its key, meta)."""
    drop = {"key", "reused", *(job.meta if job else ())}
    return {k: v for k, v in result.items() if k not in drop}


def remember(jobs: list[Job]) -> int:
    """File the standing results that the content cache lacks (results committed with a report, or
    made before the cache was cleared), so any batch asking for the same training reuses them;
    returns how many were filed."""
    n = 0
    for j in jobs:
        r = read(j.result)
        if r is not None and r.get("status") == "ok" and not cached(j).is_file():
            _file(j, r)
            n += 1
    return n


def payload(job: Job, cluster) -> dict:
    """A job as a Ray trial's config: absolute paths (trials run in their own folders, maybe on other
    machines) and the trial's torch threads (the CPUs Ray gives it)."""
    return {**asdict(job), "train": {**job.train, "threads": cluster.cpus_per_trial},
            "result": str(Path(job.result).resolve()), "workdir": str(Path(job.workdir).resolve())}


def _ray_trial(config: dict) -> None:
    from ray import tune

    job = Job(**config["job"])
    # timesteps_total: TensorBoard's x-axis is the training step, not Ray's report count
    result = run_job(job, on_report=lambda step, m: tune.report({**m, "step": step, "timesteps_total": step}))
    tune.report({**{k: v for k, v in result.items() if isinstance(v, (int, float, str)) and v is not None},
                 "timesteps_total": result.get("steps") or 0})


Event = Callable[[str, Job, dict | None], None]  # (kind, job, info): start (meta), report (a training report: step,
# losses), scoring (steps, samples: training is done, validation and sampling run), done (its result), stopped, error,
# retry (its process or node was lost; restarted from its checkpoint: attempt, of)


def _progress(on_event: Event, retries: int):
    """A Ray Tune callback (public API) that turns trial events into job events for `on_event`."""
    from ray.tune import Callback

    def job_of(trial) -> Job:
        return Job(**trial.config["job"])

    class Progress(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            on_event("start", job_of(trial), job_of(trial).meta)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            job = job_of(trial)
            if result.get("step") is not None:
                on_event("report", job, result)
            if result.get("step") is not None and result["step"] == job.train.get("steps"):  # the last training report
                on_event("scoring", job, {"steps": result["step"], "samples": job.train.get("samples", 0)})

        def on_trial_complete(self, iteration, trials, trial, **info):
            job = job_of(trial)
            result = read(job.result)
            on_event("done" if result else "stopped", job, result)

        def on_trial_error(self, iteration, trials, trial, **info):
            on_event("error", job_of(trial), {"reason": _reason(trial)})

        def on_trial_recover(self, iteration, trials, trial, **info):
            on_event("retry", job_of(trial), {"reason": _reason(trial), "attempt": trial.num_failures, "of": retries})

    return Progress()


def _reason(trial) -> str:
    """The last line of a Ray trial's error file (a lost node: its actor died unexpectedly)."""
    path = trial.error_file
    lines = Path(path).read_text(errors="replace").strip().splitlines() if path and Path(path).is_file() else []
    return lines[-1].strip()[:300] if lines else "the trial's process failed"


def tune_jobs(cluster, run_dir: str | Path, name: str, *, jobs: list[Job] | None = None, searcher=None,
              num_samples: int = 1, scheduler=None, on_event: Event | None = None):
    """Run jobs as Ray Tune trials: a fixed grid (`jobs`), or the jobs a Ray Tune `Searcher` hands out
    (`searcher`, up to `num_samples`), `cluster.concurrency` at a time with `cluster.resources` each.
    With `on_event`, Ray's own status table is off and each trial's start and end go there instead."""
    from ray import tune

    from archlab.cluster import init_ray, shutdown_ray

    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C reaches archlab, which says how to resume
    if on_event:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # its boxes ignore verbose=0; the legacy output honours it
    session = init_ray(cluster.address)
    try:
        trainable = tune.with_resources(_ray_trial, cluster.resources)
        space = {"job": tune.grid_search([payload(j, cluster) for j in jobs])} if jobs is not None else None
        tuner = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                                       max_concurrent_trials=cluster.concurrency,
                                                       reuse_actors=True),  # a trial's process runs the next: saves seconds a trial
                           run_config=tune.RunConfig(name=f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}",
                                                     storage_path=str(Path(run_dir).resolve() / "ray"),
                                                     verbose=0 if on_event else 1,
                                                     # a lost process or node: the trial restarts (from its checkpoint)
                                                     failure_config=tune.FailureConfig(max_failures=cluster.retries),
                                                     callbacks=[_progress(on_event, cluster.retries)] if on_event else None))
        return tuner.fit()
    finally:
        shutdown_ray(session)


def run_jobs(jobs: list[Job], cluster, run_dir: str | Path, name: str, on_event: Event | None = None) -> list[dict]:
    """Every job without a standing result, as Ray Tune trials (`cluster`: a TrialSettings for the
    resources, concurrency and address); returns every job's result, or a `missing` one for a job
    that never finished (the batch was stopped)."""
    if len({j.key for j in jobs}) != len(jobs):
        raise ValueError("run_jobs: job keys must be unique")
    remember(jobs)
    for j in jobs:  # a training another batch already ran is copied here, without a Ray trial
        if not is_done(j.result) and is_done(cached(j)):
            run_job(j)
    todo = [j for j in jobs if not is_done(j.result)]
    if todo:
        from archlab.data import DataConfig
        from archlab.train import TrainConfig, prepare

        # decode each data set and compute its FID reference features once, not in every trial at once
        scoring = ("samples", "fid_extractor", "fid_reference")
        for j in {json.dumps([j.data, [j.train.get(k) for k in scoring]], sort_keys=True): j for j in todo}.values():
            prepare(DataConfig(**j.data), TrainConfig(**j.train))
        tune_jobs(cluster, run_dir, name, jobs=todo, on_event=on_event)
    return [read(j.result) or {**j.meta, "key": j.key, "status": "missing",
                               "reason": "no result: the batch stopped before this training finished"} for j in jobs]
