"""Numbers for the transport solvers (tp_curvature.transport).

Bounds used below (relative to d = d(x, y), i.e. directly on W1/d):
* every backend returns NaN where ``solve`` is False;
* "exact" equals scipy's LP solution (HiGHS) to 1e-9;
* "sinkhorn" is one-sided: 0 <= (W_sinkhorn - W_exact) / d <= SINKHORN_BOUND at the default
  eps=0.02, tol=1e-2 (the documented worst case eps*log(nm) + 2*tol*max(M)/d is much looser;
  measured on these problems: <= 0.01). A small negative slack covers float32 sums.
"""
from __future__ import annotations

import math

import hypothesis as hyp
import numpy as np
import ot
import pytest
from dataclasses import replace
from hypothesis import strategies as st
from scipy.optimize import linprog

from tp_curvature.transport import DEFAULTS, connection_problem, solve_w1
from tp_curvature.problem import LayerPairProblem
from tp_curvature.testing import minplus, random_layer_pair

SINKHORN_BOUND = 0.02  # max (W_sinkhorn - W_exact) / d
NEG_SLACK = 1e-5  # float32 accumulation below W1 allowed, relative to d


def _rel_err(W, We, P):
    m = P.solve
    return (W[m] - We[m]) / P.d_xy[m]


def _problem(d_xy, c_zw, c_zy, c_xw, p, r, alpha, solve=None):
    """A problem where every x has pred measure p (over all Z) and every y succ measure r."""
    n_x, n_y = d_xy.shape
    n_z, n_w = c_zw.shape
    pred_idx = np.broadcast_to(np.arange(n_z), (n_x, n_z)).copy()
    succ_idx = np.broadcast_to(np.arange(n_w), (n_y, n_w)).copy()
    pm = np.broadcast_to(np.asarray(p, float), (n_x, n_z)).copy()
    sm = np.broadcast_to(np.asarray(r, float), (n_y, n_w)).copy()
    if solve is None:
        solve = np.ones((n_x, n_y), bool)
    return LayerPairProblem(d_xy=np.asarray(d_xy, float), c_zw=np.asarray(c_zw, float),
                            c_zy=np.asarray(c_zy, float), c_xw=np.asarray(c_xw, float),
                            pred_idx=pred_idx, pred_mass=pm, succ_idx=succ_idx,
                            succ_mass=sm, alpha=alpha, solve=solve)


def _random_costs_problem(rng, n_x, n_y, n_z, n_w, alpha, k_z=None, k_w=None):
    """Random positive costs (not min-plus consistent), random supports and masses."""
    k_z = n_z if k_z is None else k_z
    k_w = n_w if k_w is None else k_w
    pred_idx = np.stack([rng.choice(n_z, k_z, replace=False) for _ in range(n_x)])
    succ_idx = np.stack([rng.choice(n_w, k_w, replace=False) for _ in range(n_y)])
    pm = rng.uniform(0.05, 1, size=(n_x, k_z))
    pm /= pm.sum(1, keepdims=True)
    sm = rng.uniform(0.05, 1, size=(n_y, k_w))
    sm /= sm.sum(1, keepdims=True)
    return LayerPairProblem(
        d_xy=rng.uniform(0.5, 3, size=(n_x, n_y)), c_zw=rng.uniform(0.5, 5, size=(n_z, n_w)),
        c_zy=rng.uniform(0.5, 4, size=(n_z, n_y)), c_xw=rng.uniform(0.5, 4, size=(n_x, n_w)),
        pred_idx=pred_idx, pred_mass=pm, succ_idx=succ_idx, succ_mass=sm, alpha=alpha,
        solve=rng.uniform(size=(n_x, n_y)) < 0.8, name="randcost")


def _lp_w1(a, b, M):
    n, m = M.shape
    A_eq = np.zeros((n + m, n * m))
    for i in range(n):
        A_eq[i, i * m:(i + 1) * m] = 1
    for j in range(m):
        A_eq[n + j, j::m] = 1
    res = linprog(M.ravel(), A_eq=A_eq, b_eq=np.concatenate([a, b]), bounds=(0, None),
                  method="highs")
    assert res.status == 0
    return res.fun


def _manual_connection(P, i, j):
    """Independent build of (a, b, M) from the definition (loops, no fancy indexing)."""
    rows, a = [], []
    for z, m in zip(P.pred_idx[i], P.pred_mass[i]):
        if m > 0:
            rows.append(("z", z))
            a.append((1 - P.alpha) * m)
    cols, b = [], []
    for w, m in zip(P.succ_idx[j], P.succ_mass[j]):
        if m > 0:
            cols.append(("w", w))
            b.append((1 - P.alpha) * m)
    rows.append(("x", i))
    a.append(P.alpha if len(rows) > 1 else 1.0)
    cols.append(("y", j))
    b.append(P.alpha if len(cols) > 1 else 1.0)
    M = np.zeros((len(rows), len(cols)))
    for r, (kr, u) in enumerate(rows):
        for c, (kc, v) in enumerate(cols):
            if kr == "z" and kc == "w":
                M[r, c] = P.c_zw[u, v]
            elif kr == "z":
                M[r, c] = P.c_zy[u, v]
            elif kc == "w":
                M[r, c] = P.c_xw[u, v]
            else:
                M[r, c] = P.d_xy[u, v]
    return np.array(a), np.array(b), M


# ------------------------------------------------------------------------------ exact backend
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_matches_linprog(seed):
    rng = np.random.default_rng(seed)
    P = _random_costs_problem(rng, 3, 3, 4, 3, alpha=0.3, k_z=3, k_w=2)
    P.pred_mass[1] = 0.0  # m_x = delta_x on row 1
    W = solve_w1(P, "exact")
    for i, j in np.argwhere(P.solve):
        ref = _lp_w1(*_manual_connection(P, i, j))
        assert W[i, j] == pytest.approx(ref, abs=1e-9, rel=1e-9)
    assert np.isnan(W[~P.solve]).all()


def test_connection_problem_matches_definition():
    P = random_layer_pair(5, 3, measure="flow")
    for i, j in np.argwhere(P.solve)[:6]:
        a, b, M = connection_problem(P, i, j)
        a2, b2, M2 = _manual_connection(P, i, j)
        # same atoms up to order: compare sorted masses and the exact OT value
        assert np.allclose(np.sort(a), np.sort(a2)) and np.allclose(np.sort(b), np.sort(b2))
        assert ot.emd2(a, b, M) == pytest.approx(ot.emd2(a2, b2, M2), rel=1e-12)


# ------------------------------------------------------------------------ sinkhorn vs exact
@pytest.mark.parametrize("n,seed,measure,alpha", [
    (8, 0, "paper", 0.5), (12, 1, "paper", 0.9), (10, 2, "flow", 0.5), (16, 3, "flow", 0.2),
])
def test_sinkhorn_vs_exact_minplus(n, seed, measure, alpha):
    """Real min-plus costs of random layered length matrices (testing.random_layer_pair)."""
    P = random_layer_pair(n, seed, measure=measure, alpha=alpha)
    We = solve_w1(P, "exact")
    W, stats = solve_w1(P, log=True)
    assert np.array_equal(np.isnan(W), ~P.solve)
    rel = _rel_err(W, We, P)
    assert rel.min() >= -NEG_SLACK
    assert rel.max() <= SINKHORN_BOUND
    assert stats["n_not_converged"] == 0
    assert stats["n_solved"] == P.n_connections


def test_sinkhorn_vs_exact_minplus_by_hand():
    """Min-plus costs built here from random layered length matrices, one shared support."""
    rng = np.random.default_rng(7)
    n_z, n_x, n_y, n_w = 5, 4, 6, 5
    l1 = rng.uniform(0.2, 2, (n_z, n_x))
    l2 = rng.uniform(0.2, 2, (n_x, n_y))
    l3 = rng.uniform(0.2, 2, (n_y, n_w))
    c_zy = np.array([[min(l1[z, k] + l2[k, y] for k in range(n_x)) for y in range(n_y)]
                     for z in range(n_z)])
    c_xw = np.array([[min(l2[x, k] + l3[k, w] for k in range(n_y)) for w in range(n_w)]
                     for x in range(n_x)])
    c_zw = np.array([[min(c_zy[z, k] + l3[k, w] for k in range(n_y)) for w in range(n_w)]
                     for z in range(n_z)])
    assert np.allclose(c_zw, minplus(minplus(l1, l2), l3))
    P = _problem(l2, c_zw, c_zy, c_xw, rng.dirichlet(np.ones(n_z)), rng.dirichlet(np.ones(n_w)),
                 alpha=0.5)
    We = solve_w1(P, "exact")
    rel = _rel_err(solve_w1(P), We, P)
    assert -NEG_SLACK <= rel.min() and rel.max() <= SINKHORN_BOUND


@pytest.mark.parametrize("seed", [0, 1])
def test_sinkhorn_vs_exact_random_costs_ragged_supports(seed):
    """Non-metric random costs and per-row supports (the gather path of the engine)."""
    rng = np.random.default_rng(seed)
    P = _random_costs_problem(rng, 6, 7, 9, 8, alpha=0.5, k_z=4, k_w=3)
    We = solve_w1(P, "exact")
    W, stats = solve_w1(P, log=True)
    assert stats["uniform_support"] is False
    rel = _rel_err(W, We, P)
    assert -NEG_SLACK <= rel.min() and rel.max() <= SINKHORN_BOUND


@pytest.mark.parametrize("batch", [1, 32])
def test_deltas_mixed_into_batches(batch):
    """Rows / columns with all-zero measures (deltas) next to normal ones in one batch."""
    P = random_layer_pair(9, 6, measure="paper")
    P.pred_mass[[1, 4]] = 0.0
    P.succ_mass[[0, 5, 7]] = 0.0
    We = solve_w1(P, "exact")
    W = solve_w1(P, batch=batch)
    rel = _rel_err(W, We, P)
    assert -NEG_SLACK <= rel.min() and rel.max() <= SINKHORN_BOUND
    both = np.zeros_like(P.solve)
    both[np.ix_([1, 4], [0, 5, 7])] = True
    assert np.allclose(W[both & P.solve], P.d_xy[both & P.solve], rtol=1e-12)


def test_fallbacks_float64_and_log_domain():
    """Random non-metric costs at a small eps: many problems leave the float32 range (and a
    few the float64 one); the fallbacks must still give feasible-plan values near exact."""
    rng = np.random.default_rng(0)
    P = _random_costs_problem(rng, 4, 4, 6, 6, alpha=0.5)
    We = solve_w1(P, "exact")
    W, stats = solve_w1(P, eps=0.005, log=True)
    assert stats["n_float64"] + stats["n_log_domain"] > 0
    rel = _rel_err(W, We, P)
    assert -NEG_SLACK <= rel.min() and rel.max() <= SINKHORN_BOUND


def test_topk_supports_flow():
    P = random_layer_pair(12, 5, measure="flow", topk=4)
    assert (P.pred_mass > 0).sum(1).max() <= 4
    rel = _rel_err(solve_w1(P), solve_w1(P, "exact"), P)
    assert -NEG_SLACK <= rel.min() and rel.max() <= SINKHORN_BOUND


@pytest.mark.parametrize("kw", [dict(precision="float64"), dict(precision="log"),
                                dict(batch=1), dict(eps_scaling=1.0, omega=1.0),
                                dict(chunk_rows=1, progress=False, mass_tol=0.0)])
def test_engine_paths_agree(kw):
    P = random_layer_pair(8, 11, measure="paper")
    We = solve_w1(P, "exact")
    W, stats = solve_w1(P, **kw, log=True)
    rel = _rel_err(W, We, P)
    assert -NEG_SLACK <= rel.min() and rel.max() <= SINKHORN_BOUND
    if "precision" in kw:          # every connection there but the bypassed ones
        key = "n_float64" if kw["precision"] == "float64" else "n_log_domain"
        assert 0 < stats["n_bypass"] < P.n_connections
        assert stats[key] + stats["n_bypass"] == P.n_connections


def test_smaller_eps_is_more_accurate():
    P = random_layer_pair(10, 4)
    We = solve_w1(P, "exact")
    e1 = _rel_err(solve_w1(P, eps=0.05), We, P).max()
    e2 = _rel_err(solve_w1(P, eps=0.005, tol=1e-3), We, P).max()
    assert e2 < e1
    assert e2 <= 0.006


def test_max_iter_reports_and_stays_feasible():
    P = random_layer_pair(8, 1)
    We = solve_w1(P, "exact")
    W, stats = solve_w1(P, max_iter=1, tol=1e-9, log=True)
    assert stats["n_not_converged"] > 0
    # the rounded plan is feasible, so even unconverged values are upper bounds of W1
    assert _rel_err(W, We, P).min() >= -NEG_SLACK


def test_pot_sinkhorn_backend_close():
    P = random_layer_pair(6, 2)
    We = solve_w1(P, "exact")
    W = solve_w1(P, "pot-sinkhorn", eps=0.02, tol=1e-9, max_iter=5000)
    assert np.abs(_rel_err(W, We, P)).max() <= 0.05


# ---------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("backend", ["exact", "sinkhorn", "pot-sinkhorn"])
def test_both_deltas_give_d(backend):
    rng = np.random.default_rng(0)
    P = _random_costs_problem(rng, 4, 5, 3, 3, alpha=0.5)
    P.pred_mass[:] = 0.0
    P.succ_mass[:] = 0.0
    W = solve_w1(P, backend)
    assert np.allclose(W[P.solve], P.d_xy[P.solve], rtol=1e-12)
    # k_z = k_w = 0 (empty supports) as well
    P.pred_idx = np.zeros((4, 0), np.int64)
    P.pred_mass = np.zeros((4, 0))
    P.succ_idx = np.zeros((5, 0), np.int64)
    P.succ_mass = np.zeros((5, 0))
    assert np.allclose(solve_w1(P, backend)[P.solve], P.d_xy[P.solve], rtol=1e-12)


@pytest.mark.parametrize("backend", ["exact", "sinkhorn"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8])
def test_one_delta_fixes_the_plan(backend, alpha):
    rng = np.random.default_rng(1)
    P = _random_costs_problem(rng, 4, 3, 5, 4, alpha=alpha, k_z=3, k_w=4)
    P.pred_idx = np.zeros((4, 0), np.int64)  # m_x = delta_x for every x
    P.pred_mass = np.zeros((4, 0))
    W = solve_w1(P, backend)
    for i, j in np.argwhere(P.solve):
        r = P.succ_mass[j]
        w = P.succ_idx[j]
        ref = alpha * P.d_xy[i, j] + (1 - alpha) * (r * P.c_xw[i, w]).sum()
        assert W[i, j] == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("backend", ["exact", "sinkhorn"])
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.7])
@pytest.mark.parametrize("c,c1,c2,d", [(1.0, 2.0, 2.5, 3.0), (2.0, 0.5, 0.7, 4.0),
                                       (1.5, 1.0, 1.0, 0.8)])
def test_equal_zw_costs_closed_form(backend, alpha, c, c1, c2, d):
    """All z->w costs c, z->y c1, x->w c2, x->y d: any plan costs
    c (1 - 2 alpha + t) + (c1 + c2)(alpha - t) + d t with t = T_xy in [max(0, 2 alpha - 1), alpha],
    so W1 is the smaller end point: alpha enters the formula directly."""
    n_z, n_w = 4, 5
    rng = np.random.default_rng(2)
    P = _problem(np.full((2, 3), d), np.full((n_z, n_w), c), np.full((n_z, 3), c1),
                 np.full((2, n_w), c2), rng.dirichlet(np.ones(n_z)), rng.dirichlet(np.ones(n_w)),
                 alpha=alpha)
    t0 = max(0.0, 2 * alpha - 1)
    ref = min(c * (1 - 2 * alpha + t) + (c1 + c2) * (alpha - t) + d * t for t in (t0, alpha))
    W = solve_w1(P, backend)
    if backend == "exact":
        assert np.allclose(W, ref, rtol=1e-12)
    else:
        rel = (W - ref) / d
        assert rel.min() >= -NEG_SLACK and rel.max() <= SINKHORN_BOUND


def test_alpha_zero_is_shared_problem():
    """alpha = 0: m_x = p, m_y = r, so W1 = W(p, r; c_zw) for every connection."""
    rng = np.random.default_rng(3)
    p, r = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(6))
    c_zw = rng.uniform(1, 3, (5, 6))
    P = _problem(rng.uniform(1, 2, (3, 4)), c_zw, rng.uniform(1, 3, (5, 4)),
                 rng.uniform(1, 3, (3, 6)), p, r, alpha=0.0)
    ref = ot.emd2(p, r, c_zw)
    assert np.allclose(solve_w1(P, "exact"), ref, rtol=1e-10)
    rel = (solve_w1(P) - ref) / P.d_xy
    assert rel.min() >= -NEG_SLACK and rel.max() <= SINKHORN_BOUND


def test_solve_mask_and_validation():
    P = random_layer_pair(6, 0)
    P.solve[:] = False
    P.solve[1, 2] = True
    W = solve_w1(P)
    assert np.isfinite(W[1, 2]) and np.isnan(W).sum() == W.size - 1
    P.d_xy[1, 2] = np.inf
    with pytest.raises(ValueError):
        solve_w1(P)
    with pytest.raises(ValueError):
        solve_w1(random_layer_pair(4, 0), backend="nope")


# ------------------------------------------------------------------------- property (fast)


@hyp.settings(max_examples=25, deadline=None, derandomize=True)
@hyp.given(seed=st.integers(0, 10_000), n_z=st.integers(1, 6), n_w=st.integers(1, 6),
           alpha=st.sampled_from([0.0, 0.1, 0.5, 0.9]), scale=st.floats(0.01, 100.0))
def test_property_sinkhorn_upper_bounds_exact(seed, n_z, n_w, alpha, scale):
    """On random problems of any size/scale, the documented one-sided bound holds:
    exact <= sinkhorn <= exact + (eps log(nm) + 2 tol max(M)/d) d.

    (The empirical 0.02 of the layered problems does not hold for adversarial tiny problems:
    e.g. 0.066 on a 3x2 problem with max(M)/d = 8, from the tolerance/rounding term.)"""
    rng = np.random.default_rng(seed)
    P = _random_costs_problem(rng, 3, 3, n_z, n_w, alpha=alpha,
                              k_z=int(rng.integers(1, n_z + 1)),
                              k_w=int(rng.integers(1, n_w + 1)))
    for name in ("d_xy", "c_zw", "c_zy", "c_xw"):
        setattr(P, name, getattr(P, name) * scale)
    if not P.solve.any():
        P.solve[0, 0] = True
    W, We = solve_w1(P), solve_w1(P, "exact")
    eps, tol = DEFAULTS["eps"], DEFAULTS["tol"]
    for i, j in np.argwhere(P.solve):
        a, b, M = connection_problem(P, i, j)
        d = P.d_xy[i, j]
        bound = eps * np.log(M.size) + 2 * tol * M.max() / d
        assert -NEG_SLACK <= (W[i, j] - We[i, j]) / d <= bound


@hyp.settings(max_examples=30, deadline=None, derandomize=True)
@hyp.given(seed=st.integers(0, 10_000), n_z=st.integers(1, 5), n_w=st.integers(1, 5),
           alpha=st.sampled_from([0.5, 0.6, 0.9, 0.99, 0.999]),
           delta=st.sampled_from(["none", "x", "y", "both"]))
def test_property_w1_at_alpha_from_half_idleness(seed, n_z, n_w, alpha, delta):
    """W1 at alpha >= 1/2 is (2 alpha - 1) d + 2 (1 - alpha) W1 at 1/2 (kappa does not depend
    on alpha there): an independent LP at alpha against the LP at 1/2 through the formula,
    with delta measures on either side, and the engine (which solves at 1/2) within kappa_tol
    of the LP at alpha."""
    from tp_curvature.transport._solve import at_half_idleness, from_half_idleness

    rng = np.random.default_rng(seed)
    P = _random_costs_problem(rng, 2, 2, n_z, n_w, alpha=alpha)
    if delta in ("x", "both"):
        P.pred_mass[0] = 0.0
    if delta in ("y", "both"):
        P.succ_mass[1] = 0.0
    P.solve[:] = True
    half = at_half_idleness(P)
    lp = np.array([[_lp_w1(*connection_problem(P, i, j)) for j in range(2)] for i in range(2)])
    lp_half = np.array([[_lp_w1(*connection_problem(half, i, j)) for j in range(2)]
                        for i in range(2)])
    np.testing.assert_allclose(from_half_idleness(P, lp_half), lp, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(P.kappa(lp), half.kappa(lp_half), atol=1e-6 / (1 - alpha))
    assert _kappa_err(solve_w1(P), lp, P).max() <= DEFAULTS["kappa_tol"]


def test_half_idleness_refuses_small_alpha():
    with pytest.raises(ValueError, match="alpha 0.3"):
        from tp_curvature.transport._solve import at_half_idleness
        at_half_idleness(random_layer_pair(4, 0, alpha=0.3))


# --------------------------------------------------------------- certified accuracy (kappa_tol)
def _kappa_err(W, We, P):
    return np.abs(W - We) / (P.d_xy * (1 - P.alpha))


def _cert_problem(kind, alpha):
    if kind == "dense":
        return random_layer_pair(10, 3, alpha=alpha)
    if kind == "sparse":  # 50% zero weights: unreachable pairs get large capped costs
        return random_layer_pair(12, 1, alpha=alpha, density=0.5)
    if kind == "topk":  # ragged supports (the one-at-a-time path)
        return random_layer_pair(12, 5, alpha=alpha, measure="flow", topk=4)
    return _random_costs_problem(np.random.default_rng(4), 5, 6, 7, 6, alpha=alpha, k_z=4, k_w=3)


@pytest.mark.parametrize("precision", ["float32", "float64", "log"])
@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("kind", ["dense", "sparse", "topk", "randcost"])
def test_certificate_brackets_exact(kind, alpha, precision):
    """LB = P - kappa_gap d (1-alpha) <= exact W1 <= P (up to float32 rounding of P), i.e. the
    reported kappa_gap bounds the true kappa error of every value, on every engine path."""
    P = _cert_problem(kind, alpha)
    We = solve_w1(P, "exact")
    m = P.solve
    for mass_tol in (0.0, DEFAULTS["mass_tol"]):
        W, lg = solve_w1(P, kappa_tol=None, precision=precision, mass_tol=mass_tol, log=True)
        assert lg["n_exact_fallback"] == 0
        gap = lg["kappa_gap"]
        assert np.isnan(gap[~m]).all() and (gap[m] >= 0).all()
        assert lg["kappa_gap_max"] == pytest.approx(gap[m].max())
        err = _kappa_err(W, We, P)[m]
        assert (err <= gap[m] + 1e-12).all()
        if mass_tol == 0.0:  # no trimming: the bound is LB <= W1 <= P itself
            lb = W - gap * P.d_xy * (1 - alpha)
            assert (lb[m] <= We[m] * (1 + 1e-12)).all()
            assert (We[m] <= W[m] * (1 + 1e-6)).all()


@hyp.settings(max_examples=24, deadline=None, derandomize=True)
@hyp.given(seed=st.integers(0, 10_000), n=st.integers(3, 9),
           kind=st.sampled_from(["dense", "sparse", "flow", "flow_sparse", "randcost"]),
           alpha=st.sampled_from([0.5, 0.9, 0.99]),
           precision=st.sampled_from(["float32", "float64"]))
def test_property_certificate_covers_the_exact_error(seed, n, kind, alpha, precision):
    """On random problems of every class (dense, half-zero weights with capped costs, ragged
    flow measures, random costs; alpha 0.5 / 0.9 / 0.99; float32 and float64) the raw run's
    kappa_gap is never below its true error against ``ot.emd2``, and the certified run
    (``kappa_tol``, the default) is within kappa_tol of it."""
    topk = max(2, n // 2)
    if kind == "randcost":
        rng = np.random.default_rng(seed)
        P = _random_costs_problem(rng, n, n + 1, n, n - 1, alpha=alpha, k_z=topk, k_w=topk)
    else:
        P = random_layer_pair(n, seed, alpha=alpha, density=0.5 if "sparse" in kind else 1.0,
                              measure="flow" if "flow" in kind else "paper",
                              topk=topk if "flow" in kind else None)
    m = P.solve
    hyp.assume(m.any())
    We = solve_w1(P, "exact")
    W, lg = solve_w1(P, kappa_tol=None, precision=precision, log=True)
    assert (_kappa_err(W, We, P)[m] <= lg["kappa_gap"][m] + 1e-12).all()
    Wc = solve_w1(P, precision=precision)
    assert _kappa_err(Wc, We, P)[m].max() <= DEFAULTS["kappa_tol"]


def _largest_cost_of_each_problem(P):
    """max over the entries of each connection's own cost matrix, by brute force."""
    out = np.full(P.d_xy.shape, np.nan)
    for x in range(P.n_x):
        zs = P.pred_idx[x][(P.pred_mass[x] > 0) & (P.pred_idx[x] >= 0)]
        for y in range(P.n_y):
            ws = P.succ_idx[y][(P.succ_mass[y] > 0) & (P.succ_idx[y] >= 0)]
            vals = [P.d_xy[x, y], *P.c_zy[zs, y], *P.c_xw[x, ws],
                    *P.c_zw[np.ix_(zs, ws)].ravel()]
            out[x, y] = max(vals)
    return out


@pytest.mark.parametrize("kind", ["dense", "sparse", "topk", "randcost"])
def test_trimming_cost_bounds_cover_each_connection(kind):
    """The trimming term uses a bound on each connection's own largest cost: never below it
    (the certificate's validity), and below the layer-wide maximum where a connection's
    neighbourhood has no capped (unreachable) pair."""
    from tp_curvature.transport._prepare import trim_cost_bounds

    P = _cert_problem(kind, 0.5)
    M = trim_cost_bounds(P)
    exact = _largest_cost_of_each_problem(P)
    m = P.solve
    assert (M[m] >= exact[m]).all()
    zs = np.unique(P.pred_idx[(P.pred_mass > 0) & (P.pred_idx >= 0)])
    ws = np.unique(P.succ_idx[(P.succ_mass > 0) & (P.succ_idx >= 0)])
    layer_max = max(P.d_xy[m].max(), P.c_zy[zs].max(), P.c_xw[:, ws].max(),
                    P.c_zw[np.ix_(zs, ws)].max())    # the bound before: one for the layer
    assert M[m].max() <= layer_max
    if kind == "sparse":   # capped costs sit in some neighbourhoods only
        assert (M[m] < exact[m].max()).mean() > 0.2


@pytest.mark.parametrize("kind", ["dense", "sparse", "topk", "randcost"])
@pytest.mark.parametrize("mass_tol", [0.2, 0.5])
def test_certificate_holds_under_heavy_trimming(kind, mass_tol):
    """With atoms that carry real mass dropped, the per-connection trimming term still makes
    kappa_gap an upper bound of the true error."""
    from tp_curvature.transport._prepare import compact_measure

    P = _cert_problem(kind, 0.5)
    We = solve_w1(P, "exact")
    dropped = [compact_measure(i, w, mass_tol)[4] for i, w in ((P.pred_idx, P.pred_mass),
                                                               (P.succ_idx, P.succ_mass))]
    assert max(d.max() for d in dropped) > 0.1           # atoms with real mass are dropped
    W, lg = solve_w1(P, kappa_tol=None, mass_tol=mass_tol, log=True)
    m = P.solve
    err = _kappa_err(W, We, P)[m]
    assert (err <= lg["kappa_gap"][m] + 1e-12).all()
    Wc = solve_w1(P, kappa_tol=0.02, mass_tol=mass_tol)      # certified: lowers mass_tol
    assert _kappa_err(Wc, We, P)[m].max() <= 0.02


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99])
def test_kappa_tol_holds_on_sparse_layers(alpha):
    """The default (kappa_tol=0.02) keeps every kappa within 0.02 of exact on sparse layers
    with capped costs, where plain Sinkhorn is off by 0.1-0.2 at alpha 0.9 / 0.99."""
    P = random_layer_pair(24, 0, alpha=alpha, density=0.5)
    We = solve_w1(P, "exact")
    W, lg = solve_w1(P, log=True)
    err = _kappa_err(W, We, P)[P.solve]
    assert err.max() <= DEFAULTS["kappa_tol"]
    assert lg["kappa_gap_max"] <= DEFAULTS["kappa_tol"]
    assert (err <= lg["kappa_gap"][P.solve] + 1e-12).all()
    if alpha > 0.5:
        # solved at idleness 1/2 (exactly equivalent): the same kappa, no exact re-solves
        assert lg["alpha_solved"] == 0.5 and lg["n_exact_fallback"] == 0
        Wh = solve_w1(replace(P, alpha=0.5))
        np.testing.assert_allclose(P.kappa(W)[P.solve],
                                   replace(P, alpha=0.5).kappa(Wh)[P.solve], atol=1e-9)
    tight = solve_w1(P, kappa_tol=0.005)
    assert _kappa_err(tight, We, P)[P.solve].max() <= 0.005


def test_kappa_tol_no_fallback_on_dense_default():
    P = random_layer_pair(32, 0)
    W, lg = solve_w1(P, log=True)
    assert lg["n_exact_fallback"] == 0 and lg["kappa_tol"] == DEFAULTS["kappa_tol"]
    assert lg["kappa_gap_max"] <= DEFAULTS["kappa_tol"]


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_kappa_tol_none_leaves_values_alone(precision):
    """kappa_tol only replaces values: with the same trimming (mass_tol=0), every connection
    certified by the first pass keeps the engine's value bit for bit, the others are refined
    (then re-solved exactly if still uncertified), and None re-solves nothing."""
    P = random_layer_pair(16, 1, alpha=0.9)
    W0, lg0 = solve_w1(P, kappa_tol=None, mass_tol=0.0, precision=precision, log=True)
    W1, lg1 = solve_w1(P, kappa_tol=0.005, mass_tol=0.0, precision=precision, log=True)
    assert lg0["n_exact_fallback"] == 0 and lg0["n_refined"] == 0
    ok = P.solve & (lg0["kappa_gap"] <= 0.005)
    assert ok.any() and np.array_equal(W0[ok], W1[ok])
    assert lg1["n_refined"] == (P.solve & ~ok).sum() > 0
    assert lg1["n_exact_fallback"] <= lg1["n_refined"]
    assert np.all(lg1["kappa_gap"][P.solve] <= 0.005)
    with pytest.raises(ValueError):
        solve_w1(P, kappa_tol=0.0)


def test_refinement_pass_saves_exact_solves():
    """On sparse layers with a tight kappa_tol (0.005) most first-pass bounds exceed it; the
    float64 pass at a quarter of eps certifies them, so (almost) nothing goes to the exact
    solver, and every returned value is within kappa_tol of exact."""
    P = random_layer_pair(32, 0, density=0.5, alpha=0.9)
    W, lg = solve_w1(P, log=True, kappa_tol=0.005)
    assert lg["n_refined"] > 0.2 * lg["n_solved"]
    assert lg["n_exact_fallback"] < 0.1 * lg["n_refined"]
    ref = solve_w1(P, backend="exact")
    d = P.d_xy[P.solve]
    err = np.abs(W[P.solve] - ref[P.solve]) / d / (1 - P.alpha)
    assert err.max() <= 0.005


def test_refinement_pass_is_capped_and_leaves_the_rest_to_the_exact_solver(monkeypatch):
    """The refinement pass runs at most REFINE_MAX_ITER iterations per eps stage (beyond, an
    exact solve is cheaper); what it leaves uncertified is solved exactly, so every value is
    still within kappa_tol of exact, also with a cap of 3 iterations."""
    import tp_curvature.transport._sinkhorn as engine
    P = random_layer_pair(32, 0, density=0.5, alpha=0.9)
    exact = solve_w1(P, backend="exact")
    inner = engine.sinkhorn_backend
    passes = []

    def spy(problem, opts, *a, **k):
        out = inner(problem, opts, *a, **k)
        if k.get("refine", True) is False:
            passes.append((opts.max_iter, out[1]["iterations_max"]))
        return out

    monkeypatch.setattr(engine, "sinkhorn_backend", spy)
    runs, default = {}, engine.REFINE_MAX_ITER
    for cap in (default, 3):
        monkeypatch.setattr(engine, "REFINE_MAX_ITER", cap)
        passes.clear()
        W, lg = solve_w1(P, log=True, kappa_tol=0.005)
        assert len(passes) == 1 and passes[0][0] == cap < DEFAULTS["max_iter"]
        assert passes[0][1] <= 2 * cap                      # two eps stages
        err = np.abs(W - exact)[P.solve] / P.d_xy[P.solve] / (1 - P.alpha)
        assert err.max() <= 0.005
        runs[cap] = lg
    assert runs[3]["n_refined"] == runs[default]["n_refined"] > 0
    assert runs[3]["n_exact_fallback"] > runs[default]["n_exact_fallback"]


def test_refinement_pass_reuses_the_first_pass_preparation(monkeypatch):
    """The refinement pass solves a subset of the same problem: it reuses the first pass's
    supports, costs and shared potentials (one ``prepare`` per problem, two without the
    reuse), and every value stays within kappa_tol of exact."""
    import tp_curvature.transport._sinkhorn as engine
    P = random_layer_pair(32, 0, density=0.5, alpha=0.9)
    exact = solve_w1(P, backend="exact")
    calls, inner = [], engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda p, tol: calls.append(tol) or inner(p, tol))
    backend = engine.sinkhorn_backend
    for reuse, n_prepared in ((True, 1), (False, 2)):
        if not reuse:
            monkeypatch.setattr(engine, "sinkhorn_backend",
                                lambda *a, prepared=None, **k: backend(*a, **k))
        calls.clear()
        W, lg = solve_w1(P, log=True, kappa_tol=0.005)
        assert lg["n_refined"] > 0 and len(calls) == n_prepared
        err = np.abs(W - exact)[P.solve] / P.d_xy[P.solve] / (1 - P.alpha)
        assert err.max() <= 0.005


def test_eps_levels_sort_by_level_then_x_then_y():
    """Connections come sorted by (level, x, y), whatever the spread of d (level numbers
    beyond 16 bits take the general sort)."""
    from tp_curvature.transport._prepare import eps_levels
    rng = np.random.default_rng(0)
    for spread, levels in ((1.0, 4), (30.0, 4), (700.0, 128)):   # the last: > 2**16 levels
        pairs = np.argwhere(rng.random((37, 29)) < 0.6)
        d = np.exp(spread * rng.random(len(pairs)))
        d[::7] = d[0]                                   # ties across rows
        got, lev, starts, ends, dmin, rho = eps_levels(pairs, d, levels)
        lev_ref = np.floor(np.log(d / d.min()) / np.log(2 ** (1 / levels)) + 1e-12)
        order = np.lexsort((pairs[:, 1], pairs[:, 0], lev_ref))
        np.testing.assert_array_equal(got, pairs[order])
        np.testing.assert_array_equal(lev, lev_ref[order])
        assert starts[0] == 0 and np.array_equal(starts[1:], ends[:-1]) and ends[-1] == len(d)
        assert np.all(np.diff(lev[starts]) > 0)
        np.testing.assert_array_equal(np.repeat(lev[starts], ends - starts), lev)


def test_stage_kernels_of_the_used_atoms_are_the_full_kernels_there():
    """Kernels computed for the rows and columns a level group reads equal the full kernels
    there, only those entries are written (into the given buffer), and with most of the
    block used the whole block is computed."""
    from tp_curvature.transport._prepare import SUB_BLOCK, stage_kernels, used_atoms
    from tp_curvature.transport._bundles import Measures
    rng = np.random.default_rng(1)
    R32 = (rng.random((40, 50)) * 30).astype(np.float32)
    eps_lv = np.array([[2.0, 1.0], [1.0, 0.5], [0.3, 0.1]])
    full = stage_kernels(R32, R32, eps_lv, 0, False).Ks
    # measures of 6 x-rows / 5 y-columns with 0-4 atoms each
    pk, sk = rng.integers(0, 5, 6), rng.integers(0, 5, 5)
    ploc, sloc = rng.integers(0, 40, (6, 4)), rng.integers(0, 50, (5, 4))
    meas = Measures(ploc, None, pk, sloc, None, sk)
    cx, cy = np.array([0, 3, 3, 5]), np.array([4, 1, 1, 2])
    rows, cols = used_atoms(meas, cx, cy, 40, 50)
    np.testing.assert_array_equal(rows, sorted({r for x in cx for r in ploc[x, :pk[x]]}))
    np.testing.assert_array_equal(cols, sorted({c for y in cy for c in sloc[y, :sk[y]]}))
    assert rows.size * cols.size < SUB_BLOCK * R32.size
    buf = np.full(full.size + 10, np.nan, np.float32)
    part = stage_kernels(R32, R32, eps_lv, 0, False, (rows, cols), buf).Ks
    assert np.shares_memory(part, buf)
    ix = (slice(None), slice(None)) + np.ix_(rows, cols)
    np.testing.assert_array_equal(part[ix], full[ix])
    assert np.count_nonzero(~np.isnan(part)) == 6 * rows.size * cols.size
    every = (np.arange(40), np.arange(50))
    np.testing.assert_array_equal(stage_kernels(R32, R32, eps_lv, 0, False, every, buf).Ks,
                                  full)


# ------------------------------------------------------------------ column slices
def test_columns_are_the_columns_of_the_whole_problem():
    """A column slice of a layer pair is exactly those columns' transport problems."""
    P = random_layer_pair(9, 3, alpha=0.5, density=0.6, topk=4)
    whole = solve_w1(P, backend="exact")
    part = solve_w1(P.columns(2, 7), backend="exact")
    np.testing.assert_array_equal(np.isnan(part), np.isnan(whole[:, 2:7]))
    np.testing.assert_allclose(part, whole[:, 2:7], rtol=1e-12, equal_nan=True)


def test_column_slices_cover_every_column_within_budget():
    from tp_curvature.transport._solve import column_slices
    rng = np.random.default_rng(0)
    solve = rng.uniform(size=(30, 57)) < 0.4
    parts = column_slices(solve, 100)
    assert parts[0][0] == 0 and parts[-1][1] == 57
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(parts, parts[1:]))
    per = [int(solve[:, c0:c1].sum()) for c0, c1 in parts]
    assert len(parts) == -(-int(solve.sum()) // 100)
    assert max(per) <= 100 + solve.sum(0).max()
    assert column_slices(solve, None) == [(0, 57)] == column_slices(solve, solve.sum())


@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_sliced_solve_is_certified_and_logged(alpha):
    """``slice_connections``: every slice certified within kappa_tol of exact; the log adds up
    and its kappa_gap covers every connection."""
    P = random_layer_pair(24, 1, alpha=alpha, density=0.7)
    exact = P.kappa(solve_w1(P, backend="exact"))
    one, log1 = solve_w1(P, log=True)
    W, log = solve_w1(P, log=True, slice_connections=90)
    assert log1["n_slices"] == 1 and log["n_slices"] > 3
    assert log["n_solved"] == log1["n_solved"] == P.solve.sum()
    np.testing.assert_array_equal(np.isnan(W), ~P.solve)
    np.testing.assert_array_equal(np.isnan(log["kappa_gap"]), ~P.solve)
    err = np.abs(P.kappa(W) - exact)[P.solve]
    assert err.max() <= DEFAULTS["kappa_tol"]
    assert np.all(err <= log["kappa_gap"][P.solve] + 1e-9)      # the bound holds per slice
    assert log["kappa_gap_max"] == np.max(log["kappa_gap"][P.solve])
    with pytest.raises(ValueError, match="slice_connections"):
        solve_w1(P, slice_connections=0)


def test_few_uncertified_connections_go_straight_to_the_exact_solver(monkeypatch):
    """At most REFINE_MIN connections above kappa_tol skip the refinement pass and are solved
    exactly; more are refined first. Either way every value is within kappa_tol."""
    import tp_curvature.transport._sinkhorn as engine
    P = random_layer_pair(16, 1, alpha=0.9)
    _, lg0 = solve_w1(P, kappa_tol=None, mass_tol=0.0, log=True)
    tol = float(np.sort(lg0["kappa_gap"][P.solve])[-3]) * 0.999    # three above it
    W, lg = solve_w1(P, kappa_tol=tol, mass_tol=0.0, log=True)
    assert lg["n_refined"] == 0 and lg["n_exact_fallback"] == 3
    exact = P.kappa(solve_w1(P, backend="exact"))
    assert np.abs(P.kappa(W) - exact)[P.solve].max() <= tol
    monkeypatch.setattr(engine, "REFINE_MIN", 2)
    _, lg2 = solve_w1(P, kappa_tol=tol, mass_tol=0.0, log=True)
    assert lg2["n_refined"] == 3 and lg2["n_exact_fallback"] <= 3


def test_ragged_layers_send_up_to_64_loose_connections_straight_to_the_exact_solver(
        monkeypatch):
    """Problems solved one at a time (ragged supports) skip the refinement pass for up to
    REFINE_MIN_RAGGED loose connections (batched ones: REFINE_MIN); all within kappa_tol."""
    import tp_curvature.transport._sinkhorn as engine
    P = _network_layer_pair(topk=8)
    _, lg0 = solve_w1(P, kappa_tol=10.0, mass_tol=0.0, finer=False, log=True)   # none loose
    assert not lg0["uniform_support"]
    g = np.sort(lg0["kappa_gap"][P.solve])
    assert g[-21] < g[-20]
    tol = float(g[-21] + g[-20]) / 2                                   # twenty above it
    W, lg = solve_w1(P, kappa_tol=tol, mass_tol=0.0, finer=False, log=True)
    assert lg["n_refined"] == 0 and lg["n_exact_fallback"] == 20
    exact = P.kappa(solve_w1(P, backend="exact"))
    assert np.abs(P.kappa(W) - exact)[P.solve].max() <= tol
    monkeypatch.setattr(engine, "REFINE_MIN_RAGGED", 8)
    _, lg2 = solve_w1(P, kappa_tol=tol, mass_tol=0.0, finer=False, log=True)
    assert lg2["n_refined"] == 20


def _network_layer_pair(topk: int):
    """The second layer pair of a small random MLP (default definition): ragged
    supports, solved one at a time."""
    import torch
    import torch.nn as nn
    from tp_curvature import CurvatureImportance

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    imp = CurvatureImportance(topk=topk).calibrate(net, torch.randn(128, 32))
    return imp.layer_problems()["2"]


def test_worker_threads_take_every_work_item_once():
    """The worker threads share one atomic counter (dynamic scheduling): across two threads
    every item is taken exactly once, whatever each item costs."""
    from numba import njit
    from tp_curvature.transport._pool import run_parallel
    from tp_curvature.transport._primitives import fetch_add

    @njit(nogil=True)
    def take(counter, hits, cost):
        while True:
            c = fetch_add(counter)
            if c >= hits.shape[0]:
                return 0
            t = 0.0
            for k in range(cost[c]):       # uneven items
                t += math.sqrt(k)
            hits[c] += 1 + (t < 0)

    n = 20000
    hits = np.zeros(n, np.int64)
    run_parallel(take, 2, hits, np.random.default_rng(0).integers(0, 2000, n))
    np.testing.assert_array_equal(hits, 1)


def test_solver_values_do_not_depend_on_the_thread_count():
    """Chunks go to whichever thread is free, so their order differs between runs; each
    chunk is solved the same way, so the values are identical with one and two threads."""
    from numba import get_num_threads, set_num_threads
    P = _network_layer_pair(topk=8)
    n = get_num_threads()
    try:
        set_num_threads(1)
        W1, _ = solve_w1(P, log=True)
        set_num_threads(min(2, n))
        W2, _ = solve_w1(P, log=True)
    finally:
        set_num_threads(n)
    np.testing.assert_array_equal(W1[P.solve], W2[P.solve])


def test_warm_starts_cut_iterations_and_stay_certified():
    """Ragged problems (solved one at a time) start from the previous connection out of the
    same x: fewer iterations on a network's layer pairs, and the values stay within kappa_tol
    of exact and within their certified gaps, as the cold starts do."""
    P = _network_layer_pair(topk=8)
    We = solve_w1(P, "exact")
    m = P.solve
    runs = {w: solve_w1(P, warm_start=w, log=True) for w in (True, False)}
    assert not runs[True][1]["uniform_support"]       # the one-at-a-time path
    assert runs[True][1]["iterations_mean"] < 0.9 * runs[False][1]["iterations_mean"]
    for W, lg in runs.values():
        err = _kappa_err(W, We, P)[m]
        assert err.max() <= DEFAULTS["kappa_tol"]
        assert (err <= lg["kappa_gap"][m] + 1e-12).all()


def test_certified_runs_keep_float32_results_of_any_scaling_range(monkeypatch):
    """A raw run (``kappa_tol=None``) redoes in float64 every one-at-a-time problem whose
    float32 scalings exceed F32_UVMAX; a certified run keeps them (the certificate checks each
    value). With the limit lowered to 1, the raw run sends most iterated (not bypassed)
    problems to float64, the certified run's values and fallbacks are those of the real limit,
    within kappa_tol."""
    import tp_curvature.transport._sinkhorn as engine
    P = _network_layer_pair(topk=8)
    m = P.solve
    We = solve_w1(P, "exact")
    W0, cert0 = solve_w1(P, log=True)
    _, raw0 = solve_w1(P, kappa_tol=None, log=True)
    monkeypatch.setattr(engine, "F32_UVMAX", 1.0)
    _, raw = solve_w1(P, kappa_tol=None, log=True)
    W, cert = solve_w1(P, log=True)
    assert not cert["uniform_support"]
    assert raw["n_float64"] > raw0["n_float64"] + (m.sum() - raw["n_bypass"]) // 2
    assert cert["n_float64"] == cert0["n_float64"]
    np.testing.assert_array_equal(W[m], W0[m])
    err = _kappa_err(W, We, P)[m]
    assert err.max() <= DEFAULTS["kappa_tol"] and (err <= cert["kappa_gap"][m] + 1e-12).all()


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("kappa_tol", [0.02, 0.01])
def test_in_kernel_refinement_certifies_loose_connections_in_place(kappa_tol, precision):
    """One-at-a-time problems whose first bound exceeds ``FINER_AT * kappa_tol`` continue at
    a quarter of eps from their plan (absorbed into the kernel), on the float32 path and on
    the float64 one (``precision="float64"`` starts there; float32 problems that overflow go
    there): on a network's layer pair none is left for the float64 refinement pass (hundreds
    without the stage at kappa_tol 0.01, ``finer=False``), every value within kappa_tol of
    exact and within its certified gap; with ``kappa_tol=None`` the stage never runs (the raw
    values are unchanged)."""
    P = _network_layer_pair(topk=16)
    We = solve_w1(P, "exact")
    m = P.solve
    on = solve_w1(P, kappa_tol=kappa_tol, precision=precision, log=True)
    off = solve_w1(P, kappa_tol=kappa_tol, precision=precision, finer=False, log=True)
    if precision == "float64":     # every connection there but the bypassed ones
        assert on[1]["n_float64"] == off[1]["n_float64"] == m.sum() - on[1]["n_bypass"]
    assert not on[1]["uniform_support"]                  # the one-at-a-time path
    assert off[1]["n_refined"] >= (100 if kappa_tol < 0.02 else 20)
    assert on[1]["n_refined"] + on[1]["n_exact_fallback"] == 0
    assert on[1]["iterations_mean"] > off[1]["iterations_mean"]     # the stage ran
    for W, lg in (on, off):
        err = _kappa_err(W, We, P)[m]
        assert err.max() <= kappa_tol
        assert (err <= lg["kappa_gap"][m] + 1e-12).all()
    np.testing.assert_array_equal(solve_w1(P, kappa_tol=None, precision=precision),
                                  solve_w1(P, kappa_tol=None, precision=precision, finer=False))


def test_expneg64_is_exp_over_float64s_range():
    """The float64 fallback's vectorisable exp(-x): within 1e-8 relative of ``np.exp`` from 0
    to the smallest float64 (subnormals excepted), 0 from its cut, never increasing; the log
    domain's log-sum-exp through it equals scipy's (``-inf`` entries included)."""
    from scipy.special import logsumexp

    from tp_curvature.transport._primitives import EXP64_CUT, expneg64, lse

    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 50.0, 1e4):
        v = rng.normal(0, scale, 33)
        v[rng.choice(33, 3, replace=False)] = -np.inf
        assert lse(v, 33) == pytest.approx(logsumexp(v), rel=1e-12, abs=1e-8)
    assert lse(np.full(4, -np.inf), 4) == -np.inf

    x = np.r_[0.0, np.geomspace(1e-12, 1.0, 200), np.linspace(1.0, 708.0, 5001)]
    got = np.array([expneg64(t) for t in x])
    np.testing.assert_allclose(got, np.exp(-x), rtol=1e-8, atol=0.0)
    assert (np.diff(got) <= 0).all()
    assert expneg64(EXP64_CUT) == 0.0 and expneg64(1e300) == 0.0 and expneg64(np.inf) == 0.0


@pytest.mark.parametrize("topk, density", [(8, 1.0), (6, 0.5)])
def test_float32_problems_that_overflow_absorb_their_scalings_and_stay_certified(topk, density):
    """One-at-a-time problems whose float32 scalings leave their range absorb them into their
    own potentials and kernel (``_drivers._absorb``) and go on in float32 instead of starting
    over in float64: at a small eps on flow-measure layer pairs 334 / 358 of the problems
    went to the float64 fallback before (``MAX_ABSORB = 0``), now at most a few; every
    certified value is within kappa_tol of exact and within its certified gap."""
    P = random_layer_pair(48, 0, measure="flow", topk=topk, density=density)
    We = solve_w1(P, "exact")
    m = P.solve
    W, lg = solve_w1(P, eps=0.005, log=True)
    assert not lg["uniform_support"]
    assert lg["n_float64"] <= 0.005 * m.sum()
    err = _kappa_err(W, We, P)[m]
    assert err.max() <= DEFAULTS["kappa_tol"]
    assert (err <= lg["kappa_gap"][m] + 1e-12).all()


def test_absorbing_keeps_the_intact_side_and_leaves_no_negative_reduced_cost():
    """``_absorb`` from the row scalings: the rows' potentials become ``f0 + e log u``, the
    columns' their c-transform (each column's smallest reduced cost 0, none negative), the
    block and the row / column kernels ``exp(-(M - f - g) / e)``, the scalings 1; a row
    without mass keeps no scaling and gets the c-transform back."""
    from tp_curvature.transport._bundles import Conn, Frame, Work
    from tp_curvature.transport._drivers import _absorb

    rng = np.random.default_rng(0)
    kz, kw, e, d = 5, 4, 0.05, 2.0
    Cb = rng.uniform(1, 4, (kz, kw))
    fr = Frame(rng.uniform(1, 4, kz), rng.normal(size=kz), rng.uniform(1, 4, kw),
               rng.normal(size=kw))
    cn = Conn(kz, kw, d, 0.3, -0.2)
    a = np.r_[rng.dirichlet(np.ones(kz)) * 0.5, 0.5].astype(np.float32)
    a[1] = 0.0
    b = np.r_[rng.dirichlet(np.ones(kw)) * 0.5, 0.5].astype(np.float32)
    u = rng.uniform(1e-3, 1e3, kz + 1).astype(np.float32)
    f_expect = np.r_[fr.fz, cn.fx] + e * np.log(u.astype(float))
    wk = Work(u, np.full(kw + 1, 7.0, np.float32), np.empty(kw, np.float32),
              np.empty(kz, np.float32), np.empty(kw + 1, np.float32),
              np.empty(kz + 1, np.float32))
    B = np.empty((kz, kw), np.float32)
    ok, cn2, kxy = _absorb(True, B, (Cb, np.empty(kz + 1), np.empty(kw + 1)), fr, cn, wk, a,
                           b, e, np.float32(1e-35))
    assert ok
    f = np.r_[fr.fz, cn2.fx]
    g = np.r_[fr.gw, cn2.gy]
    M = np.block([[Cb, fr.cz[:, None]], [fr.cw[None, :], np.array([[d]])]])
    R = M - f[:, None] - g[None, :]
    keep = np.arange(kz + 1) != 1
    np.testing.assert_allclose(f[keep], f_expect[keep], rtol=1e-6, atol=1e-9)
    assert R.min() >= -1e-12
    np.testing.assert_allclose(R[keep].min(axis=0), 0.0, atol=1e-12)
    assert R[1].min() == pytest.approx(0.0, abs=1e-12)         # the massless row
    K = np.exp(-R / e)
    np.testing.assert_allclose(B, K[:kz, :kw], rtol=1e-4, atol=1e-30)
    np.testing.assert_allclose(wk.kzy, K[:kz, kw], rtol=1e-4, atol=1e-30)
    np.testing.assert_allclose(wk.kxw, K[kz, :kw], rtol=1e-4, atol=1e-30)
    assert kxy == pytest.approx(K[kz, kw], rel=1e-9)
    assert (wk.u == 1).all() and (wk.v == 1).all()


@pytest.mark.parametrize("seed", range(6))
def test_dual_bound_is_a_lower_bound_and_exact_at_optimal_potentials(seed):
    """The certificate's lower bounds, on augmented problems with zero-mass atoms: never above
    W1 whatever the row potentials (random ones, some non-finite) or column scalings, and
    equal to W1 from the optimal potentials (the double c-transform of an optimal dual is
    optimal); the row potentials are left as they were. Sizes with and without a remainder
    of the four-row passes."""
    from tp_curvature.transport._bundles import Augmented, Frame
    from tp_curvature.transport._drivers import _col_bound
    from tp_curvature.transport._primitives import dual_bound

    rng = np.random.default_rng(seed)
    kz, kw = [(6, 5), (8, 9), (3, 4)][seed % 3]
    Cb = rng.uniform(1, 10, (kz, kw))
    cz, cw, d = rng.uniform(1, 10, kz), rng.uniform(1, 10, kw), float(rng.uniform(1, 10))
    a = np.r_[rng.dirichlet(np.ones(kz)) * 0.5, 0.5]
    b = np.r_[rng.dirichlet(np.ones(kw)) * 0.5, 0.5]
    a[rng.choice(kz, 2, replace=False)] = 0.0          # zero-mass atoms (padding, trimmed)
    b[rng.choice(kw, 1)] = 0.0
    a /= a.sum()
    b /= b.sum()
    M = np.block([[Cb, cz[:, None]], [cw[None, :], np.array([[d]])]])
    w1, lg = ot.emd2(a, b, M, log=True)
    ws = (np.empty(kw + 1), np.empty(kz + 1))
    f_opt = np.asarray(lg["u"], float)
    lb = dual_bound(Cb, cz, cw, d, a, b, f_opt, ws)
    assert lb == pytest.approx(w1, rel=1e-9, abs=1e-12)
    # zero-mass atoms constrain nothing: any potential there leaves the bound exact
    lb = dual_bound(Cb, cz, cw, d, a, b, np.where(a > 0, f_opt, 50.0), ws)
    assert lb == pytest.approx(w1, rel=1e-9, abs=1e-12)
    # the column bound from the optimal column potentials g = gw + e log v (the frame's gw,
    # y's gy, e: arbitrary)
    fr = Frame(cz, rng.normal(0, 1, kz), cw, rng.normal(0, 1, kw))
    M_aug = Augmented(Cb, cz, cw, d)
    g_opt = np.asarray(lg["v"], float)
    gy, e = float(rng.normal()), 0.7
    v_opt = np.exp((g_opt - np.r_[fr.gw, gy]) / e)
    lbc = _col_bound(M_aug, a, b, v_opt, fr, gy, e, ws)
    assert lbc == pytest.approx(w1, rel=1e-9, abs=1e-12)
    lbc = _col_bound(M_aug, a, b, np.where(b > 0, v_opt, 1e30), fr, gy, e, ws)
    assert lbc == pytest.approx(w1, rel=1e-9, abs=1e-12)
    for _ in range(5):
        f = rng.normal(0, 5, kz + 1)
        f[rng.choice(kz + 1, 2, replace=False)] = rng.choice([-np.inf, np.inf, np.nan])
        f_before = f.copy()
        lb = dual_bound(Cb, cz, cw, d, a, b, f, ws)
        assert np.isfinite(lb) or lb == -np.inf
        assert lb <= w1 + 1e-9
        np.testing.assert_array_equal(f, f_before)
        v = np.exp(rng.normal(0, 3, kw + 1))
        v[rng.choice(kw + 1, 1)] = rng.choice([0.0, np.inf])
        gy_r, e_r = float(rng.normal()), float(rng.uniform(0.1, 2))
        lbc = _col_bound(M_aug, a, b, v, fr, gy_r, e_r, ws)
        assert np.isfinite(lbc) or lbc == -np.inf
        assert lbc <= w1 + 1e-9
        # zero-mass atoms drop out: the same bounds as the problem without them
        r, c = a[:kz] > 0, b[:kw] > 0
        ra, rb = np.r_[a[:kz][r], a[kz]], np.r_[b[:kw][c], b[kw]]
        ws_r = (np.empty(c.sum() + 1), np.empty(r.sum() + 1))
        Cr = np.ascontiguousarray(Cb[np.ix_(r, c)])
        assert dual_bound(Cr, cz[r], cw[c], d, ra, rb, np.r_[f[:kz][r], f[kz]],
                          ws_r) == pytest.approx(lb, rel=1e-12, abs=1e-12)
        fr_r = Frame(cz[r], fr.fz[r], cw[c], fr.gw[c])
        assert _col_bound(Augmented(Cr, cz[r], cw[c], d), ra, rb, np.r_[v[:kw][c], v[kw]],
                          fr_r, gy_r, e_r, ws_r) == pytest.approx(lbc, rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------------------ bypass plan
def _bypass_of(P, x, y, stop=np.inf):
    """The primitive on connection (x, y) of ``P``, atoms in the problem's own order."""
    from tp_curvature.transport._primitives import bypass
    zs = (P.pred_mass[x] > 0) & (P.pred_idx[x] >= 0)
    ws = (P.succ_mass[y] > 0) & (P.succ_idx[y] >= 0)
    zi, wi = P.pred_idx[x][zs], P.succ_idx[y][ws]
    return bypass(P.c_zw, zi, wi, P.c_zy[zi, y].copy(), P.c_xw[x, wi].copy(),
                  P.pred_mass[x][zs].copy(), P.succ_mass[y][ws].copy(), P.d_xy[x, y],
                  P.alpha, stop)


def _detour(P, x, y, exchange=False):
    """T = max (c_zy + c_xw - c_zw) over the connection's atoms, by brute force (with
    ``exchange``: also min(a_z, b_w) of the pair that attains it)."""
    a, b, M = _manual_connection(P, x, y)
    t, i, j = max((M[i, -1] + M[-1, j] - M[i, j], i, j) for i in range(len(a) - 1)
                  for j in range(len(b) - 1))
    return (t, min(a[i], b[j])) if exchange else t


@hyp.settings(max_examples=40, deadline=None, derandomize=True)
@hyp.given(seed=st.integers(0, 10_000), n=st.integers(3, 8),
           kind=st.sampled_from(["dense", "sparse", "flow", "randcost"]),
           alpha=st.sampled_from([0.5, 0.7, 0.9]), long=st.sampled_from([1.0, 30.0]))
def test_property_bypass_brackets_the_exact_w1(seed, n, kind, alpha, long):
    """For every connection with atoms on both sides: the bypass plan's cost U and bound LB
    satisfy LB <= W1 <= U against ``ot.emd2``; U == W1 where the connection is at least as
    long as the detour T (LB == U), and where it is shorter, exchanging mass along the pair
    (z, w) that attains T lowers the cost by min(a_z, b_w) (T - d): W1 is at most that.
    Random costs too: the argument needs no metric. ``long`` stretches the connections, so
    that both cases occur."""
    if kind == "randcost":
        P = _random_costs_problem(np.random.default_rng(seed), n, n + 1, n, n - 1, alpha,
                                  k_z=max(2, n // 2), k_w=max(2, n // 2))
    else:
        P = random_layer_pair(n, seed, alpha=alpha, density=0.5 if kind == "sparse" else 1.0,
                              measure="flow" if kind == "flow" else "paper",
                              topk=max(2, n // 2) if kind == "flow" else None)
    P = replace(P, d_xy=np.where(P.solve, P.d_xy * long, P.d_xy))
    for x, y in np.argwhere(P.solve):
        a, b, M = _manual_connection(P, x, y)
        if len(a) == 1 or len(b) == 1:
            continue
        w1 = ot.emd2(a, b, M)
        u, lb = _bypass_of(P, x, y)
        scale = 1e-9 * M.max()
        assert lb <= w1 + scale and w1 <= u + scale
        t, ex = _detour(P, x, y, exchange=True)
        excess = t - P.d_xy[x, y]
        assert u - lb == pytest.approx((1 - alpha) * max(excess, 0.0), abs=scale)
        if excess <= 0:
            assert w1 == pytest.approx(u, abs=scale)
        else:
            assert w1 <= u - ex * excess + scale


def test_bypass_stops_early_and_needs_alpha_half():
    """The scan stops once T exceeds ``stop`` (then ``(inf, -inf)``, like below alpha 1/2);
    a ``stop`` at T itself still gives the plan."""
    P = random_layer_pair(6, 3, alpha=0.5)
    x, y = np.argwhere(P.solve)[0]
    t = _detour(P, x, y)
    u, lb = _bypass_of(P, x, y)
    assert np.isfinite(u) and np.isfinite(lb)
    assert _bypass_of(P, x, y, stop=t) == (u, lb)
    assert _bypass_of(P, x, y, stop=t * (1 - 1e-6)) == (np.inf, -np.inf)
    assert _bypass_of(replace(P, alpha=0.4), x, y) == (np.inf, -np.inf)


@pytest.mark.parametrize("uniform", [True, False])
def test_solver_takes_the_bypass_plan_exactly_where_it_is_optimal(uniform):
    """On a network's layer pair (ragged supports, one at a time) and a dense one (batched),
    ``n_bypass`` counts the connections with d >= T (brute force); their values are exact
    (|kappa error| <= 1e-9 against ``ot.emd2``, certified gap <= 1e-9); ``bypass=False``
    iterates on all of them, and alpha below 1/2 takes none."""
    P = (random_layer_pair(14, 2, alpha=0.5) if uniform else _network_layer_pair(topk=8))
    m = P.solve
    xs, ys = np.nonzero(m)
    want = np.zeros_like(m)
    for x, y in zip(xs, ys):
        want[x, y] = _detour(P, x, y) <= P.d_xy[x, y] * (1 + 1e-9)
    assert 0 < want.sum() < m.sum()
    We = solve_w1(P, "exact")
    W, lg = solve_w1(P, mass_tol=0.0, log=True)
    assert lg["uniform_support"] == uniform
    assert lg["n_bypass"] == want.sum()
    err = _kappa_err(W, We, P)
    assert err[want].max() <= 1e-9 and lg["kappa_gap"][want].max() <= 1e-9
    assert err[m].max() <= DEFAULTS["kappa_tol"]
    W0, lg0 = solve_w1(P, mass_tol=0.0, bypass=False, log=True)
    assert lg0["n_bypass"] == 0 and lg0["iterations_mean"] > lg["iterations_mean"]
    assert _kappa_err(W0, We, P)[m].max() <= DEFAULTS["kappa_tol"]
    assert solve_w1(replace(P, alpha=0.4), mass_tol=0.0, log=True)[1]["n_bypass"] == 0
