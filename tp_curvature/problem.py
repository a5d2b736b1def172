"""The transport problems of one layer pair: the contract between the graph and the kernels.

For a weight layer with input nodes X (``n_x`` channels) and output nodes Y (``n_y``), the
connection :math:`x \\to y` has two measures

.. math::

    m_x = \\alpha\\,\\delta_x + (1-\\alpha) \\sum_{z \\in Z} p_x(z)\\,\\delta_z, \\qquad
    m_y = \\alpha\\,\\delta_y + (1-\\alpha) \\sum_{w \\in W} r_y(w)\\,\\delta_w,

where Z are the predecessors of the X layer and W the successors of the Y layer. When
:math:`p_x` is empty (no active neighbour, or an input layer) ``m_x`` is :math:`\\delta_x`
(all mass stays on x); the same for ``m_y``.

The ground cost between a source point (a row: some z, or x itself) and a target point (a
column: some w, or y itself) is the forward shortest-path length over the edges among the
junctions Z, X, Y, W (see :func:`tp_curvature.curvature.problem_from_strengths`):

=========  ===========  ============================================
row        column       cost
=========  ===========  ============================================
z          w            ``c_zw[z, w]`` (e.g. z -> x' -> y' -> w, z -> z' -> x' -> y' -> w)
z          y            ``c_zy[z, y]`` (e.g. z -> x' -> y, z -> z' -> x' -> y)
x          w            ``c_xw[x, w]`` (e.g. x -> y' -> w, x -> y' -> w' -> w)
x          y            ``d_xy[x, y]`` (the connection itself)
=========  ===========  ============================================

Every connection of the pair shares ``c_zw``; only one row (x) and one column (y) differ.
The kernels return :math:`W_1(m_x, m_y)`; the curvature is
:math:`\\kappa(x, y) = (1 - W_1 / d(x, y)) / (1 - \\alpha)` (see :mod:`tp_curvature.curvature`).

All cost arrays are finite float64 (the graph caps unreachable pairs before building the
problem); ``d_xy`` may hold ``inf`` only where ``solve`` is False.

Connections that are not solved get documented values in :meth:`LayerPairProblem.kappa`:
an existing connection that is not solved (a dead endpoint, ``a = 0``, or a zero weight) has
:math:`\\kappa = 1`, a structurally absent pair (different groups of a grouped conv, no edge in
the element graph) ``NaN``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


def selects_all(idx: np.ndarray, n: int) -> bool:
    """Whether the index array ``idx`` is ``0..n-1`` in order: a selection of every row or
    column of an ``n``-long axis, which a caller can use as is instead of copying."""
    return idx.shape[0] == n and bool(np.array_equal(idx, np.arange(n)))


def cap_costs(costs: tuple, d_solved: np.ndarray, where: Optional[np.ndarray] = None,
              copy: bool = True) -> tuple:
    """Each cost matrix of ``costs`` with its infinite entries (pairs no forward path joins)
    set to the cap, twice the largest finite cost among ``costs`` and the lengths of the
    connections to solve (``d_solved``, or its entries where ``where`` is True), so every
    transport problem is well posed. ``copy=False`` caps the matrices in place (the caller
    owns them; no temporaries: a wide layer pair's are tens of MB each)."""
    top = -np.inf
    for c, w in [(c, None) for c in costs] + [(d_solved, where)]:
        ok = np.isfinite(c) if w is None else np.isfinite(c) & w
        top = max(top, float(np.max(c, where=ok, initial=-np.inf)))
    cap = 2.0 * top if np.isfinite(top) else 2.0
    if copy:
        costs = tuple(c.copy() for c in costs)
    for c in costs:
        c[~np.isfinite(c)] = cap
    return costs


def kappa_from_w1(w1: np.ndarray, d_xy: np.ndarray, alpha: float) -> np.ndarray:
    """:math:`\\kappa = (1 - W_1/d)/(1-\\alpha)` elementwise."""
    return (1.0 - w1 / d_xy) / (1.0 - alpha)


@dataclass
class LayerPairProblem:
    """All W1 problems :math:`W_1(m_x, m_y)` of the connections of one layer pair.

    Attributes
    ----------
    d_xy : (n_x, n_y) float64
        Length of the connection x -> y (``inf`` where there is none).
    c_zw : (n_z, n_w) float64
        3-hop forward shortest-path lengths from predecessors z to successors w.
    c_zy : (n_z, n_y) float64
        2-hop lengths z -> y.
    c_xw : (n_x, n_w) float64
        2-hop lengths x -> w.
    pred_idx : (n_x, k_z) int64
        Support of :math:`p_x`: indices into Z, padded with -1 (``k_z`` may be 0).
    pred_mass : (n_x, k_z) float64
        :math:`p_x` on that support; each row sums to 1, or is all 0 when x has no active
        predecessor (then ``m_x = delta_x``). Padding entries are 0.
    succ_idx : (n_y, k_w) int64
        Support of :math:`r_y`: indices into W, padded with -1.
    succ_mass : (n_y, k_w) float64
        :math:`r_y`, rows sum to 1 or are all 0 (``m_y = delta_y``).
    alpha : float
        Idleness, the mass each measure keeps on its own node, in [0, 1).
    solve : (n_x, n_y) bool
        Connections whose W1 is wanted; the others are left NaN by the solvers.
    name : str
        The layer this pair belongs to (for messages and progress bars).
    exists : (n_x, n_y) bool, optional
        Structural connections (a superset of ``solve``); None means ``solve``.
    length : (n_x, n_y) float64, optional
        :math:`d(x, y)` of every existing connection, solved or not (``inf`` where there is
        none or the weight is 0); ``d_xy`` keeps it only where ``solve`` is True.
    """

    d_xy: np.ndarray
    c_zw: np.ndarray
    c_zy: np.ndarray
    c_xw: np.ndarray
    pred_idx: np.ndarray
    pred_mass: np.ndarray
    succ_idx: np.ndarray
    succ_mass: np.ndarray
    alpha: float
    solve: np.ndarray
    name: str = ""
    exists: Optional[np.ndarray] = None
    length: Optional[np.ndarray] = None

    @property
    def connections(self) -> np.ndarray:
        """Structural connections: ``exists``, or ``solve`` when no ``exists`` was given."""
        return self.solve if self.exists is None else self.exists

    def kappa(self, w1: np.ndarray, overwrite: bool = False) -> np.ndarray:
        """:math:`\\kappa` of every pair from the solvers' ``w1`` (n_x, n_y): solved connections
        :math:`(1 - W_1/d_{xy})/(1-\\alpha)`, other connections 1, absent pairs NaN.

        ``overwrite=True`` computes it in ``w1`` itself (float64, owned by the caller) and
        returns that array: no (n_x, n_y) temporaries, where a wide layer's cost tens of MB
        each."""
        solve = self.solve
        if overwrite and w1.dtype == np.float64 and w1.flags.writeable:
            kappa = w1
            np.divide(w1, self.d_xy, out=kappa, where=solve)
            np.subtract(1.0, kappa, out=kappa, where=solve)
            np.divide(kappa, 1.0 - self.alpha, out=kappa, where=solve)
            kappa[~solve] = np.nan
            kappa[~solve & self.connections] = 1.0
            return kappa
        kappa = np.where(self.connections, 1.0, np.nan)
        kappa[solve] = kappa_from_w1(w1[solve], self.d_xy[solve], self.alpha)
        return kappa

    def columns(self, c0: int, c1: int) -> "LayerPairProblem":
        """The connections into the Y nodes ``c0:c1`` only (views: Z, X, W and ``c_zw``,
        ``c_xw`` are shared), a problem whose W1 are those columns of this one's."""
        def cut(a):
            return None if a is None else a[:, c0:c1]
        return LayerPairProblem(
            d_xy=cut(self.d_xy), c_zw=self.c_zw, c_zy=cut(self.c_zy), c_xw=self.c_xw,
            pred_idx=self.pred_idx, pred_mass=self.pred_mass,
            succ_idx=self.succ_idx[c0:c1], succ_mass=self.succ_mass[c0:c1], alpha=self.alpha,
            solve=cut(self.solve), name=self.name, exists=cut(self.exists),
            length=cut(self.length))

    @property
    def n_x(self) -> int:
        return self.d_xy.shape[0]

    @property
    def n_y(self) -> int:
        return self.d_xy.shape[1]

    @property
    def n_connections(self) -> int:
        return int(self.solve.sum())

    def validate(self) -> None:
        """Check shapes and invariants; raise ValueError naming the layer on violation."""
        n_x, n_y = self.d_xy.shape
        n_z, n_w = self.c_zw.shape
        where = f"layer pair {self.name!r}" if self.name else "layer pair"
        checks = [
            (self.c_zy.shape == (n_z, n_y), f"c_zy shape {self.c_zy.shape} != {(n_z, n_y)}"),
            (self.c_xw.shape == (n_x, n_w), f"c_xw shape {self.c_xw.shape} != {(n_x, n_w)}"),
            (self.pred_idx.shape == self.pred_mass.shape and self.pred_idx.shape[0] == n_x,
             "pred_idx / pred_mass must both be (n_x, k_z)"),
            (self.succ_idx.shape == self.succ_mass.shape and self.succ_idx.shape[0] == n_y,
             "succ_idx / succ_mass must both be (n_y, k_w)"),
            (self.solve.shape == (n_x, n_y), "solve must be (n_x, n_y)"),
            (0.0 <= self.alpha < 1.0, f"alpha must be in [0, 1), got {self.alpha}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{where}: {msg}")
        for arr, nm in ((self.c_zw, "c_zw"), (self.c_zy, "c_zy"), (self.c_xw, "c_xw")):
            if arr.size and not np.all(np.isfinite(arr)):
                raise ValueError(f"{where}: {nm} has non-finite entries")
        for arr, nm in ((self.exists, "exists"), (self.length, "length")):
            if arr is not None and arr.shape != (n_x, n_y):
                raise ValueError(f"{where}: {nm} shape {arr.shape} != {(n_x, n_y)}")
        if self.exists is not None and np.any(self.solve & ~self.exists):
            raise ValueError(f"{where}: solve marks pairs that are not connections (exists)")
        d = self.d_xy[self.solve]
        if d.size and not (np.all(np.isfinite(d)) and np.all(d > 0)):
            raise ValueError(f"{where}: d_xy must be finite and > 0 where solve is True")
