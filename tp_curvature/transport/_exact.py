r"""Reference backends: POT solvers in a Python loop over the connections.

``"exact"`` solves every connection with POT's network simplex ``ot.emd2``;
``"pot-sinkhorn"`` with ``ot.sinkhorn2`` on ``M / d(x, y)`` with ``reg = eps`` (it returns the
cost of the unrounded entropic plan, so it is not one-sided like the Numba engine).
:func:`connection_problem` is the dense ``(a, b, M)`` of one connection.
"""
from __future__ import annotations

import importlib
import random
import sys
import warnings

import numpy as np


def pot():
    """The ``ot`` module (POT), imported on first use so that the process's global state is
    left as it was: POT draws from Python's ``random`` and adds warning filters when it is
    first imported; both are restored."""
    if "ot" not in sys.modules:
        state, filters = random.getstate(), list(warnings.filters)
        try:
            importlib.import_module("ot")
        finally:
            random.setstate(state)
            warnings.filters[:] = filters
            getattr(warnings, "_filters_mutated", lambda: None)()
    return sys.modules["ot"]


def connection_problem(problem, i: int, j: int):
    r"""Dense ``(a, b, M)`` of connection ``i -> j``.

    Rows: support of :math:`p_x` plus x, columns: support of :math:`r_y` plus y,

    .. math::

        a = [(1-\alpha)\, p_x,\; \alpha], \qquad b = [(1-\alpha)\, r_y,\; \alpha], \qquad
        M = \begin{pmatrix} C_{zw} & c_{zy}[:, y] \\ c_{xw}[x, :] & d(x, y) \end{pmatrix}.

    Zero-mass atoms are dropped; an all-zero measure row gives the delta (``a = [1]``); with
    ``alpha = 0`` x and y are dropped unless their side is a delta.
    """
    al = float(problem.alpha)
    pm = problem.pred_mass[i]
    keep = pm > 0
    zi = problem.pred_idx[i][keep]
    sm = problem.succ_mass[j]
    keepw = sm > 0
    wi = problem.succ_idx[j][keepw]
    if zi.size:
        a = np.concatenate([(1.0 - al) * pm[keep], [al]])
    else:
        a = np.ones(1)
    if wi.size:
        b = np.concatenate([(1.0 - al) * sm[keepw], [al]])
    else:
        b = np.ones(1)
    M = np.empty((zi.size + 1, wi.size + 1))
    M[:-1, :-1] = problem.c_zw[np.ix_(zi, wi)]
    M[:-1, -1] = problem.c_zy[zi, j]
    M[-1, :-1] = problem.c_xw[i, wi]
    M[-1, -1] = problem.d_xy[i, j]
    if al == 0.0:  # x and y carry no mass: drop them (a delta side keeps its single atom)
        if zi.size:
            a, M = a[:-1], M[:-1]
        if wi.size:
            b, M = b[:-1], M[:, :-1]
    return a, b, M


def pot_sinkhorn_w1(a, b, M, d, eps, tol, max_iter):
    r""":math:`d \cdot` ``ot.sinkhorn2(a, b, M / d, eps)``: POT's Sinkhorn with eps relative to d.

    Uses the log-domain ``sinkhorn_log`` when :math:`\max(M/d)/\varepsilon \ge 600`, where the
    plain kernel would underflow.
    """
    ot = pot()

    Ms = M / d
    method = "sinkhorn" if Ms.max() / eps < 600 else "sinkhorn_log"
    return d * float(ot.sinkhorn2(a, b, Ms, eps, method=method, numItermax=max_iter,
                                  stopThr=tol))


def exact_w1(problem, i: int, j: int) -> float:
    """Exact :math:`W_1` of connection ``i -> j`` (``ot.emd2``; forced plans in closed form)."""
    ot = pot()

    a, b, M = connection_problem(problem, i, j)
    if a.size == 1 or b.size == 1:  # the plan is forced
        return float((M * np.outer(a, b)).sum())
    # both measures sum to 1 by construction (POT's marginal check and dual centring cost
    # 40 of the ~190 us of a 33 x 33 call; thousands of calls on some layers)
    return float(ot.emd2(a, b, M, numItermax=10_000_000, check_marginals=False,
                         center_dual=False))


def loop_backend(problem, backend, eps, tol, max_iter, progress):
    """W1 of every connection with ``ot.emd2`` (``"exact"``) or :func:`pot_sinkhorn_w1`
    (``"pot-sinkhorn"``); forced plans (a delta side) in closed form. Returns (W, number of
    POT warnings)."""
    ot = pot()

    out = np.full(problem.d_xy.shape, np.nan)
    pairs = np.argwhere(problem.solve)
    it = pairs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(pairs, desc=f"W1 {backend} {problem.name}", leave=False)
    n_warn = 0
    for i, j in it:
        a, b, M = connection_problem(problem, i, j)
        if a.size == 1 or b.size == 1:  # the plan is forced
            out[i, j] = float((M * np.outer(a, b)).sum())
            continue
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if backend == "exact":
                out[i, j] = ot.emd2(a, b, M, numItermax=10_000_000)
            else:
                out[i, j] = pot_sinkhorn_w1(a, b, M, problem.d_xy[i, j], eps, tol, max_iter)
        n_warn += len(w)
    return out, n_warn
