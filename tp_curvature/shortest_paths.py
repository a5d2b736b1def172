"""Forward shortest paths in a layered graph: min-plus (tropical) matrix products.

For length matrices :math:`A \\in \\bar{\\mathbb R}^{n \\times m}` (layer L to L+1) and
:math:`B \\in \\bar{\\mathbb R}^{m \\times p}` (L+1 to L+2), the 2-hop shortest-path lengths are

.. math::  (A \\otimes B)_{ij} = \\min_k \\; A_{ik} + B_{kj},

with :math:`+\\infty` for "no edge". Chaining gives any number of hops. The Numba kernel is
tiled (a tile of ``B`` stays in cache while the rows of ``A`` pass over it) and folds four
terms per pass over an output row; it skips four entries of ``A`` at a time when all are
infinite, so sparse layers (grouped / depthwise convolutions) cost about their edges. The
minimum is exact, so the result does not depend on the order of the terms.
"""
from __future__ import annotations

import numba
import numpy as np


#: tiles of the blocked product: a (TILE_K, TILE_J) tile of ``b`` (64 KB of float64) is read
#: from L1 / L2 by every row of ``a`` that passes over it, and each output row's tile (2 KB)
#: stays in L1 while its TILE_K terms are folded in
TILE_K, TILE_J = 32, 256


@numba.njit(cache=True, fastmath=False, inline="always")
def _fold4(o, b0, b1, b2, b3, a0, a1, a2, a3):
    """``o = min(o, a0 + b0, ..., a3 + b3)`` elementwise: four terms of one output row per
    pass (1-D arguments: LLVM vectorises this loop, not its 2-D-indexed form)."""
    for j in range(o.shape[0]):
        t0 = a0 + b0[j]
        t1 = a1 + b1[j]
        t2 = a2 + b2[j]
        t3 = a3 + b3[j]
        t0 = t0 if t0 < t1 else t1
        t2 = t2 if t2 < t3 else t3
        t0 = t0 if t0 < t2 else t2
        x = o[j]
        o[j] = t0 if t0 < x else x


@numba.njit(cache=True, fastmath=False, inline="always")
def _fold1(o, b0, a0):
    """``o = min(o, a0 + b0)`` elementwise (the remainder of :func:`_fold4`)."""
    for j in range(o.shape[0]):
        t0 = a0 + b0[j]
        x = o[j]
        o[j] = t0 if t0 < x else x


@numba.njit(cache=True, fastmath=False)
def _tile(a, b, out, i0, i1, j0, j1):
    """``out[i0:i1, j0:j1]`` of the product, over ``TILE_K`` rows of ``b`` at a time; four
    terms per pass, skipped when all four entries of ``a`` are infinite (no edge: sparse
    layers cost about their edges)."""
    m = a.shape[1]
    for i in range(i0, i1):
        for j in range(j0, j1):
            out[i, j] = np.inf
    for k0 in range(0, m, TILE_K):
        k1 = min(m, k0 + TILE_K)
        for i in range(i0, i1):
            o = out[i, j0:j1]
            k = k0
            while k + 4 <= k1:
                a0 = a[i, k]
                a1 = a[i, k + 1]
                a2 = a[i, k + 2]
                a3 = a[i, k + 3]
                if not (a0 == np.inf and a1 == np.inf and a2 == np.inf and a3 == np.inf):
                    _fold4(o, b[k, j0:j1], b[k + 1, j0:j1], b[k + 2, j0:j1],
                           b[k + 3, j0:j1], a0, a1, a2, a3)
                k += 4
            while k < k1:
                if a[i, k] != np.inf:
                    _fold1(o, b[k, j0:j1], a[i, k])
                k += 1


@numba.njit(parallel=True, cache=True, fastmath=False)
def _minplus(a, b, out, rows):
    """The product in tiles of ``rows`` rows and ``TILE_J`` columns, one task each."""
    n = a.shape[0]
    p = b.shape[1]
    nj = (p + TILE_J - 1) // TILE_J
    ni = (n + rows - 1) // rows
    for t in numba.prange(ni * nj):
        i0 = (t // nj) * rows
        j0 = (t % nj) * TILE_J
        _tile(a, b, out, i0, min(n, i0 + rows), j0, min(p, j0 + TILE_J))


@numba.njit(cache=True, fastmath=False)
def _minplus_serial(a, b, out):
    p = b.shape[1]
    for j0 in range(0, p, TILE_J):
        _tile(a, b, out, 0, a.shape[0], j0, min(p, j0 + TILE_J))


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
        if a.size * b.shape[1] >= MINPLUS_PARALLEL:
            # at least two tasks per thread: the rows split where the columns give fewer
            tasks = 2 * numba.get_num_threads()
            col_tiles = -(-b.shape[1] // TILE_J)              # (ceiling divisions)
            row_parts = -(-tasks // col_tiles)
            _minplus(a, b, out, -(-a.shape[0] // row_parts))
        else:
            _minplus_serial(a, b, out)
    else:
        out.fill(np.inf)
    return out
