"""Forward shortest paths in a layered graph: min-plus (tropical) matrix products.

For length matrices :math:`A \\in \\bar{\\mathbb R}^{n \\times m}` (layer L to L+1) and
:math:`B \\in \\bar{\\mathbb R}^{m \\times p}` (L+1 to L+2), the 2-hop shortest-path lengths are

.. math::  (A \\otimes B)_{ij} = \\min_k \\; A_{ik} + B_{kj},

with :math:`+\\infty` for "no edge". Chaining gives any number of hops. The Numba kernel skips
infinite entries of ``A``, so sparse layers (grouped / depthwise convolutions) cost only their
edges.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, fastmath=False)
def _minplus_row(a, b, out, i):
    m = a.shape[1]
    p = b.shape[1]
    row = out[i]
    for j in range(p):
        row[j] = np.inf
    for k in range(m):
        aik = a[i, k]
        if aik == np.inf:
            continue
        bk = b[k]
        for j in range(p):
            v = aik + bk[j]
            if v < row[j]:
                row[j] = v


@numba.njit(parallel=True, cache=True, fastmath=False)
def _minplus(a, b, out):
    for i in numba.prange(a.shape[0]):
        _minplus_row(a, b, out, i)


@numba.njit(cache=True, fastmath=False)
def _minplus_serial(a, b, out):
    for i in range(a.shape[0]):
        _minplus_row(a, b, out, i)


#: products with fewer multiply-adds than this run on the calling thread: a small layer
#: pair's product takes microseconds, and starting the worker threads on a busy machine waits
#: for a core (ResNet-56's products took 1-12 ms each in parallel beside another job)
MINPLUS_PARALLEL = 1 << 20


def minplus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Min-plus product ``C[i, j] = min_k a[i, k] + b[k, j]`` (float64, ``inf`` = no path)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"min-plus shapes do not chain: {a.shape} x {b.shape}")
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.float64)
    if a.size and b.size:
        (_minplus if a.size * b.shape[1] >= MINPLUS_PARALLEL else _minplus_serial)(a, b, out)
    else:
        out.fill(np.inf)
    return out
