"""The entry point :func:`solve_w1` (backend dispatch, argument checks, the log dict)."""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from ..problem import LayerPairProblem
from ._exact import loop_backend
from ._sinkhorn import PATHS, EngineOptions, sinkhorn_backend

BACKENDS = ("sinkhorn", "exact", "pot-sinkhorn")

#: Defaults of the ``"sinkhorn"`` backend (relative eps, L1 marginal tolerance, ...).
#: ``kappa_tol``: the certified accuracy, max |kappa - exact kappa| of every returned value
#: (connections whose certified bound exceeds it are re-solved exactly; see :func:`solve_w1`).
DEFAULTS = dict(eps=0.02, tol=1e-2, max_iter=2000, omega=1.5, eps_scaling=3.0, levels=4,
                mass_tol=1e-4, batch=32, kappa_tol=0.02, slice_connections=1 << 18)


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
    kappa_tol: float | None = DEFAULTS["kappa_tol"],
    half_idleness: bool = True,
    warm_start: bool = True,
    finer: bool = True,
    bypass: bool = True,
    slice_connections: int | None = DEFAULTS["slice_connections"],
    validate: bool = True,
    log: bool = False,
):
    r""":math:`W_1(m_x, m_y)` of every connection of a layer pair.

    For connection :math:`x \to y`, :math:`W_1 = \min_{T \in U(a, b)} \langle T, M \rangle` with
    ``(a, b, M)`` as in :func:`~tp_curvature.transport.connection_problem`. The ``"sinkhorn"``
    backend (:mod:`tp_curvature.transport._sinkhorn`) computes, for every connection, the cost
    :math:`P` of a feasible transport plan (:math:`P \ge W_1`, so kappa is biased low) and,
    from the final Sinkhorn potentials :math:`f`, the weak-duality bound
    :math:`LB = \sum_i a_i f'_i + \sum_j b_j g'_j \le W_1` (:math:`g' = f^c`,
    :math:`f' = g'^c`: any dual-feasible pair bounds every plan's cost from below; for a loose
    one-at-a-time problem also the mirror bound from the column potentials, keeping the
    larger). Hence the **certified** kappa error

    .. math::

        |\kappa_P - \kappa| \le \gamma = \frac{P - LB + t}{d(x, y)\,(1 - \alpha)}

    (:math:`t`: the ``mass_tol`` trimming term, 0 when nothing is dropped; up to float
    rounding of P), and every connection with :math:`\gamma >` ``kappa_tol`` is re-solved
    exactly with ``ot.emd2``. So **every returned value is within** ``kappa_tol`` **of the
    exact kappa** (default 0.02). Sinkhorn's own error bound is
    :math:`\varepsilon \log(nm) + 2\,\mathrm{tol} \max M / d` relative to d, i.e.
    :math:`1/(1-\alpha)` larger in kappa: at ``alpha = 0.9`` or 0.99, or on sparse layers with
    large capped costs, many connections fall back to the exact solver unless ``eps`` and
    ``tol`` are smaller (e.g. 0.005 and 3e-3 with ``precision="float64"``). It uses
    ``numba.get_num_threads()`` threads (``numba.set_num_threads`` / ``NUMBA_NUM_THREADS``).

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
        in the log's ``n_not_converged`` (their value is still a feasible-plan cost >= W1).
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
        the rest; W1 moves by at most ``2 (1-alpha) mass_tol max(M)``); ``0`` keeps all. With
        ``kappa_tol`` it is lowered to ``0.05 kappa_tol min(d) / max(M)`` if smaller, so the
        trimming term uses at most a tenth of ``kappa_tol`` (log: ``mass_tol_effective``).
    batch : int
        Connections solved together by one thread when all rows share their support: the
        shared block enters each iteration as one matrix product (BLAS) over the problems
        still running; each problem keeps its own early stop.
    precision : {"float32", "float64", "log"}
        ``"float32"``: kernel-domain iterations in float32 on the shared per-level kernels, with
        automatic fallback per problem to float64 (scalings out of the safe range) and then to
        the log domain (overflow). ``"float64"`` starts at the float64 step (batched too;
        slower per iteration, faster than float32 when most problems fall back, e.g. at small
        eps); ``"log"`` solves every problem alone in the log domain (slow; for checks).
    kappa_tol : float or None
        Certified accuracy (default 0.02). Problems solved one at a time (ragged supports)
        whose bound exceeds ``0.8 kappa_tol`` first continue in place for one more stage
        (float32, or float64 on the float64 path) at a quarter of the last eps, from their
        own plan (absorbed into the kernel as :math:`P^4`; each keeps the smaller plan cost
        and the larger lower bound). Every
        connection whose certified kappa error bound still exceeds ``kappa_tol`` is solved
        again by the engine at a quarter of ``eps`` and ``tol`` in float64 (at most 100
        iterations per eps stage: beyond, an exact solve is cheaper), and, if its bound
        still exceeds ``kappa_tol``, exactly (``ot.emd2``).
        ``None``: return the first-pass Sinkhorn values as they are (the bound is still
        reported).
    half_idleness : bool
        ``"sinkhorn"`` with ``alpha > 0.5``: solve the equivalent problem at ``alpha = 0.5``
        and map its W1 back exactly (:func:`at_half_idleness`; kappa does not depend on alpha
        in [1/2, 1)), which divides the kappa error of the solution by ``2 (1 - alpha)``
        relative to solving at alpha (default True; False solves at alpha, for comparison).
    warm_start : bool
        ``"sinkhorn"``, problems solved one at a time (ragged supports): start each from the
        previous connection out of the same x (its row scalings, at the final eps) instead of
        from the shared potentials (default True; about half the iterations). Values change
        within the solver's accuracy, and are certified the same way.
    finer : bool
        ``"sinkhorn"`` with ``kappa_tol``: the in-place finer stage of one-at-a-time problems
        described under ``kappa_tol`` (default True; False sends them to the refinement pass,
        for comparison).
    bypass : bool
        ``"sinkhorn"`` with ``alpha >= 1/2``: a connection whose optimal plan moves no more mass
        along the connection itself than it must (:math:`2\alpha - 1`; the rest of x's mass
        goes to y's successors, all of x's predecessors' to y) gets that plan's cost, in
        closed form, instead of Sinkhorn iterations. It is optimal exactly when
        :math:`d(x, y) \ge \max_{z, w} (c_{zy} + c_{xw} - c_{zw})`, checked per connection
        on its own atoms (:func:`~._primitives.bypass`, with its dual bound); the value is then
        exact up to the rounding of the path lengths (kappa_gap <= 1e-9). On ViT-B/16's MLP
        layers 39-42% of the connections, on ResNet-50's 1x1 convs 82-84% (log:
        ``n_bypass``). Default True; False iterates on every connection, for comparison.
    slice_connections : int or None
        ``"sinkhorn"``: solve a layer pair with more connections than this in slices of Y
        columns of about this many connections each (:meth:`LayerPairProblem.columns`), so the
        engine's per-connection buffers (about 150 bytes per connection) are bounded by the
        slice, not the layer (default 262,144: 40 MB; a ViT-B/16 MLP layer has 2.4 million
        connections). Each slice is prepared on its own (shared potentials, trimming), so the
        values differ within the solver's accuracy from one unsliced call, and each is
        certified the same way. ``None``: one call.
    validate : bool
        Call ``problem.validate()`` first.
    log : bool
        Also return a dict of diagnostics.

    Returns
    -------
    W : ndarray (n_x, n_y) float64
        W1 where ``problem.solve``, NaN elsewhere.
    log : dict
        Only if ``log=True``. Always ``backend``, ``name``, ``n_solved``, ``seconds``, ``eps``,
        ``tol``. ``"sinkhorn"``: ``uniform_support``, ``k_z``, ``k_w`` (union support sizes,
        or the largest row support when ragged), ``iterations_mean``, ``iterations_max``,
        ``n_not_converged``, ``n_float64``, ``n_log_domain``, ``n_bypass`` (solved by the bypass
        plan), ``seconds_prepare``, ``max_iter``,
        ``omega``, ``eps_scaling``, ``levels``, ``mass_tol``, ``mass_tol_effective``,
        ``kappa_tol``, ``n_refined`` (connections solved again at a smaller eps),
        ``n_exact_fallback`` (connections re-solved exactly), ``kappa_gap`` ((n_x, n_y)
        certified bound of |kappa error| of the returned values, 0 where exact, NaN off
        ``solve``), ``kappa_gap_max`` (its max), ``seconds_certificate`` (bound, refinement
        and exact re-solves), ``alpha_solved`` (the idleness the engine solved at: 0.5 when
        ``half_idleness`` and ``alpha > 0.5``, else ``alpha``).
        Loop backends: ``n_warnings`` (POT warnings).
    """
    if validate:
        problem.validate()
    t0 = time.perf_counter()
    if backend == "sinkhorn":
        if not (1.0 <= omega < 2.0):
            raise ValueError(f"omega must be in [1, 2), got {omega}")
        if eps <= 0 or tol <= 0:
            raise ValueError("eps and tol must be > 0")
        if kappa_tol is not None and not kappa_tol > 0:
            raise ValueError(f"kappa_tol must be > 0 or None, got {kappa_tol}")
        if precision not in PATHS:
            raise ValueError(f"precision must be float32, float64 or log, got {precision!r}")
        if slice_connections is not None and not slice_connections >= 1:
            raise ValueError(f"slice_connections must be >= 1 or None, got {slice_connections}")
        opts = EngineOptions(eps, tol, max_iter, omega, eps_scaling, levels, mass_tol,
                             int(batch), chunk_rows, precision, bool(warm_start),
                             bool(finer), bool(bypass))
        half = half_idleness and problem.alpha > HALF
        W, info = _sliced(at_half_idleness(problem) if half else problem, opts, progress,
                          kappa_tol, slice_connections, keep_gap=log)
        if half:
            W = from_half_idleness(problem, W)
        info["alpha_solved"] = HALF if half else problem.alpha
    elif backend in ("exact", "pot-sinkhorn"):
        W, n_warn = loop_backend(problem, backend, eps, tol, max_iter, progress)
        info = dict(backend=backend, name=problem.name, n_solved=int(np.sum(problem.solve)),
                    n_warnings=n_warn, seconds=time.perf_counter() - t0, eps=eps, tol=tol)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    return (W, info) if log else W


#: Above this idleness the ``"sinkhorn"`` backend solves at it instead (exactly equivalent).
HALF = 0.5


def at_half_idleness(problem: LayerPairProblem) -> LayerPairProblem:
    r"""The same layer pair at idleness 1/2, whose W1 gives W1 at any ``alpha >= 1/2`` exactly.

    The measures of a connection keep mass :math:`\alpha` on x and on y and spread
    :math:`1-\alpha` over x's predecessors and y's successors, which are never y and x. Any
    plan :math:`T` sends at most :math:`1-\alpha` from x to the successors, so
    :math:`T_{xy} \ge 2\alpha - 1`; removing that common mass from x and y leaves a plan of the
    problem with :math:`1-\alpha` on x and y, i.e. :math:`2(1-\alpha)` times the problem at
    :math:`\alpha = 1/2`, and conversely. So for :math:`\alpha \ge 1/2`

    .. math::

        W_1^{\alpha} = (2\alpha - 1)\, d(x, y) + 2 (1 - \alpha)\, W_1^{1/2},
        \qquad \kappa_\alpha = \kappa_{1/2}

    (with a delta measure on one side the closed forms agree as well). Solving at 1/2 divides
    the solver's W1 error by :math:`2(1-\alpha)` before it reaches kappa: at the paper's
    ``alpha = 0.9`` the kappa error is twice the relative W1 error instead of ten times.

    Examples
    --------
    >>> import numpy as np
    >>> from tp_curvature.testing import random_layer_pair
    >>> from tp_curvature.transport import solve_w1
    >>> from tp_curvature.transport._solve import at_half_idleness, from_half_idleness
    >>> P = random_layer_pair(6, seed=0, alpha=0.9)
    >>> w_direct = solve_w1(P, backend="exact")
    >>> w_half = solve_w1(at_half_idleness(P), backend="exact")
    >>> bool(np.allclose(from_half_idleness(P, w_half), w_direct, equal_nan=True))
    True
    """
    if problem.alpha < HALF:
        raise ValueError(f"layer pair {problem.name!r}: alpha {problem.alpha} < 1/2 has no "
                         "equivalent problem at 1/2")
    return replace(problem, alpha=HALF)


def from_half_idleness(problem: LayerPairProblem, w_half: np.ndarray) -> np.ndarray:
    """W1 at ``problem.alpha`` from W1 of :func:`at_half_idleness` (NaN stays NaN)."""
    al = float(problem.alpha)
    with np.errstate(invalid="ignore"):
        return np.where(problem.solve, (2.0 * al - 1.0) * problem.d_xy
                        + 2.0 * (1.0 - al) * w_half, w_half)


def column_slices(solve: np.ndarray, budget: int | None) -> list:
    """Contiguous column ranges ``(c0, c1)`` of ``solve`` with about ``budget`` True entries
    each (one range when the whole has at most ``budget``, or ``budget`` is None)."""
    n_y = solve.shape[1]
    per_col = solve.sum(axis=0)
    total = int(per_col.sum())
    if budget is None or total <= budget or n_y <= 1:
        return [(0, n_y)]
    cum = np.cumsum(per_col)
    n = -(-total // int(budget))
    cuts = np.searchsorted(cum, np.arange(1, n) * (total / n), side="left") + 1
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 1, n_y - 1), [n_y]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


#: How the log entries of column slices combine (the others are the first slice's).
_SUMMED = ("n_solved", "n_not_converged", "n_float64", "n_log_domain", "n_bypass",
           "seconds_prepare", "seconds", "n_refined", "n_exact_fallback", "seconds_certificate")
_MAXED = ("iterations_max", "k_z", "k_w", "kappa_gap_max")


def _sliced(problem: LayerPairProblem, opts, progress: bool, kappa_tol, budget,
            keep_gap: bool = True):
    """:func:`sinkhorn_backend` over the column slices of ``problem`` (see ``solve_w1``'s
    ``slice_connections``); returns (W, merged log). ``keep_gap=False``: the log of several
    slices has no ``kappa_gap`` (an (n_x, n_y) array nobody reads when no log is returned)."""
    parts = column_slices(problem.solve, budget)
    if len(parts) == 1:
        W, info = sinkhorn_backend(problem, opts, progress, kappa_tol)
        info["n_slices"] = 1
        return W, info
    W = np.full(problem.d_xy.shape, np.nan)
    gap = np.full(problem.d_xy.shape, np.nan) if keep_gap else None
    logs = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(parts), desc=f"W1 slices {problem.name}", leave=False)
    for c0, c1 in parts:
        w, info = sinkhorn_backend(problem.columns(c0, c1), opts, False, kappa_tol)
        W[:, c0:c1] = w
        part = info.pop("kappa_gap")
        if gap is not None:
            gap[:, c0:c1] = part
        logs.append(info)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out = dict(logs[0])
    for k in _SUMMED:
        out[k] = type(logs[0][k])(sum(l[k] for l in logs))
    for k in _MAXED:
        out[k] = max(l[k] for l in logs)
    n = max(out["n_solved"], 1)
    out["iterations_mean"] = sum(l["iterations_mean"] * l["n_solved"] for l in logs) / n
    out["uniform_support"] = all(l["uniform_support"] for l in logs)
    out["mass_tol_effective"] = min(l["mass_tol_effective"] for l in logs)
    if gap is not None:
        out["kappa_gap"] = gap
    out["n_slices"] = len(parts)
    return W, out
