r"""Batched drivers: many connections of one eps level over one shared block.

When all rows share their support, a thread takes up to ``batch`` connections of one level and
each iteration's products with the shared block become two matrix products over the problems
still running (``np.dot`` in Numba -> BLAS sgemm: the block is read once for all of them).
Each problem keeps its own row x / column y, masses, scalings and its own early stop
(converged problems are swapped out of the active prefix). Problems whose float32 scalings
leave the safe range are redone as a float64 batch on the level's float64 kernel, and the rare
ones that overflow even there alone in the log domain (:func:`~._drivers.solve_each`).
Ragged supports are solved one problem at a time (:func:`run_chunk`).
"""
from __future__ import annotations

import math

import numpy as np

from ._bundles import Frame, Gather, Kernels, Settings, Slots, Work, Workspace
from ._drivers import bypassed, solve_each
from ._primitives import (F32_FLOOR, F32_UVMAX, F64, MAXITER, OK, OVERFLOW, c_transform,
                          closed_form, dual_bound, expneg, fetch_add, jit, jit_inline, jit_nogil,
                          pow_inplace, relax, rounded_total, rounding_step, scale_factor,
                          scaled_potentials, stage_power, uv_max_product)


@jit
def _swap_items(x, a, b):
    t = x[a]
    x[a] = x[b]
    x[b] = t


@jit
def _swap_rows(U, V, Ux, Vy, who, its, st, a, b):
    """Exchange the state of batch rows a and b."""
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
    _swap_items(Ux, a, b)
    _swap_items(Vy, a, b)
    _swap_items(who, a, b)
    _swap_items(its, a, b)
    _swap_items(st, a, b)


@jit_inline
def _compact(U, V, Ux, Vy, who, its, st, n_act):
    """Swap the rows of ``:n_act`` whose status is not OK behind the active prefix (finished
    or failed problems); returns the new prefix size."""
    r = 0
    while r < n_act:
        if st[r] != OK:
            n_act -= 1
            _swap_rows(U, V, Ux, Vy, who, its, st, r, n_act)
        else:
            r += 1
    return n_act


@jit
def batch_core(slots, who, nb, kern, CT, costs, meas, cfg, fast_exp, floor, uvmax, bigval, outs,
               st):
    """Batched Sinkhorn + rounding for the slots ``who[:nb]`` (dtype of ``slots.A``: float32 or
    float64), and the weak-duality lower bound of each solved problem
    (:func:`~._primitives.dual_bound` on the final potentials, float64 masses and costs).

    ``kern.Ks[s]`` / ``kern.KsT[s]`` are the shared block's stage kernels (kz x kw and
    transposed), ``kern.KCT`` = (K o C)^T and ``CT`` = C^T of the last stage. Writes the
    outputs of the solved problems; ``st[r]`` is OVERFLOW for those left to a fallback
    (row r <-> slot who[r]).
    """
    xs, ys, A, Bw, FX, GY = slots
    Ks, KsT, KCT = kern
    fz = costs.fz
    gw = costs.gw
    czyT = costs.czyT
    cxw_u = costs.cxw
    dxy = costs.dxy
    eps_st = cfg.eps
    alpha = cfg.alpha
    omega = cfg.omega
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
        st[r] = OK
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
                        t = expneg((cxw_u[x, j] - fx - gw[j]) * ie)
                        KXW[q, j] = t if t >= floor else 0.0
                    for i in range(kz):
                        t = expneg((czyT[y, i] - fz[i] - gy) * ie)
                        KZY[q, i] = t if t >= floor else 0.0
                else:
                    for j in range(kw):
                        KXW[q, j] = math.exp(-(cxw_u[x, j] - fx - gw[j]) * ie)
                    for i in range(kz):
                        KZY[q, i] = math.exp(-(czyT[y, i] - fz[i] - gy) * ie)
                KXY[q] = math.exp(-(dxy[x, y] - fx - gy) / e)
        else:
            p, ip = stage_power(eps_st[s - 1], e)
            for r in range(nb):
                if st[r] == OVERFLOW:
                    continue
                q = who[r]
                pow_inplace(U[r], kz, p, ip, 0.0)
                pow_inplace(V[r], kw, p, ip, 0.0)
                pow_inplace(KXW[q], kw, p, ip, floor)
                pow_inplace(KZY[q], kz, p, ip, floor)
                Ux[r] = float(Ux[r]) ** p
                Vy[r] = float(Vy[r]) ** p
                KXY[q] = float(KXY[q]) ** p
        # active rows: all but the failed ones (moved behind the active prefix; at a stage
        # start every status is OK or OVERFLOW)
        n_act = _compact(U, V, Ux, Vy, who, its, st, nb)
        tol = cfg.tol[s]
        it = 0
        while n_act > 0 and it < cfg.max_iter:
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
                    U[r, i] = relax(U[r, i], t, omega, half)
                t = al32 / sx if sx > zero else zero
                nbad += (sx <= zero and alpha > 0.0) or sx >= big
                Ux[r] = relax(Ux[r], t, omega, half)
                if nbad > 0:
                    st[r] = OVERFLOW
            # ---- K^T u, column error, v update
            np.dot(U[:n_act], B, KTU[:n_act])
            for r in range(n_act):
                if st[r] == OVERFLOW:
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
                    V[r, j] = relax(V[r, j], t, omega, half)
                err += abs(Vy[r] * sy - al32)
                nbad += (sy <= zero and alpha > 0.0) or sy >= big
                t = al32 / sy if sy > zero else zero
                Vy[r] = relax(Vy[r], t, omega, half)
                its[r] += 1
                if nbad > 0 or not (err < big):
                    st[r] = OVERFLOW
                elif err <= tol:
                    st[r] = -1  # converged in this stage
            # ---- compaction: swap finished rows behind the active prefix
            n_act = _compact(U, V, Ux, Vy, who, its, st, n_act)
        # reset the per-stage flags (converged -> OK, still active -> MAXITER at the end)
        for r in range(nb):
            if st[r] == -1:
                st[r] = OK
            elif st[r] == OK and s == S - 1:
                st[r] = MAXITER
        if s < S - 1:
            # give up early on problems whose scalings will leave the safe range at the next
            # eps (they become u ** p): the fallback then starts without a wasted stage
            pw = eps_st[s] / eps_st[s + 1]
            for r in range(nb):
                if st[r] == OVERFLOW:
                    continue
                uv = uv_max_product(U[r], kz, float(Ux[r]), V[r], kw, float(Vy[r]))
                if not (math.log(max(uv, 1e-300)) * pw <= math.log(uvmax)):
                    st[r] = OVERFLOW
    # ---- safety: max(u) * max(v) must stay small enough for the kernel floor / underflow
    for r in range(nb):
        if st[r] == OVERFLOW:
            continue
        if not (uv_max_product(U[r], kz, float(Ux[r]), V[r], kw, float(Vy[r])) <= uvmax):
            st[r] = OVERFLOW
    # ---- certificate: lower bound from the final potentials f = f0 + e log u (before the
    # rounding overwrites U), in float64 on the float64 costs and masses
    LBr = np.full(nb, -np.inf)
    fpot = np.empty(kz + 1)
    gws = np.empty(kw + 1)
    fws = np.empty(kz + 1)
    a64 = np.empty(kz + 1)
    b64 = np.empty(kw + 1)
    e_last = eps_st[S - 1]
    for r in range(nb):
        if st[r] == OVERFLOW:
            continue
        q = who[r]
        x = xs[q]
        y = ys[q]
        for i in range(kz):
            a64[i] = (1.0 - alpha) * meas.pm[x, i]
        a64[kz] = alpha
        for j in range(kw):
            b64[j] = (1.0 - alpha) * meas.sm[y, j]
        b64[kw] = alpha
        scaled_potentials(fpot, fz, FX[q], U[r], Ux[r], kz, e_last)
        LBr[r] = dual_bound(costs.C, czyT[y], cxw_u[x], dxy[x, y], a64, b64, fpot, (gws, fws))
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
            RX[r, i] = scale_factor(A[q, i], rv, U[r, i], one, zero)
        sx = KXY[q] * vy
        for j in range(kw):
            sx += KXW[q, j] * V[r, j]
        RXx[r] = scale_factor(al32, Ux[r] * sx, Ux[r], one, zero)
    np.dot(RX[:nb], B, KTU[:nb])
    EC = np.empty((nb, kw), dt)
    ECy = np.empty(nb, dt)
    CYy = np.empty(nb, dt)
    for r in range(nb):
        q = who[r]
        rxx = RXx[r]
        for j in range(kw):
            c = V[r, j] * (KTU[r, j] + KXW[q, j] * rxx)
            f = scale_factor(Bw[q, j], c, one, one, zero)
            EC[r, j] = Bw[q, j] - c * f
            V[r, j] = V[r, j] * f  # CYV
        sy = KXY[q] * rxx
        for i in range(kz):
            sy += KZY[q, i] * RX[r, i]
        c = Vy[r] * sy
        f = scale_factor(al32, c, one, one, zero)
        ECy[r] = al32 - c * f
        CYy[r] = Vy[r] * f
    S1 = KV
    np.dot(V[:nb], BT, S1[:nb])
    S2 = np.empty((nb, kz), dt)
    np.dot(V[:nb], KCT, S2)
    S3 = np.empty((nb, kz), dt)
    np.dot(EC, CT, S3)
    out, iters, status, lower = outs
    for r in range(nb):
        q = who[r]
        x = xs[q]
        y = ys[q]
        d = dxy[x, y]
        if st[r] == OVERFLOW:
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
            cost, corr, nr = rounding_step(cost, corr, nr, float(A[q, i]), float(RX[r, i]),
                                           float(s1), s2, s3)
        s1 = float(KXY[q]) * float(cyy)
        s2 = s1 * d
        s3 = d * float(ecy)
        for j in range(kw):
            kv = float(KXW[q, j]) * float(V[r, j])
            cwj = cxw_u[x, j]
            s1 += kv
            s2 += kv * cwj
            s3 += cwj * float(EC[r, j])
        cost, corr, nr = rounding_step(cost, corr, nr, alpha, float(RXx[r]), s1, s2, s3)
        cost = rounded_total(cost, corr, nr)
        if math.isfinite(cost):
            out[x, y] = cost
            iters[x, y] = its[r]
            status[x, y] = st[r]
            lower[x, y] = LBr[r]
        else:
            st[r] = OVERFLOW
    return 0


@jit
def batch_uniform(xs, ys, kern, costs, meas, cfg, outs, wk, gat, fr, ws):
    """Solve the connections (xs[q], ys[q]) of one eps level together (uniform supports).

    Deltas in closed form, so are the connections whose bypass plan is optimal
    (:func:`~._drivers.bypassed`); a float32 batch on the level's shared kernels ``kern``
    (path 0); the problems left over as a float64 batch on the level's float64 kernel (built
    here from the reduced costs ``costs.R``); those that overflow there alone in the log
    domain.
    """
    f4 = np.float32
    out, iters, status, lower = outs
    alpha = cfg.alpha
    path = cfg.path
    pm = meas.pm
    sm = meas.sm
    pk = meas.pk
    sk = meas.sk
    dxy = costs.dxy
    czy = costs.czy
    czyT = costs.czyT
    cxw = costs.cxw
    fz = costs.fz
    gw = costs.gw
    kz = pm.shape[1]
    kw = sm.shape[1]
    S = cfg.eps.shape[0]
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
            out[x, y] = closed_form(x, y, meas, czy, cxw, d, alpha)
            lower[x, y] = out[x, y]
            iters[x, y] = 0
            status[x, y] = OK
            continue
        if cfg.bypass and bypassed(costs.C, meas, x, y, czyT[y], cxw[x], d, alpha, outs):
            continue
        for i in range(kz):
            A[q, i] = (1.0 - alpha) * pm[x, i]
        for j in range(kw):
            Bw[q, j] = (1.0 - alpha) * sm[y, j]
        FX[q], GY[q] = c_transform(czyT[y], fz, kz, cxw[x], gw, kw, d)
        who[nb] = q
        nb += 1
    if nb == 0:
        return 0
    yes = nq > 0  # bool variables, not literals (a literal would compile batch_core twice)
    no = nq < 0
    # ---- float32 batch on the shared per-level kernels (path 0)
    if path == 0:
        batch_core(Slots(xs, ys, A, Bw, FX, GY), who, nb, kern, costs.CT, costs, meas, cfg, yes,
                   F32_FLOOR, F32_UVMAX, 1e37, outs, st)
    else:
        for r in range(nb):
            st[r] = OVERFLOW
    n2 = nq - nq
    who2 = np.empty(nb, np.int64)
    for r in range(nb):
        if st[r] == OVERFLOW:
            who2[n2] = who[r]
            n2 += 1
    if n2 == 0:
        return 0
    # ---- float64 batch for the problems that left the float32 range
    log_path = path + 2 - path  # 2, typed like path (not a literal)
    A64 = np.empty((nq, kz))
    Bw64 = np.empty((nq, kw))
    for r in range(n2):
        q = who2[r]
        for i in range(kz):
            A64[q, i] = (1.0 - alpha) * pm[xs[q], i]
        for j in range(kw):
            Bw64[q, j] = (1.0 - alpha) * sm[ys[q], j]
    R = costs.R
    K64 = np.empty((S, kz, kw))
    K64T = np.empty((S, kw, kz))
    KCT64 = np.empty((kw, kz))
    for s in range(S):
        ie = 1.0 / cfg.eps[s]
        for i in range(kz):
            for j in range(kw):
                t = math.exp(-R[i, j] * ie)
                K64[s, i, j] = t
                K64T[s, j, i] = t
                if s == S - 1:
                    KCT64[j, i] = t * costs.C[i, j]
    st2 = np.zeros(n2, np.int64)
    batch_core(Slots(xs, ys, A64, Bw64, FX, GY), who2, n2, Kernels(K64, K64T, KCT64), costs.CT64,
               costs, meas, cfg, no, 0.0, 1e290, 1e300, outs, st2)
    # the rare problems that overflow in float64 too: alone, in the log domain
    xs3 = np.empty(n2, np.int64)
    ys3 = np.empty(n2, np.int64)
    n3 = n2 - n2
    for r in range(n2):
        q = who2[r]
        if st2[r] == OVERFLOW:
            xs3[n3] = xs[q]
            ys3[n3] = ys[q]
            n3 += 1
        else:
            status[xs[q], ys[q]] += F64
    if n3 > 0:
        solve_each(xs3[:n3], ys3[:n3], kern, costs, meas, cfg, wk, gat, fr, ws, log_path, outs)
    return 0


@jit
def run_chunk(k0, k1, kern, costs, meas, cfg, cx, cy, outs):
    """Connections k0:k1 of one eps level: one batch (uniform supports) or one at a time."""
    KZ = meas.ploc.shape[1]
    KW = meas.sloc.shape[1]
    nb = 1 if cfg.uniform else KZ * KW
    f4 = np.float32
    wk = Work(np.ones(KZ + 1, f4), np.ones(KW + 1, f4), np.empty(KW, f4), np.empty(KZ, f4),
              np.empty(KW + 1, f4), np.empty(KZ + 1, f4))
    gat = Gather(not cfg.uniform, np.empty(KZ, np.int64), np.empty(KW, np.int64),
                 np.empty(nb, f4))
    fr = Frame(np.empty(KZ), np.empty(KZ), np.empty(KW), np.empty(KW))
    ws = Workspace(np.empty(KZ + 1), np.empty(KW + 1), np.empty(KZ + 1, f4), np.empty(KW + 1, f4),
                   np.empty(KZ, f4), np.empty(KW, f4), np.empty(KZ + 1, f4), np.empty(KW + 1, f4),
                   np.empty(KW + 1, f4), np.empty(nb, f4), np.empty(nb))
    if cfg.uniform and cfg.path <= 1:
        batch_uniform(cx[k0:k1], cy[k0:k1], kern, costs, meas, cfg, outs, wk, gat, fr, ws)
    else:
        solve_each(cx[k0:k1], cy[k0:k1], kern, costs, meas, cfg, wk, gat, fr, ws, cfg.path, outs)
    return 0


@jit_nogil
def solve_chunks(counter, kern, costs, meas, cfg, cx, cy, chunk_ptr, chunk_lv, outs):
    """Solve chunks until none is left (one worker thread; the GIL is released): each takes
    the next chunk from the shared ``counter`` (:func:`~._primitives.fetch_add`), so threads
    that draw cheap chunks take more of them.

    Chunk c holds connections chunk_ptr[c]:chunk_ptr[c+1], all of eps level chunk_lv[c], whose
    stage kernels are ``kern.*[chunk_lv[c]]`` (float32) and stage eps ``cfg.eps[chunk_lv[c]]``.
    """
    n_chunks = chunk_ptr.shape[0] - 1
    om32 = np.float32(cfg.omega)
    while True:
        c = fetch_add(counter)
        if c >= n_chunks:
            break
        lv = chunk_lv[c]
        lcfg = Settings(cfg.eps[lv], cfg.tol, cfg.max_iter, om32, cfg.path, cfg.alpha,
                        cfg.uniform, cfg.warm, cfg.finer, cfg.uvmax, cfg.bypass)
        run_chunk(chunk_ptr[c], chunk_ptr[c + 1], Kernels(kern.Ks[lv], kern.KsT[lv],
                                                          kern.KCT[lv]),
                  costs, meas, lcfg, cx, cy, outs)
    return 0
