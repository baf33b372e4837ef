"""
Intervals for paired differences: a bootstrap over the units that were paired (samples, test images), so that an
interval reflects the variation of the test set, and a difference is claimed only when its interval excludes zero.

    lo, hi = bootstrap_ci(boost_errors - control_errors)         # 95 % interval of the mean difference
"""

import numpy as np


def bootstrap_ci(diffs, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(diffs), resampling its entries with replacement."""
    d = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))
