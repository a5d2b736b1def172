"""Paired statistics over seeds for ``benchmarks/compare.py``.

Two criteria evaluated on the same seeds (same baseline, calibration batch and test set) are
compared seed by seed: ``d_s = a_s - b_s``. :func:`paired_comparison` returns the mean and
sample std of ``d``, wins / ties / losses (``|d| <= tie_tol`` is a tie; accuracies on one test
set are multiples of ``1/n_test``, so equal accuracies are exactly equal), and two two-sided
p-values:

* the paired t-test (``scipy.stats.ttest_rel``), used by the summary;
* the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped), shown for
  reference: with 5 seeds its smallest attainable two-sided p-value is ``2 / 2**5 = 0.0625``,
  so it can never reach 0.05 -- the reason the summary's test is the t-test.

A p-value is NaN where the test is undefined (fewer than 2 pairs, all differences equal for the
t-test, all differences zero for Wilcoxon).
"""
from __future__ import annotations

import math
import warnings

import numpy as np


def paired_comparison(a, b, tie_tol: float = 1e-9) -> dict:
    """Paired comparison of ``a`` vs ``b`` (sequences aligned by seed; pairs with a NaN / None
    on either side are dropped). Keys: ``n``, ``mean``, ``std`` (of ``a - b``), ``wins``,
    ``ties``, ``losses`` (for ``a``), ``p_t`` (paired t-test), ``p_wilcoxon``."""
    pa, pb = [], []
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        x, y = float(x), float(y)
        if math.isfinite(x) and math.isfinite(y):
            pa.append(x)
            pb.append(y)
    pa, pb = np.asarray(pa), np.asarray(pb)
    d = pa - pb
    n = int(d.size)
    out = {"n": n, "mean": float(d.mean()) if n else float("nan"),
           "std": float(d.std(ddof=1)) if n > 1 else (0.0 if n else float("nan")),
           "wins": int((d > tie_tol).sum()), "ties": int((np.abs(d) <= tie_tol).sum()),
           "losses": int((d < -tie_tol).sum()), "p_t": float("nan"),
           "p_wilcoxon": float("nan")}
    if n < 2:
        return out
    from scipy.stats import ttest_rel, wilcoxon
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if np.ptp(d) > 0:
            out["p_t"] = float(ttest_rel(pa, pb).pvalue)
        if np.any(np.abs(d) > 0):
            try:
                out["p_wilcoxon"] = float(wilcoxon(pa, pb).pvalue)
            except ValueError:
                pass
    return out


def format_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
