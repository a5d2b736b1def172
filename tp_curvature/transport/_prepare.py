r"""Preparation of a layer pair for the Sinkhorn engine (NumPy, once per call).

* :func:`compact_measure`: union support, per-row local supports, masses; atoms whose largest
  mass over all rows is negligible (cumulative <= ``mass_tol``) are dropped and the rest
  renormalised, which moves :math:`W_1` by at most :math:`(1-\alpha)(\delta_x + \delta_y)
  \max M` (:math:`\delta` the row's dropped mass fraction, :math:`\le` ``mass_tol`` for
  normalised rows; :math:`\max M` the largest cost of the connection's own problem, bounded
  by :func:`trim_cost_bounds`): take an optimal plan, drop
  the rows of the removed atoms and send the freed mass from the added (renormalised) mass.
* :func:`uniformize`, padding: rows that use (nearly) all of the union become dense over it,
  padded to multiples of ``PAD`` atoms (zero mass, cost ``PAD_COST``, kernel 0).
* :func:`shared_potentials`: exact dual potentials of the shared problem
  :math:`W(\bar p, \bar r; C_{zw})` (mean measures), made exactly dual feasible.
* :func:`prepare`: all of the above as :class:`~._bundles.Costs` / :class:`~._bundles.Measures`.
* :func:`eps_levels`, :func:`stage_kernels`, :func:`make_chunks`: connections bucketed by
  :math:`d(x, y)` into geometric eps levels, the per-level stage kernels of the shared block,
  and the work chunks of one level group.
"""
from __future__ import annotations

import warnings
from collections import namedtuple

import numpy as np

from ..problem import selects_all
from ._bundles import Costs, Kernels, Measures
from ._exact import pot
from ._primitives import F32_FLOOR, jit

PAD, PAD_COST = 8, 1e30  # uniform blocks padded to multiples of PAD with cost PAD_COST

#: A prepared layer pair: the bundles, whether the rows share their support (``uniform``), the
#: union support sizes before padding, and the mass fraction of each x / y row dropped by
#: ``mass_tol`` (``drop_x`` (n_x,), ``drop_y`` (n_y,); for the certificate).
Prepared = namedtuple("Prepared", "costs meas uniform k_z k_w drop_x drop_y")


def compact_measure(idx, mass, mass_tol):
    """Union support, per-row local supports (sorted), masses (renormalised after trimming),
    support sizes, and each row's dropped mass fraction (0 where nothing was dropped)."""
    idx = np.asarray(idx, dtype=np.int64)
    mass = np.asarray(mass, dtype=np.float64)
    n_rows = idx.shape[0]
    valid = (mass > 0) & (idx >= 0)
    if not valid.any():
        return (np.zeros(0, np.int64), np.zeros((n_rows, 0), np.int64), np.zeros((n_rows, 0)),
                np.zeros(n_rows, np.int64), np.zeros(n_rows))
    union = np.unique(idx[valid])
    # drop atoms whose largest mass over all rows is negligible (cumulative <= mass_tol)
    pos = np.searchsorted(union, np.where(valid, idx, union[0]))
    maxmass = np.zeros(union.size)
    np.maximum.at(maxmass, pos[valid], mass[valid])
    keep_atom = np.ones(union.size, bool)
    if mass_tol > 0:
        order = np.argsort(maxmass, kind="stable")
        cum = np.cumsum(maxmass[order])
        keep_atom[order[cum <= mass_tol]] = False
    new_pos = np.cumsum(keep_atom) - 1
    total = np.where(valid, mass, 0.0).sum(axis=1)
    lost = np.where(valid & ~keep_atom[pos], mass, 0.0).sum(axis=1)
    dropped = np.divide(lost, total, out=np.zeros(n_rows), where=total > 0)
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
    return union, loc, m, k, dropped


def _dense_rows(k, n):
    """Local supports ``0..n-1`` for every row and ``k = n`` (0 stays 0: a delta)."""
    loc = np.broadcast_to(np.arange(n, dtype=np.int64), (k.shape[0], n)).copy()
    return loc, np.where(k > 0, n, 0).astype(np.int64)


def uniformize(loc, mass, k, n_union):
    """Rows -> dense over the union (zeros where absent). Rows with k == 0 stay deltas."""
    n_rows = loc.shape[0]
    dense = np.zeros((n_rows, n_union))
    rows = np.repeat(np.arange(n_rows), loc.shape[1])
    cols = loc.ravel()
    ok = (np.arange(loc.shape[1])[None, :] < k[:, None]).ravel()
    dense[rows[ok], cols[ok]] = mass.ravel()[ok]
    new_loc, new_k = _dense_rows(k, n_union)
    return new_loc, dense, new_k


def pad2(a, n, m, value):
    """``a`` in the top-left corner of an (n, m) float64 array filled with ``value``."""
    out = np.full((n, m), value, dtype=np.float64)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def shared_potentials(C, pbar, rbar):
    """Exact dual potentials of the shared problem W(pbar, rbar; C) (network simplex), made
    exactly dual feasible (:math:`f_z + g_w \\le C_{zw}`)."""
    ot = pot()

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
    g = np.minimum(g, (C - f[:, None]).min(axis=0))
    return f, g


def prepare(problem, mass_tol) -> Prepared:
    """Compacted measures, union cost blocks, shared potentials (padded if uniform)."""
    zu, ploc, pm, pk, drop_x = compact_measure(problem.pred_idx, problem.pred_mass, mass_tol)
    wu, sloc, sm, sk, drop_y = compact_measure(problem.succ_idx, problem.succ_mass, mass_tol)
    nzu, nwu = zu.size, wu.size
    # uniform mode: the rows use (nearly) all of the union -> operate on the shared block
    use_x = pk > 0
    use_y = sk > 0
    uniform = bool(
        (not use_x.any() or pk[use_x].mean() >= 0.8 * nzu)
        and (not use_y.any() or sk[use_y].mean() >= 0.8 * nwu)
    )
    if uniform:
        ploc, pm, pk = uniformize(ploc, pm, pk, nzu)
        sloc, sm, sk = uniformize(sloc, sm, sk, nwu)
    C = np.ascontiguousarray(problem.c_zw[np.ix_(zu, wu)], dtype=np.float64)
    czy = np.ascontiguousarray(problem.c_zy[zu, :], dtype=np.float64)
    # c_xw is shared by every column slice of a layer: no copy when the slice uses all of W
    cxw = np.ascontiguousarray(problem.c_xw if selects_all(wu, problem.c_xw.shape[1])
                               else problem.c_xw[:, wu], dtype=np.float64)
    dxy = np.ascontiguousarray(problem.d_xy, dtype=np.float64)
    # shared potentials from the mean measures
    pbar = np.zeros(nzu)
    if use_x.any():
        np.add.at(pbar, ploc[use_x].ravel(), pm[use_x].ravel())
    rbar = np.zeros(nwu)
    if use_y.any():
        np.add.at(rbar, sloc[use_y].ravel(), sm[use_y].ravel())
    fz, gw = shared_potentials(C, pbar, rbar)
    R = np.maximum(C - fz[:, None] - gw[None, :], 0.0)
    k_z = nzu if uniform else (int(pk.max()) if pk.size else 0)
    k_w = nwu if uniform else (int(sk.max()) if sk.size else 0)
    if uniform and nzu and nwu:
        # pad the shared block to multiples of PAD atoms (zero mass, cost PAD_COST, kernel 0):
        # the inner loops then have no remainders (~15% faster iterations)
        nzp = -(-nzu // PAD) * PAD
        nwp = -(-nwu // PAD) * PAD
        C = pad2(C, nzp, nwp, PAD_COST)
        R = pad2(R, nzp, nwp, PAD_COST)
        czy = pad2(czy, nzp, czy.shape[1], PAD_COST)
        cxw = pad2(cxw, cxw.shape[0], nwp, PAD_COST)
        fz = np.concatenate([fz, np.zeros(nzp - nzu)])
        gw = np.concatenate([gw, np.zeros(nwp - nwu)])
        ploc, pk = _dense_rows(pk, nzp)
        pm = pad2(pm, pm.shape[0], nzp, 0.0)
        sloc, sk = _dense_rows(sk, nwp)
        sm = pad2(sm, sm.shape[0], nwp, 0.0)
    C32 = np.minimum(C, 1e30).astype(np.float32)  # f32 sums stay finite (0 * inf = nan)
    costs = Costs(C=C, C32=C32, R=R, CT=np.ascontiguousarray(C32.T),
                  CT64=np.ascontiguousarray(C.T), czy=czy, czyT=np.ascontiguousarray(czy.T),
                  cxw=cxw, dxy=dxy, fz=fz, gw=gw)
    return Prepared(costs, Measures(ploc, pm, pk, sloc, sm, sk), uniform, k_z, k_w, drop_x,
                    drop_y)


def trim_cost_bounds(problem):
    """Bound on the largest ground cost of each connection's own problem (n_x, n_y): the factor
    of its ``mass_tol`` term in the certificate.

    For :math:`x \\to y` the problem's costs are :math:`C_{zw}` (z in the support of
    :math:`p_x`, w in that of :math:`r_y`), :math:`c_{zy}`, :math:`c_{xw}` and :math:`d(x, y)`;
    the :math:`C_{zw}` part is bounded by the smaller of its largest entry over x's rows (any
    used w) and over y's columns (any used z), the others are taken exactly. Trimming only
    removes atoms, so every cost of the trimmed problem is among these.
    """
    px = (np.asarray(problem.pred_mass) > 0) & (np.asarray(problem.pred_idx) >= 0)
    sy = (np.asarray(problem.succ_mass) > 0) & (np.asarray(problem.succ_idx) >= 0)
    pidx = np.where(px, problem.pred_idx, 0)
    sidx = np.where(sy, problem.succ_idx, 0)
    bound = np.array(problem.d_xy, dtype=np.float64)   # copy; inf where nothing is solved
    zs, ws = np.unique(pidx[px]), np.unique(sidx[sy])
    if zs.size and ws.size:
        czw = problem.c_zw[np.ix_(zs, ws)]
        row_top = np.zeros(problem.c_zw.shape[0])
        col_top = np.zeros(problem.c_zw.shape[1])
        row_top[zs] = czw.max(axis=1)
        col_top[ws] = czw.max(axis=0)
        by_x = np.where(px, row_top[pidx], 0.0).max(axis=1, initial=0.0)
        by_y = np.where(sy, col_top[sidx], 0.0).max(axis=1, initial=0.0)
        both = px.any(axis=1)[:, None] & sy.any(axis=1)[None, :]
        np.maximum(bound, np.where(both, np.minimum(by_x[:, None], by_y[None, :]), 0.0),
                   out=bound)
    # c_zy over x's support (rows of x), c_xw over y's support (columns of y)
    support_max(pidx, px, np.ascontiguousarray(problem.c_zy, dtype=np.float64), bound)
    bound_t = np.ascontiguousarray(bound.T)
    support_max(sidx, sy, np.ascontiguousarray(problem.c_xw.T, dtype=np.float64), bound_t)
    bound = bound_t.T
    return bound


@jit
def support_max(idx, ok, cost, out):
    """``out[r] = max(out[r], max_k cost[idx[r, k]])`` over the entries with ``ok[r, k]``
    (rows of ``cost`` gathered by each row's support, in place)."""
    m = out.shape[1]
    for r in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            if ok[r, k]:
                src = idx[r, k]
                for c in range(m):
                    t = cost[src, c]
                    if t > out[r, c]:
                        out[r, c] = t
    return 0


#: :func:`stage_kernels` computes only the entries a level group reads when they are fewer than
#: this share of the block (their scattered writes cost more per entry than a full pass)
SUB_BLOCK = 0.25


def eps_levels(pairs, d, levels):
    """Bucket the connections by d into geometric levels (``levels`` per factor 2).

    Returns the pairs sorted by (level, x, y), their levels, level start / end offsets, the
    smallest d and the level ratio ``rho = 2 ** (1/levels)``; level ``l`` uses
    :math:`\\varepsilon\\, d_{\\min} \\rho^l \\le \\varepsilon\\, d(x, y)`. ``pairs``
    must come sorted by (x, y) (``np.argwhere`` order): a stable sort by level keeps it.
    """
    rho = 2.0 ** (1.0 / levels)
    dmin = d.min()
    lev = np.floor(np.log(d / dmin) / np.log(rho) + 1e-12).astype(np.int64)
    # a stable sort of 16-bit keys is a radix sort (0.04 s against 0.15 s for the three-key
    # lexsort on 1.7M connections)
    key = lev.astype(np.uint16) if lev.size and lev.max() < 1 << 16 else lev
    order = np.argsort(key, kind="stable")
    pairs, lev = pairs[order], lev[order]
    bounds = np.flatnonzero(np.diff(lev)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(pairs)]])
    return pairs, lev, starts, ends, dmin, rho


def stage_kernels(R32, C32, eps_lv, path, batched, used=None, buf=None) -> Kernels:
    """Float32 stage kernels :math:`e^{-R/\\varepsilon}` of a level group (floored), and for
    the batched path their transposes and :math:`(K \\circ C)^\\top` of the last stage; empty
    arrays when the float32 path is not used (or, for those two, not batched).

    ``used``: (rows, columns) of the block that the group's problems read (one-at-a-time
    problems gather their atoms' entries only); where they are a small part of the block, only
    those entries are computed and the others are left unset (a sparsely populated eps level
    of a wide layer: ResNet-50's ``layer4.0.downsample.0`` has 105 levels, 58 of them with under
    a thousandth of its 2.1M-entry block's connections). ``buf``: a float32 array of at least
    the kernels' size to write them into (one for all the level groups of a layer pair: a
    fresh 16 MB array per group cost more in page faults than its exponentials)."""
    ng, n_stages = eps_lv.shape
    if path != 0:
        empty = np.empty((ng, n_stages, 0, 0), np.float32)
        return Kernels(empty, empty.copy(), np.empty((ng, 0, 0), np.float32))
    scale = (-1.0 / eps_lv).astype(np.float32)[:, :, None, None]
    shape = (ng, n_stages) + R32.shape
    Ks = np.empty(shape, np.float32) if buf is None else buf[: np.prod(shape)].reshape(shape)
    sub = used is not None and used[0].size * used[1].size < SUB_BLOCK * R32.size
    src = R32[np.ix_(*used)] if sub else R32
    out = np.empty(shape[:2] + src.shape, np.float32) if sub else Ks
    flat, sc = out.reshape((ng * n_stages,) + src.shape), scale.reshape(-1)
    for i in range(ng * n_stages):    # each stage kernel in a few vectorised numpy calls
        _exp_kernel(flat[i], src, sc[i])
    if sub:
        Ks[(slice(None), slice(None)) + np.ix_(*used)] = out
    if batched:
        KsT = np.ascontiguousarray(Ks.transpose(0, 1, 3, 2))
        KCT = np.ascontiguousarray((Ks[:, n_stages - 1] * C32[None]).transpose(0, 2, 1))
    else:
        KsT = np.empty((ng, n_stages, 0, 0), np.float32)
        KCT = np.empty((ng, 0, 0), np.float32)
    return Kernels(Ks, KsT, KCT)


def _exp_kernel(K, R32, scale) -> None:
    """``K = exp(scale R32)`` in place, entries below the float32 floor set to 0."""
    np.multiply(R32, scale, out=K)
    np.exp(K, out=K)
    np.copyto(K, 0.0, where=K < F32_FLOOR)


def used_atoms(meas, cx, cy, n_rows, n_cols):
    """(rows, columns) of the (n_rows, n_cols) union block that the connections
    ``(cx[k], cy[k])`` read: the union of their x's pred atoms and of their y's succ atoms
    (sorted)."""
    def union(loc, k, nodes, n_atoms):
        seen = np.zeros(loc.shape[0], dtype=bool)
        seen[nodes] = True
        nodes = np.flatnonzero(seen)
        keep = np.arange(loc.shape[1]) < k[nodes][:, None]
        seen = np.zeros(n_atoms, dtype=bool)
        seen[loc[nodes][keep]] = True
        return np.flatnonzero(seen)
    return (union(meas.ploc, meas.pk, cx, n_rows), union(meas.sloc, meas.sk, cy, n_cols))


def make_chunks(cx, lv_loc, target, chunk_rows):
    """Work chunks of one level group: contiguous runs of one level (sorted by x, then y) of at
    most ``target`` connections, and at most ``chunk_rows`` distinct x rows if given.
    Returns (chunk_ptr, chunk_lv)."""
    n = cx.shape[0]
    first = np.r_[True, lv_loc[1:] != lv_loc[:-1]]
    pos = np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0))
    cut = first | (pos % target == 0)
    if chunk_rows:
        newrow = np.r_[True, cx[1:] != cx[:-1]] | first
        row_id = np.cumsum(newrow) - 1
        row_in_lv = row_id - np.maximum.accumulate(np.where(first, row_id, 0))
        cut |= newrow & (row_in_lv % chunk_rows == 0)
    ptr = np.r_[np.flatnonzero(cut), n]
    return np.asarray(ptr, dtype=np.int64), np.asarray(lv_loc[ptr[:-1]], dtype=np.int64)
