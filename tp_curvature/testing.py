"""Random layer-pair problems for tests and benchmarks (no torch needed).

:func:`random_layer_pair` builds a :class:`~tp_curvature.problem.LayerPairProblem` from four
random dense layers Z -> X -> Y -> W (three weight matrices), the way the graph code builds
one from a trained network:

* edge length ``1/|w|`` (``"paper"`` measures) or ``1/(a_u |w_uv|)`` (``"flow"`` measures),
  clamped at ``1e-30`` below;
* ground costs by forward min-plus products (``c_zy``: 2 hops, ``c_xw``: 2 hops, ``c_zw``: 3 hops);
* activations ``a ~ U(0, 1)`` min-max normalised per layer (so each layer has one node with
  ``a = 0``, which is inactive, and one with ``a = 1``);
* ``"paper"`` measures: :math:`p(z) \\propto \\exp(-1/a_z^2)` over active predecessors (uniform
  over them if that underflows), the same for successors; ``"flow"`` measures:
  :math:`p_x(z) \\propto a_z |w_{zx}|` and :math:`r_y(w) \\propto a_w |w_{yw}|`;
* ``solve`` is False where x or y is inactive (the curvature code sets kappa = 1 there).

:func:`truncate_topk` keeps the ``k`` heaviest atoms of every measure (renormalised).
"""
from __future__ import annotations

import numpy as np

from .problem import LayerPairProblem, cap_costs

__all__ = ["minplus", "random_layer_pair", "problem_from_layers", "truncate_topk"]


def minplus(a: np.ndarray, b: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Min-plus product ``out[i, j] = min_k a[i, k] + b[k, j]`` (chunked over rows of ``a``)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.empty((a.shape[0], b.shape[1]))
    for s in range(0, a.shape[0], chunk):
        out[s:s + chunk] = (a[s:s + chunk, :, None] + b[None, :, :]).min(axis=1)
    return out


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.ones_like(a)


def _measure_rows(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn an (n_rows, n_atoms) nonnegative weight matrix into padded (idx, mass) arrays."""
    n_rows, n_atoms = weights.shape
    k = int((weights > 0).sum(axis=1).max()) if n_rows else 0
    idx = np.full((n_rows, k), -1, dtype=np.int64)
    mass = np.zeros((n_rows, k))
    for i in range(n_rows):
        sup = np.flatnonzero(weights[i] > 0)
        if sup.size == 0:
            continue
        w = weights[i, sup]
        idx[i, :sup.size] = sup
        mass[i, :sup.size] = w / w.sum()
    return idx, mass


def _paper_weights(a_nb: np.ndarray, n_rows: int) -> np.ndarray:
    """exp(-(1/a)^2) over active neighbours (uniform if it underflows), same for every row."""
    active = a_nb > 0
    w = np.zeros_like(a_nb)
    with np.errstate(divide="ignore", over="ignore", under="ignore"):
        w[active] = np.exp(-(1.0 / a_nb[active]) ** 2)
    if active.any() and w.sum() <= 0:
        w[active] = 1.0
    return np.broadcast_to(w, (n_rows, a_nb.size)).copy()


def truncate_topk(idx: np.ndarray, mass: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` heaviest atoms of each row (renormalised); rows of zeros stay zero."""
    if k is None or k >= idx.shape[1]:
        return idx.copy(), mass.copy()
    order = np.argsort(-mass, axis=1, kind="stable")[:, :k]
    new_idx = np.take_along_axis(idx, order, axis=1)
    new_mass = np.take_along_axis(mass, order, axis=1)
    new_idx[new_mass <= 0] = -1
    s = new_mass.sum(axis=1, keepdims=True)
    np.divide(new_mass, s, out=new_mass, where=s > 0)
    return new_idx, new_mass


def problem_from_layers(
    w_zx: np.ndarray,
    w_xy: np.ndarray,
    w_yw: np.ndarray,
    a_z: np.ndarray,
    a_x: np.ndarray,
    a_y: np.ndarray,
    a_w: np.ndarray,
    *,
    alpha: float = 0.5,
    measure: str = "paper",
    topk: int | None = None,
    name: str = "",
    cap_unreachable: bool = False,
) -> LayerPairProblem:
    """Build the problem of the middle layer ``w_xy`` from three dense weight matrices.

    ``w_zx`` is (n_z, n_x), ``w_xy`` (n_x, n_y), ``w_yw`` (n_y, n_w) (rows: source nodes);
    ``a_*`` are the node activations (already normalised to [0, 1]). ``measure`` is
    ``"paper"`` (lengths ``1/|w|``, masses ``exp(-1/a^2)``) or ``"flow"`` (lengths
    ``1/(a_u |w_uv|)``, masses ``a_z |w_zx|`` and ``a_w |w_yw|``).
    ``cap_unreachable``: zero weights are no edges (infinite length), unreachable pairs get the
    graph code's cap (twice the largest finite cost) and only connections with a nonzero
    weight are solved, as :mod:`tp_curvature.curvature` does for sparse layers.
    """
    tiny = 1e-30
    if measure == "paper":
        l_zx = 1.0 / np.maximum(np.abs(w_zx), tiny)
        l_xy = 1.0 / np.maximum(np.abs(w_xy), tiny)
        l_yw = 1.0 / np.maximum(np.abs(w_yw), tiny)
        pw = _paper_weights(a_z, w_xy.shape[0])
        rw = _paper_weights(a_w, w_xy.shape[1])
    elif measure == "flow":
        l_zx = 1.0 / np.maximum(a_z[:, None] * np.abs(w_zx), tiny)
        l_xy = 1.0 / np.maximum(a_x[:, None] * np.abs(w_xy), tiny)
        l_yw = 1.0 / np.maximum(a_y[:, None] * np.abs(w_yw), tiny)
        pw = (a_z[:, None] * np.abs(w_zx)).T  # (n_x, n_z)
        rw = a_w[None, :] * np.abs(w_yw)  # (n_y, n_w)
    else:
        raise ValueError(f"unknown measure {measure!r}")
    if cap_unreachable:
        l_zx, l_xy, l_yw = (np.where(l >= 1.0 / tiny, np.inf, l) for l in (l_zx, l_xy, l_yw))
    c_zy = minplus(l_zx, l_xy)
    c_xw = minplus(l_xy, l_yw)
    c_zw = minplus(c_zy, l_yw)
    if cap_unreachable:
        c_zw, c_zy, c_xw = cap_costs((c_zw, c_zy, c_xw), l_xy)
    pred_idx, pred_mass = _measure_rows(pw)
    succ_idx, succ_mass = _measure_rows(rw)
    if topk is not None:
        pred_idx, pred_mass = truncate_topk(pred_idx, pred_mass, topk)
        succ_idx, succ_mass = truncate_topk(succ_idx, succ_mass, topk)
    solve = (a_x[:, None] > 0) & (a_y[None, :] > 0) & np.isfinite(l_xy)
    return LayerPairProblem(
        d_xy=l_xy, c_zw=c_zw, c_zy=c_zy, c_xw=c_xw,
        pred_idx=pred_idx, pred_mass=pred_mass, succ_idx=succ_idx, succ_mass=succ_mass,
        alpha=float(alpha), solve=solve, name=name,
    )


def random_layer_pair(
    n: int,
    seed: int = 0,
    *,
    n_z: int | None = None,
    n_y: int | None = None,
    n_w: int | None = None,
    alpha: float = 0.5,
    measure: str = "paper",
    topk: int | None = None,
    density: float = 1.0,
) -> LayerPairProblem:
    """A random layer pair with ``n`` channels per layer (see the module docstring).

    Weights are ``N(0, 1/fan_in)``; activations ``U(0, 1)`` min-max normalised per layer.
    ``density < 1``: each weight is kept with that probability (the others are 0, i.e. no
    edge; unreachable pairs capped as in the graph code, see :func:`problem_from_layers`).
    """
    rng = np.random.default_rng(seed)
    n_x = n
    n_z = n if n_z is None else n_z
    n_y = n if n_y is None else n_y
    n_w = n if n_w is None else n_w
    w_zx = rng.normal(size=(n_z, n_x)) / np.sqrt(n_z)
    w_xy = rng.normal(size=(n_x, n_y)) / np.sqrt(n_x)
    w_yw = rng.normal(size=(n_y, n_w)) / np.sqrt(n_y)
    a = [_minmax(rng.uniform(size=m)) for m in (n_z, n_x, n_y, n_w)]
    sparse = density < 1.0
    if sparse:
        w_zx, w_xy, w_yw = (w * (rng.uniform(size=w.shape) < density) for w in (w_zx, w_xy, w_yw))
    return problem_from_layers(
        w_zx, w_xy, w_yw, *a, alpha=alpha, measure=measure, topk=topk,
        name=f"random{n}-{measure}-s{seed}" + (f"-dens{density:g}" if sparse else ""),
        cap_unreachable=sparse,
    )
