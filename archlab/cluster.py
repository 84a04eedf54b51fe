"""Ray for the search and the ablation: one way to start or join a cluster and to ask for resources.

Local by default (a private Ray on this machine, all its CPUs); `address` joins a running cluster
(`auto` or HOST:6379), which keeps its own authentication settings. Workers get `ARCHLAB_CACHE`
(decoded datasets, reference statistics) from the driver, so point it at a folder every node
mounts. With GPUs, Ray gives each trial its own devices (CUDA_VISIBLE_DEVICES), so a trial's
`--device cuda` is the GPU Ray assigned to it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from dataclasses import asdict, dataclass, field

from archlab.data import DataConfig
from archlab.errors import ArchlabError
from archlab.schema import at_least, build, check, flag, setting
from archlab.train_config import TrainConfig


def init_ray(address: str | None) -> str | None:
    """Start a private local Ray (all this machine's CPUs) or join a cluster (`address`). Returns the
    session folder of a local Ray this call started (None otherwise), for `shutdown_ray`."""
    import ray

    from archlab.io import cache_dir

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # the driver reads it; workers get `env`
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster
    if ray.is_initialized():
        return None
    if address:
        check_reachable(address)
    env = {"ARCHLAB_CACHE": str(cache_dir().resolve()), "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    kwargs = {"address": address} if address else {"address": "local", "num_cpus": os.cpu_count()}
    session = None
    with held_interrupts() as held:
        try:
            ctx = ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                           runtime_env={"env_vars": env}, **kwargs)
            session = None if address else ctx.address_info.get("session_dir")
        except ConnectionError as e:
            raise ArchlabError(f"--address: cannot join a Ray cluster at {address!r}: {str(e).splitlines()[0][:200]}") from None
        except SystemExit as e:  # ray.init's own SIGTERM handler (sys.exit(15)) ran while Ray started
            if e.code != signal.SIGTERM:
                raise
            ray.shutdown()
            held.append(signal.SIGTERM)
    if held:  # Ctrl-C or SIGTERM came while Ray started: stop it, then let the signal's handler act
        shutdown_ray(session)
        handler = signal.getsignal(held[0])
        if callable(handler):
            handler(held[0], None)
        raise SystemExit(128 + held[0])  # SIGTERM with no handler of ours: exit as it would have
    return session


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT cluster address must answer (a TCP connect to its GCS) before Ray is asked to join
    it: given a dead or mistyped address, ray.init retries for minutes, printing warnings. `auto` and
    `ray://` addresses are left to Ray, which fails fast on those."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ArchlabError(f"--address: nothing answers at {address} ({e.strerror or type(e).__name__}); is the "
                           "cluster's head running (ray start --head)?") from None


@contextlib.contextmanager
def held_interrupts():
    """Hold SIGINT and SIGTERM for the block: the signals that came are in the list it yields, and
    the caller acts on them once the block is done. ray.init interrupted part-way (KeyboardInterrupt
    inside its start-up) could leave the driver waiting on a half-started Ray for minutes: 1 of 4
    Ctrl-Cs at start-up did here, sent to the process group as a terminal sends it."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in old.items():
        if callable(handler):  # not an ignored signal (a background job's SIGINT stays ignored)
            signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def shutdown_ray(session_dir: str | None) -> None:
    """Stop the local Ray that `init_ray` started and remove its session files (logs, sockets, object
    spill: about 130 MB under /tmp/ray after a small search); a joined cluster is left alone."""
    import shutil

    import ray

    if session_dir is None:
        return
    ray.shutdown()
    session = Path(session_dir)
    latest = session.parent / "session_latest"
    if latest.is_symlink() and latest.resolve() == session.resolve():
        latest.unlink()
    shutil.rmtree(session, ignore_errors=True)


def trial_resources(cpus: int, gpus: float, device: str) -> dict:
    if gpus > 0 and device == "cpu":
        raise ArchlabError(f"--gpus-per-trial: {gpus!r} needs --device cuda (or another accelerator)")
    if device.startswith("cuda") and not gpus:  # Ray hides every GPU from a trial that asks for none
        raise ArchlabError(f"--device {device}: trials run on Ray, which gives a trial GPUs only when it asks for "
                           "them: add --gpus-per-trial (e.g. 1, or 0.5 for two trials per GPU)")
    return {"cpu": cpus, "gpu": gpus} if gpus else {"cpu": cpus}


@dataclass(kw_only=True)
class TrialSettings:
    """What the search and the ablation share: the proxy training their Ray trials run, and where."""
    cpus_per_trial: int = setting(2, valid=at_least(1), rule=">= 1")
    gpus_per_trial: float = setting(0, valid=at_least(0), rule=">= 0")
    concurrency: int = setting(1, valid=at_least(1), rule=">= 1")
    retries: int = setting(2, valid=at_least(0), rule=">= 0")  # restarts of a trial whose process or node was lost
    address: str | None = None
    data: dict = field(default_factory=lambda: asdict(DataConfig()))
    train: dict = field(default_factory=lambda: asdict(TrainConfig()))

    @property
    def train_config(self) -> TrainConfig:
        return build(TrainConfig, self.train, "train")

    @property
    def data_config(self) -> DataConfig:
        return build(DataConfig, self.data, "data")

    def locate_data(self) -> None:
        """Trials run in their own folders, maybe on other machines: the data folder becomes an absolute
        path, which must exist."""
        spec = self.data["spec"]
        if spec != "synthetic":
            if not Path(spec).exists():
                raise ArchlabError(f"--dataset: {spec} does not exist")
            self.data = {**self.data, "spec": str(Path(spec).resolve())}

    def validate_trials(self) -> None:
        """Every field in its range (named by its flag), the data and training settings, the resources."""
        check(self, label=flag)
        self.data_config
        self.resources  # raises if the request cannot be met (a GPU asked without --gpus-per-trial, ...)
        self.train_config.validate()

    @property
    def resources(self) -> dict:
        """Ray resources of one trial; GPUs only for a trial that trains on one."""
        return trial_resources(self.cpus_per_trial, self.gpus_per_trial, self.train_config.device)
