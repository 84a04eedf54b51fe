"""Ctrl-C at random moments: does every command stop cleanly, say how to go on, and lose nothing?

Each case starts a small run (a search, an ablation or a supernet training on the synthetic data) in a
session of its own, as a terminal starts a foreground job, and sends SIGINT at a random moment of an
uninterrupted run's span: to the whole process group (what a terminal's Ctrl-C does: Ray's gcs_server
and raylet get it too) or to the driver alone, alternately. It records the exit status, the seconds to
exit, whether the message says how to resume, the processes left (found by a marker in their
environment, so Ray's workers, which start sessions of their own, are counted too), and whether the
resume command then completes the run with every trial finished before the signal kept, unchanged.

    python benchmarks/interrupts.py --cases 20 --out reports

Writes `interrupts.md` and `interrupts.json` to --out. Each case's run folder and cache are fresh.
Timings are upper bounds when another job shares the machine (the report says what ran beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "archlab.cli"]
SMALL = ["--dataset", "synthetic", "--proxy", "smoke", "--cpus-per-trial", "1"]
COMMANDS = {  # name: (argv with {out}, resume argv)
    "search": (["search", "--budget-ms", "900", "--trials", "2", *SMALL, "--steps", "60", "--out", "{out}"],
               ["search", "--resume", "{out}"]),
    "ablate": (["ablate", "search_spaces/snapgen_ablation.yaml", "--rows", "0,1", "--seeds", "1", "--measure", "none",
                *SMALL, "--steps", "60", "--out", "{out}"], None),  # resumed by the same command
    "supernet": (["supernet", "train", "search_spaces/snapgen_unet.yaml", *SMALL, "--steps", "20",
                  "--checkpoint-every", "5", "--out", "{out}"], None),
}
GOAL_SECONDS = 30


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ARCHLAB_INTERRUPT_CASE=marker."""
    want, out = f"ARCHLAB_INTERRUPT_CASE={marker}".encode(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if want in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                out.append(int(pid))
        except OSError:
            continue
    return out


def finished_trials(command: str, out: Path) -> dict:
    """What the run had finished: {trial or job: its score}."""
    if command == "search":
        from optuna.trial import TrialState

        from archlab.search import open_study

        if not (out / "search.json").is_file():
            return {}
        try:
            study = open_study(out)
        except KeyError:  # stopped before its study existed
            return {}
        return {t.number: t.values for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    done = {}
    results = out.glob("results/*/seed*.json") if command == "ablate" else out.glob("result.json")
    for result in sorted(results):
        r = json.loads(result.read_text())
        if r.get("status") == "ok":
            done[str(result.relative_to(out))] = r.get("val_loss", r.get("val_loss_largest"))
    return done


def complete(command: str, out: Path) -> bool:
    if command == "search":
        return (out / "summary.json").is_file() and len(finished_trials(command, out)) >= 1
    return len(finished_trials(command, out)) == (2 if command == "ablate" else 1)


def start(argv: list[str], marker: str, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "ARCHLAB_INTERRUPT_CASE": marker, "ARCHLAB_CACHE": str(cache)}
    # a terminal's foreground job: its own process group, Ctrl-C's default action (a shell gives a background
    # job SIGINT ignored, and every child inherits that)
    return subprocess.Popen(CLI + argv, cwd=ROOT, env=env, start_new_session=True, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def span(command: str, work: Path) -> float:
    """Seconds an uninterrupted run takes (fresh folder and cache)."""
    argv = [a.replace("{out}", str(work / f"{command}-span")) for a in COMMANDS[command][0]]
    t0 = time.time()
    p = start(argv, f"{command}-span", work / f"{command}-span-cache")
    out, _ = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"{command}: the uninterrupted run failed ({p.returncode}):\n{out[-2000:]}")
    return time.time() - t0


def case(command: str, k: int, delay: float, group: bool, work: Path) -> dict:
    out, cache, marker = work / f"{command}-{k}", work / f"{command}-{k}-cache", f"{command}-{k}"
    argv, resume = COMMANDS[command]
    argv = [a.replace("{out}", str(out)) for a in argv]
    p = start(argv, marker, cache)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()  # read as it runs: the last line before the signal names the moment
    deadline = time.time() + delay
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    moment = next((ln.strip() for ln in reversed(lines) if ln.strip()), "(nothing printed yet)")[-120:]
    if p.poll() is not None:
        reader.join()
        return {"command": command, "case": k, "delay_s": round(delay, 1), "moment": moment, "skipped": "finished first"}
    before = finished_trials(command, out)
    t0 = time.time()
    (os.killpg if group else os.kill)(p.pid, signal.SIGINT)
    try:
        p.wait(timeout=120)
        rc, seconds = p.returncode, time.time() - t0
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc, seconds = "no exit in 120 s", None
    reader.join()
    text = "".join(lines)
    time.sleep(2)  # Ray's processes get this long to go after the driver
    left = processes_with(marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    resume_argv = [a.replace("{out}", str(out)) for a in (resume or argv)]
    r = start(resume_argv, marker + "-resume", cache)
    r_out, _ = r.communicate(timeout=900)
    after = finished_trials(command, out)
    kept = all(after.get(key) == value for key, value in before.items())
    return {"command": command, "case": k, "delay_s": round(delay, 1), "moment": moment,
            "sent_to": "process group" if group else "driver", "exit": rc,
            "seconds_to_exit": round(seconds, 1) if seconds is not None else None,
            "resume_hint": "continue with" in text or "resumes from" in text, "processes_left": len(left),
            "finished_before": len(before), "finished_after": len(after), "resume_exit": r.returncode, "resumed_complete": complete(command, out),
            "finished_kept": kept, "resume_tail": r_out.strip().splitlines()[-1][-160:] if r_out.strip() else ""}


def ok(c: dict) -> bool:
    return (c.get("exit") == 130 and c["seconds_to_exit"] is not None and c["seconds_to_exit"] <= GOAL_SECONDS
            and c["resume_hint"] and c["processes_left"] == 0 and c["resume_exit"] == 0 and c["resumed_complete"]
            and c["finished_kept"])


def markdown(report: dict) -> str:
    cases = [c for c in report["cases"] if "skipped" not in c]
    lines = ["# Ctrl-C at random moments", "", f"Command: `{report['command']}`", "",
             f"Host: {report['host']}; {report['beside']}.", "",
             f"**{sum(map(ok, cases))}/{len(cases)}** cases met the goal: exit 130 within {GOAL_SECONDS} s with the "
             "resume hint, no process left, and the resume command completed the run with every trial finished "
             "before the signal kept unchanged.", "",
             "Spans of an uninterrupted run (the moments are drawn uniformly over them): "
             + ", ".join(f"{k} {v:.0f} s" for k, v in report["spans_s"].items()) + ".", "",
             "| command | case | sent to | at (s) | last line before the signal | exit | s to exit | hint | left | "
             "finished before | resume exit | complete | kept | goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c['command']} | {c['case']} | {c['sent_to']} | {c['delay_s']} | {c['moment'].replace('|', '/')} "
                     f"| {c['exit']} | {c['seconds_to_exit']} | {c['resume_hint']} | {c['processes_left']} | "
                     f"{c['finished_before']} | {c['resume_exit']} | {c['resumed_complete']} | {c['finished_kept']} | "
                     f"{'yes' if ok(c) else '**no**'} |")
    skipped = [c for c in report["cases"] if "skipped" in c]
    if skipped:
        lines += ["", f"{len(skipped)} drawn moments fell after the run had already finished (not counted): "
                  + ", ".join(f"{c['command']} at {c['delay_s']} s" for c in skipped) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20, help="interrupts in all, spread over the commands")
    ap.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated: " + ", ".join(COMMANDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beside", default="nothing else ran on the machine", help="what shared the machine, for the report")
    ap.add_argument("--out", default="reports")
    args = ap.parse_args()
    # a job started in the background (`nohup ... &`) ignores SIGINT, and its children would inherit that:
    # the commands under test get the default disposition, as in a terminal's foreground job
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from archlab.io import write_atomic
    from archlab.latency.table import cpu_model

    rng = random.Random(args.seed)
    commands = args.commands.split(",")
    work = Path(tempfile.mkdtemp(prefix="archlab-interrupts-"))
    try:
        spans = {c: span(c, work) for c in commands}
        print("spans:", {c: round(s) for c, s in spans.items()}, flush=True)
        cases = []
        for k in range(args.cases):
            command = commands[k % len(commands)]
            c = case(command, k, rng.uniform(0.5, spans[command]), group=k % 2 == 0, work=work)
            print(json.dumps(c), flush=True)
            cases.append(c)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"command": shlex.join(["python", "benchmarks/interrupts.py", *sys.argv[1:]]), "host": f"{cpu_model()}, "
              f"{os.cpu_count()} CPUs", "beside": args.beside, "spans_s": spans, "cases": cases,
              "met_goal": sum(map(ok, [c for c in cases if "skipped" not in c])),
              "counted": sum("skipped" not in c for c in cases)}
    out = Path(args.out)
    for name, text in (("interrupts.json", json.dumps(report, indent=1, default=str)), ("interrupts.md", markdown(report))):
        write_atomic(out / name, text)
    print(f"{report['met_goal']}/{report['counted']} met the goal; {out / 'interrupts.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
