r"""Stabilised log-domain Sinkhorn: the last resort of the engine.

On the potentials :math:`f, g` (plan :math:`T_{ij} = e^{(f_i + g_j - M_{ij})/\varepsilon}`):

.. math::

    f_i \leftarrow \varepsilon \bigl(\log a_i - \operatorname{LSE}_j\,
    (g_j - M_{ij})/\varepsilon\bigr), \qquad
    g_j \leftarrow \varepsilon \bigl(\log b_j - \operatorname{LSE}_i\,
    (f_i - M_{ij})/\varepsilon\bigr),

over-relaxed with ``omega`` like the kernel-domain updates, over the eps stages. Used for the
problems whose scalings overflow even in float64 (their reduced costs are far from the shared
potentials' ones) and for ``precision="log"``.
"""
from __future__ import annotations

import math

import numpy as np

from ._bundles import Augmented
from ._primitives import MAXITER, OK, jit, lse, rounded_cost


@jit
def log_domain(M, a, b, eps_st, tol_st, max_iter, omega):
    """Log-domain Sinkhorn on the augmented cost ``M`` (:class:`~._bundles.Augmented`).

    ``a`` / ``b`` are the row / column masses (last: x / y), ``eps_st`` / ``tol_st`` the eps
    schedule and its stop tolerances. Returns (cost of the rounded plan, final row potentials
    ``f`` (``-1e300`` on zero-mass rows; for the certificate), iterations, status).
    """
    kz, kw = M.block.shape
    n = kz + 1
    m = kw + 1
    D = np.empty((n, m))  # dense cost, for the row / column sweeps
    for i in range(kz):
        for j in range(kw):
            D[i, j] = M.block[i, j]
        D[i, kw] = M.col[i]
    for j in range(kw):
        D[kz, j] = M.row[j]
    D[kz, kw] = M.corner
    f = np.zeros(n)
    g = np.zeros(m)
    la = np.empty(n)
    lb = np.empty(m)
    for i in range(n):
        la[i] = math.log(a[i]) if a[i] > 0 else -np.inf
    for j in range(m):
        lb[j] = math.log(b[j]) if b[j] > 0 else -np.inf
    buf = np.empty(max(n, m))
    total = 0
    status = OK
    eps = eps_st[0]
    for s in range(eps_st.shape[0]):
        eps = eps_st[s]
        status = MAXITER
        for it in range(max_iter):
            total += 1
            for i in range(n):
                if a[i] == 0.0:
                    f[i] = -1e300
                    continue
                for j in range(m):
                    buf[j] = (g[j] - D[i, j]) / eps
                t = eps * (la[i] - lse(buf, m))
                f[i] = f[i] + omega * (t - f[i]) if f[i] > -1e299 else t
            err = 0.0
            for j in range(m):
                if b[j] == 0.0:
                    g[j] = -1e300
                    continue
                for i in range(n):
                    buf[i] = (f[i] - D[i, j]) / eps
                lc = lse(buf, n)
                err += abs(math.exp(lc + g[j] / eps) - b[j])
                t = eps * (lb[j] - lc)
                g[j] = g[j] + omega * (t - g[j]) if g[j] > -1e299 else t
            if err <= tol_st[s]:
                status = OK
                break
    # the plan as an augmented kernel with unit scalings, then the shared rounding
    Pb = np.empty((kz, kw))
    Pc = np.empty(kz)
    Pr = np.empty(kw)
    for i in range(kz):
        for j in range(kw):
            Pb[i, j] = math.exp((f[i] + g[j] - D[i, j]) / eps)
        Pc[i] = math.exp((f[i] + g[kw] - D[i, kw]) / eps)
    for j in range(kw):
        Pr[j] = math.exp((f[kz] + g[j] - D[kz, j]) / eps)
    P = Augmented(Pb, Pc, Pr, math.exp((f[kz] + g[kw] - D[kz, kw]) / eps))
    cost = rounded_cost(P, M, a, b, np.ones(n), np.ones(m), np.empty(n), np.empty(m),
                        np.empty(m))
    return cost, f, total, status
