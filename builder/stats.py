"""Order statistics of measured samples: the one percentile rule every report and model uses.

>>> percentile([10, 20, 30, 40], 0.5)
25.0
"""
from __future__ import annotations

import math
from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1), linear between order statistics (numpy's default rule);
    0.0 for no values."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
