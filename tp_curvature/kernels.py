r"""Transport kernels: :math:`W_1(m_x, m_y)` for every connection of a layer pair.

What is solved
--------------
For each connection :math:`x \to y` of a :class:`~tp_curvature.problem.LayerPairProblem` the
kernels return the Wasserstein-1 distance

.. math::

    W_1(m_x, m_y) = \min_{T \ge 0} \langle T, M \rangle_F
    \quad \text{s.t.} \quad T \mathbf{1} = a, \; T^\top \mathbf{1} = b,

with rows = support of :math:`p_x` plus x, columns = support of :math:`r_y` plus y,

.. math::

    a = [(1-\alpha)\, p_x,\; \alpha], \qquad b = [(1-\alpha)\, r_y,\; \alpha], \qquad
    M = \begin{pmatrix} C_{zw} & c_{zy}[:, y] \\ c_{xw}[x, :] & d(x, y) \end{pmatrix}

(zero-mass atoms dropped; an all-zero :math:`p_x` makes :math:`m_x = \delta_x`, the same for y).
Every connection of a pair shares the block :math:`C_{zw}`; only row x and column y differ.

Backends
--------
``"exact"``
    POT's network simplex ``ot.emd2`` in a Python loop (the reference).
``"pot-sinkhorn"``
    ``ot.sinkhorn2`` in the same loop, on ``M / d(x, y)`` with ``reg = eps`` (a peer for the
    benchmark; it returns the cost of the unrounded entropic plan).
``"sinkhorn"`` (default)
    Numba kernels that solve all connections of the pair in one call (below).

The Numba Sinkhorn engine
-------------------------
Each problem is made relative: the entropic problem

.. math::

    \min_{T \in U(a, b)} \langle T, M \rangle - \varepsilon\, d(x, y)\, H(T)

is solved, i.e. plain Sinkhorn on ``M / d(x, y)`` with regularisation ``eps``; the entropic
error is then a fraction of ``d(x, y)`` and so directly an error on :math:`\kappa`. The returned
value is the transport cost :math:`\langle \hat T, M \rangle` of the final plan after rounding
it onto :math:`U(a, b)` (Altschuler, Weed & Rigollet 2017, Alg. 2). Because :math:`\hat T` is
feasible, **the bias is one-sided**:

.. math::

    W_1 \;\le\; \langle \hat T, M \rangle \;\le\; W_1 + \varepsilon\, d(x,y) \log(n m)
    + 2\, \delta \max M,

with :math:`n \times m` the problem size and :math:`\delta` the L1 marginal error at the stop
(``tol``); so :math:`\kappa_\varepsilon \le \kappa`, by at most
:math:`(\varepsilon \log(nm) + 2\delta \max M / d) / (1-\alpha)` (plus ``mass_tol`` terms, below).
The bound is loose: on random dense layers of 64-256 channels (paper measures, alpha 0.5)
``eps=0.02, tol=1e-2`` gives max :math:`|\Delta\kappa|` 0.011-0.015, Spearman > 0.9999 (see
``benchmarks/kernels.py``). Note the :math:`1/(1-\alpha)`: at ``alpha=0.9`` the same W1 error
is a 10x larger kappa error, so scale ``eps`` (and ``tol``) with :math:`1-\alpha`.

How it is made fast (all of it exploits that the connections share :math:`C_{zw}`):

* **Shared potentials (warm start).** The shared problem :math:`W(\bar p, \bar r; C_{zw})` (mean
  measures) is solved once exactly (``ot.emd``); its dual potentials :math:`f^*, g^*` give
  reduced costs :math:`R = C_{zw} - f^* \oplus g^* \ge 0`, and x / y get the c-transform
  potentials, so every kernel entry is :math:`e^{-R/\varepsilon} \le 1` and every problem
  starts from scalings 1, i.e. from the shared problem's potentials.
* **eps levels.** Connections are bucketed by :math:`d(x,y)` into geometric levels (``levels``
  per octave); a level uses :math:`\varepsilon_\ell \le \varepsilon\, d(x,y)` (at most
  ``2**(1/levels)`` smaller), so the kernel :math:`e^{-R/\varepsilon_\ell}` of the shared block is
  computed once per level (float32, entries below 1e-35 set to 0), not per connection.
* **Kernel domain, eps-scaling, over-relaxation.** Sinkhorn runs on scaling vectors
  :math:`u, v` (no logarithms in the loop), first at ``eps_scaling * eps`` (tolerance 0.1), then
  at ``eps``; updates are over-relaxed, :math:`u \leftarrow \max(u + \omega (a / Kv - u),\;
  a / (2 Kv))` with ``omega`` (same fixed point; ~2-3x fewer iterations at 1.5).
* **Batches over one shared block.** When all rows share their support (the paper's and the
  flow measures on dense layers; padded to multiples of 16), a thread takes up to ``batch``
  connections of one level and each iteration's products with the shared block become two
  matrix products over the problems still running (``np.dot`` in Numba -> BLAS sgemm, ~5x
  the flop rate of matrix-vector loops). Each problem keeps its own row x / column y, masses,
  scalings and **its own early stop** (L1 error of the violated marginal ``<= tol``): converged
  problems are swapped out of the active set. The batches are spread over
  ``numba.get_num_threads()`` worker threads running ``nogil`` Numba code (a ``prange`` version
  compiled ~10 s longer for the same speed and nested OpenBLAS in OpenMP); the per-thread
  workspace is O(batch * (k_z + k_w)). Rows with different supports (e.g. after top-k
  truncation) are solved one problem per thread on the gathered block (O(k_z k_w) workspace).
  No (connections x n x m) tensor is ever built.
* **Fallbacks.** Problems whose float32 scalings leave the safe range (``max u * max v >
  1e25``, i.e. their potentials moved far from the shared ones; checked after each stage) are
  redone as a float64 batch on the level's float64 kernel (built from the reduced costs), and
  alone in the (stabilised) log domain if that overflows (ragged supports: float64 alone, then
  log domain). On the layered test problems at the defaults none falls back; at ``eps=0.005``
  most do (use ``precision="float64"`` there), on random non-metric costs many do. ``max_iter``
  caps the
  iterations per stage; counts of non-converged / float64 / log-domain problems are in
  :data:`last_stats` (a non-converged value is still a feasible-plan cost, >= W1).
* **Negligible atoms.** Atoms whose largest mass over all rows is tiny (cumulative <=
  ``mass_tol``, default 1e-4) are dropped and the rest renormalised, which changes :math:`W_1`
  by at most ``2 (1-alpha) mass_tol max M`` (the paper's :math:`e^{-1/a^2}` weights leave many
  such atoms).

Cost: one Sinkhorn iteration is about :math:`4 (k_z+1)(k_w+1)` flops, so the kernel scales with
:math:`(k_z+1)(k_w+1)` per connection: truncating the measures to their ``k`` heaviest atoms (the
graph code does this before building the problem) is the lever for wide layers. Measured on this
2-core machine (CPU time of one core, full layer pairs, paper measures, defaults): ~4 us per
connection at 64 channels, ~8 us at 128, ~22 us at 256, i.e. about 70x, 170x and 250x the
``ot.emd2`` loop per core; a layer with few solved connections pays the per-level kernels
(a few exps per block entry).

Degenerate cases are solved in closed form: both measures deltas gives :math:`W_1 = d(x,y)`;
a delta on one side fixes the plan (:math:`W_1 = \sum_w b_w c_{xw} + b_y d` and symmetrically).
``alpha = 0`` is allowed (x and y then carry no mass unless their measure is a delta).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings

import numpy as np
from numba import njit

from .problem import LayerPairProblem

__all__ = ["solve_w1", "connection_problem", "last_stats", "BACKENDS", "DEFAULTS"]

BACKENDS = ("sinkhorn", "exact", "pot-sinkhorn")

#: Defaults of the ``"sinkhorn"`` backend (relative eps, L1 marginal tolerance, ...).
DEFAULTS = dict(eps=0.02, tol=1e-2, max_iter=2000, omega=1.5, eps_scaling=3.0, levels=4,
                mass_tol=1e-4, batch=32)

#: Statistics of the last :func:`solve_w1` call (backend, n_solved, iterations, non-converged
#: count, log-domain fallbacks, seconds, ...). Overwritten by every call.
last_stats: dict = {}

# status codes of the Numba solver
_OK, _MAXITER, _OVERFLOW = 0, 1, 2
_F64, _LOG = 3, 6  # offsets: solved by the float64 fallback (3, 4) / the log domain (6, 7)
_COARSE_TOL = 0.1  # L1 marginal tolerance of the eps-scaling (coarse) stage
_PAD, _PAD_COST = 16, 1e30  # uniform blocks padded to multiples of _PAD with cost _PAD_COST
_KERNEL_BYTES = 64 << 20  # memory for the per-level kernels of one parallel call


# ---------------------------------------------------------------------------------------------
# one connection as a dense problem (reference backends, tests)
# ---------------------------------------------------------------------------------------------
def connection_problem(problem: LayerPairProblem, i: int, j: int):
    """Dense ``(a, b, M)`` of connection ``i -> j`` (rows: pred support + x; cols: succ + y).

    Zero-mass atoms are dropped; an all-zero measure row gives the delta (``a = [1]``).
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
    """``d * ot.sinkhorn2(a, b, M / d, eps)``: POT's Sinkhorn with eps relative to d (log-domain
    ``sinkhorn_log`` when ``max(M/d)/eps >= 600``, where the plain kernel would underflow)."""
    import ot

    Ms = M / d
    method = "sinkhorn" if Ms.max() / eps < 600 else "sinkhorn_log"
    return d * float(ot.sinkhorn2(a, b, Ms, eps, method=method, numItermax=max_iter,
                                  stopThr=tol))


def _loop_backend(problem, backend, eps, tol, max_iter, progress):
    import ot

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
        if backend == "exact":
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                out[i, j] = ot.emd2(a, b, M, numItermax=10_000_000)
            n_warn += len(w)
        else:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                out[i, j] = pot_sinkhorn_w1(a, b, M, problem.d_xy[i, j], eps, tol, max_iter)
            n_warn += len(w)
    return out, n_warn


# ---------------------------------------------------------------------------------------------
# Numba engine
# ---------------------------------------------------------------------------------------------
_FM = {"nsz", "arcp", "contract", "reassoc", "afn"}  # no nnan/ninf: overflow must be seen
_F32_FLOOR = 1e-35  # float32 kernel entries below this are set to 0 (no denormal inputs)
_F32_UVMAX = 1e25  # float32 result accepted only if max(u) * max(v) <= this (floored mass)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _sinkhorn_kernel(B, BT, a, b, kxw, kzy, kxy, u, v, ktu, kv, tol, max_iter, omega, half,
                     big):
    """Kernel-domain Sinkhorn on the augmented kernel [[B, kzy], [kxw, kxy]] (any float dtype).

    ``B`` is (kz, kw) and ``BT`` its transpose (both contiguous: both products are axpy loops);
    ``a`` has kz+1 entries (last: x), ``b`` kw+1 (last: y); ``u``/``v`` are the scalings (in and
    out, dtype of B). Over-relaxed updates ``u <- max(u + omega (a/Kv - u), half a/Kv)``; stop
    when the L1 error of the column marginal (the violated one) is ``<= tol``.
    Returns (iterations, status).
    """
    kz, kw = B.shape
    for it in range(1, max_iter + 1):
        # ---- K v (rows z, then x)
        vy = v[kw]
        for i in range(kz):
            kv[i] = kzy[i] * vy
        for j in range(kw):
            vj = v[j]
            for i in range(kz):
                kv[i] += BT[j, i] * vj
        sx = kxy * vy
        for j in range(kw):
            sx += kxw[j] * v[j]
        kv[kz] = sx
        for i in range(kz + 1):
            s = kv[i]
            if s > 0.0 and s < big:
                t = a[i] / s
                r = u[i] + omega * (t - u[i])
                h = half * t
                u[i] = r if r > h else h
            elif a[i] == 0.0:
                u[i] = 0.0 * u[i]
            else:
                return it, _OVERFLOW
        # ---- K^T u
        ux = u[kz]
        for j in range(kw):
            ktu[j] = kxw[j] * ux
        sy = kxy * ux
        for i in range(kz):
            ui = u[i]
            sy += kzy[i] * ui
            for j in range(kw):
                ktu[j] += B[i, j] * ui
        ktu[kw] = sy
        # ---- error of the column marginal (new u, old v), then v update
        err = 0.0
        for j in range(kw + 1):
            t = ktu[j]
            err += abs(float(v[j]) * float(t) - float(b[j]))
            if t > 0.0 and t < big:
                t = b[j] / t
                r = v[j] + omega * (t - v[j])
                h = half * t
                v[j] = r if r > h else h
            elif b[j] == 0.0:
                v[j] = 0.0 * v[j]
            else:
                return it, _OVERFLOW
        if not (err < 1e300):
            return it, _OVERFLOW
        if err <= tol:
            return it, _OK
    return max_iter, _MAXITER


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _rounded_cost(B, a, b, kxw, kzy, kxy, u, v, Cb, czy, cxw, dxy, rx, cy, ec):
    """Cost <T, M> of the plan diag(u) K diag(v) after Altschuler rounding onto U(a, b).

    ``Cb`` is the (kz, kw) cost block, ``czy``/``cxw`` the y column / x row of costs. The arrays
    share one float dtype (float32 in the fast path: the inner sums are then float32, relative
    error ~1e-6, and the totals float64). Three passes over the block.
    """
    kz, kw = B.shape
    one = a.dtype.type(1.0)
    zero = a.dtype.type(0.0)
    # row scaling x_i = min(1, a_i / r_i), stored as rx = x * u
    for i in range(kz):
        s = kzy[i] * v[kw]
        for j in range(kw):
            s += B[i, j] * v[j]
        r = u[i] * s
        rx[i] = min(one, a[i] / r) * u[i] if r > zero else zero
    s = kxy * v[kw]
    for j in range(kw):
        s += kxw[j] * v[j]
    r = u[kz] * s
    rx[kz] = min(one, a[kz] / r) * u[kz] if r > zero else zero
    # column sums with scaled rows, column scaling y_j, stored as cy = y * v
    rxx = rx[kz]
    for j in range(kw):
        cy[j] = kxw[j] * rxx
    sy = kxy * rxx
    for i in range(kz):
        ri = rx[i]
        sy += kzy[i] * ri
        for j in range(kw):
            cy[j] += B[i, j] * ri
    cy[kw] = sy
    for j in range(kw + 1):
        c = v[j] * cy[j]
        f = min(one, b[j] / c) if c > zero else zero
        ec[j] = b[j] - c * f
        cy[j] = v[j] * f
    # row errors, cost of the scaled plan and of the rank-one correction err_r err_c^T / |err_r|
    cost = 0.0
    corr = 0.0
    nr = 0.0
    for i in range(kz):
        s1 = kzy[i] * cy[kw]
        s2 = s1 * czy[i]
        s3 = czy[i] * ec[kw]
        for j in range(kw):
            kvv = B[i, j] * cy[j]
            cij = Cb[i, j]
            s1 += kvv
            s2 += kvv * cij
            s3 += cij * ec[j]
        e = float(a[i]) - float(rx[i]) * float(s1)
        if e < 0.0:
            e = 0.0
        cost += float(rx[i]) * float(s2)
        corr += e * float(s3)
        nr += e
    s1 = kxy * cy[kw]
    s2 = s1 * dxy
    s3 = dxy * ec[kw]
    for j in range(kw):
        kvv = kxw[j] * cy[j]
        s1 += kvv
        s2 += kvv * cxw[j]
        s3 += cxw[j] * ec[j]
    e = float(a[kz]) - float(rx[kz]) * float(s1)
    if e < 0.0:
        e = 0.0
    cost += float(rx[kz]) * float(s2)
    corr += e * float(s3)
    nr += e
    if nr > 0.0:
        cost += corr / nr
    return cost


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _lse(vals, n):
    m = -np.inf
    for j in range(n):
        if vals[j] > m:
            m = vals[j]
    if m == -np.inf:
        return m
    s = 0.0
    for j in range(n):
        s += math.exp(vals[j] - m)
    return m + math.log(s)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _log_domain(M, a, b, eps_st, tol_st, max_iter, omega):
    """Stabilised log-domain Sinkhorn on a dense cost ``M`` (eps schedule ``eps_st``).

    The last resort for problems whose scalings overflow in the kernel domain. Returns
    (cost of the rounded plan, iterations, status).
    """
    n, m = M.shape
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
    status = _OK
    eps = eps_st[0]
    for s in range(eps_st.shape[0]):
        eps = eps_st[s]
        status = _MAXITER
        for it in range(max_iter):
            total += 1
            for i in range(n):
                if a[i] == 0.0:
                    f[i] = -1e300
                    continue
                for j in range(m):
                    buf[j] = (g[j] - M[i, j]) / eps
                t = eps * (la[i] - _lse(buf, m))
                f[i] = f[i] + omega * (t - f[i]) if f[i] > -1e299 else t
            err = 0.0
            for j in range(m):
                if b[j] == 0.0:
                    g[j] = -1e300
                    continue
                for i in range(n):
                    buf[i] = (f[i] - M[i, j]) / eps
                lc = _lse(buf, n)
                err += abs(math.exp(lc + g[j] / eps) - b[j])
                t = eps * (lb[j] - lc)
                g[j] = g[j] + omega * (t - g[j]) if g[j] > -1e299 else t
            if err <= tol_st[s]:
                status = _OK
                break
    # plan, Altschuler rounding (explicit loops: cheaper to compile than axis sums)
    P = np.empty((n, m))
    er = np.zeros(n)
    ec = np.zeros(m)
    for i in range(n):
        r = 0.0
        for j in range(m):
            P[i, j] = math.exp((f[i] + g[j] - M[i, j]) / eps)
            r += P[i, j]
        x = min(1.0, a[i] / r) if r > 0 else 0.0
        for j in range(m):
            P[i, j] *= x
            ec[j] += P[i, j]
    for j in range(m):
        y = min(1.0, b[j] / ec[j]) if ec[j] > 0 else 0.0
        ec[j] = 0.0
        for i in range(n):
            P[i, j] *= y
            ec[j] += P[i, j]
            er[i] += P[i, j]
        ec[j] = b[j] - ec[j]
    nr = 0.0
    for i in range(n):
        er[i] = max(a[i] - er[i], 0.0)
        nr += er[i]
    cost = 0.0
    for i in range(n):
        for j in range(m):
            pij = P[i, j]
            if nr > 0:
                pij += er[i] * ec[j] / nr
            cost += pij * M[i, j]
    return cost, total, status


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _rowcol_kernels(e, cw, gwl, fx, cz, fzl, gy, d, kxw, kzy, floor):
    """Kernel row of x / column of y at eps ``e`` (computed in float64, stored in kxw's dtype)."""
    kw = cw.shape[0]
    kz = cz.shape[0]
    for j in range(kw):
        t = math.exp(-(cw[j] - fx - gwl[j]) / e)
        kxw[j] = t if t >= floor else 0.0
    for i in range(kz):
        t = math.exp(-(cz[i] - fzl[i] - gy) / e)
        kzy[i] = t if t >= floor else 0.0
    return math.exp(-(d - fx - gy) / e)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _pow_inplace(x, n, p, ip, floor):
    """x[:n] = x[:n] ** p (repeated products when p is the small integer ip), floored."""
    for i in range(n):
        x1 = float(x[i])
        if ip > 0:
            r = x1
            for _ in range(ip - 1):
                r *= x1
        else:
            r = x1 ** p
        x[i] = r if r >= floor else 0.0


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _run_stages(Ks, KsT, gather, zi, wi, Bws, BTws, eps_st, tol_st, s0, a, b, cw, gwl, fx, cz,
                fzl, gy, d, u, v, kxw, kzy, ktu, kv, max_iter, omega, half, big, floor):
    """Run the eps stages s0.. of one problem; the stage kernels are ``Ks[s]`` (``gather``:
    ``Ks[s][zi][:, wi]``, copied into the workspace). Returns (iterations, status, B, kxy)."""
    kz = zi.shape[0]
    kw = wi.shape[0]
    total = 0
    status = _OK
    B = Ks[0]
    BT = KsT[0]
    kxy = 1.0
    S = eps_st.shape[0]
    for s in range(s0, S):
        e = eps_st[s]
        if gather:
            B = Bws[: kz * kw].reshape((kz, kw))
            BT = BTws[: kz * kw].reshape((kw, kz))
            K = Ks[s]
            for i in range(kz):
                zr = zi[i]
                for j in range(kw):
                    t = K[zr, wi[j]]
                    B[i, j] = t
                    BT[j, i] = t
        else:
            B = Ks[s]
            BT = KsT[s]
        if s > s0:
            # next stage: u = exp(df / e) -> u ** p, row/column kernels -> k ** p
            p = eps_st[s - 1] / e
            ip = int(p + 0.5)
            if not (abs(p - ip) < 1e-9 and ip <= 8):
                ip = 0
            _pow_inplace(u, kz + 1, p, ip, 0.0)
            _pow_inplace(v, kw + 1, p, ip, 0.0)
            _pow_inplace(kxw, kw, p, ip, floor)
            _pow_inplace(kzy, kz, p, ip, floor)
            kxy = kxy ** p
        else:
            kxy = _rowcol_kernels(e, cw, gwl, fx, cz, fzl, gy, d, kxw, kzy, floor)
        its, status = _sinkhorn_kernel(B, BT, a, b, kxw, kzy, kxw.dtype.type(kxy), u, v, ktu,
                                       kv, tol_st[s], max_iter, omega, half, big)
        total += its
        if status == _OVERFLOW:
            break
    return total, status, B, kxy


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _solve_one(x, y, Ks, KsT, C, C32, fz, gw, eps_st, tol_st, uniform, ploc, pm, pk, sloc, sm,
               sk, czy_u, cxw_u, dxy, alpha, max_iter, omega, ws32, ws64, path):
    """Solve one connection; returns (W1, iterations, status).

    Float32 kernel-domain Sinkhorn on the shared kernels first; if its scalings leave the safe
    range, float64 kernel-domain Sinkhorn on this problem's own kernel; if that overflows,
    log-domain. ``path`` 1 starts at float64, 2 at the log domain.
    """
    (Bws, BTws, u, v, ktu, kv, kxw, kzy, wa32, wb32, cz32, cw32, rx32, cy32, ec32, Cws32) = ws32
    (wa, wb, cz, cw, fzl, gwl, zi, wi) = ws64
    d = dxy[x, y]
    kz = pk[x]
    kw = sk[y]
    # ---- a delta on one side fixes the plan
    if kz == 0 and kw == 0:
        return d, 0, _OK
    if kz == 0:
        s = alpha * d
        for j in range(kw):
            s += (1.0 - alpha) * sm[y, j] * cxw_u[x, sloc[y, j]]
        return s, 0, _OK
    if kw == 0:
        s = alpha * d
        for i in range(kz):
            s += (1.0 - alpha) * pm[x, i] * czy_u[ploc[x, i], y]
        return s, 0, _OK
    # ---- supports, masses, costs of row x / column y, shared potentials on them
    for i in range(kz):
        zr = ploc[x, i]
        zi[i] = zr
        wa[i] = (1.0 - alpha) * pm[x, i]
        cz[i] = czy_u[zr, y]
        fzl[i] = fz[zr]
        wa32[i] = wa[i]
        cz32[i] = cz[i]
    wa[kz] = alpha
    wa32[kz] = alpha
    for j in range(kw):
        wr = sloc[y, j]
        wi[j] = wr
        wb[j] = (1.0 - alpha) * sm[y, j]
        cw[j] = cxw_u[x, wr]
        gwl[j] = gw[wr]
        wb32[j] = wb[j]
        cw32[j] = cw[j]
    wb[kw] = alpha
    wb32[kw] = alpha
    # c-transform potentials of x and y w.r.t. the shared ones (all reduced costs >= 0)
    fx = np.inf
    for j in range(kw):
        t = cw[j] - gwl[j]
        if t < fx:
            fx = t
    gy = d - fx
    for i in range(kz):
        t = cz[i] - fzl[i]
        if t < gy:
            gy = t
    zik = zi[:kz]
    wik = wi[:kw]
    S = eps_st.shape[0]
    total = 0
    # cost block (float32)
    if uniform:
        Cb32 = C32
    else:
        Cb32 = Cws32[: kz * kw].reshape((kz, kw))
        for i in range(kz):
            for j in range(kw):
                Cb32[i, j] = C[zik[i], wik[j]]
    # ---- float32 on the shared kernels
    u[: kz + 1] = 1.0
    v[: kw + 1] = 1.0
    s0 = S - S  # 0, not a literal (int literals as call arguments compile callees twice)
    u_ = u[: kz + 1]
    v_ = v[: kw + 1]
    status = _OVERFLOW
    if path == 0:
        its, status, B, kxy = _run_stages(
            Ks, KsT, not uniform, zik, wik, Bws, BTws, eps_st, tol_st, s0, wa32[: kz + 1],
            wb32[: kw + 1], cw[:kw], gwl[:kw], fx, cz[:kz], fzl[:kz], gy, d, u_, v_, kxw[:kw],
            kzy[:kz], ktu, kv, max_iter, omega, np.float32(0.5), np.float32(1e37),
            np.float32(_F32_FLOOR))
        total = its
    if status != _OVERFLOW:
        umax = 0.0
        for i in range(kz + 1):
            umax = max(umax, float(u_[i]))
        vmax = 0.0
        for j in range(kw + 1):
            vmax = max(vmax, float(v_[j]))
        if umax * vmax <= _F32_UVMAX:
            w1 = _rounded_cost(B, wa32[: kz + 1], wb32[: kw + 1], kxw[:kw], kzy[:kz],
                               np.float32(kxy), u_, v_, Cb32, cz32[:kz], cw32[:kw],
                               np.float32(d), rx32, cy32, ec32)
            if math.isfinite(w1):
                return w1, total, status
    # ---- float64 on this problem's own kernel (no floor)
    Cb = np.empty((kz, kw))
    M = np.empty((kz + 1, kw + 1))  # reduced costs (>= 0)
    for i in range(kz):
        for j in range(kw):
            Cb[i, j] = C[zik[i], wik[j]]
            M[i, j] = max(Cb[i, j] - fzl[i] - gwl[j], 0.0)
        M[i, kw] = cz[i] - fzl[i] - gy
    for j in range(kw):
        M[kz, j] = cw[j] - fx - gwl[j]
    M[kz, kw] = d - fx - gy
    if path <= 1:
        K64 = np.empty((S, kz, kw))
        K64T = np.empty((S, kw, kz))
        for s in range(S):
            for i in range(kz):
                for j in range(kw):
                    t = math.exp(-M[i, j] / eps_st[s])
                    K64[s, i, j] = t
                    K64T[s, j, i] = t
        u64 = np.ones(kz + 1)
        v64 = np.ones(kw + 1)
        kxw64 = np.empty(kw)
        kzy64 = np.empty(kz)
        iloc = np.arange(kz)
        jloc = np.arange(kw)
        gather64 = kz < 0  # False, not a literal
        its, status, B64, kxy = _run_stages(
            K64, K64T, gather64, iloc, jloc, K64[0].ravel(), K64T[0].ravel(), eps_st, tol_st, s0,
            wa[: kz + 1], wb[: kw + 1], cw[:kw], gwl[:kw], fx, cz[:kz], fzl[:kz], gy, d, u64, v64,
            kxw64, kzy64, np.empty(kw + 1), np.empty(kz + 1), max_iter, omega, 0.5, 1e300, 0.0)
        total += its
        if status != _OVERFLOW:
            w1 = _rounded_cost(B64, wa[: kz + 1], wb[: kw + 1], kxw64, kzy64, kxy, u64, v64, Cb,
                               cz[:kz], cw[:kw], d, np.empty(kz + 1), np.empty(kw + 1),
                               np.empty(kw + 1))
            if math.isfinite(w1):
                return w1, total, _F64 + status
    # ---- log domain on the reduced costs
    cost_r, its, st = _log_domain(M, wa[: kz + 1], wb[: kw + 1], eps_st, tol_st, max_iter, omega)
    # undo the potential shift: <T, M_red> = <T, M> - <a, f> - <b, g> for T in U(a, b)
    shift = wa[kz] * fx + wb[kw] * gy
    for i in range(kz):
        shift += wa[i] * fzl[i]
    for j in range(kw):
        shift += wb[j] * gwl[j]
    return cost_r + shift, total + its, _LOG + st


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _expneg(x):
    """exp(-x) for x >= 0 to ~1e-5 relative, 0 beyond 80.6 (the float32 kernel floor):
    (Taylor of degree 8 at -x/128) ** 128, plain arithmetic so that loops vectorise."""
    y = -min(x, 80.6) * (1.0 / 128.0)
    p = 1.0 + y * (1.0 + y * (1.0 / 2.0) * (1.0 + y * (1.0 / 3.0) * (1.0 + y * (1.0 / 4.0) * (
        1.0 + y * (1.0 / 5.0) * (1.0 + y * (1.0 / 6.0) * (1.0 + y * (1.0 / 7.0) * (
            1.0 + y * (1.0 / 8.0))))))))
    for _ in range(7):
        p = p * p
    return p if x < 80.6 else 0.0


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _batch_core(xs, ys, who, nb, Ks, KsT, KCT, CT, fz, gw, eps_st, tol_st, A, Bw, FX, GY, czyT,
                cxw_u, dxy, alpha, max_iter, omega, fast_exp, floor, uvmax, bigval, out, iters,
                status, st):
    """Batched Sinkhorn + rounding for the slots ``who[:nb]`` (dtype of ``A``: float32 or 64).

    ``Ks[s]`` / ``KsT[s]`` are the shared block's stage kernels (kz x kw and transposed),
    ``KCT`` = (K o C)^T and ``CT`` = C^T of the last stage. Writes out/iters/status of the
    solved problems; ``st[r]`` is _OVERFLOW for those left to a fallback (row r <-> who[r]).
    """
    dt = A.dtype
    one = dt.type(1.0)
    zero = dt.type(0.0)
    half = dt.type(0.5)
    big = dt.type(bigval)
    al32 = dt.type(alpha)
    kz = Ks.shape[1]
    kw = Ks.shape[2]
    S = eps_st.shape[0]
    nq = A.shape[0]
    KXW = np.empty((nq, kw), dt)
    KZY = np.empty((nq, kz), dt)
    KXY = np.empty(nq, dt)
    U = np.ones((nb, kz), dt)
    V = np.ones((nb, kw), dt)
    Ux = np.ones(nb, dt)
    Vy = np.ones(nb, dt)
    KV = np.empty((nb, kz), dt)
    KTU = np.empty((nb, kw), dt)
    its = np.zeros(nb, np.int64)
    for r in range(nb):
        st[r] = _OK
    # ---- eps stages
    for s in range(S):
        e = eps_st[s]
        B = Ks[s]
        BT = KsT[s]
        if s == 0:
            for r in range(nb):
                q = who[r]
                x = xs[q]
                y = ys[q]
                fx = FX[q]
                gy = GY[q]
                ie = 1.0 / e
                if fast_exp:
                    for j in range(kw):
                        t = _expneg((cxw_u[x, j] - fx - gw[j]) * ie)
                        KXW[q, j] = t if t >= floor else 0.0
                    for i in range(kz):
                        t = _expneg((czyT[y, i] - fz[i] - gy) * ie)
                        KZY[q, i] = t if t >= floor else 0.0
                else:
                    for j in range(kw):
                        KXW[q, j] = math.exp(-(cxw_u[x, j] - fx - gw[j]) * ie)
                    for i in range(kz):
                        KZY[q, i] = math.exp(-(czyT[y, i] - fz[i] - gy) * ie)
                KXY[q] = math.exp(-(dxy[x, y] - fx - gy) / e)
        else:
            p = eps_st[s - 1] / e
            ip = int(p + 0.5)
            if not (abs(p - ip) < 1e-9 and ip <= 8):
                ip = 0
            for r in range(nb):
                if st[r] == _OVERFLOW:
                    continue
                q = who[r]
                _pow_inplace(U[r], kz, p, ip, 0.0)
                _pow_inplace(V[r], kw, p, ip, 0.0)
                _pow_inplace(KXW[q], kw, p, ip, floor)
                _pow_inplace(KZY[q], kz, p, ip, floor)
                Ux[r] = float(Ux[r]) ** p
                Vy[r] = float(Vy[r]) ** p
                KXY[q] = float(KXY[q]) ** p
        # active rows: all but the failed ones (moved behind the active prefix)
        n_act = nb
        r = 0
        while r < n_act:
            if st[r] == _OVERFLOW:
                n_act -= 1
                _swap_rows(U, V, Ux, Vy, who, its, st, r, n_act)
            else:
                r += 1
        tol = tol_st[s]
        it = 0
        while n_act > 0 and it < max_iter:
            it += 1
            # ---- K v, u update (branch-free loops: they vectorise; failures are counted)
            np.dot(V[:n_act], BT, KV[:n_act])
            for r in range(n_act):
                q = who[r]
                vy = Vy[r]
                sx = KXY[q] * vy
                for j in range(kw):
                    sx += KXW[q, j] * V[r, j]
                nbad = 0
                for i in range(kz):
                    sv = KV[r, i] + KZY[q, i] * vy
                    ai = A[q, i]
                    t = ai / sv if sv > zero else zero
                    nbad += (sv <= zero and ai > zero) or sv >= big
                    rr = U[r, i] + omega * (t - U[r, i])
                    h = half * t
                    U[r, i] = rr if rr > h else h
                t = al32 / sx if sx > zero else zero
                nbad += (sx <= zero and alpha > 0.0) or sx >= big
                rr = Ux[r] + omega * (t - Ux[r])
                h = half * t
                Ux[r] = rr if rr > h else h
                if nbad > 0:
                    st[r] = _OVERFLOW
            # ---- K^T u, column error, v update
            np.dot(U[:n_act], B, KTU[:n_act])
            for r in range(n_act):
                if st[r] == _OVERFLOW:
                    continue
                q = who[r]
                ux = Ux[r]
                sy = KXY[q] * ux
                for i in range(kz):
                    sy += KZY[q, i] * U[r, i]
                err = zero
                nbad = 0
                for j in range(kw):
                    t = KTU[r, j] + KXW[q, j] * ux
                    bj = Bw[q, j]
                    err += abs(V[r, j] * t - bj)
                    nbad += (t <= zero and bj > zero) or t >= big
                    t = bj / t if t > zero else zero
                    rr = V[r, j] + omega * (t - V[r, j])
                    h = half * t
                    V[r, j] = rr if rr > h else h
                err += abs(Vy[r] * sy - al32)
                nbad += (sy <= zero and alpha > 0.0) or sy >= big
                t = al32 / sy if sy > zero else zero
                rr = Vy[r] + omega * (t - Vy[r])
                h = half * t
                Vy[r] = rr if rr > h else h
                its[r] += 1
                if nbad > 0 or not (err < big):
                    st[r] = _OVERFLOW
                elif err <= tol:
                    st[r] = -1  # converged in this stage
            # ---- compaction: swap finished rows behind the active prefix
            r = 0
            while r < n_act:
                if st[r] != _OK:
                    n_act -= 1
                    _swap_rows(U, V, Ux, Vy, who, its, st, r, n_act)
                else:
                    r += 1
        # reset the per-stage flags (converged -> OK, still active -> MAXITER at the end)
        for r in range(nb):
            if st[r] == -1:
                st[r] = _OK
            elif st[r] == _OK and s == S - 1:
                st[r] = _MAXITER
        if s < S - 1:
            # give up early on problems whose scalings will leave the safe range at the next
            # eps (they become u ** p): the fallback then starts without a wasted stage
            pw = eps_st[s] / eps_st[s + 1]
            for r in range(nb):
                if st[r] == _OVERFLOW:
                    continue
                umax = float(Ux[r])
                for i in range(kz):
                    umax = max(umax, float(U[r, i]))
                vmax = float(Vy[r])
                for j in range(kw):
                    vmax = max(vmax, float(V[r, j]))
                if not (math.log(max(umax * vmax, 1e-300)) * pw <= math.log(uvmax)):
                    st[r] = _OVERFLOW
    # ---- safety: max(u) * max(v) must stay small enough for the kernel floor / underflow
    for r in range(nb):
        if st[r] == _OVERFLOW:
            continue
        umax = float(Ux[r])
        for i in range(kz):
            umax = max(umax, float(U[r, i]))
        vmax = float(Vy[r])
        for j in range(kw):
            vmax = max(vmax, float(V[r, j]))
        if not (umax * vmax <= uvmax):
            st[r] = _OVERFLOW
    # ---- rounding (Altschuler) and cost of all rows at once: 4 matrix products
    B = Ks[S - 1]
    BT = KsT[S - 1]
    RX = U  # reuse storage: RX = x * u, CYV = y * v
    np.dot(V[:nb], BT, KV[:nb])
    RXx = np.empty(nb, dt)
    for r in range(nb):
        q = who[r]
        vy = Vy[r]
        for i in range(kz):
            rv = U[r, i] * (KV[r, i] + KZY[q, i] * vy)
            RX[r, i] = min(one, A[q, i] / rv) * U[r, i] if rv > 0.0 else zero
        sx = KXY[q] * vy
        for j in range(kw):
            sx += KXW[q, j] * V[r, j]
        rv = Ux[r] * sx
        RXx[r] = min(one, al32 / rv) * Ux[r] if rv > 0.0 else zero
    np.dot(RX[:nb], B, KTU[:nb])
    EC = np.empty((nb, kw), dt)
    ECy = np.empty(nb, dt)
    CYy = np.empty(nb, dt)
    for r in range(nb):
        q = who[r]
        rxx = RXx[r]
        for j in range(kw):
            c = V[r, j] * (KTU[r, j] + KXW[q, j] * rxx)
            f = min(one, Bw[q, j] / c) if c > 0.0 else zero
            EC[r, j] = Bw[q, j] - c * f
            V[r, j] = V[r, j] * f  # CYV
        sy = KXY[q] * rxx
        for i in range(kz):
            sy += KZY[q, i] * RX[r, i]
        c = Vy[r] * sy
        f = min(one, al32 / c) if c > 0.0 else zero
        ECy[r] = al32 - c * f
        CYy[r] = Vy[r] * f
    S1 = KV
    np.dot(V[:nb], BT, S1[:nb])
    S2 = np.empty((nb, kz), dt)
    np.dot(V[:nb], KCT, S2)
    S3 = np.empty((nb, kz), dt)
    np.dot(EC, CT, S3)
    for r in range(nb):
        q = who[r]
        x = xs[q]
        y = ys[q]
        d = dxy[x, y]
        if st[r] == _OVERFLOW:
            continue
        cyy = CYy[r]
        ecy = ECy[r]
        cost = 0.0
        corr = 0.0
        nr = 0.0
        for i in range(kz):
            czi = czyT[y, i]
            kzy = KZY[q, i]
            s1 = S1[r, i] + kzy * cyy
            s2 = float(S2[r, i]) + float(kzy) * czi * float(cyy)
            s3 = float(S3[r, i]) + czi * float(ecy)
            ei = float(A[q, i]) - float(RX[r, i]) * float(s1)
            if ei < 0.0:
                ei = 0.0
            cost += float(RX[r, i]) * s2
            corr += ei * s3
            nr += ei
        s1 = float(KXY[q]) * float(cyy)
        s2 = s1 * d
        s3 = d * float(ecy)
        for j in range(kw):
            kv = float(KXW[q, j]) * float(V[r, j])
            cwj = cxw_u[x, j]
            s1 += kv
            s2 += kv * cwj
            s3 += cwj * float(EC[r, j])
        ex = alpha - float(RXx[r]) * s1
        if ex < 0.0:
            ex = 0.0
        cost += float(RXx[r]) * s2
        corr += ex * s3
        nr += ex
        if nr > 0.0:
            cost += corr / nr
        if math.isfinite(cost):
            out[x, y] = cost
            iters[x, y] = its[r]
            status[x, y] = st[r]
        else:
            st[r] = _OVERFLOW
    return 0


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _batch_uniform(xs, ys, Kl, KlT, KCT, CT, C, C32, R, CT64, fz, gw, eps_st, tol_st, ploc, pm,
                   pk, sloc, sm, sk, czy_u, czyT, cxw_u, dxy, alpha, max_iter, omega, out, iters,
                   status, ws32, ws64, path):
    """Solve the connections (xs[q], ys[q]) of one eps level together (uniform supports).

    The shared block enters every iteration as a matrix product over the active problems
    (``np.dot`` -> BLAS sgemm: the block is read once for all of them); each problem keeps its
    own row x / column y, masses, scalings and early stop (converged problems are swapped out
    of the active prefix). Degenerate problems are solved in closed form; problems whose
    float32 scalings leave the safe range are redone as a float64 batch on this level's
    float64 kernel (built here from the reduced costs ``R``), and the rare ones that overflow
    even there alone in the log domain (:func:`_solve_one`).
    """
    f4 = np.float32
    kz = pm.shape[1]
    kw = sm.shape[1]
    S = eps_st.shape[0]
    nq = xs.shape[0]
    # ---- per-problem constants (slot q) and state (row r, compacted; who[r] = slot)
    A = np.empty((nq, kz), f4)
    Bw = np.empty((nq, kw), f4)
    FX = np.empty(nq)
    GY = np.empty(nq)
    who = np.empty(nq, np.int64)
    st = np.zeros(nq, np.int64)
    nb = nq - nq  # 0, not a literal
    for q in range(nq):
        x = xs[q]
        y = ys[q]
        d = dxy[x, y]
        if pk[x] == 0 or sk[y] == 0:  # a delta on one side fixes the plan
            s = alpha * d
            if pk[x] == 0 and sk[y] > 0:
                for j in range(kw):
                    s += (1.0 - alpha) * sm[y, j] * cxw_u[x, j]
            elif sk[y] == 0 and pk[x] > 0:
                for i in range(kz):
                    s += (1.0 - alpha) * pm[x, i] * czyT[y, i]
            else:
                s = d
            out[x, y] = s
            iters[x, y] = 0
            status[x, y] = _OK
            continue
        for i in range(kz):
            A[q, i] = (1.0 - alpha) * pm[x, i]
        for j in range(kw):
            Bw[q, j] = (1.0 - alpha) * sm[y, j]
        fx = np.inf
        for j in range(kw):
            t = cxw_u[x, j] - gw[j]
            if t < fx:
                fx = t
        gy = d - fx
        for i in range(kz):
            t = czyT[y, i] - fz[i]
            if t < gy:
                gy = t
        FX[q] = fx
        GY[q] = gy
        who[nb] = q
        nb += 1
    if nb == 0:
        return 0
    yes = nq > 0  # bool variables, not literals (a literal would compile _batch_core twice)
    no = nq < 0
    # ---- float32 batch on the shared per-level kernels (path 0)
    if path == 0:
        _batch_core(xs, ys, who, nb, Kl, KlT, KCT, CT, fz, gw, eps_st, tol_st, A, Bw, FX, GY,
                    czyT, cxw_u, dxy, alpha, max_iter, omega, yes, _F32_FLOOR, _F32_UVMAX, 1e37,
                    out, iters, status, st)
    else:
        for r in range(nb):
            st[r] = _OVERFLOW
    n2 = nq - nq
    who2 = np.empty(nb, np.int64)
    for r in range(nb):
        if st[r] == _OVERFLOW:
            who2[n2] = who[r]
            n2 += 1
    if n2 == 0:
        return 0
    # ---- float64 batch for the problems that left the float32 range
    uniform = yes
    log_path = path + 2 - path  # 2, typed like path (not a literal)
    A64 = np.empty((nq, kz))
    Bw64 = np.empty((nq, kw))
    for r in range(n2):
        q = who2[r]
        for i in range(kz):
            A64[q, i] = (1.0 - alpha) * pm[xs[q], i]
        for j in range(kw):
            Bw64[q, j] = (1.0 - alpha) * sm[ys[q], j]
    K64 = np.empty((S, kz, kw))
    K64T = np.empty((S, kw, kz))
    KCT64 = np.empty((kw, kz))
    for s in range(S):
        ie = 1.0 / eps_st[s]
        for i in range(kz):
            for j in range(kw):
                t = math.exp(-R[i, j] * ie)
                K64[s, i, j] = t
                K64T[s, j, i] = t
                if s == S - 1:
                    KCT64[j, i] = t * C[i, j]
    st2 = np.zeros(n2, np.int64)
    _batch_core(xs, ys, who2, n2, K64, K64T, KCT64, CT64, fz, gw, eps_st, tol_st, A64, Bw64, FX,
                GY, czyT, cxw_u, dxy, alpha, max_iter, omega, no, 0.0, 1e290, 1e300, out,
                iters, status, st2)
    for r in range(n2):
        q = who2[r]
        x = xs[q]
        y = ys[q]
        if st2[r] == _OVERFLOW:  # alone, in the log domain
            w1, it2, st3 = _solve_one(x, y, Kl, KlT, C, C32, fz, gw, eps_st, tol_st, uniform,
                                      ploc, pm, pk, sloc, sm, sk, czy_u, cxw_u, dxy, alpha,
                                      max_iter, omega, ws32, ws64, log_path)
            out[x, y] = w1
            iters[x, y] = it2
            status[x, y] = st3
        else:
            status[x, y] += _F64
    return 0


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _swap_rows(U, V, Ux, Vy, who, its, st, a, b):
    if a == b:
        return
    for i in range(U.shape[1]):
        t = U[a, i]
        U[a, i] = U[b, i]
        U[b, i] = t
    for j in range(V.shape[1]):
        t = V[a, j]
        V[a, j] = V[b, j]
        V[b, j] = t
    t = Ux[a]
    Ux[a] = Ux[b]
    Ux[b] = t
    t = Vy[a]
    Vy[a] = Vy[b]
    Vy[b] = t
    ti = who[a]
    who[a] = who[b]
    who[b] = ti
    ti = its[a]
    its[a] = its[b]
    its[b] = ti
    ti = st[a]
    st[a] = st[b]
    st[b] = ti


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _run_chunk(k0, k1, Kl, KlT, KCTl, CT, C, C32, R, CT64, fz, gw, eps_st, tol_st, uniform, cx,
               cyy, ploc, pm, pk, sloc, sm, sk, czy_u, czyT, cxw_u, dxy, alpha, max_iter, omega,
               path, out, iters, status):
    """Connections k0:k1 (one eps level): one batch (uniform supports) or one at a time."""
    KZ = ploc.shape[1]
    KW = sloc.shape[1]
    nb = 1 if uniform else KZ * KW
    f4 = np.float32
    ws32 = (np.empty(nb, f4), np.empty(nb, f4), np.ones(KZ + 1, f4), np.ones(KW + 1, f4),
            np.empty(KW + 1, f4), np.empty(KZ + 1, f4), np.empty(KW, f4), np.empty(KZ, f4),
            np.empty(KZ + 1, f4), np.empty(KW + 1, f4), np.empty(KZ, f4), np.empty(KW, f4),
            np.empty(KZ + 1, f4), np.empty(KW + 1, f4), np.empty(KW + 1, f4), np.empty(nb, f4))
    ws64 = (np.empty(KZ + 1), np.empty(KW + 1), np.empty(KZ), np.empty(KW), np.empty(KZ),
            np.empty(KW), np.empty(KZ, np.int64), np.empty(KW, np.int64))
    if uniform and path <= 1:
        _batch_uniform(cx[k0:k1], cyy[k0:k1], Kl, KlT, KCTl, CT, C, C32, R, CT64, fz, gw,
                       eps_st, tol_st, ploc, pm, pk, sloc, sm, sk, czy_u, czyT, cxw_u, dxy,
                       alpha, max_iter, omega, out, iters, status, ws32, ws64, path)
    else:
        for k in range(k0, k1):
            x = cx[k]
            y = cyy[k]
            w1, its, st = _solve_one(x, y, Kl, KlT, C, C32, fz, gw, eps_st, tol_st, uniform,
                                     ploc, pm, pk, sloc, sm, sk, czy_u, cxw_u, dxy, alpha,
                                     max_iter, omega, ws32, ws64, path)
            out[x, y] = w1
            iters[x, y] = its
            status[x, y] = st
    return 0


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def _solve_chunks(first, step, Ks, KsT, KCT, CT, C, C32, R, CT64, fz, gw, eps_lv, tol_st,
                  uniform, cx, cyy, chunk_ptr, chunk_lv, ploc, pm, pk, sloc, sm, sk, czy_u, czyT,
                  cxw_u, dxy, alpha, max_iter, omega, path, out, iters, status):
    """Solve the chunks first, first + step, ... (one worker thread; the GIL is released).

    Chunk c holds connections chunk_ptr[c]:chunk_ptr[c+1], all of eps level chunk_lv[c], whose
    stage kernels are Ks[chunk_lv[c]] (float32) and stage eps eps_lv[chunk_lv[c]]. Uniform
    supports: the chunk is one batch (:func:`_batch_uniform`); otherwise one problem at a time.
    """
    n_chunks = chunk_ptr.shape[0] - 1
    om32 = np.float32(omega)
    for c in range(first, n_chunks, step):
        lv = chunk_lv[c]
        _run_chunk(chunk_ptr[c], chunk_ptr[c + 1], Ks[lv], KsT[lv], KCT[lv], CT, C, C32, R, CT64,
                   fz, gw, eps_lv[lv], tol_st, uniform, cx, cyy, ploc, pm, pk, sloc, sm, sk,
                   czy_u, czyT, cxw_u, dxy, alpha, max_iter, om32, path, out, iters, status)
    return 0


_POOL = []


def _run_parallel(n_threads, args):
    """Run :func:`_solve_chunks` on ``n_threads`` threads (chunks interleaved)."""
    if n_threads <= 1:
        _solve_chunks(0, 1, *args)
        return
    from concurrent.futures import ThreadPoolExecutor

    if not _POOL or _POOL[0][0] < n_threads:
        if _POOL:
            _POOL[0][1].shutdown(wait=False)
            _POOL.clear()
        _POOL.append((n_threads, ThreadPoolExecutor(n_threads, thread_name_prefix="tp-w1")))
    ex = _POOL[0][1]
    futs = [ex.submit(_solve_chunks, w, n_threads, *args) for w in range(n_threads)]
    for f in futs:
        f.result()


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------
def _compact_measure(idx, mass, mass_tol):
    """Union support, per-row local supports (sorted), masses (renormalised after trimming)."""
    idx = np.asarray(idx, dtype=np.int64)
    mass = np.asarray(mass, dtype=np.float64)
    n_rows = idx.shape[0]
    valid = (mass > 0) & (idx >= 0)
    if not valid.any():
        return (np.zeros(0, np.int64), np.zeros((n_rows, 0), np.int64), np.zeros((n_rows, 0)),
                np.zeros(n_rows, np.int64))
    union = np.unique(idx[valid])
    # drop atoms whose largest mass over all rows is negligible (cumulative <= mass_tol)
    pos = np.searchsorted(union, np.where(valid, idx, union[0]))
    maxmass = np.zeros(union.size)
    np.maximum.at(maxmass, pos[valid], mass[valid])
    if mass_tol > 0:
        order = np.argsort(maxmass, kind="stable")
        cum = np.cumsum(maxmass[order])
        drop = order[cum <= mass_tol]
        keep_atom = np.ones(union.size, bool)
        keep_atom[drop] = False
    else:
        keep_atom = np.ones(union.size, bool)
    new_pos = np.cumsum(keep_atom) - 1
    valid &= keep_atom[pos]
    union = union[keep_atom]
    loc_all = np.where(valid, new_pos[pos], np.iinfo(np.int64).max)
    order = np.argsort(loc_all, axis=1, kind="stable")
    loc_sorted = np.take_along_axis(loc_all, order, axis=1)
    mass_sorted = np.take_along_axis(np.where(valid, mass, 0.0), order, axis=1)
    k = valid.sum(axis=1).astype(np.int64)
    K = int(k.max()) if n_rows else 0
    loc = np.where(np.arange(K)[None, :] < k[:, None], loc_sorted[:, :K], 0).astype(np.int64)
    m = mass_sorted[:, :K].copy()
    s = m.sum(axis=1, keepdims=True)
    np.divide(m, s, out=m, where=s > 0)
    return union, loc, m, k


def _uniformize(loc, mass, k, n_union):
    """Rows -> dense over the union (zeros where absent). Rows with k == 0 stay deltas."""
    n_rows = loc.shape[0]
    dense = np.zeros((n_rows, n_union))
    rows = np.repeat(np.arange(n_rows), loc.shape[1])
    cols = loc.ravel()
    ok = (np.arange(loc.shape[1])[None, :] < k[:, None]).ravel()
    dense[rows[ok], cols[ok]] = mass.ravel()[ok]
    new_loc = np.broadcast_to(np.arange(n_union, dtype=np.int64), (n_rows, n_union)).copy()
    new_k = np.where(k > 0, n_union, 0).astype(np.int64)
    return new_loc, dense, new_k


_BLAS_CTL = []


def _one_blas_thread():
    """Context manager: BLAS single-threaded while the worker threads call sgemm (a threaded
    OpenBLAS under our threads would oversubscribe the cores). No-op without threadpoolctl."""
    import contextlib

    if not _BLAS_CTL:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot uses)
            from threadpoolctl import ThreadpoolController

            _BLAS_CTL.append(ThreadpoolController())
        except Exception:  # pragma: no cover - threadpoolctl missing
            _BLAS_CTL.append(None)
    ctl = _BLAS_CTL[0]
    return ctl.limit(limits=1, user_api="blas") if ctl is not None else contextlib.nullcontext()


def _pad2(a, n, m, value):
    out = np.full((n, m), value, dtype=np.float64)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def _shared_potentials(C, pbar, rbar):
    """Exact dual potentials of the shared problem W(pbar, rbar; C) (network simplex)."""
    import ot

    nz, nw = C.shape
    if nz == 0 or nw == 0:
        return np.zeros(nz), np.zeros(nw)
    a = np.maximum(pbar, 1e-300)
    b = np.maximum(rbar, 1e-300)
    a = a / a.sum()
    b = b / b.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, log = ot.emd(a, b, C, numItermax=10_000_000, log=True)
    f = np.asarray(log["u"], dtype=np.float64)
    g = np.asarray(log["v"], dtype=np.float64)
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(g))):
        f = C.min(axis=1)
        g = (C - f[:, None]).min(axis=0)
    # make them exactly dual feasible: f_z + g_w <= C
    g = np.minimum(g, (C - f[:, None]).min(axis=0))
    return f, g


def _sinkhorn_backend(problem, eps, tol, max_iter, omega, eps_scaling, levels, mass_tol,
                      batch, chunk_rows, progress, precision):
    al = float(problem.alpha)
    n_x, n_y = problem.d_xy.shape
    out = np.full((n_x, n_y), np.nan)
    iters = np.zeros((n_x, n_y), np.int64)
    status = np.zeros((n_x, n_y), np.int64)
    t0 = time.perf_counter()
    zu, ploc, pm, pk = _compact_measure(problem.pred_idx, problem.pred_mass, mass_tol)
    wu, sloc, sm, sk = _compact_measure(problem.succ_idx, problem.succ_mass, mass_tol)
    nzu, nwu = zu.size, wu.size
    # uniform mode: the rows use (nearly) all of the union -> operate on the shared block
    use_x = pk > 0
    use_y = sk > 0
    uniform = bool(
        (not use_x.any() or pk[use_x].mean() >= 0.8 * nzu)
        and (not use_y.any() or sk[use_y].mean() >= 0.8 * nwu)
    )
    if uniform:
        ploc, pm, pk = _uniformize(ploc, pm, pk, nzu)
        sloc, sm, sk = _uniformize(sloc, sm, sk, nwu)
    C = np.ascontiguousarray(problem.c_zw[np.ix_(zu, wu)], dtype=np.float64)
    czy_u = np.ascontiguousarray(problem.c_zy[zu, :], dtype=np.float64)
    cxw_u = np.ascontiguousarray(problem.c_xw[:, wu], dtype=np.float64)
    dxy = np.ascontiguousarray(problem.d_xy, dtype=np.float64)
    # shared potentials from the mean measures
    pbar = np.zeros(nzu)
    if use_x.any():
        np.add.at(pbar, ploc[use_x].ravel(), pm[use_x].ravel())
    rbar = np.zeros(nwu)
    if use_y.any():
        np.add.at(rbar, sloc[use_y].ravel(), sm[use_y].ravel())
    fz, gw = _shared_potentials(C, pbar, rbar)
    R = np.maximum(C - fz[:, None] - gw[None, :], 0.0)
    k_z_union, k_w_union = nzu, nwu
    if uniform and nzu and nwu:
        # pad the shared block to multiples of _PAD atoms (zero mass, cost _PAD_COST, kernel 0):
        # the inner loops then have no remainders (~15% faster iterations)
        nzp = -(-nzu // _PAD) * _PAD
        nwp = -(-nwu // _PAD) * _PAD
        C = _pad2(C, nzp, nwp, _PAD_COST)
        R = _pad2(R, nzp, nwp, _PAD_COST)
        czy_u = _pad2(czy_u, nzp, czy_u.shape[1], _PAD_COST)
        cxw_u = _pad2(cxw_u, cxw_u.shape[0], nwp, _PAD_COST)
        fz = np.concatenate([fz, np.zeros(nzp - nzu)])
        gw = np.concatenate([gw, np.zeros(nwp - nwu)])
        ploc = np.broadcast_to(np.arange(nzp, dtype=np.int64), (ploc.shape[0], nzp)).copy()
        pm = _pad2(pm, pm.shape[0], nzp, 0.0)
        pk = np.where(pk > 0, nzp, 0).astype(np.int64)
        sloc = np.broadcast_to(np.arange(nwp, dtype=np.int64), (sloc.shape[0], nwp)).copy()
        sm = _pad2(sm, sm.shape[0], nwp, 0.0)
        sk = np.where(sk > 0, nwp, 0).astype(np.int64)
        nzu, nwu = nzp, nwp
    R32 = np.minimum(R, 1e30).astype(np.float32)
    C32 = np.minimum(C, 1e30).astype(np.float32)  # f32 sums stay finite (0 * inf = nan)
    path = {"float32": 0, "float64": 1, "log": 2}[precision]
    t_prep = time.perf_counter() - t0

    pairs = np.argwhere(problem.solve)
    n_solved = len(pairs)
    if n_solved:
        d = dxy[pairs[:, 0], pairs[:, 1]]
        rho = 2.0 ** (1.0 / levels)
        dmin = d.min()
        lev = np.floor(np.log(d / dmin) / np.log(rho) + 1e-12).astype(np.int64)
        order = np.lexsort((pairs[:, 1], pairs[:, 0], lev))
        pairs, lev = pairs[order], lev[order]
        bounds = np.flatnonzero(np.diff(lev)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [n_solved]])
        n_stages = 2 if eps_scaling and eps_scaling > 1 else 1
        from numba import get_num_threads

        nthr = get_num_threads()
        # level groups: the stage kernels of a group of levels are computed at once (memory
        # bounded by _KERNEL_BYTES) and all their connections go to one parallel call
        batched = uniform and path <= 1
        per_level = (n_stages * 2 + 1) * max(nzu * nwu, 1) * 4  # float32 kernels, transposes
        lv_per_group = max(1, _KERNEL_BYTES // per_level)
        n_lv = len(starts)
        pbar = None
        if progress:
            from tqdm.auto import tqdm

            pbar = tqdm(total=n_solved, desc=f"W1 sinkhorn {problem.name}", leave=False)
        tol_st = np.array([max(tol, _COARSE_TOL), tol][2 - n_stages:])
        CT = np.ascontiguousarray(C32.T)
        CT64 = np.ascontiguousarray(C.T)
        czyT = np.ascontiguousarray(czy_u.T)
        for g0 in range(0, n_lv, lv_per_group):
            g1 = min(n_lv, g0 + lv_per_group)
            ng = g1 - g0
            e_fine = eps * dmin * rho ** lev[starts[g0:g1]].astype(np.float64)
            eps_lv = np.stack([eps_scaling * e_fine, e_fine], axis=1)[:, 2 - n_stages:].copy()
            if path == 0:  # all stage kernels of the group in a few vectorised numpy calls
                Ks = np.multiply(R32[None, None], (-1.0 / eps_lv).astype(np.float32)[:, :, None,
                                                                                   None])
                np.exp(Ks, out=Ks)
                Ks[Ks < _F32_FLOOR] = 0.0
                KsT = np.ascontiguousarray(Ks.transpose(0, 1, 3, 2))
                if batched:
                    KCT = np.ascontiguousarray((Ks[:, n_stages - 1] * C32[None]).transpose(0, 2, 1))
                else:
                    KCT = np.empty((ng, 0, 0), np.float32)
            else:
                Ks = np.empty((ng, n_stages, 0, 0), np.float32)
                KsT = np.empty((ng, n_stages, 0, 0), np.float32)
                KCT = np.empty((ng, 0, 0), np.float32)
            s, e = starts[g0], ends[g1 - 1]
            cx = np.ascontiguousarray(pairs[s:e, 0])
            cy = np.ascontiguousarray(pairs[s:e, 1])
            # chunks: contiguous runs of one level (sorted by x, then y): batches of at most
            # `batch` connections (uniform supports), else enough chunks to balance the
            # threads; at most chunk_rows distinct x rows per chunk if given
            target = batch if batched else max(1, (e - s) // (8 * nthr))
            lv_loc = np.repeat(np.arange(ng), ends[g0:g1] - starts[g0:g1])
            first = np.r_[True, lv_loc[1:] != lv_loc[:-1]]
            pos = np.arange(e - s) - np.maximum.accumulate(np.where(first, np.arange(e - s), 0))
            cut = first | (pos % target == 0)
            if chunk_rows:
                newrow = np.r_[True, cx[1:] != cx[:-1]] | first
                row_id = np.cumsum(newrow) - 1
                row_in_lv = row_id - np.maximum.accumulate(np.where(first, row_id, 0))
                cut |= newrow & (row_in_lv % chunk_rows == 0)
            ptr = np.r_[np.flatnonzero(cut), e - s]
            clv = lv_loc[ptr[:-1]]
            chunk_ptr = np.asarray(ptr, dtype=np.int64)
            chunk_lv = np.asarray(clv, dtype=np.int64)
            args = (Ks, KsT, KCT, CT, C, C32, R, CT64, fz, gw, eps_lv, tol_st, uniform, cx, cy,
                    chunk_ptr, chunk_lv, ploc, pm, pk, sloc, sm, sk, czy_u, czyT, cxw_u, dxy, al,
                    int(max_iter), float(omega), path, out, iters, status)
            with _one_blas_thread() if batched else contextlib.nullcontext():
                _run_parallel(min(nthr, len(chunk_ptr) - 1), args)
            if pbar is not None:
                pbar.update(e - s)
        if pbar is not None:
            pbar.close()
    sel = problem.solve
    st = status[sel]
    its = iters[sel]
    last_stats.clear()
    last_stats.update(
        backend="sinkhorn", name=problem.name, n_solved=int(n_solved),
        uniform_support=uniform,
        k_z=int(k_z_union if uniform else (pk.max() if pk.size else 0)),
        k_w=int(k_w_union if uniform else (sk.max() if sk.size else 0)),
        iterations_mean=float(its.mean()) if its.size else 0.0,
        iterations_max=int(its.max()) if its.size else 0,
        n_not_converged=int(np.isin(st, (_MAXITER, _F64 + _MAXITER, _LOG + _MAXITER)).sum()),
        n_float64=int(((st == _F64) | (st == _F64 + _MAXITER)).sum()),
        n_log_domain=int((st >= _LOG).sum()),
        seconds_prepare=t_prep, seconds=time.perf_counter() - t0,
        eps=eps, tol=tol, max_iter=int(max_iter), omega=omega, eps_scaling=eps_scaling,
        levels=levels, mass_tol=mass_tol,
    )
    return out


def solve_w1(
    problem: LayerPairProblem,
    backend: str = "sinkhorn",
    *,
    eps: float = DEFAULTS["eps"],
    tol: float = DEFAULTS["tol"],
    max_iter: int = DEFAULTS["max_iter"],
    chunk_rows: int | None = None,
    progress: bool = False,
    omega: float = DEFAULTS["omega"],
    eps_scaling: float = DEFAULTS["eps_scaling"],
    levels: int = DEFAULTS["levels"],
    mass_tol: float = DEFAULTS["mass_tol"],
    batch: int = DEFAULTS["batch"],
    precision: str = "float32",
    validate: bool = True,
) -> np.ndarray:
    r"""W1(m_x, m_y) of every connection of a layer pair, as an ``(n_x, n_y)`` float64 array.

    The ``"sinkhorn"`` backend (see the module docstring) returns, for every connection, the
    cost of a feasible transport plan: an upper bound of W1 (so kappa is biased low), within
    ``eps*log(n*m) + 2*tol*max(M)/d`` of it relative to d. It uses
    ``numba.get_num_threads()`` threads (``numba.set_num_threads`` / ``NUMBA_NUM_THREADS``).
    Defaults (:data:`DEFAULTS`): eps 0.02, tol 1e-2, max_iter 2000, omega 1.5, eps_scaling 3,
    levels 4, mass_tol 1e-4, batch 32, float32 -- on random dense 64-256-channel layers (paper
    measures, alpha 0.5): max |delta kappa| ~0.015, Spearman > 0.9999, >= 50x the emd2 loop.
    For alpha = 0.9 the same W1 error is 10x larger in kappa: use eps ~0.005, tol ~3e-3 and
    ``precision="float64"`` (max |delta kappa| ~0.01, ~20x the emd2 loop).

    Parameters
    ----------
    problem : LayerPairProblem
        The layer pair (see :mod:`tp_curvature.problem`).
    backend : {"sinkhorn", "exact", "pot-sinkhorn"}
        ``"sinkhorn"``: the Numba engine (default); ``"exact"``: ``ot.emd2`` loop (reference);
        ``"pot-sinkhorn"``: ``ot.sinkhorn2`` loop.
    eps : float
        Entropic regularisation *relative to d(x, y)* (the cost is divided by d(x, y)).
        Bias bound: ``0 <= W1_eps/d - W1/d <= eps*log(n*m) + 2*tol*max(M)/d``.
    tol : float
        Stop when the L1 error of the violated marginal is ``<= tol`` (masses sum to 1).
    max_iter : int
        Safety cap on iterations per problem and eps stage; problems that hit it are counted
        in ``last_stats["n_not_converged"]`` (their value is still a feasible-plan cost >= W1).
    chunk_rows : int, optional
        At most this many x rows per work chunk (finer load balancing / progress).
    progress : bool
        Show a tqdm bar (over eps levels for ``"sinkhorn"``, connections otherwise).
    omega : float
        Over-relaxation factor of the Sinkhorn updates, in [1, 2) (1 = plain Sinkhorn).
    eps_scaling : float
        First solve at ``eps_scaling * eps`` (tolerance ``max(tol, 0.1)``); ``<= 1`` disables.
        An integer keeps the stage change cheap (powers instead of ``pow``).
    levels : int
        eps levels per factor 2 of d(x, y) (bucketing; the eps used is in
        ``[eps / 2**(1/levels), eps]`` relative to d).
    mass_tol : float
        Drop the atoms whose largest mass over all rows sums to ``<= mass_tol`` (renormalise
        the rest; W1 moves by at most ``2 (1-alpha) mass_tol max(M)``); ``0`` keeps all.
    batch : int
        Connections solved together by one thread when all rows share their support: the
        shared block enters each iteration as one matrix product (BLAS) over the problems
        still running; each problem keeps its own early stop.
    precision : {"float32", "float64", "log"}
        ``"float32"``: kernel-domain iterations in float32 on the shared per-level kernels, with
        automatic fallback per problem to float64 (scalings out of the safe range) and then to
        the log domain (overflow). ``"float64"`` starts at the float64 step (batched too, ~1.5x
        slower; faster than float32 when most problems fall back, e.g. ``eps <= 0.005``);
        ``"log"`` solves every problem alone in the log domain (slow; for checks).
    validate : bool
        Call ``problem.validate()`` first.

    Returns
    -------
    W : ndarray (n_x, n_y) float64
        W1 where ``problem.solve``, NaN elsewhere. ``last_stats`` holds diagnostics.
    """
    if validate:
        problem.validate()
    t0 = time.perf_counter()
    if backend == "sinkhorn":
        if not (1.0 <= omega < 2.0):
            raise ValueError(f"omega must be in [1, 2), got {omega}")
        if eps <= 0 or tol <= 0:
            raise ValueError("eps and tol must be > 0")
        if precision not in ("float32", "float64", "log"):
            raise ValueError(f"precision must be float32, float64 or log, got {precision!r}")
        return _sinkhorn_backend(problem, eps, tol, max_iter, omega, eps_scaling, levels,
                                 mass_tol, int(batch), chunk_rows, progress, precision)
    if backend in ("exact", "pot-sinkhorn"):
        out, n_warn = _loop_backend(problem, backend, eps, tol, max_iter, progress)
        last_stats.clear()
        last_stats.update(backend=backend, name=problem.name,
                          n_solved=int(problem.solve.sum()), n_warnings=n_warn,
                          seconds=time.perf_counter() - t0, eps=eps, tol=tol)
        return out
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
