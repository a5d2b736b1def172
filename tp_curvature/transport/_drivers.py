r"""Single-problem drivers: kernel-domain Sinkhorn over the eps stages, with fallbacks.

:func:`solve_each` solves connections one at a time: a connection whose bypass plan is
optimal takes its cost (:func:`bypassed`, no iterations); the others float32 kernel-domain
Sinkhorn on the shared stage kernels (gathered onto the problem's atoms when the supports are
ragged); if its scalings leave the safe range, it absorbs them into its own potentials and
kernel and goes on (:func:`_absorb`, ragged problems, at most ``MAX_ABSORB`` times), then
float64 kernel-domain Sinkhorn on the problem's own kernel :math:`e^{-R/\varepsilon}` of the
reduced costs; if that overflows too, the log domain
(:func:`~._log_domain.log_domain`; both in :func:`_fallback`). With ``kappa_tol``, a float32
or float64 result whose certified gap is loose continues for one finer stage from its own
plan (:func:`_finer`). The returned value is always the cost of a rounded, feasible plan.
"""
from __future__ import annotations

import math

import numpy as np

from ._bundles import Augmented, Conn, Gather, Work
from ._log_domain import log_domain
from ._primitives import (BYPASS, F32_FLOOR, F64, LOG, MAXITER, OK, OVERFLOW, aug_matvec,
                          aug_rmatvec, bypass, c_transform, closed_form, cols_from_rows,
                          dual_bound, expneg, expneg64, jit, mass_sum, pow_inplace, relax,
                          rounded_cost, rows_from_cols, scaled_potentials, stage_power,
                          uv_max_product)


#: The in-kernel refinement (:func:`_finer`) runs one more stage at this fraction of the last
#: eps, to the last tolerance (its kernel is the plan to the power 1 / FINER = 4: :func:`_pow4`).
FINER = 0.25
#: A gathered problem whose float32 scalings leave their range absorbs them into its
#: potentials (:func:`_absorb`) at most this many times before the float64 fallback.
MAX_ABSORB = 2
#: :func:`sinkhorn_kernel`'s overflow in the column update (the row scalings are intact)
OVERFLOW_U_KEPT = 9
#: A connection whose bypass plan is within this of its dual bound (in kappa) takes the plan
#: as its solution (:func:`bypassed`): optimal up to the rounding of the path lengths (on
#: ViT-B/16 and ResNet-50 layers the gaps are 0, a rounding, or above 1e-3).
BYPASS_GAP = 1e-9

@jit
def _relax_all(u, mass, s, n, omega, half, big):
    """Update the scalings ``u[:n]`` with marginals ``mass`` and products ``s`` (= K v):
    relaxed towards ``mass / s`` where ``0 < s < big``, 0 elsewhere. Returns the number of
    entries with a positive mass and ``s`` out of that range (overflow if not 0). Branch-free
    (selects), so that the loop vectorises."""
    zero = half - half
    one = zero + 1
    nbad = 0
    for i in range(n):
        si = s[i]
        good = si > zero and si < big
        nbad += (not good) and mass[i] != zero
        t = mass[i] / (si if good else one)
        ui = u[i]
        r = ui + omega * (t - ui)
        h = half * t
        r = r if r > h else h
        u[i] = r if good else zero
    return nbad


@jit
def sinkhorn_kernel(B, kxy, a, b, wk, tol, max_iter, omega, half, big):
    """Kernel-domain Sinkhorn on the augmented kernel ``[[B, wk.kzy], [wk.kxw, kxy]]``.

    ``B`` is (kz, kw), contiguous: ``K v`` is a dot product per row, ``K^T u`` axpy loops over
    the rows (both vectorise; no transposed copy); ``a`` has kz+1 entries (last: x), ``b``
    kw+1 (last: y); ``wk`` holds the scalings ``u``/``v`` (in and out, dtype of B) and
    workspaces (:class:`~._bundles.Work`). Over-relaxed updates (:func:`_relax_all`); stop
    when the L1 error of the column marginal (the violated one) is ``<= tol``. Returns
    (iterations, status); an overflow in the row update returns ``OVERFLOW`` (``v`` is the
    last iteration's), one in the column update ``OVERFLOW_U_KEPT`` (``u`` is intact).
    """
    kzy = wk.kzy
    kxw = wk.kxw
    u = wk.u
    v = wk.v
    ktu = wk.ktu
    kv = wk.kv
    kz, kw = B.shape
    for it in range(1, max_iter + 1):
        # ---- K v (rows z, then x)
        vy = v[kw]
        aug_matvec(B, kzy, vy, v, kv)
        sx = kxy * vy
        for j in range(kw):
            sx += kxw[j] * v[j]
        kv[kz] = sx
        if _relax_all(u, a, kv, kz + 1, omega, half, big):
            return it, OVERFLOW
        # ---- K^T u
        aug_rmatvec(B, kzy, kxw, kxy, u, ktu)
        # ---- error of the column marginal (new u, old v), then v update
        err = 0.0
        for j in range(kw + 1):
            err += abs(float(v[j]) * float(ktu[j]) - float(b[j]))
        if _relax_all(v, b, ktu, kw + 1, omega, half, big):
            return it, OVERFLOW_U_KEPT
        if not (err < 1e300):
            return it, OVERFLOW_U_KEPT
        if err <= tol:
            return it, OK
    return max_iter, MAXITER


@jit
def rowcol_kernels(e, fr, cn, kxw, kzy, floor):
    """Kernel row ``kxw`` of x / column ``kzy`` of y at eps ``e`` from the frame ``fr`` and the
    connection's scalars ``cn`` (float64 arguments, stored in kxw's dtype, floored); returns
    the corner :math:`e^{-(d - f_x - g_y)/e}`. The reduced costs are >= 0 (c-transform
    potentials), so :func:`~._primitives.expneg` applies (vectorised, ~1e-5 relative: the
    kernel only steers the iteration; the returned cost is the rounded plan's and the bound
    holds for any potentials)."""
    cw = fr.cw
    gwl = fr.gw
    cz = fr.cz
    fzl = fr.fz
    fx = cn.fx
    gy = cn.gy
    ie = 1.0 / e
    for j in range(cn.kw):
        t = expneg((cw[j] - fx - gwl[j]) * ie)
        kxw[j] = t if t >= floor else 0.0
    for i in range(cn.kz):
        t = expneg((cz[i] - fzl[i] - gy) * ie)
        kzy[i] = t if t >= floor else 0.0
    return math.exp(-(cn.d - fx - gy) * ie)


@jit
def run_stages(Ks, gat, cfg, cn, a, b, fr, wk, half, big, floor, warm, ab):
    """Run the eps stages of one problem; stage ``s`` uses the kernel ``Ks[s]`` (``gat.on``:
    ``Ks[s][zi][:, wi]``, copied into the workspace). Between stages the scalings and the row
    / column kernels become their power ``eps[s-1] / eps[s]``. ``warm``: ``wk.u`` holds
    scalings of the last stage (a warm start): only the last stage runs, starting from
    ``v = b / K^T u``.

    Gathered problems whose scalings leave the range absorb them (:func:`_absorb`, at most
    ``MAX_ABSORB`` times; ``ab`` = (float64 cost block, two float64 workspaces)): the
    frame's potentials ``fr.fz`` / ``fr.gw`` and x's / y's become the problem's own, the
    block its own kernel, and later stages the power of it. Returns (iterations, status,
    block of the last stage, corner kernel, the connection's scalars (``fx`` / ``gy``
    changed if absorbed), number of absorptions)."""
    zi = gat.zi
    wi = gat.wi
    kz = cn.kz
    kw = cn.kw
    u = wk.u
    v = wk.v
    kxw = wk.kxw
    kzy = wk.kzy
    eps_st = cfg.eps
    total = 0
    status = OK
    B = Ks[0]
    kxy = 1.0
    S = eps_st.shape[0]
    s0 = S - 1 if warm else 0
    n_abs = 0
    for s in range(s0, S):
        e = eps_st[s]
        if gat.on:
            B = gat.Bws[: kz * kw].reshape((kz, kw))
            if n_abs == 0:
                K = Ks[s]
                for i in range(kz):
                    zr = zi[i]
                    for j in range(kw):
                        B[i, j] = K[zr, wi[j]]
        else:
            B = Ks[s]
        if s > s0:
            # next stage: u = exp(df / e) -> u ** p, row/column kernels -> k ** p
            p, ip = stage_power(eps_st[s - 1], e)
            pow_inplace(u, kz + 1, p, ip, 0.0)
            pow_inplace(v, kw + 1, p, ip, 0.0)
            pow_inplace(kxw, kw, p, ip, floor)
            pow_inplace(kzy, kz, p, ip, floor)
            if n_abs:                  # the problem's own kernel (absorbed potentials)
                pow_inplace(gat.Bws, kz * kw, p, ip, floor)
            kxy = kxy ** p
        else:
            kxy = rowcol_kernels(e, fr, cn, kxw, kzy, floor)
            if warm:
                _v_from_u(B, kzy, kxw, kxw.dtype.type(kxy), u, b, v, wk.ktu)
        while True:
            its, status = sinkhorn_kernel(B, kxw.dtype.type(kxy), a, b, wk, cfg.tol[s],
                                          cfg.max_iter, cfg.omega, half, big)
            total += its
            if status == OK or status == MAXITER:
                break
            if not gat.on or n_abs == MAX_ABSORB:
                status = OVERFLOW
                break
            ok, cn, kxy = _absorb(status == OVERFLOW_U_KEPT, B, ab, fr, cn, wk, a, b, e,
                                  floor)
            if not ok:
                status = OVERFLOW
                break
            n_abs += 1
        if status == OVERFLOW:
            break
    return total, status, B, kxy, cn, n_abs


@jit
def _absorb(from_u, B, ab, fr, cn, wk, a, b, e, floor):
    r"""Absorb the scalings of a problem whose iteration left their range into its
    potentials, and rebuild its kernel from its costs (stabilised Sinkhorn, Schmitzer 2019).

    The intact side's scalings become potentials (``from_u``: the rows', :math:`f = f_0 + e
    \log u`; else the columns', :math:`g = g_0 + e \log v`), the other side's their
    c-transform over the augmented cost (``ab[0]`` the float64 block, ``fr`` the x row / y
    column costs; e.g. :math:`g_j = \min_i (M_{ij} - f_i)`), and atoms of the intact side
    left without a potential (no mass, or a zero scaling) the c-transform back. So every
    reduced cost :math:`M - f \oplus g` is >= 0 and each atom of the transformed side has
    one that is 0 (no kernel entry above 1, none of its kernel rows or columns floored to
    0 entirely), and entries that were floored under the old potentials are recomputed.
    (The soft c-transform, the exact Sinkhorn update, was tried: it takes atoms of small mass
    far below 1 and their entries under the float32 floor again.) The potentials replace the
    frame's (``fr.fz``, ``fr.gw``: this problem's copies) and x's / y's; the block ``B``
    (this problem's) and the row / column kernels become :math:`e^{-(M - f \oplus g)/e}`
    (floored), the scalings 1. ``ab[1]``, ``ab[2]``: float64 workspaces (kz+1, kw+1).
    Returns (False, ...) if the intact side has no finite potential, else (True, the
    connection's new scalars, corner kernel)."""
    Cb, f, g = ab
    kz = cn.kz
    kw = cn.kw
    M = Augmented(Cb, fr.cz, fr.cw, cn.d)
    if from_u:
        if not _log_scalings(wk.u, a, fr.fz, cn.fx, e, f, kz):
            return False, cn, 1.0
        cols_from_rows(M, f, g, a)
        for i in range(kz + 1):
            if f[i] == -np.inf:
                f[i] = _hard_min(M, g, i, kw + 1, False)
    else:
        if not _log_scalings(wk.v, b, fr.gw, cn.gy, e, g, kw):
            return False, cn, 1.0
        rows_from_cols(M, g, f)
        for j in range(kw + 1):
            if g[j] == -np.inf:
                g[j] = _hard_min(M, f, j, kz + 1, True)
    for i in range(kz):
        fr.fz[i] = f[i]
    for j in range(kw):
        fr.gw[j] = g[j]
    cn = Conn(kz, kw, cn.d, f[kz], g[kw])
    ie = 1.0 / e
    for i in range(kz):
        fi = f[i]
        for j in range(kw):
            t = expneg((Cb[i, j] - fi - g[j]) * ie)
            B[i, j] = t if t >= floor else 0.0
    kxy = rowcol_kernels(e, fr, cn, wk.kxw, wk.kzy, floor)
    wk.u[: kz + 1] = 1.0
    wk.v[: kw + 1] = 1.0
    return True, cn, kxy


@jit
def _col_bound(M, a, b, v, fr, gy, e, ws):
    r"""Weak-duality bound of :math:`W_1` from the column scalings ``v`` (the mirror of
    :func:`~._primitives.dual_bound`, which starts from the rows): :math:`g = g_0 + e \log v`
    on the positive-mass columns (``fr.gw``, ``gy``: the frame's potentials of the kernel),
    :math:`f' = g^c`, :math:`g' = f'^c`, and :math:`LB = \sum_i a_i f'_i + \sum_j b_j g'_j`
    over the positive-mass atoms (``M``: the augmented float64 cost; ``ws``: workspaces
    (kw+1, kz+1)). The column update comes last in each iteration, so the column potentials
    are the fresher: on ViT-B/16 and ResNet-50 layers their bound is the closer one in most
    problems (docs/performance.md, "The column bound"). Returns ``-inf`` if no finite bound."""
    g, f = ws
    if not _log_scalings(v, b, fr.gw, gy, e, g, M.block.shape[1]):
        return -np.inf
    rows_from_cols(M, g, f)
    lb = mass_sum(a, f)
    if lb == -np.inf:
        return lb
    cols_from_rows(M, f, g, a)
    return lb + mass_sum(b, g)


@jit
def _lower_bound(M, a, b, f, v, fr, gy, e, loose, ws):
    """The certificate's bound of a solved problem: :func:`~._primitives.dual_bound` from the
    row potentials ``f`` and, if it leaves the gap above ``loose`` (``loose[0] - lb >
    loose[1]``: the plan's cost and ``finer * d``), also :func:`_col_bound` from the column
    scalings ``v``; the larger. ``ws``: workspaces (kw+1, kz+1), shared by both."""
    lb = dual_bound(M.block, M.col, M.row, M.corner, a, b, f, ws)
    if loose[0] - lb > loose[1]:
        lb = max(lb, _col_bound(M, a, b, v, fr, gy, e, ws))
    return lb


@jit
def _log_scalings(sc, mass, base, last, e, out, k):
    """``out[i] = base[i] + e log sc[i]`` (``last`` for ``i == k``) where the mass is positive
    and the scaling in (0, inf), else ``-inf``; False if no entry is finite."""
    any_finite = False
    for i in range(k + 1):
        t = float(sc[i])
        ok = mass[i] > 0.0 and 0.0 < t < np.inf
        out[i] = (base[i] if i < k else last) + e * math.log(t) if ok else -np.inf
        any_finite = any_finite or ok
    return any_finite


@jit
def _hard_min(M, pot, i, n_other, cols):
    r""":math:`\min_j (M_{ij} - p_j)` for one row ``i`` of the augmented cost, or one column if
    ``cols`` (``n_other`` entries of the other side's potentials ``pot``)."""
    kz, kw = M.block.shape
    m = np.inf
    for j in range(n_other):
        r, c = (j, i) if cols else (i, j)
        if r < kz:
            t = M.block[r, c] if c < kw else M.col[r]
        else:
            t = M.row[c] if c < kw else M.corner
        t -= pot[j]
        m = t if t < m else m
    return m


@jit
def _v_from_u(B, kzy, kxw, kxy, u, b, v, ktu):
    """``v = b / K^T u`` (0 where ``K^T u`` is 0), the column half-step of a warm start."""
    aug_rmatvec(B, kzy, kxw, kxy, u, ktu)
    for j in range(B.shape[1] + 1):
        t = ktu[j]
        v[j] = b[j] / t if t > 0.0 else b[j] - b[j]


@jit
def _warm_u(u, uprev, kz, fx_prev, fx, e):
    """Scalings of the previous connection out of the same x as a start: the z entries are
    relative to the shared potentials (the same), x's to its c-transform potential ``fx``,
    which depends on y: ``u_x = u'_x exp((fx' - fx) / e)``. False if that leaves the safe
    range (then a cold start)."""
    t = (fx_prev - fx) / e
    if not (abs(t) < 20.0) or not (uprev[kz] > 0.0):
        return False
    for i in range(kz):
        u[i] = uprev[i]
    u[kz] = uprev[kz] * math.exp(t)
    return True


@jit
def _gather_side(loc, mass, row, k, cost, other, pot, alpha, idx, w, c, p, w32, c32):
    """One side of a ragged problem: the ``k`` atoms ``loc[row, :k]``, masses
    ``(1-alpha) mass[row]`` then alpha (x / y), costs ``cost[other, atom]`` (to y / from x) and
    the shared potentials, in float64 and float32. (Indices, not row views: no refcounting.)"""
    for i in range(k):
        r = loc[row, i]
        idx[i] = r
        w[i] = (1.0 - alpha) * mass[row, i]
        c[i] = cost[other, r]
        p[i] = pot[r]
        w32[i] = w[i]
        c32[i] = c[i]
    w[k] = alpha
    w32[k] = alpha


@jit
def bypassed(C, meas, x, y, cz, cw, d, alpha, outs):
    """Write the bypass plan's cost as connection (x, y)'s W1 if it is optimal up to rounding
    (:func:`~._primitives.bypass`: its bound within ``BYPASS_GAP`` of kappa); returns whether
    it did. ``C``: the shared cost block; ``cz`` / ``cw``: the costs to y / from x of x's and
    y's atoms (``meas``), in their order."""
    kz = meas.pk[x]
    kw = meas.sk[y]
    gap = BYPASS_GAP * d
    u, lb = bypass(C, meas.ploc[x, :kz], meas.sloc[y, :kw], cz, cw, meas.pm[x, :kz],
                   meas.sm[y, :kw], d, alpha, d + gap)
    if not u - lb <= (1.0 - alpha) * gap:
        return False
    out, iters, status, lower = outs
    out[x, y] = u
    lower[x, y] = lb
    iters[x, y] = 0
    status[x, y] = BYPASS
    return True


@jit
def solve_each(xs, ys, kern, costs, meas, cfg, wk, gat, fr, ws, path, outs):
    """Solve the connections (xs[k], ys[k]) one at a time; writes ``outs`` (W1, iterations,
    status, weak-duality lower bound).

    ``kern`` holds the level's float32 stage kernels of the shared block; ``wk``, ``gat``,
    ``fr``, ``ws`` are the chunk's workspaces (:mod:`._bundles`). Per problem: float32
    kernel-domain Sinkhorn on the shared kernels (gathered onto its atoms when ragged); if its
    scalings leave the safe range, float64 on its own kernel; if that overflows, the log
    domain. ``path`` 0 starts at float32, 1 at float64, 2 at the log domain.
    """
    out, iters, status_out, lower = outs
    fpot = np.empty(meas.ploc.shape[1] + 1)  # certificate workspaces
    gws = np.empty(meas.sloc.shape[1] + 1)
    fcol = np.empty_like(fpot)
    alpha = cfg.alpha
    uniform = cfg.uniform
    eps_st = cfg.eps
    S = eps_st.shape[0]
    Ks = kern.Ks
    C = costs.C
    C32 = costs.C32
    czy = costs.czy
    czyT = costs.czyT
    cxw = costs.cxw
    dxy = costs.dxy
    fz = costs.fz
    gw = costs.gw
    ploc, pm, pk, sloc, sm, sk = meas
    zi = gat.zi
    wi = gat.wi
    cz = fr.cz
    cw = fr.cw
    fzl = fr.fz
    gwl = fr.gw
    u = wk.u
    v = wk.v
    wa, wb, wa32, wb32, cz32, cw32, rx32, cy32, ec32, Cws32, Cws64 = ws
    uprev = np.empty_like(u)
    prev_x = -1
    prev_fx = 0.0
    for k in range(xs.shape[0]):
        x = xs[k]
        y = ys[k]
        d = dxy[x, y]
        kz = pk[x]
        kw = sk[y]
        if kz == 0 or kw == 0:
            out[x, y] = closed_form(x, y, meas, czy, cxw, d, alpha)
            lower[x, y] = out[x, y]
            iters[x, y] = 0
            status_out[x, y] = OK
            continue
        # ---- supports, masses, costs of row x / column y, shared potentials on them
        _gather_side(ploc, pm, x, kz, czyT, y, fz, alpha, zi, wa, cz, fzl, wa32, cz32)
        _gather_side(sloc, sm, y, kw, cxw, x, gw, alpha, wi, wb, cw, gwl, wb32, cw32)
        if cfg.bypass and bypassed(C, meas, x, y, cz, cw, d, alpha, outs):
            continue
        fx, gy = c_transform(cz, fzl, kz, cw, gwl, kw, d)
        cn = Conn(kz, kw, d, fx, gy)
        total = 0
        # cost block, float64 (certificate) and float32 (rounding): gathered once
        if uniform:
            Cb = C
            Cb32 = C32
        else:
            Cb = Cws64[: kz * kw].reshape((kz, kw))
            Cb32 = Cws32[: kz * kw].reshape((kz, kw))
            for i in range(kz):
                zr = zi[i]
                for j in range(kw):
                    c = C[zr, wi[j]]
                    Cb[i, j] = c
                    Cb32[i, j] = c
        # ---- float32 on the shared kernels (warm: from the previous connection out of x)
        warm = cfg.warm and x == prev_x and _warm_u(u, uprev, kz, prev_fx, fx, eps_st[S - 1])
        if not warm:
            u[: kz + 1] = 1.0
        v[: kw + 1] = 1.0
        status = OVERFLOW
        prev_x = -1
        if path == 0:
            its, status, B, kxy, cn, n_abs = run_stages(
                Ks, gat, cfg, cn, wa32[: kz + 1], wb32[: kw + 1], fr, wk, np.float32(0.5),
                np.float32(1e37), np.float32(F32_FLOOR), warm, (Cb, fpot, gws))
            total = its
            if status != OVERFLOW and uv_max_product(u, kz + 1, 0.0, v, kw + 1, 0.0) <= cfg.uvmax:
                if n_abs == 0:          # (absorbed scalings belong to its own potentials)
                    for i in range(kz + 1):
                        uprev[i] = u[i]
                    prev_x = x
                    prev_fx = fx
                w1 = rounded_cost(Augmented(B, wk.kzy, wk.kxw, np.float32(kxy)),
                                  Augmented(Cb32, cz32, cw32, np.float32(d)), wa32[: kz + 1],
                                  wb32[: kw + 1], u, v, rx32, cy32, ec32)
                if math.isfinite(w1):
                    out[x, y] = w1
                    iters[x, y] = total
                    status_out[x, y] = status
                    scaled_potentials(fpot, fzl, cn.fx, u, u[kz], kz, eps_st[S - 1])
                    lb = _lower_bound(Augmented(Cb, cz, cw, d), wa[: kz + 1], wb[: kw + 1],
                                      fpot, v, fr, cn.gy, eps_st[S - 1], (w1, cfg.finer * d),
                                      (gws, fcol))
                    lower[x, y] = lb
                    if gat.on and w1 - lb > cfg.finer * d:      # B: this problem's copy
                        its, w1f, lbf = _finer(
                            B, kxy, Augmented(Cb32, cz32, cw32, np.float32(d)), wa32[: kz + 1],
                            wb32[: kw + 1], (rx32, cy32, ec32), np.float32(F32_FLOOR),
                            np.float32(1e37), cn, wk, cfg, Cb, fr, wa[: kz + 1],
                            wb[: kw + 1], fpot, (gws, fcol), FINER * eps_st[S - 1])
                        out[x, y] = min(w1, w1f)
                        lower[x, y] = max(lb, lbf)
                        iters[x, y] = total + its
                    continue
        w1, lb, its, st = _fallback(Cb, eps_st, cfg, cn, fr, wa, wb, path)
        out[x, y] = w1
        lower[x, y] = lb
        iters[x, y] = total + its
        status_out[x, y] = st
    return 0


@jit
def _finer(B, kxy, cost, a, b, rws, floor, big, cn, wk, cfg, Cb, fr, wa, wb, fpot, ws, ef):
    """One more stage at the finer eps ``ef`` (``FINER`` times the last), from the current plan,
    in the dtype of ``B`` (float32 on the shared kernels, float64 in the fallback).

    The plan :math:`P = u_i K_{ij} v_j = e^{-(M_{ij} - f_i - g_j)/e}` (``B``, the row / column
    kernels of ``wk`` and the corner ``kxy``) is absorbed into the kernel of the finer stage,
    :math:`K' = e^{-(M - f \\oplus g)/(e/4)} = P^4` (entries below ``floor`` set to 0), with
    scalings 1: no exponential and no scaling range to check. Iterates with masses ``a``,
    ``b`` to the last stage's tolerance, rounds against ``cost`` (an
    :class:`~._bundles.Augmented` in B's dtype; ``rws``: the rounding workspaces), and adds
    :math:`e' \\log u'` to the row potentials ``fpot`` (those of the first bound) for the
    weak-duality bound on the float64 costs ``Cb`` (``fr``: the row / column costs) with
    masses ``wa``, ``wb`` (``ws``: its workspaces, :func:`~._primitives.dual_bound`).
    Returns (iterations, plan cost, lower bound); inf / -inf when the stage fails. The caller
    keeps the smaller cost and the larger bound (both stay valid)."""
    kz = cn.kz
    kw = cn.kw
    u = wk.u
    v = wk.v
    kzy = wk.kzy
    kxw = wk.kxw
    vy = v[kw]
    ux = u[kz]
    for i in range(kz):
        ui = u[i]
        for j in range(kw):
            B[i, j] = _pow4(ui * B[i, j] * v[j], floor)
        kzy[i] = _pow4(ui * kzy[i] * vy, floor)
    for j in range(kw):
        kxw[j] = _pow4(ux * kxw[j] * v[j], floor)
    k4 = _pow4(ux * kxw.dtype.type(kxy) * vy, floor)
    u[: kz + 1] = 1.0
    v[: kw + 1] = 1.0
    its, status = sinkhorn_kernel(B, k4, a, b, wk, cfg.tol[cfg.tol.shape[0] - 1], cfg.max_iter,
                                  cfg.omega, kxw.dtype.type(0.5), big)
    # (only certified runs get here: no range check, ``uvmax``)
    if status != OK and status != MAXITER:
        return its, math.inf, -math.inf
    rx, cy, ec = rws
    w1 = rounded_cost(Augmented(B, kzy, kxw, k4), cost, a, b, u, v, rx, cy, ec)
    if not math.isfinite(w1):
        return its, math.inf, -math.inf
    # the first stage's potentials plus the finer stage's (in place: entry i reads fpot[i])
    scaled_potentials(fpot, fpot, fpot[kz], u, u[kz], kz, ef)
    return its, w1, dual_bound(Cb, fr.cz, fr.cw, cn.d, wa, wb, fpot, ws)


@jit
def _pow4(t, floor):
    """``t ** 4`` (``1 / FINER``), 0 below ``floor``."""
    t2 = t * t
    t4 = t2 * t2
    return t4 if t4 >= floor else t4 - t4


@jit
def _fallback(Cb, eps_st, cfg, cn, fr, wa, wb, path):
    """Float64 kernel domain on the problem's own kernel (no floor; :func:`expneg64`) if
    ``path <= 1``, then the log domain on its reduced costs; ``Cb``: the problem's float64
    cost block (its first ``kz`` rows and ``kw`` columns). Returns (W1, weak-duality lower
    bound, iterations, status)."""
    kz = cn.kz
    kw = cn.kw
    d = cn.d
    fx = cn.fx
    gy = cn.gy
    cz = fr.cz
    cw = fr.cw
    fzl = fr.fz
    gwl = fr.gw
    S = eps_st.shape[0]
    total = 0
    Rb = np.empty((kz, kw))  # reduced costs (>= 0)
    Rc = np.empty(kz)
    Rr = np.empty(kw)
    for i in range(kz):
        for j in range(kw):
            Rb[i, j] = max(Cb[i, j] - fzl[i] - gwl[j], 0.0)
        Rc[i] = cz[i] - fzl[i] - gy
    for j in range(kw):
        Rr[j] = cw[j] - fx - gwl[j]
    Mred = Augmented(Rb, Rc, Rr, d - fx - gy)
    if path <= 1:
        K64 = np.empty((S, kz, kw))
        for s in range(S):
            ie = 1.0 / eps_st[s]
            for i in range(kz):
                for j in range(kw):
                    K64[s, i, j] = expneg64(Rb[i, j] * ie)
        wk64 = Work(np.ones(kz + 1), np.ones(kw + 1), np.empty(kw), np.empty(kz),
                    np.empty(kw + 1), np.empty(kz + 1))
        gat64 = Gather(kz < 0, np.arange(kz), np.arange(kw), K64[0].ravel())
        # (gat64.on is False: no absorbing, ``ab`` unused)
        its, status, B64, kxy, cn, _ = run_stages(K64, gat64, cfg, cn, wa[: kz + 1],
                                                  wb[: kw + 1], fr, wk64, 0.5, 1e300, 0.0,
                                                  kz < 0, (Cb, Rc, Rr))
        total += its
        if status != OVERFLOW:
            w1 = rounded_cost(Augmented(B64, wk64.kzy, wk64.kxw, kxy), Augmented(Cb, cz, cw, d),
                              wa[: kz + 1], wb[: kw + 1], wk64.u, wk64.v, np.empty(kz + 1),
                              np.empty(kw + 1), np.empty(kw + 1))
            if math.isfinite(w1):
                fpot = np.empty(kz + 1)
                bws = (np.empty(kw + 1), np.empty(kz + 1))
                scaled_potentials(fpot, fzl, fx, wk64.u, wk64.u[kz], kz, eps_st[S - 1])
                lb = _lower_bound(Augmented(Cb, cz, cw, d), wa[: kz + 1], wb[: kw + 1], fpot,
                                  wk64.v, fr, gy, eps_st[S - 1], (w1, cfg.finer * d), bws)
                if w1 - lb > cfg.finer * d:           # (B64: this problem's own kernel)
                    its, w1f, lbf = _finer(
                        B64, kxy, Augmented(Cb, cz, cw, d), wa[: kz + 1], wb[: kw + 1],
                        (np.empty(kz + 1), np.empty(kw + 1), np.empty(kw + 1)), 0.0, 1e300, cn,
                        wk64, cfg, Cb, fr, wa[: kz + 1], wb[: kw + 1], fpot, bws,
                        FINER * eps_st[S - 1])
                    total += its
                    w1 = min(w1, w1f)
                    lb = max(lb, lbf)
                return w1, lb, total, F64 + status
    # ---- log domain on the reduced costs
    cost_r, f_red, its, st = log_domain(Mred, wa[: kz + 1], wb[: kw + 1], eps_st, cfg.tol,
                                        cfg.max_iter, cfg.omega)
    # certificate on the original costs: f = (f_z, f_x) + the reduced-cost potentials
    # (f_red = -1e300 on zero-mass rows, which dual_bound ignores)
    fpot = np.empty(kz + 1)
    for i in range(kz):
        fpot[i] = fzl[i] + f_red[i]
    fpot[kz] = fx + f_red[kz]
    lb = dual_bound(Cb, cz, cw, d, wa[: kz + 1], wb[: kw + 1], fpot,
                    (np.empty(kw + 1), np.empty(kz + 1)))
    # undo the potential shift: <T, M_red> = <T, M> - <a, f> - <b, g> for T in U(a, b)
    shift = wa[kz] * fx + wb[kw] * gy
    for i in range(kz):
        shift += wa[i] * fzl[i]
    for j in range(kw):
        shift += wb[j] * gwl[j]
    return cost_r + shift, lb, total + its, LOG + st
