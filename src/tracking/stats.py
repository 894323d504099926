"""Statistics over seeds, shared by the aggregator and the fidelity table: n, mean, sample std, 95% t interval."""
from __future__ import annotations

import math
import statistics
from typing import Dict, Iterable


def _t975(df: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return 1.96


def describe(values: Iterable[float]) -> Dict[str, float]:
    """n, mean, sample std (0 for one value) and the half-width of the 95% t confidence interval (nan for one)."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci95": math.nan}
    mean = statistics.fmean(v)
    std = statistics.stdev(v) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "ci95": _t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan}
