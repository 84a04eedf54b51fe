import pytest

from archlab.decompose import decompose
from archlab.errors import ArchlabError
from archlab.space import load_space
from conftest import SPACE


@pytest.fixture(scope="module")
def space():
    return load_space(SPACE)


def test_sampling_is_seeded(space):
    a = [p for p, _ in space.sample(5, seed=3)]
    b = [p for p, _ in space.sample(5, seed=3)]
    c = [p for p, _ in space.sample(5, seed=4)]
    assert a == b and a != c
    assert all(set(p) == {q.path for q in space.params} for p in a)


def test_sampled_configs_carry_the_point(space):
    point, cfg = space.sample(1, seed=11)[0]
    assert cfg.stages[1].kv_heads == point["stages.1.kv_heads"]
    assert cfg.stages[2].transformer_depth == point["stages.2.transformer_depth"]
    assert cfg.conditioning.first_stage == point["conditioning.first_stage"]


def test_block_signatures_cover_every_sampled_block(space):
    sigs = {s.signature for s in space.block_signatures()}
    for _, cfg in space.sample(150, seed=5):
        for block in decompose(cfg):
            assert block.signature in sigs, block.key


def test_int_range_param(space):
    p = {q.path: q for q in space.params}["stages.2.transformer_depth"]
    assert p.choices == (2, 4, 6) and p.int_range == (2, 6, 2)


@pytest.mark.parametrize("params, message", [
    ("{stages.9.conv: [standard]}", "stages.9.conv"),
    ("{stages.1.kv_heads: [3]}", "kv_heads"),
    ("{stages.1.conv: []}", "at least one choice"),
    ("{stages.1.transformer_depth: {low: 3, high: 1}}", "low <= high"),
    ("{stages.1.conv: separable}", "list of choices"),
])
def test_malformed_space_is_a_one_line_error(tmp_path, params, message):
    base = SPACE.read_text().split("params:")[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(base + f"params: {params}\n")
    with pytest.raises(ArchlabError) as err:
        load_space(bad)
    assert message in str(err.value) and "\n" not in str(err.value) and str(bad) in str(err.value)


def test_signatures_exact_when_channels_are_searched(tmp_path):
    """Stage-0 channels set the time-embedding width of every residual block."""
    import yaml
    from conftest import tiny_dict
    from archlab.space import load_space as load
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base": tiny_dict(), "params": {
        "stages.0.channels": [32, 64], "stages.1.channels": [64, 128], "stages.2.kv_heads": ["mhsa", "mqa"]}}))
    space = load(path)
    full = set()
    for a in (32, 64):
        for b in (64, 128):
            for kv in ("mhsa", "mqa"):
                cfg = space.config({"stages.0.channels": a, "stages.1.channels": b, "stages.2.kv_heads": kv})
                full |= {s.signature for s in decompose(cfg)}
    assert {s.signature for s in space.block_signatures()} == full


def test_sample_gives_distinct_networks_outside_avoid(tmp_path):
    import yaml

    from archlab.errors import ArchlabError
    from archlab.space import load_space
    from conftest import tiny_dict

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": tiny_dict(), "params": {"stages.1.ffn_ratio": [2, 3, 4],
                                                                    "attention.qk_norm": [False, True]}}))
    space = load_space(path)
    every = {cfg.digest() for _, cfg in space.sample(6, seed=0)}
    assert len(every) == 6  # all 6 configs, none twice
    keep = sorted(every)[:2]
    got = space.sample(2, seed=3, avoid=every - set(keep))
    assert sorted(cfg.digest() for _, cfg in got) == keep
    with pytest.raises(ArchlabError, match="found only 2 distinct networks outside the 4 to avoid, asked 3"):
        space.sample(3, seed=3, avoid=every - set(keep))


def test_point_from_a_table_snaps_values_to_their_choices(space):
    """Values read back from trials.csv / Parquet / a NaN-upcast pandas column are the space's choices again."""
    import numpy as np

    point, cfg = space.sample(1, seed=2)[0]
    table = {k: (float(v) if isinstance(v, int) and not isinstance(v, bool) else str(v)) for k, v in point.items()}
    table["stages.1.transformer_depth"] = np.float64(point["stages.1.transformer_depth"])
    back = space.point_from(table)
    assert back == point and all(type(back[k]) is type(point[k]) for k in point)
    assert space.config(back).digest() == cfg.digest()
    with pytest.raises(ArchlabError, match="stages.0.conv"):
        space.point_from({**point, "stages.0.conv": "dilated"})
    with pytest.raises(ArchlabError, match="stages.2.expansion"):
        space.point_from({**point, "stages.2.expansion": float("nan")})
