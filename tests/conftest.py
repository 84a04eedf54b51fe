"""Shared fixtures: tiny configs that build and run in milliseconds on a CPU."""

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
