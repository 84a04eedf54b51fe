import json
import subprocess
import sys

import pytest

from archlab.cli import main
from conftest import LADDER, SPACE, tiny_dict

PAPER_ROWS = ["baseline", "no-highres-sa", "separable-conv", "expansion-2", "ffn-3", "mqa",
              "early-conditioning", "qknorm-rope"]


def test_cost_ladder_json_rows_in_paper_order(capsys):
    assert main(["cost", str(LADDER), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["rows"]] == PAPER_ROWS
    for r in out["rows"]:
        assert r["params"] > 0 and r["macs"] > 0 and r["flops"] == 2 * r["macs"] and r["paper"]["params_m"]


def test_cost_text_shows_paper_and_explains_disagreements(capsys):
    assert main(["cost", str(LADDER)]) == 0
    out = capsys.readouterr().out
    assert "paper params M" in out and "DIFF" in out and "unexplained" not in out
    assert "row 6 early-conditioning, MACs (paper: FLOPs):" in out


def test_cost_single_config_with_blocks(tmp_path, capsys):
    import yaml
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict()))
    assert main(["cost", str(path), "--json", "--blocks"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["name"] == "tiny" and sum(b["params"] for b in row["blocks"]) == row["params"]
    assert sum(b["macs"] for b in row["blocks"]) == row["macs"]


def test_show_json_gives_the_config_or_the_blocks(capsys):
    from archlab.config import ArchConfig
    from archlab.decompose import decompose
    from archlab.ladder import load_ladder

    assert main(["show", str(LADDER), "--row", "mqa", "--json"]) == 0
    cfg = ArchConfig.from_dict(json.loads(capsys.readouterr().out))
    assert cfg.digest() == load_ladder(str(LADDER)).row("mqa").config.digest()
    assert main(["show", str(LADDER), "--row", "mqa", "--blocks", "--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)
    assert [b["key"] for b in blocks] == [b.key for b in decompose(cfg)]


def test_show_round_trips_a_ladder_row(tmp_path, capsys):
    assert main(["show", str(LADDER), "--row", "mqa"]) == 0
    path = tmp_path / "mqa.yaml"
    path.write_text(capsys.readouterr().out)
    assert main(["cost", str(path), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)["rows"][0]
    assert main(["cost", str(LADDER), "--row", "5", "--json"]) == 0
    from_ladder = json.loads(capsys.readouterr().out)["rows"][0]
    assert from_file["name"] == from_ladder["name"] == "mqa"
    assert (from_file["params"], from_file["macs"]) == (from_ladder["params"], from_ladder["macs"])


def test_space_summary_and_samples(capsys):
    assert main(["space", str(SPACE), "--sample", "2", "--seed", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["size"] > 1e6 and len(out["samples"]) == 2


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "archlab.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("content, expect", [
    ("stages: [{channels: 64}, {channels: 64, transformer_depth: 1, kv_heads: 3}]", "stages[1].kv_heads: 3"),
    ("stages: [{channels: 64}, {channels: 64, ffn_ratio: -1}]", "stages[1].ffn_ratio: must be > 0, got -1"),
    ("stages: [{channels: 64}]", "conditioning.first_stage: must be a stage index in 0..0, got 1"),
    ("stages: [{channels: 64}]\nfoo: 1", "foo: unknown key"),
    ("stages: [{channels: 64, conv: [1]}]", "stages[0].conv"),
    ("stages: [{channels: 64\n", "invalid YAML"),
])
def test_bad_input_one_line_exit_2(tmp_path, content, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    r = _cli("cost", str(path))
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == ""


@pytest.mark.parametrize("args, expect", [
    (["cost", "missing.yaml"], "missing.yaml: no such file"),
    (["cost", str(LADDER), "--row", "nope"], "--row: 'nope'"),
    (["cost", str(LADDER), "--colour"], "unrecognized arguments: --colour"),
    (["frobnicate"], "invalid choice"),
    (["latency", "export", "--out", "x"], "give --space, --ladder, --networks-of, --blocks-of or a combination"),
    (["latency", "run", "nowhere", "--out", "t.csv", "--device-name", "d"], "cannot read the bundle manifest"),
])
def test_bad_flags_one_line_exit_2(args, expect):
    r = _cli(*args)
    assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content, expect", [
    (b"\xff\xfe\x00binary", "not a UTF-8 text file"),
    (b"stage: [{channels: 64}]", "stage: unknown key"),
    (b"- 1\n- 2\n", "must be a mapping"),
    (b"base: {stages: [{channels: 64}, {channels: 64}]}\nrows: [{name: a, set: {1: true}}]", "dotted string"),
    (b"base: {stages: [{channels: 64}, {channels: 64}]}\nrows: [{name: a, set: 0}]", "rows[0].set"),
])
def test_malformed_files_one_line_exit_2(tmp_path, content, expect):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    r = _cli("cost", str(path))
    assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_directory_is_not_a_file(tmp_path):
    r = _cli("cost", str(tmp_path))
    assert r.returncode == 2 and "not a file" in r.stderr


def test_every_preset_setting_is_a_flag_that_overrides_the_preset():
    """The training flags are made from TrainConfig's fields: none is missing, each overrides the preset."""
    from archlab import presets
    from archlab.cli import build_parser
    from archlab.cli.common import train_config
    from archlab.train_config import preset_settings

    parser = build_parser()
    for command in (["train", "x.yaml"], ["search"], ["ablate", "x.yaml"]):
        args = parser.parse_args(command + ["--proxy", "smoke", "--weight-decay", "0.5", "--init", "sequential"])
        assert set(preset_settings()) <= set(vars(args)), command
        t = train_config(args, threads=1)
        assert t.weight_decay == 0.5 and t.init == "sequential"
        assert t.steps == presets.get("smoke").train_config().steps  # not given: the preset's


def test_a_default_the_help_states_is_the_settings_default():
    """Flags left to a settings dataclass (no default of their own) state that dataclass's default."""
    import argparse
    import dataclasses
    import re

    from archlab.ablate import AblateSettings
    from archlab.cli import build_parser
    from archlab.fidelity import FidelitySettings
    from archlab.search import SearchSettings

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for command, cls in (("search", SearchSettings), ("ablate", AblateSettings), ("fidelity", FidelitySettings)):
        fields = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                  for f in dataclasses.fields(cls)}
        for action in sub.choices[command]._actions:
            said = re.search(r"\(default ([^;)]+)\)", action.help or "")
            if action.default is None and action.dest in fields and said:
                value = fields[action.dest]
                assert said.group(1) == (",".join(map(str, value)) if isinstance(value, list) else str(value)), \
                    (command, action.dest)
                checked += 1
    assert checked >= 5


def test_sigterm_stops_a_training_as_ctrl_c_does(tmp_path):
    """SIGTERM (`kill PID`, a scheduler's stop) to a training with a run folder: exit 143 and the command
    that continues it, as Ctrl-C gives (the search's Ctrl-C and SIGTERM: test_search)."""
    import signal
    import time

    import yaml

    cfg, out = tmp_path / "tiny.yaml", tmp_path / "run"
    cfg.write_text(yaml.safe_dump(tiny_dict()))
    argv = [sys.executable, "-m", "archlab.cli", "train", str(cfg), "--dataset", "synthetic", "--image-size", "8",
            "--classes", "3", "--per-class", "8", "--val-per-class", "4", "--steps", "20000", "--checkpoint-every", "5",
            "--batch", "4", "--width-mult", "1", "--samples", "0", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (out / "checkpoint.pt").exists():
            time.sleep(0.05)
        assert proc.poll() is None, "the training ended before the signal"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert f"archlab: interrupted; continue with: archlab train {cfg}" in err and str(out) in err
