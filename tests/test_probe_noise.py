"""experiments/probe_noise.py: the split of a (training views x test views) table of differences into its parts,
checked on tables built from known parts, and the per-set spread it reports."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import probe_noise  # noqa: E402


def test_components_recover_known_spreads():
    rng = np.random.default_rng(0)
    n, reps = 12, 400
    got = np.array([probe_noise.components(0.01 + rng.normal(0, 0.006, (n, 1)) + rng.normal(0, 0.007, (1, n))
                                           + rng.normal(0, 0.008, (n, n))) for _ in range(reps)])
    # each estimate is unbiased in variance: the mean of the squares recovers the square of each part
    assert np.sqrt((got ** 2).mean(0)) == pytest.approx([0.006, 0.007, 0.008], rel=0.1)
    assert probe_noise.components(np.full((4, 4), 0.02)) == (0.0, 0.0, 0.0)


def test_summary_of_a_cross_table():
    rows = []
    table = np.array([[0.01, 0.03], [0.02, 0.00]])  # second - first, train set x test set
    for enc, add in (("a", 0.0), ("b", 1.0)):
        for i in range(2):
            for j in range(2):
                rows.append({"encoder": enc, "variant": "v", "seed": 0, "train_set": i, "test_set": j,
                             "rmse": 0.7 + add * table[i, j]})
    s = probe_noise.summarize(rows, range(2))["variants"]["v"]
    assert s["per_set"] == pytest.approx([0.01, 0.0])          # each set's own training and test views
    assert s["sd_over_sets"] == pytest.approx(np.std([0.01, 0.0], ddof=1))
    assert s["mean_diff"] == pytest.approx(0.005) and s["baseline_rmse"] == pytest.approx(0.7)
