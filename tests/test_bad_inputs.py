"""Bad input never gets a traceback: a table of inputs that once did (a campaign of bad inputs), each
of which must now give exit status 2, one line naming the field or file and the value, and change
no file."""

import json
from dataclasses import asdict

import pytest
import yaml

from archlab.cli import main
from conftest import LADDER, SPACE, tiny_dict

ROOT = LADDER.parents[1]


def _settings_json(**extra) -> str:
    from archlab.search import SearchSettings

    s = SearchSettings(space=str(SPACE), table=str(ROOT / "latency_tables" / "amd-epyc-2c.csv"), budget_ms=900)
    return json.dumps({**asdict(s), **extra})


def _setup(tmp_path, kind: str) -> list[str]:
    """Lay out what a case needs in tmp_path; return the argv."""
    if kind == "huge-config":
        path = tmp_path / "huge.yaml"
        path.write_text(yaml.safe_dump(tiny_dict(stages=[dict(channels=2_000_000), dict(channels=4_000_000)])))
        return ["cost", str(path)]
    if kind == "huge-image-size":
        return ["data", "--image-size", "65536"]
    if kind == "huge-classes":
        return ["data", "--classes", "1000000000"]
    if kind.startswith("out-is-a-file"):
        (tmp_path / "afile").write_text("keep me\n")
        return {"out-is-a-file-train": ["train", str(LADDER), "--out", str(tmp_path / "afile")],
                "out-is-a-file-search": ["search", "--budget-ms", "900", "--out", str(tmp_path / "afile")],
                "out-is-a-file-export": ["latency", "export", "--ladder", str(LADDER), "--out", str(tmp_path / "afile")],
                "out-is-a-file-report": ["report", str(tmp_path), "--out", str(tmp_path / "afile")]}[kind]
    if kind == "export-is-a-folder":
        (tmp_path / "adir").mkdir()
        return ["data", "--export", str(tmp_path / "adir")]
    if kind.startswith("resume-"):
        run = tmp_path / "run"
        run.mkdir()
        (run / "search.json").write_text({"resume-corrupt": "{not json", "resume-list": "[1, 2]",
                                          "resume-unknown-key": _settings_json(bogus=1),
                                          "resume-bad-value": _settings_json(trials="many")}[kind])
        return ["search", "--resume", str(run)]
    raise AssertionError(kind)


CASES = {  # kind: what the one line must say
    "huge-config": "to build and trace",
    "huge-image-size": "--image-size 65536",
    "huge-classes": "--classes 1000000000",
    "out-is-a-file-train": "is a file, not a folder",
    "out-is-a-file-search": "is a file, not a folder",
    "out-is-a-file-export": "is a file, not a folder",
    "out-is-a-file-report": "is a file, not a folder",
    "export-is-a-folder": "is a folder, not a file",
    "resume-corrupt": "search.json: not a readable search settings file",
    "resume-list": "search.json: not a usable search settings file (must be a mapping, got list",
    "resume-unknown-key": "bogus",
    "resume-bad-value": "search.json: not a usable search settings file (trials: must be an integer, got 'many')",
}


def _snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2_and_changes_nothing(kind, tmp_path, capsys):
    argv = _setup(tmp_path, kind)
    before = _snapshot(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (a flag's type check) exit from the parser
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and CASES[kind] in lines[0], err
    assert _snapshot(tmp_path) == before  # nothing written, nothing half-written


def test_an_image_over_pils_pixel_limit_is_skipped_and_counted(tmp_path, monkeypatch):
    """A decompression bomb in a dataset folder is an unreadable image: skipped and counted."""
    import numpy as np
    from PIL import Image

    from archlab.data import DataConfig, load_dataset

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(4):
            (tmp_path / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "train" / "a" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 300x300 is over twice the limit: PIL refuses it
    data = load_dataset(DataConfig(str(tmp_path), 8))
    assert data.skipped == 1 and len(data.train) + len(data.val) == 8
