r"""Single-problem drivers: kernel-domain Sinkhorn over the eps stages, with fallbacks.

:func:`solve_one` solves one connection: float32 kernel-domain Sinkhorn on the shared stage
kernels (gathered onto the problem's atoms when the supports are ragged); if its scalings
leave the safe range, float64 kernel-domain Sinkhorn on the problem's own kernel
:math:`e^{-R/\varepsilon}` of the reduced costs; if that overflows too, the log domain
(:func:`~._log_domain.log_domain`). The returned value is always the cost of a rounded,
feasible plan.
"""
from __future__ import annotations

import math

import numpy as np

from ._bundles import Augmented, Frame, Gather, Work
from ._log_domain import log_domain
from ._primitives import (F32_FLOOR, F32_UVMAX, F64, LOG, MAXITER, OK, OVERFLOW, aug_rmatvec,
                          c_transform, closed_form, jit, pow_inplace, relax, rounded_cost,
                          stage_power, uv_max_product)


@jit
def _checked_relax(u, mass, s, omega, half, big):
    """Update of one scaling with marginal ``mass`` and product ``s`` (= (K v)_i): relaxed
    towards ``mass / s`` if ``0 < s < big``, 0 for a zero mass, else (u, False): overflow."""
    if s > 0.0 and s < big:
        return relax(u, mass / s, omega, half), True
    if mass == 0.0:
        return 0.0 * u, True
    return u, False


@jit
def sinkhorn_kernel(K, BT, a, b, u, v, ktu, kv, tol, max_iter, omega, half, big):
    """Kernel-domain Sinkhorn on the augmented kernel ``K`` (:class:`~._bundles.Augmented`).

    ``K.block`` is (kz, kw) and ``BT`` its transpose (both contiguous: both products are axpy
    loops); ``a`` has kz+1 entries (last: x), ``b`` kw+1 (last: y); ``u``/``v`` are the
    scalings (in and out, dtype of the block), ``ktu`` / ``kv`` workspaces. Over-relaxed
    updates (:func:`~._primitives.relax`); stop when the L1 error of the column marginal (the
    violated one) is ``<= tol``. Returns (iterations, status).
    """
    B = K.block
    kzy = K.col
    kxw = K.row
    kxy = K.corner
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
            ui, ok = _checked_relax(u[i], a[i], kv[i], omega, half, big)
            if not ok:
                return it, OVERFLOW
            u[i] = ui
        # ---- K^T u
        aug_rmatvec(K, u, ktu)
        # ---- error of the column marginal (new u, old v), then v update
        err = 0.0
        for j in range(kw + 1):
            t = ktu[j]
            err += abs(float(v[j]) * float(t) - float(b[j]))
            vj, ok = _checked_relax(v[j], b[j], t, omega, half, big)
            if not ok:
                return it, OVERFLOW
            v[j] = vj
        if not (err < 1e300):
            return it, OVERFLOW
        if err <= tol:
            return it, OK
    return max_iter, MAXITER


@jit
def rowcol_kernels(e, fr, kxw, kzy, floor):
    """Kernel row of x / column of y at eps ``e`` from the frame ``fr`` (computed in float64,
    stored in kxw's dtype, floored); returns the corner :math:`e^{-(d - f_x - g_y)/e}`."""
    cw = fr.cw
    gwl = fr.gw
    cz = fr.cz
    fzl = fr.fz
    fx = fr.fx
    gy = fr.gy
    for j in range(cw.shape[0]):
        t = math.exp(-(cw[j] - fx - gwl[j]) / e)
        kxw[j] = t if t >= floor else 0.0
    for i in range(cz.shape[0]):
        t = math.exp(-(cz[i] - fzl[i] - gy) / e)
        kzy[i] = t if t >= floor else 0.0
    return math.exp(-(fr.d - fx - gy) / e)


@jit
def run_stages(Ks, KsT, gat, cfg, a, b, fr, wk, half, big, floor):
    """Run the eps stages of one problem; stage ``s`` uses the kernel ``Ks[s]`` (``gat.on``:
    ``Ks[s][zi][:, wi]``, copied into the workspace). Between stages the scalings and the row
    / column kernels become their power ``eps[s-1] / eps[s]``. Returns (iterations, status,
    block of the last stage, corner kernel)."""
    zi = gat.zi
    wi = gat.wi
    kz = zi.shape[0]
    kw = wi.shape[0]
    u = wk.u
    v = wk.v
    kxw = wk.kxw
    kzy = wk.kzy
    eps_st = cfg.eps
    total = 0
    status = OK
    B = Ks[0]
    BT = KsT[0]
    kxy = 1.0
    S = eps_st.shape[0]
    for s in range(S):
        e = eps_st[s]
        if gat.on:
            B = gat.Bws[: kz * kw].reshape((kz, kw))
            BT = gat.BTws[: kz * kw].reshape((kw, kz))
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
        if s > 0:
            # next stage: u = exp(df / e) -> u ** p, row/column kernels -> k ** p
            p, ip = stage_power(eps_st[s - 1], e)
            pow_inplace(u, kz + 1, p, ip, 0.0)
            pow_inplace(v, kw + 1, p, ip, 0.0)
            pow_inplace(kxw, kw, p, ip, floor)
            pow_inplace(kzy, kz, p, ip, floor)
            kxy = kxy ** p
        else:
            kxy = rowcol_kernels(e, fr, kxw, kzy, floor)
        its, status = sinkhorn_kernel(Augmented(B, kzy, kxw, kxw.dtype.type(kxy)), BT, a, b, u,
                                      v, wk.ktu, wk.kv, cfg.tol[s], cfg.max_iter, cfg.omega,
                                      half, big)
        total += its
        if status == OVERFLOW:
            break
    return total, status, B, kxy


@jit
def _gather_side(loc, mass, k, cost, pot, alpha, idx, w, c, p, w32, c32):
    """One side of a ragged problem on its ``k`` atoms ``loc[:k]``: masses ``(1-alpha) mass``
    then alpha (x / y), the costs to y / from x, the shared potentials (float64 and float32)."""
    for i in range(k):
        r = loc[i]
        idx[i] = r
        w[i] = (1.0 - alpha) * mass[i]
        c[i] = cost[r]
        p[i] = pot[r]
        w32[i] = w[i]
        c32[i] = c[i]
    w[k] = alpha
    w32[k] = alpha


@jit
def solve_one(x, y, kern, costs, meas, cfg, ws32, ws64, path):
    """Solve connection (x, y); returns (W1, iterations, status).

    ``kern`` holds the level's float32 stage kernels of the shared block, ``ws32`` / ``ws64``
    the workspaces. ``path`` 0 starts at float32, 1 at float64, 2 at the log domain.
    """
    (Bws, BTws, u, v, ktu, kv, kxw, kzy, wa32, wb32, cz32, cw32, rx32, cy32, ec32, Cws32) = ws32
    (wa, wb, cz, cw, fzl, gwl, zi, wi) = ws64
    alpha = cfg.alpha
    d = costs.dxy[x, y]
    kz = meas.pk[x]
    kw = meas.sk[y]
    if kz == 0 or kw == 0:
        return closed_form(x, y, meas, costs.czy, costs.cxw, d, alpha), 0, OK
    # ---- supports, masses, costs of row x / column y, shared potentials on them
    _gather_side(meas.ploc[x], meas.pm[x], kz, costs.czyT[y], costs.fz, alpha, zi, wa, cz, fzl,
                 wa32, cz32)
    _gather_side(meas.sloc[y], meas.sm[y], kw, costs.cxw[x], costs.gw, alpha, wi, wb, cw, gwl,
                 wb32, cw32)
    fx, gy = c_transform(cz[:kz], fzl[:kz], cw[:kw], gwl[:kw], d)
    fr = Frame(cz[:kz], fzl[:kz], cw[:kw], gwl[:kw], d, fx, gy)
    zik = zi[:kz]
    wik = wi[:kw]
    C = costs.C
    S = cfg.eps.shape[0]
    total = 0
    # cost block (float32)
    if cfg.uniform:
        Cb32 = costs.C32
    else:
        Cb32 = Cws32[: kz * kw].reshape((kz, kw))
        for i in range(kz):
            for j in range(kw):
                Cb32[i, j] = C[zik[i], wik[j]]
    # ---- float32 on the shared kernels
    u[: kz + 1] = 1.0
    v[: kw + 1] = 1.0
    u_ = u[: kz + 1]
    v_ = v[: kw + 1]
    status = OVERFLOW
    if path == 0:
        its, status, B, kxy = run_stages(
            kern.Ks, kern.KsT, Gather(not cfg.uniform, zik, wik, Bws, BTws), cfg,
            wa32[: kz + 1], wb32[: kw + 1], fr, Work(u_, v_, kxw[:kw], kzy[:kz], ktu, kv),
            np.float32(0.5), np.float32(1e37), np.float32(F32_FLOOR))
        total = its
    if status != OVERFLOW:
        if uv_max_product(u_, kz + 1, 0.0, v_, kw + 1, 0.0) <= F32_UVMAX:
            w1 = rounded_cost(Augmented(B, kzy[:kz], kxw[:kw], np.float32(kxy)),
                              Augmented(Cb32, cz32[:kz], cw32[:kw], np.float32(d)),
                              wa32[: kz + 1], wb32[: kw + 1], u_, v_, rx32, cy32, ec32)
            if math.isfinite(w1):
                return w1, total, status
    # ---- float64 on this problem's own kernel (no floor)
    Cb = np.empty((kz, kw))
    Rb = np.empty((kz, kw))  # reduced costs (>= 0)
    Rc = np.empty(kz)
    Rr = np.empty(kw)
    for i in range(kz):
        for j in range(kw):
            Cb[i, j] = C[zik[i], wik[j]]
            Rb[i, j] = max(Cb[i, j] - fzl[i] - gwl[j], 0.0)
        Rc[i] = cz[i] - fzl[i] - gy
    for j in range(kw):
        Rr[j] = cw[j] - fx - gwl[j]
    Mred = Augmented(Rb, Rc, Rr, d - fx - gy)
    if path <= 1:
        K64 = np.empty((S, kz, kw))
        K64T = np.empty((S, kw, kz))
        for s in range(S):
            for i in range(kz):
                for j in range(kw):
                    t = math.exp(-Rb[i, j] / cfg.eps[s])
                    K64[s, i, j] = t
                    K64T[s, j, i] = t
        u64 = np.ones(kz + 1)
        v64 = np.ones(kw + 1)
        kxw64 = np.empty(kw)
        kzy64 = np.empty(kz)
        gat64 = Gather(kz < 0, np.arange(kz), np.arange(kw), K64[0].ravel(), K64T[0].ravel())
        its, status, B64, kxy = run_stages(
            K64, K64T, gat64, cfg, wa[: kz + 1], wb[: kw + 1], fr,
            Work(u64, v64, kxw64, kzy64, np.empty(kw + 1), np.empty(kz + 1)), 0.5, 1e300, 0.0)
        total += its
        if status != OVERFLOW:
            w1 = rounded_cost(Augmented(B64, kzy64, kxw64, kxy), Augmented(Cb, cz[:kz], cw[:kw], d),
                              wa[: kz + 1], wb[: kw + 1], u64, v64, np.empty(kz + 1),
                              np.empty(kw + 1), np.empty(kw + 1))
            if math.isfinite(w1):
                return w1, total, F64 + status
    # ---- log domain on the reduced costs
    cost_r, its, st = log_domain(Mred, wa[: kz + 1], wb[: kw + 1], cfg.eps, cfg.tol,
                                 cfg.max_iter, cfg.omega)
    # undo the potential shift: <T, M_red> = <T, M> - <a, f> - <b, g> for T in U(a, b)
    shift = wa[kz] * fx + wb[kw] * gy
    for i in range(kz):
        shift += wa[i] * fzl[i]
    for j in range(kw):
        shift += wb[j] * gwl[j]
    return cost_r + shift, total + its, LOG + st
