r"""The Numba Sinkhorn engine (backend ``"sinkhorn"``): all connections of a pair in one call.

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
:math:`(\varepsilon \log(nm) + 2\delta \max M / d) / (1-\alpha)` (plus ``mass_tol`` terms,
:mod:`._prepare`). The bound is loose; measured errors are in the README
(``benchmarks/kernels.py``). Note the :math:`1/(1-\alpha)`: at ``alpha=0.9`` the same W1
error is a 10x larger kappa error, so scale ``eps`` (and ``tol``) with :math:`1-\alpha`.

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
* **Weak connections in closed form.** At ``alpha >= 1/2`` a connection at least as long as
  every detour (:math:`d(x, y) \ge \max_{z, w} (c_{zy} + c_{xw} - c_{zw})`) has an optimal
  plan that moves only the forced :math:`2\alpha - 1` along it (:func:`~._primitives.bypass`);
  its cost is W1, exact, with no iteration (``bypass=False``: iterate anyway). Checked per
  connection before anything else, stopping at the first row whose detour exceeds d: 39-42%
  of a ViT-B/16 MLP layer's connections, 82-84% of a ResNet-50 1x1 conv's.
* **Kernel domain, eps-scaling, over-relaxation.** Sinkhorn runs on scaling vectors
  :math:`u, v` (no logarithms in the loop), first at ``eps_scaling * eps`` (tolerance 0.1), then
  at ``eps``; updates are over-relaxed, :math:`u \leftarrow \max(u + \omega (a / Kv - u),\;
  a / (2 Kv))` with ``omega`` (same fixed point, fewer iterations).
* **Batches over one shared block** (:mod:`._batched`). When all rows share their support (the
  paper's and the flow measures on dense layers; padded to multiples of 16), a thread takes up
  to ``batch`` connections of one level and each iteration's products with the shared block
  become two matrix products over the problems still running (BLAS sgemm). Each problem keeps
  its own early stop (L1 error of the violated marginal ``<= tol``). The batches are spread
  over ``numba.get_num_threads()`` worker threads running ``nogil`` Numba code (:mod:`._pool`;
  a ``prange`` version compiles longer for the same speed and nests OpenBLAS in OpenMP); the
  per-thread workspace is O(batch * (k_z + k_w)). Rows with different supports (e.g. after
  top-k truncation) are solved one problem per thread on the gathered block
  (:mod:`._drivers`, O(k_z k_w) workspace), in ``CHUNKS`` chunks per level group. Each
  thread takes the next chunk from a shared atomic counter, so a thread that draws cheap
  chunks takes more (a fixed round-robin left one of two threads idle 43-54% of the time on
  ViT-B/16 MLP layers), and the chunking does not depend on the thread count (the warm
  starts make values depend on it): the values are the same on one thread or many. No
  (connections x n x m) tensor is ever built.
* **Warm starts** (one-at-a-time problems). The connections of a chunk are sorted by x, and
  all connections out of x share its source measure: a problem starts from the previous
  one's final row scalings (same eps level; x's own entry shifted by the change of its
  c-transform potential), skips the eps-scaling stage and begins with the column update
  :math:`v = b / K^\top u` (``warm_start=False``: every problem from the shared potentials;
  measured: about half the iterations and 15-25% less time on ragged layers).
* **The column bound** (one-at-a-time problems). A problem whose bound from its row
  scalings exceeds ``FINER_AT * kappa_tol`` also takes the bound from its column scalings
  (:func:`~._drivers._col_bound`) and keeps the larger: the column update comes last, and
  its potentials are the closer ones on most layers (a ViT-B/16 MLP slice: half the
  problems were loose from the rows, a fifth from both).
* **Finer stage in place** (one-at-a-time problems, with ``kappa_tol``). A problem whose
  certified bound still exceeds ``FINER_AT * kappa_tol`` continues at once for one more
  stage at a quarter of the last eps, in float32 or, for a problem that fell back to the
  float64 path, in float64: its plan :math:`P = e^{-(M - f \oplus g)/e}`
  becomes the stage's kernel :math:`P^4 = e^{-(M - f \oplus g)/(e/4)}` with scalings 1
  (no exponential, no range check), and the plan cost / lower bound kept are the better of
  the two stages' (:func:`~._drivers._finer`). It takes the entropic bias of most loose
  connections below the tolerance without the float64 refinement pass
  (``finer=False``: all of them go there).
* **Fallbacks.** Problems whose float32 scalings leave the safe range (``max u * max v >
  1e25``, i.e. their potentials moved far from the shared ones; checked after each stage) are
  redone as a float64 batch on the level's float64 kernel (built from the reduced costs), and
  alone in the (stabilised) log domain if that overflows (:mod:`._log_domain`). A ragged
  problem solved alone first absorbs its scalings into its own potentials and kernel and
  goes on in float32 (at most twice, :func:`~._drivers._absorb`: on ResNet-50's 3x3 layers
  a sixth to two fifths of the problems overflowed, and starting over in float64 cost three
  normal problems), then float64 alone, then the log domain. With ``kappa_tol`` a
  one-at-a-time float32 result is kept whatever its scalings' range (an entry floored to 0
  can only make its plan worse, and the certificate bounds every value): on a ViT-B/16 MLP
  layer pair 33,880 of 294,816 problems went to float64 for range alone, 6,064 before the
  absorbing (those whose iteration overflows), none with it. Fallbacks are rare on layered
  problems at the default eps and common at much smaller eps (use ``precision="float64"``
  there) or on random non-metric costs. ``max_iter`` caps the iterations per stage; counts
  of non-converged / float64 / log-domain problems are in the log of
  :func:`~tp_curvature.transport.solve_w1` (a non-converged value is still a feasible-plan
  cost, >= W1).

Cost: one Sinkhorn iteration is about :math:`4 (k_z+1)(k_w+1)` flops, so the engine scales
with :math:`(k_z+1)(k_w+1)` per connection: truncating the measures to their ``k`` heaviest
atoms (the graph code does this before building the problem) is the lever for wide layers; a
layer with few solved connections pays the per-level kernels (a few exps per block entry).
Degenerate cases are solved in closed form (:func:`~._primitives.closed_form`).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from ._batched import solve_chunks
from ._bundles import Outputs, Settings
from ._pool import one_blas_thread, run_parallel
from ._prepare import (eps_levels, make_chunks, prepare, stage_kernels, trim_cost_bounds,
                       used_atoms)
from ._primitives import BYPASS, F32_UVMAX, F64, LOG, MAXITER

COARSE_TOL = 0.1  # L1 marginal tolerance of the eps-scaling (coarse) stage
KERNEL_BYTES = 16 << 20  # memory for the per-level kernels of one parallel call
PATHS = {"float32": 0, "float64": 1, "log": 2}
ROUND_REL = 1e-5  # float32 rounding of a returned cost, relative (measured <= 3e-7)
TRIM_SHARE = 0.1  # share of kappa_tol left to the mass_tol trimming term of the certificate
FINER_AT = 0.8  # in-kernel refinement above this share of kappa_tol (one-at-a-time path)
CHUNKS = 64  # one-at-a-time work chunks per level group (threads take them dynamically)
CHUNK_MIN = 256  # connections per chunk at least (each chunk starts cold and allocates)
REFINE_EPS = 0.25  # the refinement pass runs at this fraction of eps and tol, in float64
#: Up to this many connections above ``kappa_tol`` go straight to the exact solver: a
#: refinement pass (its own preparation, shared potentials and kernels) costs more than a few
#: ``ot.emd2`` calls (measured: 2.5 ms against 0.4 ms per 65-atom problem).
REFINE_MIN = 8
#: The same for problems solved one at a time (ragged supports): there the pass often fails to
#: certify small layers' loose connections anyway (ResNet-56's 58 layer pairs: 242 of 272
#: refined connections still went to ``ot.emd2``; all 325 straight to it: 1.04-1.11 ->
#: 0.92-1.05 s); wide layers' many loose ones (a ViT-B/16 MLP slice: ~900, 1 left after the
#: pass) are refined. (Batched problems: the dense random layers of ``benchmarks/kernels.py``
#: refine 19-5,997 connections with none left.)
REFINE_MIN_RAGGED = 64
#: Iterations per eps stage of the refinement pass at most: a connection still above
#: ``kappa_tol`` after it goes to ``ot.emd2``, which takes about 0.1-0.25 ms on a 33 x 33
#: problem, i.e. the time of 100-200 float64 iterations (slow problems are common on
#: ResNet-50's 3x3 convs: with the solver's ``max_iter`` of 2,000, ``layer3.4.conv2``'s pass
#: averaged 843 iterations and took 4.1 of the layer's 4.7 s, 1.6 s with this cap).
REFINE_MAX_ITER = 100


class EngineOptions(NamedTuple):
    """The engine's knobs (see :func:`~tp_curvature.transport.solve_w1`)."""
    eps: float
    tol: float
    max_iter: int
    omega: float
    eps_scaling: float
    levels: int
    mass_tol: float
    batch: int
    chunk_rows: int
    precision: str
    warm_start: bool = True
    finer: bool = True
    bypass: bool = True


def sinkhorn_backend(problem, opts: EngineOptions, progress: bool = False,
                     kappa_tol=None, refine: bool = True, top=None, prepared=None):
    """W1 of every connection of ``problem`` with the Numba engine, certified (see
    :func:`certify`); returns (W, log dict).

    With ``kappa_tol`` and ``refine``, the connections whose certified bound exceeds
    ``kappa_tol`` (when there are more than ``REFINE_MIN``, ``REFINE_MIN_RAGGED`` for
    problems solved one at a time; fewer go to the exact solver
    directly) are first solved again by the engine at ``REFINE_EPS * eps`` and
    ``REFINE_EPS * tol`` in float64, at most ``REFINE_MAX_ITER`` iterations per stage (the
    smaller entropic bias tightens both sides of the bound); each connection keeps the value
    with the smaller certified bound, and only those still above ``kappa_tol`` go to the
    exact solver. ``top``: the per-connection cost bounds of
    :func:`~._prepare.trim_cost_bounds` if already known (they depend on the costs and
    supports only, not on ``solve``: the refinement pass reuses the first pass's), and
    ``prepared`` the ``(mass_tol, prepared problem)`` of a pass over the same problem (with
    another ``solve``), reused if it trimmed no more than this pass may.
    """
    n_x, n_y = problem.d_xy.shape
    outs = Outputs(np.full((n_x, n_y), np.nan), np.zeros((n_x, n_y), np.int64),
                   np.zeros((n_x, n_y), np.int64), np.full((n_x, n_y), np.nan))
    t0 = time.perf_counter()
    if top is None and kappa_tol is not None and opts.mass_tol > 0:
        top = trim_cost_bounds(problem)
    mass_tol_eff = _trimming_tolerance(problem, opts.mass_tol, kappa_tol, top)
    if prepared is not None and prepared[0] <= mass_tol_eff:
        # (a refinement pass: supports, costs, shared potentials; trimmed to a tolerance no
        # larger than this pass's, and the certificate counts the mass actually trimmed)
        prep = prepared[1]
    else:
        prep = prepare(problem, mass_tol_eff)
    t_prep = time.perf_counter() - t0
    n_solved = int(problem.solve.sum())
    # one-at-a-time float32 problems whose first bound exceeds FINER_AT * kappa_tol continue
    # in place at a quarter of eps (:func:`~._drivers._finer`)
    finer = (FINER_AT * kappa_tol * (1.0 - float(problem.alpha))
             if kappa_tol is not None and refine and opts.finer else np.inf)
    # a certified run keeps float32 results of any scaling range (the certificate checks each
    # one); a raw run only those whose floored kernel entries carried no mass
    uvmax = np.inf if kappa_tol is not None else F32_UVMAX
    if n_solved:
        _solve_levels(problem, prep, opts, outs, progress, finer, uvmax)
    t_cert = time.perf_counter()
    kgap, _ = certify(problem, prep, outs, None, top)
    n_refined = n_exact = 0
    if kappa_tol is not None and refine:
        n_refined, n_exact = _refine(problem, opts, outs, kgap, kappa_tol, top,
                                     REFINE_MIN if prep.uniform else REFINE_MIN_RAGGED,
                                     (mass_tol_eff, prep))
    n_exact += exact_fallback(problem, outs, kgap, kappa_tol)
    st = outs.status[problem.solve]
    its = outs.iters[problem.solve]
    log = dict(
        backend="sinkhorn", name=problem.name, n_solved=n_solved,
        uniform_support=prep.uniform, k_z=int(prep.k_z), k_w=int(prep.k_w),
        iterations_mean=float(its.mean()) if its.size else 0.0,
        iterations_max=int(its.max()) if its.size else 0,
        n_not_converged=int(np.isin(st, (MAXITER, F64 + MAXITER, LOG + MAXITER)).sum()),
        n_float64=int(((st == F64) | (st == F64 + MAXITER)).sum()),
        n_log_domain=int(np.isin(st, (LOG, LOG + MAXITER)).sum()),
        n_bypass=int((st == BYPASS).sum()),
        seconds_prepare=t_prep, seconds=time.perf_counter() - t0,
        **{k: v for k, v in opts._asdict().items() if k not in ("batch", "chunk_rows",
                                                                "precision", "warm_start",
                                                                "finer", "bypass")},
        mass_tol_effective=mass_tol_eff, kappa_tol=kappa_tol,
        n_refined=n_refined, n_exact_fallback=n_exact, kappa_gap=kgap,
        kappa_gap_max=float(np.max(kgap[problem.solve])) if n_solved else 0.0,
        seconds_certificate=time.perf_counter() - t_cert,
    )
    return outs.out, log


def _trimming_tolerance(problem, mass_tol: float, kappa_tol, top) -> float:
    """``mass_tol``, lowered so that the trimming term of the certificate,
    ``(delta_x + delta_y) M_xy / d`` in kappa, stays below ``TRIM_SHARE * kappa_tol`` for
    every solved connection (``delta <= mass_tol`` for normalised rows; ``top``: the
    per-connection cost bounds ``M_xy`` of :func:`~._prepare.trim_cost_bounds`)."""
    if kappa_tol is None or mass_tol <= 0 or not problem.solve.any():
        return mass_tol
    ratio = float(np.min(problem.d_xy[problem.solve] / top[problem.solve]))
    return min(mass_tol, 0.5 * TRIM_SHARE * kappa_tol * ratio)


def _solve_levels(problem, prep, opts: EngineOptions, outs, progress: bool,
                  finer: float = np.inf, uvmax: float = F32_UVMAX) -> None:
    """Solve every connection of ``problem`` into ``outs``: connections bucketed by eps level,
    the stage kernels of a group of levels computed at once (memory bounded by
    ``KERNEL_BYTES``), and all their connections sent to one parallel call."""
    from numba import get_num_threads

    costs, meas, uniform = prep.costs, prep.meas, prep.uniform
    nzu, nwu = costs.C.shape
    path = PATHS[opts.precision]
    R32 = np.minimum(costs.R, 1e30).astype(np.float32) if path == 0 else None
    pairs = np.argwhere(problem.solve)
    d = costs.dxy[pairs[:, 0], pairs[:, 1]]
    pairs, lev, starts, ends, dmin, rho = eps_levels(pairs, d, opts.levels)
    n_stages = 2 if opts.eps_scaling and opts.eps_scaling > 1 else 1
    nthr = get_num_threads()
    batched = uniform and path <= 1
    # float32 kernels (and, batched, their transposes and K o C)
    per_level = (n_stages * 2 + 1 if batched else n_stages) * max(nzu * nwu, 1) * 4
    lv_per_group = max(1, KERNEL_BYTES // per_level)
    tol_st = np.array([max(opts.tol, COARSE_TOL), opts.tol][2 - n_stages:])
    # one-at-a-time float32 problems: every group's kernels written into one buffer
    ragged32 = not batched and path == 0
    buf = (np.empty(min(lv_per_group, len(starts)) * n_stages * nzu * nwu, np.float32)
           if ragged32 else None)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(pairs), desc=f"W1 sinkhorn {problem.name}", leave=False)
    for g0 in range(0, len(starts), lv_per_group):
        g1 = min(len(starts), g0 + lv_per_group)
        e_fine = opts.eps * dmin * rho ** lev[starts[g0:g1]].astype(np.float64)
        eps_lv = np.stack([opts.eps_scaling * e_fine, e_fine], axis=1)[:, 2 - n_stages:].copy()
        s, e = starts[g0], ends[g1 - 1]
        cx = np.ascontiguousarray(pairs[s:e, 0])
        cy = np.ascontiguousarray(pairs[s:e, 1])
        # one-at-a-time problems read only their atoms' kernel entries
        kern = stage_kernels(R32, costs.C32, eps_lv, path, batched,
                             used_atoms(meas, cx, cy, nzu, nwu) if ragged32 else None, buf)
        # chunks: batches of at most `batch` connections (uniform supports), else CHUNKS
        # chunks (of at least CHUNK_MIN connections) taken by whichever thread is free; not
        # tied to the thread count, since the warm starts make values depend on the chunking
        target = opts.batch if batched else max(CHUNK_MIN, (e - s) // CHUNKS)
        lv_loc = np.repeat(np.arange(g1 - g0), ends[g0:g1] - starts[g0:g1])
        chunk_ptr, chunk_lv = make_chunks(cx, lv_loc, target, opts.chunk_rows)
        cfg = Settings(eps_lv, tol_st, int(opts.max_iter), float(opts.omega), path,
                       float(problem.alpha), uniform, bool(opts.warm_start), float(finer),
                       float(uvmax), bool(opts.bypass))
        with one_blas_thread(batched):
            run_parallel(solve_chunks, min(nthr, len(chunk_ptr) - 1), kern, costs, meas,
                         cfg, cx, cy, chunk_ptr, chunk_lv, outs)
        if bar is not None:
            bar.update(e - s)
    if bar is not None:
        bar.close()


def _refine(problem, opts: EngineOptions, outs, kgap, kappa_tol, top, least: int,
            prepared) -> tuple:
    """Solve the connections whose bound exceeds ``kappa_tol`` again at ``REFINE_EPS`` times
    eps and tol in float64 if there are more than ``least``; each keeps the value with the
    smaller bound (``outs`` and ``kgap`` updated in place; ``prepared``: the first pass's
    ``(mass_tol, prepared problem)``). Returns (number refined, number the refinement
    re-solved exactly)."""
    bad = problem.solve & ~(kgap <= kappa_tol)
    n_refined = int(bad.sum())
    if n_refined <= least:               # nothing, or so few that exact_fallback is cheaper
        return 0, 0
    fine = opts._replace(eps=REFINE_EPS * opts.eps, tol=REFINE_EPS * opts.tol,
                         precision="float64", max_iter=min(opts.max_iter, REFINE_MAX_ITER))
    w2, log2 = sinkhorn_backend(replace(problem, solve=bad), fine, False, kappa_tol,
                                refine=False, top=top, prepared=prepared)
    # the refinement pass itself re-solves exactly what it cannot certify
    better = bad & (log2["kappa_gap"] < kgap)
    outs.out[better] = w2[better]
    kgap[better] = log2["kappa_gap"][better]
    return n_refined, log2["n_exact_fallback"]


def certify(problem, prep, outs, kappa_tol, top=None):
    r"""Certified kappa error of every solved connection; exact re-solve where it is too large.

    For connection :math:`x \to y` the engine returns the cost :math:`P \ge W_1'` of a feasible
    plan of the (``mass_tol``-trimmed) problem and a weak-duality lower bound
    :math:`LB \le W_1'` (``outs.lower``, :func:`~._primitives.dual_bound`), and trimming moves
    W1 by at most :math:`t = (1-\alpha)(\delta_x + \delta_y) M_{xy}`, :math:`M_{xy}` a bound
    on the largest cost of the connection's own problem (``top``, computed if None:
    :func:`~._prepare.trim_cost_bounds`). So :math:`|P - W_1| \le (P - LB) + t` (plus
    ``ROUND_REL * P`` for float32 results, whose summed cost may sit a rounding below
    :math:`W_1`) and

    .. math::

        |\kappa_P - \kappa| \le \frac{(P - LB) + t}{d(x, y)\,(1-\alpha)} =: \gamma,

    ``kappa_gap``. Connections with
    :math:`\gamma >` ``kappa_tol`` (or a non-finite bound) are re-solved exactly
    (:func:`~._exact.exact_w1` on the original problem; their gap becomes 0). ``kappa_tol``
    None: nothing is re-solved (the values are the engine's). Returns (kappa_gap (n_x, n_y),
    NaN off ``solve``; number of exact re-solves); ``outs.out`` is updated in place.
    """
    al = float(problem.alpha)
    solve = problem.solve
    d = prep.costs.dxy
    with np.errstate(invalid="ignore", over="ignore"):
        gap = np.maximum(outs.out - outs.lower, 0.0)
        # float32 sums of the rounded cost: P may sit below W1 by its rounding (~1e-7 P)
        gap += np.where(outs.status < F64, ROUND_REL * np.abs(outs.out), 0.0)
    if prep.drop_x.any() or prep.drop_y.any():
        if top is None:
            top = trim_cost_bounds(problem)
        with np.errstate(invalid="ignore"):   # inf * 0 off the solved connections
            gap = gap + (1.0 - al) * (prep.drop_x[:, None] + prep.drop_y[None, :]) * top
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        kgap = np.where(solve, gap / (d * (1.0 - al)), np.nan)
    kgap[solve & np.isnan(kgap)] = np.inf  # no bound: treat as unbounded
    n_exact = exact_fallback(problem, outs, kgap, kappa_tol)
    return kgap, n_exact


def exact_fallback(problem, outs, kgap, kappa_tol):
    """Re-solve exactly (``ot.emd2``) every solved connection whose certified bound ``kgap``
    exceeds ``kappa_tol`` (or is not finite); their bound becomes 0. ``kappa_tol`` None:
    nothing. Updates ``outs.out`` and ``kgap`` in place; returns the number re-solved."""
    from ._exact import exact_w1

    if kappa_tol is None:
        return 0
    redo = np.argwhere(problem.solve & ~(kgap <= kappa_tol))
    for i, j in redo:
        outs.out[i, j] = exact_w1(problem, int(i), int(j))
        kgap[i, j] = 0.0
    return len(redo)
