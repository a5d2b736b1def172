r"""Transport solvers: :math:`W_1(m_x, m_y)` for every connection of a layer pair.

What is solved
--------------
For each connection :math:`x \to y` of a :class:`~tp_curvature.problem.LayerPairProblem` the
solvers return the Wasserstein-1 distance

.. math::

    W_1(m_x, m_y) = \min_{T \ge 0} \langle T, M \rangle_F
    \quad \text{s.t.} \quad T \mathbf{1} = a, \; T^\top \mathbf{1} = b,

with rows = support of :math:`p_x` plus x, columns = support of :math:`r_y` plus y,

.. math::

    a = [(1-\alpha)\, p_x,\; \alpha], \qquad b = [(1-\alpha)\, r_y,\; \alpha], \qquad
    M = \begin{pmatrix} C_{zw} & c_{zy}[:, y] \\ c_{xw}[x, :] & d(x, y) \end{pmatrix}

(zero-mass atoms dropped; an all-zero :math:`p_x` makes :math:`m_x = \delta_x`, the same for y).
Every connection of a pair shares the block :math:`C_{zw}`; only row x and column y differ.
Degenerate cases are solved in closed form: both measures deltas gives :math:`W_1 = d(x,y)`;
a delta on one side fixes the plan (:math:`W_1 = \sum_w b_w c_{xw} + b_y d` and
symmetrically). At ``alpha >= 1/2`` so is every connection at least as long as its detours
(:math:`d(x, y) \ge \max_{z, w} (c_{zy} + c_{xw} - c_{zw})`: the plan that moves only the
forced :math:`2\alpha - 1` along it is optimal; ``"sinkhorn"`` backend, ``bypass=True``).
``alpha = 0`` is allowed (x and y then carry no mass unless their measure is a
delta).

Backends (:func:`solve_w1`)
---------------------------
``"exact"``
    POT's network simplex ``ot.emd2`` in a Python loop (the reference; :mod:`._exact`).
``"pot-sinkhorn"``
    ``ot.sinkhorn2`` in the same loop, on ``M / d(x, y)`` with ``reg = eps`` (a peer for the
    benchmark; it returns the cost of the unrounded entropic plan).
``"sinkhorn"`` (default)
    Numba Sinkhorn that solves all connections of the pair in one call, returning rounded
    feasible-plan costs (one-sided bias); see :mod:`._sinkhorn`.

Layout (private modules): ``_exact`` (POT loops, :func:`connection_problem`), ``_sinkhorn``
(the engine and its theory), ``_prepare`` (measure compaction, padding, shared potentials,
eps levels, chunks), ``_primitives`` (one copy of each Sinkhorn step), ``_drivers``
(single-problem solver with fallbacks), ``_batched`` (batched solver, worker entry),
``_log_domain``, ``_pool`` (threads, BLAS limit), ``_bundles`` (array bundles), ``_solve``.
"""
from ._exact import connection_problem, pot_sinkhorn_w1
from ._solve import BACKENDS, DEFAULTS, solve_w1

__all__ = ["solve_w1", "connection_problem", "pot_sinkhorn_w1", "BACKENDS", "DEFAULTS"]
