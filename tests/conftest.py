"""Shared fixtures: tiny configs that build and run in milliseconds on a CPU."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from archlab.config import ArchConfig

ROOT = Path(__file__).resolve().parents[1]
LADDER = ROOT / "search_spaces" / "snapgen_ablation.yaml"
SPACE = ROOT / "search_spaces" / "snapgen_unet.yaml"


def tiny_dict(**over) -> dict:
    d = dict(
        name="tiny",
        latent=dict(channels=4, resolution=16),
        attention=dict(head_dim=16, qk_norm=False, rope=False),
        conditioning=dict(context_dim=24, context_len=5, first_stage=1, inject="add"),
        stage_defaults=dict(res_blocks=1),
        stages=[dict(channels=32), dict(channels=64, transformer_depth=1), dict(channels=64, transformer_depth=2)],
    )
    d.update(over)
    return d


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Tests never read or write the repository's runs/cache (decoded data, features, training results)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ARCHLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture
def tiny() -> ArchConfig:
    return ArchConfig.from_dict(tiny_dict())


def terminal_job(argv: list[str], **kw) -> subprocess.Popen:
    """Start `argv` as a terminal starts a foreground job: its own process group, and Ctrl-C's default
    action. A shell gives a background job (`pytest ... &`) SIGINT ignored, which every child inherits:
    a search started from such a pytest would ignore the test's Ctrl-C and train on."""
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kw)


def kill_when(argv: list[str], ready, timeout: float = 300, poll: float = 0.2) -> None:
    """Start `argv` in its own process group, wait until `ready()` is true, then SIGKILL the whole group
    (the driver, Ray and its workers): what a crash or a reboot does to a run."""
    proc = terminal_job(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(poll)
        assert proc.poll() is None, f"{' '.join(argv[2:4])} ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
