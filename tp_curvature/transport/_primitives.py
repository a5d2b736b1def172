r"""One copy of each Sinkhorn primitive (Numba, nopython).

Notation: a problem is the augmented kernel / cost :math:`\begin{pmatrix} B & k_{zy} \\
k_{xw} & k_{xy} \end{pmatrix}` (:class:`~._bundles.Augmented`) with row masses :math:`a`
(``kz + 1`` entries, last: x) and column masses :math:`b` (``kw + 1``, last: y); the plan is
:math:`\operatorname{diag}(u) K \operatorname{diag}(v)`.

* :func:`relax`: over-relaxed scaling update
  :math:`u \leftarrow \max(u + \omega (t - u),\; t / 2)` with :math:`t = a / (K v)`
  (same fixed point as plain Sinkhorn, :math:`\omega = 1`).
* :func:`rounded_cost`: Altschuler, Weed & Rigollet (2017, Alg. 2) rounding of the plan onto
  :math:`U(a, b)` and its cost, from the scalar steps :func:`scale_factor` (row / column factor
  :math:`\min(1, \text{target} / \text{sum})`), :func:`rounding_step` (row error and cost
  terms) and :func:`rounded_total` (plus the rank-one correction
  :math:`e_r e_c^\top / \lVert e_r \rVert_1`). The batched solver computes the same sums with
  matrix products and shares the scalar steps.
* :func:`dual_bound`: a weak-duality lower bound of :math:`W_1` from any row potentials (the
  certificate of the returned values), through the c-transforms :func:`cols_from_rows` and
  :func:`rows_from_cols` and the sides' terms :func:`mass_sum`.
* :func:`aug_rmatvec`, :func:`aug_matvec`: :math:`K^\top r` and the block rows of
  :math:`K v` for the augmented kernel. These and the c-transforms take four block rows per
  pass (independent sums and minima; one row at a time waits on each one's latency).
* :func:`c_transform`: potentials of x and y w.r.t. the shared ones (reduced costs >= 0).
* :func:`closed_form`: :math:`W_1` when one measure is a delta (the plan is forced).
* :func:`bypass`: the plan that leaves the connection itself no more mass than it must, its
  cost and a dual bound; optimal, and so :math:`W_1` in closed form, on many connections.
* :func:`uv_max_product`: :math:`\max u \cdot \max v`, the numeric range check of the scalings.
* :func:`lse`, :func:`expneg`, :func:`expneg64`, :func:`pow_inplace`: log-sum-exp, a
  vectorisable :math:`e^{-x}` for float32 kernels and one for float64 kernels, and the stage
  change :math:`u \leftarrow u^p`.
* :func:`fetch_add`: an atomic counter, the worker threads' shared queue of work items.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._bundles import Augmented

# status codes of the solvers
OK, MAXITER, OVERFLOW = 0, 1, 2
F64, LOG = 3, 6  # offsets: solved by the float64 fallback (3, 4) / the log domain (6, 7)
BYPASS = 10  # solved by the bypass plan (:func:`bypass`), no iterations
FM = {"nsz", "arcp", "contract", "reassoc", "afn"}  # no nnan/ninf: overflow must be seen
F32_FLOOR = 1e-35  # float32 kernel entries below this are set to 0 (no denormal inputs)
F32_UVMAX = 1e25  # float32 result accepted only if max(u) * max(v) <= this (floored mass)

#: decorator of every jitted function of the engine
jit = njit(cache=True, fastmath=FM, error_model="numpy")
#: the same, inlined at the Numba IR level (small loops called once per iteration, which LLVM
#: would leave as calls)
jit_inline = njit(cache=True, fastmath=FM, error_model="numpy", inline="always")
#: the same, releasing the GIL (worker threads)
jit_nogil = njit(cache=True, nogil=True, fastmath=FM, error_model="numpy")


@intrinsic
def fetch_add(typingctx, counter):
    """``counter[0] += 1`` atomically (an int64 array shared by worker threads); returns the
    value before (the next work item of the calling thread: dynamic scheduling)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [zero])
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "monotonic")

    return types.int64(counter), codegen


@jit
def relax(u, t, omega, half):
    """Over-relaxed update of one scaling towards its Sinkhorn target ``t``."""
    r = u + omega * (t - u)
    h = half * t
    return r if r > h else h


@jit
def scale_factor(target, got, scale, one, zero):
    """``min(1, target / got) * scale``, 0 where ``got <= 0`` (Altschuler's row / column step)."""
    return min(one, target / got) * scale if got > zero else zero


@jit
def rounding_step(cost, corr, nr, ai, rxi, s1, s2, s3):
    """Accumulate one row: error ``e = max(a_i - rx_i s1, 0)``, cost ``rx_i s2``, correction
    ``e s3``; returns the updated (cost, corr, nr)."""
    e = ai - rxi * s1
    if e < 0.0:
        e = 0.0
    cost += rxi * s2
    corr += e * s3
    nr += e
    return cost, corr, nr


@jit
def rounded_total(cost, corr, nr):
    """Cost of the rounded plan: scaled plan plus the rank-one correction (if any error)."""
    if nr > 0.0:
        cost += corr / nr
    return cost


@jit
def aug_rmatvec(B, col, row, corner, r, out):
    """``out = K^T r`` for the augmented ``K = [[B, col], [row, corner]]`` (``r``: kz+1
    entries, ``out``: kw+1), as axpy loops over the contiguous rows of ``B``, four rows per
    pass (one row per pass chains every ``out[j]`` through a store and a load per row: 1.6x
    slower on 33 x 32 blocks)."""
    kz, kw = B.shape
    rx = r[kz]
    for j in range(kw):
        out[j] = row[j] * rx
    sy = corner * rx
    i = 0
    while i + 4 <= kz:
        r0 = r[i]
        r1 = r[i + 1]
        r2 = r[i + 2]
        r3 = r[i + 3]
        sy += (col[i] * r0 + col[i + 1] * r1) + (col[i + 2] * r2 + col[i + 3] * r3)
        for j in range(kw):
            out[j] += (B[i, j] * r0 + B[i + 1, j] * r1) + (B[i + 2, j] * r2 + B[i + 3, j] * r3)
        i += 4
    while i < kz:
        ri = r[i]
        sy += col[i] * ri
        for j in range(kw):
            out[j] += B[i, j] * ri
        i += 1
    out[kw] = sy


@jit
def aug_matvec(B, col, vlast, v, out):
    """``out[i] = col[i] vlast + sum_j B[i, j] v[j]`` for the ``kz`` block rows of the
    augmented kernel (the x row is the caller's), four rows per pass (four independent sums:
    1.4x faster than one row at a time on 33 x 32 blocks)."""
    kz, kw = B.shape
    i = 0
    while i + 4 <= kz:
        t0 = col[i] * vlast
        t1 = col[i + 1] * vlast
        t2 = col[i + 2] * vlast
        t3 = col[i + 3] * vlast
        for j in range(kw):
            vj = v[j]
            t0 += B[i, j] * vj
            t1 += B[i + 1, j] * vj
            t2 += B[i + 2, j] * vj
            t3 += B[i + 3, j] * vj
        out[i] = t0
        out[i + 1] = t1
        out[i + 2] = t2
        out[i + 3] = t3
        i += 4
    while i < kz:
        t = col[i] * vlast
        for j in range(kw):
            t += B[i, j] * v[j]
        out[i] = t
        i += 1


@jit
def rounded_cost(K, M, a, b, u, v, rx, cy, ec):
    """Cost :math:`\\langle \\hat T, M \\rangle` of ``diag(u) K diag(v)`` rounded onto U(a, b).

    ``K`` and ``M`` are :class:`~._bundles.Augmented` (kernel and cost); ``rx``, ``cy``, ``ec``
    are workspaces (kz+1, kw+1, kw+1). The arrays share one float dtype (float32 in the fast
    path: the inner sums are float32, the totals float64). Three passes over the block.
    """
    B = K.block
    kzy = K.col
    kxw = K.row
    kxy = K.corner
    Cb = M.block
    czy = M.col
    cxw = M.row
    dxy = M.corner
    kz, kw = B.shape
    one = a.dtype.type(1.0)
    zero = a.dtype.type(0.0)
    # row scaling x_i = min(1, a_i / r_i), stored as rx = x * u
    aug_matvec(B, kzy, v[kw], v, rx)
    for i in range(kz):
        rx[i] = scale_factor(a[i], u[i] * rx[i], u[i], one, zero)
    s = kxy * v[kw]
    for j in range(kw):
        s += kxw[j] * v[j]
    rx[kz] = scale_factor(a[kz], u[kz] * s, u[kz], one, zero)
    # column sums with scaled rows, column scaling y_j, stored as cy = y * v
    aug_rmatvec(B, kzy, kxw, kxy, rx, cy)
    for j in range(kw + 1):
        c = v[j] * cy[j]
        f = scale_factor(b[j], c, one, one, zero)
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
        cost, corr, nr = rounding_step(cost, corr, nr, float(a[i]), float(rx[i]), float(s1),
                                       float(s2), float(s3))
    s1 = kxy * cy[kw]
    s2 = s1 * dxy
    s3 = dxy * ec[kw]
    for j in range(kw):
        kvv = kxw[j] * cy[j]
        s1 += kvv
        s2 += kvv * cxw[j]
        s3 += cxw[j] * ec[j]
    cost, corr, nr = rounding_step(cost, corr, nr, float(a[kz]), float(rx[kz]), float(s1),
                                   float(s2), float(s3))
    return rounded_total(cost, corr, nr)


@jit
def dual_bound(Cb, cz, cw, d, a, b, f, ws):
    r"""Weak-duality lower bound of :math:`W_1` from the row potentials ``f`` (kz+1 entries).

    The cost is the augmented :math:`M` with block ``Cb`` (kz, kw; contiguous), column ``cz``
    (to y), row ``cw`` (from x) and corner ``d``; ``a`` / ``b`` are the row / column masses
    (float64, kz+1 / kw+1 entries, last: x / y). Only positive-mass atoms enter (a zero-mass
    atom carries no flow, so the LP has no constraint on it: padding and dropped atoms are
    ignored). With :math:`g'_j = \min_{i: a_i > 0} (M_{ij} - f_i)` and :math:`f'_i =
    \min_{j: b_j > 0} (M_{ij} - g'_j) \ge f_i` (the double c-transform), :math:`f'_i + g'_j
    \le M_{ij}`, so for every plan :math:`T \in U(a, b)`

    .. math::

        \langle T, M \rangle \ge \sum_{ij} T_{ij} (f'_i + g'_j)
        = \sum_i a_i f'_i + \sum_j b_j g'_j =: LB,

    whatever ``f`` is. Rows with a non-finite potential (an underflowed scaling) are left out
    of :math:`g'` and get theirs from :math:`f' = g'^c` (still feasible). Returns LB
    (``-inf`` if no finite :math:`g'` exists). ``ws``: workspaces ``(g, f')`` (kw+1, kz+1
    entries); ``f`` is not changed. Left-out rows and columns enter the minima as potentials
    :math:`-\infty` (their terms are :math:`+\infty`), so the loops over the block have no
    branches (:func:`cols_from_rows`, :func:`rows_from_cols`).
    """
    g, f2 = ws
    M = Augmented(Cb, cz, cw, d)
    cols_from_rows(M, f, g, a)
    lb = mass_sum(b, g)
    if lb == -np.inf:
        return lb
    rows_from_cols(M, g, f2)
    return lb + mass_sum(a, f2)


@jit
def mass_sum(mass, pot):
    r""":math:`\sum_i m_i p_i` over the atoms of positive mass (a side's term of a dual
    bound); the others' potentials become ``-inf`` (they drop out of the next c-transform).
    ``-inf`` if a positive-mass potential is not below ``+inf`` (no finite bound)."""
    s = 0.0
    for i in range(mass.shape[0]):
        if mass[i] > 0.0:
            if not pot[i] < np.inf:
                return -np.inf
            s += mass[i] * pot[i]
        else:
            pot[i] = -np.inf
    return s


@jit
def cols_from_rows(M, f, g, a):
    r"""``g = f^c`` over the augmented cost ``M`` (:class:`~._bundles.Augmented`; rows z then
    x, columns w then y): :math:`g_j = \min_i (M_{ij} - f_i)` over the rows with a positive
    mass ``a_i`` and a finite ``f_i`` (the others drop out, as potentials :math:`-\infty`).
    Four rows per pass over the block: each ``g[j]`` otherwise waits on a store and a load
    per row (the bound 1.45x faster on 33 x 32 problems with this and
    :func:`rows_from_cols`)."""
    Cb = M.block
    kz, kw = Cb.shape
    fx = _live(f, a, kz)
    for j in range(kw):
        g[j] = M.row[j] - fx
    g[kw] = M.corner - fx
    i = 0
    while i + 4 <= kz:
        f0 = _live(f, a, i)
        f1 = _live(f, a, i + 1)
        f2 = _live(f, a, i + 2)
        f3 = _live(f, a, i + 3)
        for j in range(kw):
            t0 = Cb[i, j] - f0
            t1 = Cb[i + 1, j] - f1
            t2 = Cb[i + 2, j] - f2
            t3 = Cb[i + 3, j] - f3
            t0 = t0 if t0 < t1 else t1
            t2 = t2 if t2 < t3 else t3
            t0 = t0 if t0 < t2 else t2
            g[j] = t0 if t0 < g[j] else g[j]
        t0 = M.col[i] - f0
        t1 = M.col[i + 1] - f1
        t2 = M.col[i + 2] - f2
        t3 = M.col[i + 3] - f3
        t0 = t0 if t0 < t1 else t1
        t2 = t2 if t2 < t3 else t3
        t0 = t0 if t0 < t2 else t2
        g[kw] = t0 if t0 < g[kw] else g[kw]
        i += 4
    while i < kz:
        fi = _live(f, a, i)
        for j in range(kw):
            t = Cb[i, j] - fi
            g[j] = t if t < g[j] else g[j]
        t = M.col[i] - fi
        g[kw] = t if t < g[kw] else g[kw]
        i += 1


@jit_inline
def _live(f, a, i):
    """``f[i]``, or ``-inf`` where the mass is 0 or the potential not finite."""
    return f[i] if a[i] > 0.0 and math.isfinite(f[i]) else -np.inf


@jit
def rows_from_cols(M, g, f):
    r"""``f = g^c``: :math:`f_i = \min_j (M_{ij} - g_j)`; columns with ``g = -inf`` drop
    out. Four rows at a time (four independent minima: LLVM leaves a float minimum over a
    row scalar)."""
    Cb = M.block
    kz, kw = Cb.shape
    gy = g[kw]
    i = 0
    while i + 4 <= kz:
        t0 = M.col[i] - gy
        t1 = M.col[i + 1] - gy
        t2 = M.col[i + 2] - gy
        t3 = M.col[i + 3] - gy
        for j in range(kw):
            gj = g[j]
            c = Cb[i, j] - gj
            t0 = c if c < t0 else t0
            c = Cb[i + 1, j] - gj
            t1 = c if c < t1 else t1
            c = Cb[i + 2, j] - gj
            t2 = c if c < t2 else t2
            c = Cb[i + 3, j] - gj
            t3 = c if c < t3 else t3
        f[i] = t0
        f[i + 1] = t1
        f[i + 2] = t2
        f[i + 3] = t3
        i += 4
    while i < kz:
        t = M.col[i] - gy
        for j in range(kw):
            c = Cb[i, j] - g[j]
            t = c if c < t else t
        f[i] = t
        i += 1
    t = M.corner - gy
    for j in range(kw):
        c = M.row[j] - g[j]
        t = c if c < t else t
    f[kz] = t


@jit
def scaled_potentials(f, f0, fx, u, ux, kz, e):
    r"""Row potentials of the scalings ``u`` (z rows, ``kz`` entries) and ``ux`` (x row) on top
    of the reference potentials ``f0`` / ``fx`` (the plan :math:`u_i K_{ij} v_j` with
    :math:`K = e^{-(M - f_0 \oplus g_0)/e}`): ``f[i] = f0[i] + e log u[i]``, ``f[kz] = fx +
    e log ux`` in float64; ``-inf`` where a scaling is 0."""
    for i in range(kz):
        ui = float(u[i])
        f[i] = f0[i] + e * math.log(ui) if ui > 0.0 else -np.inf
    uxf = float(ux)
    f[kz] = fx + e * math.log(uxf) if uxf > 0.0 else -np.inf


@jit_inline
def c_transform(cz, fz, kz, cw, gw, kw, d):
    """Potentials of x and y given the shared ones ``fz`` / ``gw`` (first kz / kw entries).

    :math:`f_x = \\min_w (c_{xw} - g_w)`, :math:`g_y = \\min(d - f_x, \\min_z (c_{zy} - f_z))`,
    so that every reduced cost of the augmented problem is >= 0.
    """
    fx = np.inf
    for j in range(kw):
        t = cw[j] - gw[j]
        if t < fx:
            fx = t
    gy = d - fx
    for i in range(kz):
        t = cz[i] - fz[i]
        if t < gy:
            gy = t
    return fx, gy


@jit
def closed_form(x, y, meas, czy, cxw, d, alpha):
    """W1 of connection (x, y) when ``pk[x] == 0`` or ``sk[y] == 0`` (a delta: the plan is forced).

    Both deltas: :math:`d(x, y)`; :math:`m_x = \\delta_x`:
    :math:`\\alpha d + (1-\\alpha) \\sum_w r_y(w) c_{xw}`; symmetrically for :math:`m_y`.
    """
    kz = meas.pk[x]
    kw = meas.sk[y]
    if kz == 0 and kw == 0:
        return d
    s = alpha * d
    if kz == 0:
        for j in range(kw):
            s += (1.0 - alpha) * meas.sm[y, j] * cxw[x, meas.sloc[y, j]]
    else:
        for i in range(kz):
            s += (1.0 - alpha) * meas.pm[x, i] * czy[meas.ploc[x, i], y]
    return s


@jit
def _row_detour(C, row, wi, cw, r, kw):
    r""":math:`\max_j (c_w[j] - C[row, w_j])` over the atoms with ``r[j] > 0`` (-inf if none),
    in four independent maxima (one waits on each comparison's latency: 2x slower)."""
    m0 = m1 = m2 = m3 = -np.inf
    j = 0
    while j + 4 <= kw:
        t0 = cw[j] - C[row, wi[j]]
        t1 = cw[j + 1] - C[row, wi[j + 1]]
        t2 = cw[j + 2] - C[row, wi[j + 2]]
        t3 = cw[j + 3] - C[row, wi[j + 3]]
        t0 = t0 if r[j] > 0.0 else -np.inf
        t1 = t1 if r[j + 1] > 0.0 else -np.inf
        t2 = t2 if r[j + 2] > 0.0 else -np.inf
        t3 = t3 if r[j + 3] > 0.0 else -np.inf
        m0 = t0 if t0 > m0 else m0
        m1 = t1 if t1 > m1 else m1
        m2 = t2 if t2 > m2 else m2
        m3 = t3 if t3 > m3 else m3
        j += 4
    while j < kw:
        t0 = cw[j] - C[row, wi[j]]
        t0 = t0 if r[j] > 0.0 else -np.inf
        m0 = t0 if t0 > m0 else m0
        j += 1
    m0 = m0 if m0 > m1 else m1
    m2 = m2 if m2 > m3 else m3
    return m0 if m0 > m2 else m2


@jit
def bypass(C, zi, wi, cz, cw, p, r, d, alpha, stop):
    r"""The bypass plan of connection x -> y at ``alpha >= 1/2``: its cost and a dual lower
    bound of :math:`W_1`; ``(inf, -inf)`` below 1/2.

    Every plan moves at least :math:`2\alpha - 1` from x to y (x's successors can take only
    :math:`1-\alpha`). The bypass plan moves exactly that: the rest of x's mass goes to y's
    successors w (:math:`b_w = (1-\alpha) r_w` each) and all of x's predecessors' mass
    (:math:`a_z = (1-\alpha) p_z`) to y, at the cost

    .. math::

        U = (2\alpha - 1)\, d + \sum_z a_z c_{zy} + \sum_w b_w c_{xw}.

    With :math:`T = \max_{z, w} (c_{zy} + c_{xw} - c_{zw})` over the atoms of positive mass,
    the potentials :math:`f_x = 0`, :math:`g_w = c_{xw}`, :math:`g_y = d`,
    :math:`f_z = c_{zy} - \max(T, d)` are dual feasible, so

    .. math::

        LB = U - \textstyle\sum_z a_z\, \max(T - d, 0) \;\le\; W_1 \;\le\; U,

    and the plan is optimal exactly when :math:`d \ge T` (otherwise moving mass from x -> w and
    z -> y to x -> y and z -> w lowers the cost): a weak connection, longer than every detour
    :math:`z \to y` plus :math:`x \to w` minus :math:`z \to w`.

    ``C[zi[i], wi[j]]`` is the cost from the i-th predecessor atom to the j-th successor atom,
    ``cz[i]`` its cost to y, ``cw[j]`` the cost from x, ``p`` / ``r`` the measures' weights
    (each summing to 1; their lengths are the numbers of atoms). The scan stops as soon as
    :math:`T` exceeds ``stop`` and returns ``(inf, -inf)`` (``stop = inf``: never).

    Examples
    --------
    Two predecessors and two successors; the connection is long, so the bypass plan is optimal
    (the bound meets the cost):

    >>> import numpy as np
    >>> C = np.array([[3.0, 4.0], [4.0, 3.0]])
    >>> i, c, q = np.arange(2), np.array([2.0, 2.0]), np.array([0.5, 0.5])
    >>> [float(t) for t in bypass(C, i, i, c, c, q, q, 5.0, 0.5, np.inf)]
    [2.0, 2.0]

    A short one: the detour ``T = 2 + 2 - 3 = 1`` exceeds ``d = 0.5``, the bound stays below:

    >>> [float(t) for t in bypass(C, i, i, c, c, q, q, 0.5, 0.5, np.inf)]
    [2.0, 1.75]
    """
    if alpha < 0.5:
        return np.inf, -np.inf
    kz = p.shape[0]
    kw = r.shape[0]
    t_max = -np.inf
    for i in range(kz):
        if p[i] > 0.0:
            t = cz[i] + _row_detour(C, zi[i], wi, cw, r, kw)
            t_max = t if t > t_max else t_max
            if t_max > stop:
                return np.inf, -np.inf
    sa = 0.0
    u = 0.0
    for i in range(kz):
        sa += p[i] if p[i] > 0.0 else 0.0
        u += p[i] * cz[i] if p[i] > 0.0 else 0.0
    for j in range(kw):
        u += r[j] * cw[j] if r[j] > 0.0 else 0.0
    u = (2.0 * alpha - 1.0) * d + (1.0 - alpha) * u
    return u, u - (1.0 - alpha) * sa * max(t_max - d, 0.0)


@jit_inline
def uv_max_product(u, nu, u0, v, nv, v0):
    """``max(u0, u[:nu]) * max(v0, v[:nv])`` in float64 (range check of the scalings)."""
    umax = u0
    for i in range(nu):
        umax = max(umax, float(u[i]))
    vmax = v0
    for j in range(nv):
        vmax = max(vmax, float(v[j]))
    return umax * vmax


@jit
def lse(vals, n):
    """:math:`\\log \\sum_{j<n} e^{v_j}` (stabilised by the max; the exponentials through
    :func:`expneg64`, which vectorises: log-domain solves take half the time they took with a
    ``math.exp`` call per entry)."""
    m = -np.inf
    for j in range(n):
        if vals[j] > m:
            m = vals[j]
    if m == -np.inf:
        return m
    s = 0.0
    for j in range(n):
        s += expneg64(m - vals[j])
    return m + math.log(s)


@jit
def pow_inplace(x, n, p, ip, floor):
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


@jit
def stage_power(e_prev, e):
    """Exponent ``p = e_prev / e`` of the stage change and ``ip`` (p if a small integer, else 0)."""
    p = e_prev / e
    ip = int(p + 0.5)
    if not (abs(p - ip) < 1e-9 and ip <= 8):
        ip = 0
    return p, ip


@jit
def expneg(x):
    """exp(-x) for x >= 0 to ~1e-5 relative, 0 beyond 80.6 (the float32 kernel floor):
    (Taylor of degree 8 at -x/128) ** 128, plain arithmetic so that loops vectorise."""
    y = -min(x, 80.6) * (1.0 / 128.0)
    p = 1.0 + y * (1.0 + y * (1.0 / 2.0) * (1.0 + y * (1.0 / 3.0) * (1.0 + y * (1.0 / 4.0) * (
        1.0 + y * (1.0 / 5.0) * (1.0 + y * (1.0 / 6.0) * (1.0 + y * (1.0 / 7.0) * (
            1.0 + y * (1.0 / 8.0))))))))
    for _ in range(7):
        p = p * p
    return p if x < 80.6 else 0.0


#: :func:`expneg64` is 0 from here on (``exp(-745.2)`` is below the smallest float64)
EXP64_CUT = 745.2


@jit
def expneg64(x):
    """exp(-x) for x >= 0 over float64's whole range, to ~3e-9 relative, 0 from
    ``EXP64_CUT``: (Taylor of degree 12 at -x/1024) ** 1024 (ten squarings), plain
    arithmetic so that loops vectorise (``math.exp`` is a library call per entry: the float64
    kernels of a problem cost more than its iterations). The kernel only steers the iteration
    (the returned cost is the rounded plan's, the bound holds for any potentials)."""
    y = -min(x, EXP64_CUT) * (1.0 / 1024.0)
    p = 1.0 + y * (1.0 + y * (1.0 / 2.0) * (1.0 + y * (1.0 / 3.0) * (1.0 + y * (1.0 / 4.0) * (
        1.0 + y * (1.0 / 5.0) * (1.0 + y * (1.0 / 6.0) * (1.0 + y * (1.0 / 7.0) * (
            1.0 + y * (1.0 / 8.0) * (1.0 + y * (1.0 / 9.0) * (1.0 + y * (1.0 / 10.0) * (
                1.0 + y * (1.0 / 11.0) * (1.0 + y * (1.0 / 12.0))))))))))))
    for _ in range(10):
        p = p * p
    return p if x < EXP64_CUT else 0.0
