"""Proxy presets: the lab's parse, flags override them, bad preset files are one-line errors."""

import subprocess
import sys

import pytest

from archlab import presets
from archlab.cli import build_parser
from archlab.cli.common import data_config, train_config
from archlab.errors import ArchlabError
from conftest import LADDER


def test_the_labs_presets_parse_and_the_reference_is_8x_the_cpu_preset():
    found = presets.presets()
    assert {"smoke", "cpu", "reference"} <= set(found)
    assert presets.get(None).name == presets.DEFAULT == "cpu"
    assert found["reference"].compute >= 8 * found["cpu"].compute
    assert found["smoke"].compute < found["cpu"].compute
    for p in found.values():
        p.train_config(seed=3).validate()
        assert p.train_config(seed=3).seed == 3 and p.description


def _args(argv):
    return build_parser().parse_args(["train", str(LADDER)] + argv)


def test_flags_override_the_preset_and_the_rest_comes_from_it():
    t = train_config(_args(["--proxy", "smoke", "--steps", "7", "--seed", "2"]), 1)
    smoke = presets.get("smoke").train_config()
    assert (t.steps, t.seed, t.batch, t.lr, t.width_mult) == (7, 2, smoke.batch, smoke.lr, smoke.width_mult)
    assert data_config(_args(["--proxy", "smoke"])).resolution == presets.get("smoke").image_size
    assert data_config(_args(["--proxy", "smoke", "--image-size", "32"])).resolution == 32
    assert train_config(_args([]), 1).steps == presets.get("cpu").train_config().steps  # the default preset


def test_a_preset_file_of_ones_own(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("tiny:\n  image_size: 8\n  steps: 3\n  batch: 4\n  lr: 0.002\nother:\n  image_size: 16\n")
    assert presets.get(f"{f}:tiny").train_config().steps == 3
    assert presets.get(f"{f}:tiny").train_config().lr == 0.002
    with pytest.raises(ArchlabError, match="holds 2 presets"):
        presets.get(str(f))
    with pytest.raises(ArchlabError, match="no preset|not a preset"):
        presets.get(f"{f}:missing")


@pytest.mark.parametrize("body, message", [
    ("p:\n  image_size: 16\n  stepz: 3\n", "p: stepz: not a preset setting"),
    ("p:\n  image_size: 16\n  steps: many\n", "p: steps: must be an integer, got 'many'"),
    ("p:\n  image_size: 16\n  steps: true\n", "p: steps: must be an integer"),
    ("p:\n  image_size: 16\n  batch: 0\n", "p: batch: must be >= 1, got 0"),
    ("p:\n  image_size: 12\n", "p: image_size: 12 must be a power of two"),
    ("p:\n  steps: 3\n", "p: image_size: required"),
    ("p:\n  image_size: 16\n  seed: 3\n", "p: seed: not a preset setting"),
    ("p:\n  image_size: 16\n  timesteps: cosine\n", "p: timesteps: 'cosine' is not one of"),
    ("p:\n  image_size: 16\n  lr_schedule: linear\n", "p: lr_schedule: 'linear' is not one of"),
    ("p: [1, 2]\n", "p: a preset must be a mapping"),
    ("- a\n- b\n", "a presets file must be a mapping"),
    ("p: {image_size: 16\n", "invalid YAML"),
])
def test_bad_presets_are_one_line_errors_naming_the_field(tmp_path, body, message):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(ArchlabError) as e:
        presets.get(f"{f}:p")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_a_bad_preset_with_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("p:\n  image_size: 16\n  lr: -1\n")
    for proxy, message in (("nope", "'nope' is not a preset"), (f"{f}:p", "p: lr: must be > 0, got -1")):
        r = subprocess.run([sys.executable, "-m", "archlab.cli", "train", str(LADDER), "--proxy", proxy],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
