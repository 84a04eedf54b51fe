"""The lab on a real multi-node Ray cluster (Ray's own `cluster_utils.Cluster`, every node a set of
processes on this machine, at its own interface address: a driver cannot join nodes on 127.0.0.1, as
Ray rewrites a loopback join address to the interface's): trials spread over the nodes, a node lost
mid-training is survived, and a run folder is held by one run at a time."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from archlab.errors import ArchlabError
from archlab.io import folder_lock
from archlab.search import finished, open_study
from conftest import ROOT, SPACE, tiny_dict
from test_ablate import tiny_lab  # noqa: F401 - the two-row ladder and its latency table
from test_search import setup  # noqa: F401 - the tiny space and its latency table

CLI = [sys.executable, "-m", "archlab.cli"]
TINY = ["--dataset", "synthetic", "--image-size", "8", "--classes", "3", "--per-class", "8", "--val-per-class", "4",
        "--batch", "4", "--width-mult", "1", "--samples", "0", "--cpus-per-trial", "1"]


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs (it only coordinates) and two worker nodes of one CPU each."""
    from ray.cluster_utils import Cluster

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")  # a private cluster: the drivers in subprocesses inherit it
    # a lost node is declared dead after 2 missed health checks 0.5 s apart (Ray's default: 5 of 3 s)
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 2}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": health})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    c.shutdown()
    mp.undo()


def _free_cpus(address: str) -> float:
    """CPUs the cluster has free now, asked as a driver of its own (then gone again)."""
    code = ("import ray; ray.init(address=%r, log_to_driver=False); "
            "print(ray.available_resources().get('CPU', 0)); ray.shutdown()" % address)
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                check=True).stdout.strip().splitlines()[-1])


def _results(folder: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))]


def _search_argv(setup, run: Path, address: str, trials: int, steps: int, concurrency: int) -> list[str]:
    space_path, _, table, every = setup
    return CLI + ["search", "--space", str(space_path), "--table", str(table), "--budget-ms", str(every[-1]),
                  "--trials", str(trials), "--steps", str(steps), "--checkpoint-every", "5", "--concurrency",
                  str(concurrency), "--no-asha", "--address", address, "--out", str(run)] + TINY


def test_a_search_and_an_ablation_spread_over_the_nodes(cluster, setup, tiny_lab, tmp_path):
    c, nodes = cluster
    run = tmp_path / "search"
    p = subprocess.run(_search_argv(setup, run, c.address, trials=2, steps=30, concurrency=2),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    trained = _results(run / "trials", "trial*.json")
    assert len(trained) == 2 and {r["status"] for r in trained} == {"ok"}, p.stderr[-3000:]
    assert {r["node"] for r in trained} == {n.node_id for n in nodes}  # both workers trained, the head none
    assert finished(open_study(run)) == 2 and (run / "summary.md").is_file()

    ladder, table = tiny_lab
    out = tmp_path / "ablate"
    p = subprocess.run(CLI + ["ablate", str(ladder), "--seeds", "1", "--table", str(table), "--measure", "none",
                              "--steps", "30", "--concurrency", "2", "--address", c.address, "--out", str(out)] + TINY,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _results(out / "results", "*/seed*.json")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert {r["node"] for r in rows} == {n.node_id for n in nodes}
    assert _free_cpus(c.address) == 2  # every trial's worker gave its CPU back: nothing left running


def _lose_node_mid_training(c, nodes, argv: list[str], folder: Path) -> subprocess.CompletedProcess:
    """Run `argv` with one worker node holding every CPU; once a training has checkpointed, kill that
    node (its raylet and workers, SIGKILL), as a lost machine would, and add a fresh one."""
    busy, spare = nodes
    c.remove_node(spare)  # every trial now starts on `busy`
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None and not any(folder.rglob("checkpoint.pt")):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before a training checkpointed"
        c.remove_node(busy, allow_graceful=False)
        nodes[:] = [c.add_node(num_cpus=1) for _ in range(2)]  # the restarted trial goes to one of these
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_a_node_lost_mid_training_restarts_its_trial_from_the_checkpoint(cluster, setup, tiny_lab, tmp_path):
    c, nodes = cluster
    lost = nodes[0].node_id
    run = tmp_path / "search"
    p = _lose_node_mid_training(c, nodes, _search_argv(setup, run, c.address, trials=2, steps=100, concurrency=1),
                                run / "trials")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "restarting it from its last checkpoint (retry 1 of 2)" in p.stderr
    trained = _results(run / "trials", "trial*.json")
    assert len(trained) == 2 and {r["status"] for r in trained} == {"ok"}  # --trials met, none counted twice
    (restarted,) = [r for r in trained if r["resumed_from"] > 0]  # it went on from its checkpoint, elsewhere
    assert restarted["node"] != lost and restarted["steps"] == 100
    assert finished(open_study(run)) == 2

    ladder, table = tiny_lab
    out = tmp_path / "ablate"
    lost = nodes[0].node_id
    argv = CLI + ["ablate", str(ladder), "--rows", "0", "--seeds", "1", "--table", str(table), "--measure", "none",
                  "--steps", "100", "--checkpoint-every", "5", "--address", c.address, "--out", str(out)] + TINY
    p = _lose_node_mid_training(c, nodes, argv, out / "train")
    assert p.returncode == 0, p.stderr[-3000:]
    (row,) = _results(out / "results", "*/seed*.json")
    assert row["status"] == "ok" and row["resumed_from"] > 0 and row["node"] != lost
    assert _free_cpus(c.address) == 2


# ---- one run per folder -------------------------------------------------------------------------

def test_a_folder_lock_refuses_a_second_holder_and_a_killed_holder_leaves_none(tmp_path):
    with folder_lock(tmp_path / "run"):
        with pytest.raises(ArchlabError, match=r"--out: .*run is in use by another archlab run \(pid \d+ on "):
            with folder_lock(tmp_path / "run"):
                pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from archlab.io import folder_lock\n"
                               f"with folder_lock({str(tmp_path / 'run')!r}):\n print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ArchlabError, match=f"pid {holder.pid} "):
        with folder_lock(tmp_path / "run"):
            pass
    holder.kill()  # kill -9: the kernel lets go of its lock
    holder.wait()
    with folder_lock(tmp_path / "run"):
        pass


@pytest.mark.parametrize("command", ["search", "ablate", "fidelity", "supernet", "train"])
def test_a_second_run_on_a_folder_in_use_is_one_line(command, tmp_path, capsys):
    from archlab.cli import main

    folder = tmp_path / "run"
    data = ["--dataset", "synthetic", "--image-size", "8", "--classes", "3", "--per-class", "4", "--val-per-class", "2"]
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_dict()))
    argv = {"search": ["search", "--resume", str(folder)],
            "ablate": ["ablate", str(ROOT / "search_spaces" / "snapgen_ablation.yaml"), "--measure", "none",
                       "--out", str(folder)] + data,
            "fidelity": ["fidelity", "--work", str(folder), "--results", str(tmp_path / "results"),
                         "--out", str(tmp_path / "report"), "--dataset", "synthetic"],
            "supernet": ["supernet", "train", str(SPACE), "--out", str(folder)] + data,
            "train": ["train", str(cfg), "--steps", "1", "--samples", "0", "--out", str(folder)] + data}[command]
    flag = {"search": "--resume", "fidelity": "--work"}.get(command, "--out")
    with folder_lock(folder):
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"archlab: error: {flag}: {folder} is in use by another archlab run (pid {os.getpid()} on ")
