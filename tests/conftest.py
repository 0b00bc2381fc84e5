"""Session-scoped pico models and the fixtures every test shares (helpers are
in tests/helpers.py)."""

from pathlib import Path

import pytest

from ner_merge.models.cache_folder import CACHE_DIR_VARIABLE
from tests.helpers import build_trio


@pytest.fixture(autouse=True)
def isolated_score_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets an empty score cache of its own, never the user's, outside
    its tmp_path (tests check what a run leaves there)."""
    cache = tmp_path_factory.mktemp("score-cache")
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(cache))
    return cache


@pytest.fixture(scope="session")
def trios(tmp_path_factory):
    """trios(family, tied=False): a pico trio of that family, built once a session."""
    built: dict[tuple[str, bool], dict[str, Path]] = {}

    def get(family: str, tied: bool = False) -> dict[str, Path]:
        if (family, tied) not in built:
            folder = tmp_path_factory.mktemp(family + ("-tied" if tied else ""))
            built[family, tied] = build_trio(folder, family, tied=tied)
        return built[family, tied]

    return get


@pytest.fixture(scope="session")
def qwen_trio(trios) -> dict[str, Path]:
    return trios("qwen2")


@pytest.fixture(scope="session")
def wide_trio(tmp_path_factory) -> dict[str, Path]:
    """A trio 1024 wide: BLAS threads its products (so a score could depend on
    the thread count), and a worker is caught scoring a matrix (a tenth of a
    second each)."""
    root = tmp_path_factory.mktemp("wide-trio")
    return build_trio(root, "qwen2", hidden_size=1024, intermediate_size=2048)
