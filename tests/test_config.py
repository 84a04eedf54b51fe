import pytest

from archlab.config import ArchConfig, with_width
from archlab.errors import ArchlabError
from conftest import tiny_dict


def test_stage_defaults_merge_and_round_trip(tiny):
    assert [s.res_blocks for s in tiny.stages] == [1, 1, 1]
    assert tiny.stages[1].transformer_depth == 1 and tiny.stages[0].conv == "standard"
    again = ArchConfig.from_dict(tiny.to_dict())
    assert again == tiny
    assert ArchConfig.from_dict(__import__("yaml").safe_load(tiny.to_yaml())) == tiny


def test_with_values_dotted_paths_and_wildcard(tiny):
    cfg = tiny.with_values({"stages.*.conv": "separable", "stages.1.kv_heads": "mqa", "attention.rope": True})
    assert [s.conv for s in cfg.stages] == ["separable"] * 3
    assert cfg.kv_heads(1) == 1 and cfg.kv_heads(2) == cfg.heads(2) == 4
    assert cfg.attention.rope and not tiny.attention.rope  # the original is untouched


def test_width_mult_scales_channels_and_head_dim_keeping_heads(tiny):
    half = with_width(tiny, 0.5)
    assert [half.channels(i) for i in range(3)] == [16, 32, 32]
    assert half.head_dim == 8 and [half.heads(i) for i in range(3)] == [tiny.heads(i) for i in range(3)]
    assert half.time_embed_dim == 4 * 16


@pytest.mark.parametrize("override, field, value", [
    ({"attention": dict(head_dim=24)}, "stages[1].channels", "64"),
    ({"stage_defaults": dict(res_blocks=1, kv_heads=3)}, "stages[1].kv_heads", "3"),
    ({"stage_defaults": dict(res_blocks=1, ffn_ratio=-2)}, "stages[1].ffn_ratio", "-2"),
    ({"stage_defaults": dict(res_blocks=1, expansion=0)}, "stages[0].expansion", "0"),
    ({"stage_defaults": dict(res_blocks=1, conv="dilated")}, "stages[0].conv", "dilated"),
    ({"stage_defaults": dict(res_blocks="two")}, "stages[0].res_blocks", "two"),
    ({"stage_defaults": dict(res_blocks=1, self_attention="yes")}, "stages[0].self_attention", "yes"),
    ({"stage_defaults": dict(res_blocks=1, colour=1)}, "stage_defaults", "colour"),
    ({"latent": dict(channels=4, resolution=18)}, "latent.resolution", "18"),
    ({"latent": dict(channels=4, resolution=16, depth=3)}, "latent.depth", "unknown key"),
    ({"conditioning": dict(first_stage=5)}, "conditioning.first_stage", "5"),
    ({"attention": dict(head_dim=16, rope=True), "width_mult": 0.125}, "attention.rope", "head_dim"),
    ({"width_mult": 0.3}, "width_mult", "0.3"),
    ({"speed": "fast"}, "speed", "unknown key"),
    ({"stages": []}, "stages", "non-empty"),
])
def test_bad_configs_name_field_and_value(override, field, value):
    with pytest.raises(ArchlabError) as err:
        ArchConfig.from_dict(tiny_dict(**override), where="x.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("x.yaml: ")
    assert field in msg and value in msg


def test_unknown_dotted_path_is_an_error(tiny):
    with pytest.raises(ArchlabError, match="stages.7.conv"):
        tiny.with_values({"stages.7.conv": "separable"})
    with pytest.raises(ArchlabError, match="atention"):
        tiny.with_values({"atention.rope": True})


@pytest.mark.parametrize("override, field", [
    ({"width_mult": 1e-12}, "width_mult"),
    ({"stage_defaults": dict(res_blocks=1, kv_heads=0)}, "stages[0].kv_heads"),
    ({"stage_defaults": []}, "stage_defaults"),
    ({"stage_defaults": 0}, "stage_defaults"),
])
def test_more_bad_configs(override, field):
    with pytest.raises(ArchlabError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ArchConfig.from_dict(tiny_dict(**override))


def test_ffn_ratio_only_checked_where_there_is_an_ffn():
    d = tiny_dict(stages=[dict(channels=32, ffn_ratio=1.001), dict(channels=64, transformer_depth=1),
                          dict(channels=64, transformer_depth=1)])
    assert ArchConfig.from_dict(d).stages[0].ffn_ratio == 1.001  # stage 0 has no transformer
    with pytest.raises(ArchlabError, match=r"stages\[0\].ffn_ratio"):
        ArchConfig.from_dict({**d, "conditioning": dict(context_dim=24, context_len=5, first_stage=0)})


def test_non_string_path_is_an_error(tiny):
    with pytest.raises(ArchlabError, match="dotted string"):
        tiny.with_values({1: True})


def test_with_values_fast_path_builds_what_the_general_path_builds():
    """Setting many fields at once by replacing them (what a search does thousands of times) gives the
    config that rebuilding it from a dict gives, for every point of a sample of the search space."""
    from archlab.config import set_path
    from archlab.space import load_space
    from conftest import ROOT

    space = load_space(ROOT / "search_spaces" / "snapgen_unet.yaml")
    for point, cfg in space.sample(200, seed=3):
        data = space.base.to_dict()
        for path, value in point.items():
            set_path(data, path, value)
        data["name"] = cfg.name
        assert cfg == ArchConfig.from_dict(data), point
    # ints where a number goes stay ints, True is not 1, and a bad value still names its field
    cfg = space.base.with_values({"stages.0.expansion": 2, "attention.rope": False})
    assert type(cfg.stages[0].expansion) is int and cfg.attention.rope is False
    with pytest.raises(ArchlabError, match=r"stages\[0\]\.conv: 'spiral' is not one of"):
        space.base.with_values({"stages.0.conv": "spiral"})
    with pytest.raises(ArchlabError, match="attention.rope: must be true or false, got 1"):
        space.base.with_values({"attention.rope": 1})
