"""Ollivier-Ricci curvature of every connection of a network's channel graph.

For a connection :math:`x \\to y` of a weight layer (x an input channel, y an output channel)

.. math::

    \\kappa(x, y) = \\frac{1}{1 - \\alpha}\\Big(1 - \\frac{W_1(m_x, m_y)}{d(x, y)}\\Big),

with the measures and ground costs of :mod:`tp_curvature.problem`. Negative curvature marks a
bottleneck that carries the network's flow; positive curvature a redundant connection.

Definitions (``variant`` picks a consistent pair; each part can be set on its own). The default
is ``variant="flow"`` with ``node_value="std"``: on the project's Fashion-MNIST comparisons
(``benchmarks/compare.py``, README "When to use curvature") it ranks best of the curvature
variants after a repair, the paper's definition (``variant="paper"``,
``node_value="mean_abs"``) worst.

============  =====================================  ==========================================
option        ``"weight"`` / ``"activation"`` (paper) ``"flow"``
============  =====================================  ==========================================
length        :math:`d(u,v) = 1/|w_{uv}|`             :math:`d(u,v) = 1/(a_u |w_{uv}|)`
measure       :math:`p_x(z) \\propto e^{-1/a_z^2}`     :math:`p_x(z) \\propto a_z |w_{zx}|`,
                                                     :math:`r_y(w) \\propto a_w |w_{yw}|`
============  =====================================  ==========================================

:math:`|w_{uv}|` is the node-level strength of :mod:`tp_curvature.graph` (kernel-slice norm,
BatchNorm scale folded in). Node values :math:`a` are min-max normalised per junction
(:mod:`tp_curvature.calibration`); the paper's weights :math:`e^{-1/a^2}` are normalised in the log
domain, so small activations keep their (tiny) share instead of underflowing to zero as in
float32 reference code. Only active neighbours (``a > 0``) joined by an edge carry mass; a node
with none keeps all its mass (``m_x = delta_x``).

Conventions for connections that are not solved (documented, finite):

* a dead endpoint (``a_x = 0`` or ``a_y = 0``) or a zero weight: :math:`\\kappa = 1` (removable;
  a zero-weight connection is absent from the graph and carries nothing);
* a pair of channels in different groups of a grouped/depthwise conv: ``NaN`` (there is no
  connection; :class:`LayerCurvature` marks it in ``exists``).

Unreachable pairs inside a cost matrix (no forward path) get a finite cap, twice the largest
finite cost of that layer pair, so every transport problem is well posed.

``topk`` keeps each measure's k heaviest neighbours (renormalised). With the paper's
:math:`e^{-1/a^2}` weights the mass is concentrated on the most active neighbours and the cost
is small (see ``benchmarks/kernels.py``); the kernels' work grows as :math:`(k+1)^2`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ._memory import release_freed_memory
from .graph import ChannelGraph, WeightLayer
from .config import CurvatureConfig, resolve_config
from .problem import LayerPairProblem, cap_costs, selects_all
from .shortest_paths import minplus

@dataclass
class LayerCurvature:
    """Curvature of the connections of one weight layer.

    ``kappa[u, v]`` is the curvature of input node (channel) ``u`` -> output channel ``v``,
    NaN for structurally absent pairs (grouped convs; ``exists`` is False there); ``solved``
    marks the connections that went through the transport solver (the others are
    dead-endpoint or zero-weight connections with kappa = 1); ``length`` is d(u, v) (inf
    where there is no connection). ``in_group`` maps each input feature of the module (e.g. a
    Linear's flattened input) to its node ``u``. ``kappa`` and ``length`` are kept in float32
    (the solver certifies kappa to ``kappa_tol``, 0.02 by default, far above float32
    resolution), which halves what a scored model holds (ViT-B/16: 85.7M connections).
    """
    name: str
    module: nn.Module
    kappa: np.ndarray
    solved: np.ndarray
    in_group: np.ndarray
    length: np.ndarray

    def __post_init__(self):
        self.kappa = np.asarray(self.kappa, dtype=np.float32)
        self.length = np.asarray(self.length, dtype=np.float32)

    @property
    def exists(self) -> np.ndarray:
        """Structural connections: where kappa is not NaN."""
        return ~np.isnan(self.kappa)

    def as_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.kappa)


def _lengths(strength: np.ndarray, a_src: Optional[np.ndarray], flow: bool) -> np.ndarray:
    """d = 1/s (or 1/(a_src s)); inf where there is no edge."""
    d = strength * a_src[:, None] if flow else np.array(strength, dtype=np.float64)
    edge = d > 0
    np.divide(1.0, d, out=d, where=edge)     # in place: a wide layer's matrix is tens of MB
    d[~edge] = np.inf
    return d


def _neighbour_weights(strength: np.ndarray, a_nb: np.ndarray, measure: str, axis: int):
    """Unnormalised log-weights of neighbours (-inf = no mass). ``strength`` has the neighbour
    on ``axis`` (0: rows are neighbours z; 1: columns are neighbours w)."""
    shape = [1, 1]
    shape[axis] = -1
    a = a_nb.reshape(shape)
    ok = (strength > 0) & (a > 0)
    with np.errstate(divide="ignore"):
        if measure == "activation":
            logw = np.where(ok, -1.0 / np.where(a > 0, a, 1.0) ** 2, -np.inf)
        else:
            logw = np.where(ok, np.log(np.where(ok, a * strength, 1.0)), -np.inf)
    return logw


def _support(logw: np.ndarray, topk: Optional[int]):
    """Per row of ``logw`` (rows = the measure's centre): indices and normalised masses of
    the (top-k) support, padded with -1 / 0."""
    n, m = logw.shape
    k = m if topk is None else min(topk, m)
    if k == 0 or n == 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0))
    if k < m:
        idx = np.argpartition(-logw, k - 1, axis=1)[:, :k]
    else:
        idx = np.tile(np.arange(m), (n, 1))
    lw = np.take_along_axis(logw, idx, axis=1)
    order = np.argsort(-lw, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    lw = np.take_along_axis(lw, order, axis=1)
    finite = np.isfinite(lw)
    mx = np.where(finite.any(1), np.max(np.where(finite, lw, -np.inf), axis=1), 0.0)
    w = np.where(finite, np.exp(lw - mx[:, None]), 0.0)
    tot = w.sum(1, keepdims=True)
    mass = np.divide(w, tot, out=np.zeros_like(w), where=tot > 0)
    idx = np.where(mass > 0, idx, -1).astype(np.int64)
    return idx, mass


SUPPORT_BLOCK = 1 << 18   # entries of the log-weight block one step of _supports builds


def _supports(rows, n_rows: int, a_nb: np.ndarray, cfg: CurvatureConfig):
    """Supports and masses (:func:`_support`) of the measures centred on ``n_rows`` nodes:
    ``rows(r)`` gives the strengths from the centres ``r`` (a slice) to their neighbours,
    whose values are ``a_nb``. Built a block of rows at a time: the log-weights of a wide
    layer pair (e.g. 3,072 x 768) and their temporaries would cost tens of MB each."""
    step = max(1, SUPPORT_BLOCK // max(a_nb.size, 1))
    parts = [_support(_neighbour_weights(rows(slice(r0, r0 + step)), a_nb, cfg.measure, 1),
                      cfg.topk) for r0 in range(0, max(n_rows, 1), step)]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _restrict(idx: np.ndarray):
    """Union of the used indices and ``idx`` re-indexed into that union."""
    used = np.unique(idx[idx >= 0])
    remap = np.full(int(idx.max()) + 1 if idx.size and idx.max() >= 0 else 0, -1, np.int64)
    remap[used] = np.arange(used.size)
    out = np.where(idx >= 0, remap[np.maximum(idx, 0)] if remap.size else -1, -1)
    return used, out.astype(np.int64)


def _internal_blocks(graph: ChannelGraph, juncs: list, p: float) -> list:
    """``(i0, j0, S)`` blocks of the edges among the stacked junctions ``juncs`` (topological
    order): S (strengths) joins the nodes at offset ``i0`` to those at offset ``j0``."""
    offs = np.cumsum([0] + [graph.junctions[j].n_nodes for j in juncs])
    blocks = []
    for b, jb in enumerate(juncs):
        srcs = set(graph.predecessors(jb))
        for a, ja in enumerate(juncs):
            if a != b and ja in srcs:
                S = graph.junction_edges(ja, jb, p)
                if (S > 0).any():
                    blocks.append((int(offs[a]), int(offs[b]), S))
    return blocks


def _close_rows(d: np.ndarray, blocks: list, a_src: np.ndarray, flow: bool) -> np.ndarray:
    """``D . d``: the rows of ``d`` (lengths from stacked nodes) closed under the edges among
    those nodes (``blocks``, earlier junction -> later junction): a dynamic programme over
    the blocks, later sources first, so one pass is exact. ``d`` is updated in place (the
    callers pass fresh arrays) and returned."""
    if not blocks or not np.isfinite(d).any():
        return d
    for i0, j0, S in sorted(blocks, key=lambda b: -b[0]):
        r, c = slice(i0, i0 + S.shape[0]), slice(j0, j0 + S.shape[1])
        np.minimum(d[r], minplus(_lengths(S, a_src[r], flow), d[c]), out=d[r])
    return d


def _close_cols(d: np.ndarray, blocks: list, a_src: np.ndarray, flow: bool) -> np.ndarray:
    """``d . D``: the columns of ``d`` (lengths into stacked nodes) closed under the edges
    among those nodes (earlier sources first, one pass), in place like :func:`_close_rows`."""
    if not blocks or not np.isfinite(d).any():
        return d
    for i0, j0, S in sorted(blocks, key=lambda b: b[0]):
        r, c = slice(i0, i0 + S.shape[0]), slice(j0, j0 + S.shape[1])
        np.minimum(d[:, c], minplus(d[:, r], _lengths(S, a_src[r], flow)), out=d[:, c])
    return d


def _paths_zw(d_zx, c_zy, c_xw, d_yw, skip_zy: bool, skip_xw: bool) -> np.ndarray:
    """``c_zw = min(d_zx . c_xw, c_zy . d_yw)`` (min-plus ``.``) with only the products it
    needs. Without a skip edge X -> W, ``c_xw = d_xy . d_yw`` and ``c_zy <= d_zx . d_xy``, so
    ``d_zx . c_xw >= c_zy . d_yw`` (the same three-hop paths, grouped differently): the first
    product is not needed; likewise the second without a skip edge Z -> Y. With neither, both
    are the same paths and the one with the shorter inner dim is computed (a ViT MLP layer:
    768 instead of 3,072). The results agree to the rounding of the sums' grouping."""
    if skip_zy and skip_xw:
        return np.minimum(minplus(c_zy, d_yw), minplus(d_zx, c_xw))
    if skip_zy or (not skip_xw and c_zy.shape[1] <= d_zx.shape[1]):
        return minplus(c_zy, d_yw)
    return minplus(d_zx, c_xw)


def _skip_edges(graph: ChannelGraph, srcs: list, dsts: list, p: float) -> Optional[np.ndarray]:
    """Strengths of the edges from the stacked junctions ``srcs`` to the stacked ``dsts``, or
    None when there is none (the usual case; the dense zero block of a wide layer pair would
    cost hundreds of MB while its problem is built)."""
    feeds = {b: set(graph.predecessors(b)) for b in dsts}
    blocks = [[graph.junction_edges(a, b, p) if a in feeds[b] else None for b in dsts]
              for a in srcs]
    if not any(S is not None and (S > 0).any() for row in blocks for S in row):
        return None
    n_dst = [graph.junctions[b].n_nodes for b in dsts]
    return np.vstack([np.hstack([np.zeros((graph.junctions[a].n_nodes, n)) if S is None else S
                                 for S, n in zip(row, n_dst)]) for a, row in zip(srcs, blocks)])


def build_layer_problem(graph: ChannelGraph, layer: WeightLayer, acts: list,
                        cfg: CurvatureConfig, dst: Optional[int] = None,
                        channels: Optional[np.ndarray] = None) -> LayerPairProblem:
    """Assemble the :class:`LayerPairProblem` of ``layer`` (all its connections x -> y).

    X is the layer's input junction, Y its (first) output junction; Z stacks every junction
    with an edge into X and W every junction Y has an edge into. The problem carries the
    structural connections (``exists``) and their lengths (``length``) besides what the
    kernels read. ``dst`` (default: the first out-junction) and ``channels`` (default: all
    output channels, which must then all reach ``dst``) select the connections of a layer whose
    outputs split over several junctions (the q / k / v thirds of a packed in-projection).
    """
    X = layer.in_junction
    Y = layer.out_junctions[0] if dst is None else dst
    s_xy_layer, cols, exists = graph.layer_edges(layer, Y, cfg.p)
    if channels is None:
        if np.any(cols < 0):
            raise ValueError(f"layer {layer.name!r}: some output channels do not reach "
                             f"junction {graph.junctions[Y].name!r}")
    else:
        cols, exists = cols[channels], exists[:, channels]
    # predecessors Z of X and successors W of Y (several junctions are stacked)
    preds = graph.predecessors(X)
    succs = graph.successors(Y)
    n_x, n_yn = acts[X].size, acts[Y].size
    s_zx = (np.vstack([graph.junction_edges(z, X, cfg.p) for z in preds]) if preds
            else np.zeros((0, n_x)))
    a_z = np.concatenate([acts[z] for z in preds]) if preds else np.zeros(0)
    s_yw = (np.hstack([graph.junction_edges(Y, w, cfg.p) for w in succs]) if succs
            else np.zeros((n_yn, 0)))
    a_w = np.concatenate([acts[w] for w in succs]) if succs else np.zeros(0)
    # skip edges that bypass X or Y (a layer whose output reaches several junctions, a
    # residual stream) and edges among the junctions of Z or of W (a residual stream that
    # also feeds the branch merged into X: x -> in_proj -> v -> out_proj -> X): the ground
    # costs are shortest paths over every edge among Z, X, Y, W
    skips = dict(
        s_zz=_internal_blocks(graph, preds, cfg.p),
        s_ww=_internal_blocks(graph, succs, cfg.p),
        s_zw=_skip_edges(graph, preds, succs, cfg.p),
        s_zy=_skip_edges(graph, preds, [Y], cfg.p),
        s_xw=_skip_edges(graph, [X], succs, cfg.p))
    strengths = PairStrengths(
        s_zx=s_zx, a_z=a_z, a_x=acts[X], s_xy_all=graph.junction_edges(X, Y, cfg.p),
        s_direct=s_xy_layer if selects_all(cols, s_xy_layer.shape[1])
        else s_xy_layer[:, cols], cols=cols, a_yn=acts[Y], s_yw=s_yw, a_w=a_w,
        exists=exists, **skips)
    return problem_from_strengths(strengths, cfg, layer.name)


@dataclass
class PairStrengths:
    """Edge strengths ``|w|`` (0 = no edge) and normalised node values around one layer pair
    (``n_yn`` nodes in the Y layer; the connections' columns are ``cols`` of them).

    ``s_zx`` (n_z, n_x): predecessors -> X; ``a_z``, ``a_x`` (n_z,), (n_x,): node values;
    ``s_xy_all`` (n_x, n_yn): every edge X -> Y (for the shortest paths); ``s_direct``
    (n_x, n_c): the scored connections (columns ``cols`` of Y); ``cols`` (n_c,): the Y node of
    each connection column; ``a_yn`` (n_yn,): node values of Y; ``s_yw`` (n_yn, n_w), ``a_w``
    (n_w,): Y -> successors and their values; ``exists`` (n_x, n_c): structural connections.
    Optional: ``s_zw``, ``s_zy``, ``s_xw`` (n_z, n_w), (n_z, n_yn), (n_x, n_w), skip edges that
    bypass X or Y; ``s_zz``, ``s_ww``: lists of ``(i0, j0, S)`` blocks, edges among the stacked
    Z nodes (rows ``i0:i0+S.shape[0]`` -> rows ``j0:j0+S.shape[1]`` of ``s_zx``) and among the
    stacked W nodes (columns of ``s_yw``), each from an earlier junction to a later one.
    """
    s_zx: np.ndarray
    a_z: np.ndarray
    a_x: np.ndarray
    s_xy_all: np.ndarray
    s_direct: np.ndarray
    cols: np.ndarray
    a_yn: np.ndarray
    s_yw: np.ndarray
    a_w: np.ndarray
    exists: np.ndarray
    s_zw: Optional[np.ndarray] = None
    s_zy: Optional[np.ndarray] = None
    s_xw: Optional[np.ndarray] = None
    s_zz: Optional[list] = None
    s_ww: Optional[list] = None


def problem_from_strengths(st: PairStrengths, cfg: CurvatureConfig, name: str = "",
                           conventions=None) -> LayerPairProblem:
    """Build the transport problems of one layer pair from its :class:`PairStrengths`.

    The ground costs are the shortest paths over every edge among Z, X, Y, W: with
    ``D_Z`` / ``D_W`` the shortest paths inside Z / W (0 on the diagonal) and min-plus
    products ``.``, the closed lengths ``d_zx* = D_Z . d_zx``, ``d_zy* = D_Z . d_zy``,
    ``d_yw* = d_yw . D_W``, ``d_xw* = d_xw . D_W``, ``d_zw* = D_Z . d_zw . D_W`` give
    ``c_zy = min(d_zy*, d_zx* . d_xy)``, ``c_xw = min(d_xw*, d_xy . d_yw*)`` and
    ``c_zw = min(d_zw*, d_zx* . c_xw, c_zy . d_yw*)``. Paths that leave the neighbourhood
    Z, X, Y, W are not considered.

    ``conventions``: the per-weight mode's
    :class:`~tp_curvature.unstructured.Conventions` (None: the library's), for the
    authors' float32 measures and which dead endpoints are solved; X counts as the network's
    input layer when the pair has no Z nodes, Y as its output when it has no W nodes.

    Returns the :class:`LayerPairProblem` with ``exists`` and ``length`` set, so that
    :func:`solve_problem` needs nothing else.
    """
    flow_len = cfg.length == "flow"
    a_y = st.a_yn[st.cols]
    # measures (top-k supports)
    if conventions is not None and conventions.float32_measure:
        pred_idx, pred_mass = conventions.supports(st.s_zx.T, st.a_z, cfg.topk, cfg.alpha)
        succ_idx, succ_mass = conventions.supports(st.s_yw[st.cols], st.a_w, cfg.topk,
                                                   cfg.alpha)
    else:
        pred_idx, pred_mass = _supports(lambda r: st.s_zx[:, r].T, st.s_zx.shape[1],
                                        st.a_z, cfg)
        succ_idx, succ_mass = _supports(lambda r: st.s_yw[st.cols[r]], st.cols.shape[0],
                                        st.a_w, cfg)
    z_used, pred_idx = _restrict(pred_idx)
    w_used, succ_idx = _restrict(succ_idx)

    # ground costs: forward shortest paths (Z- and W-internal edges closed first)
    zz, ww = st.s_zz or [], st.s_ww or []

    def close_z(d):
        return _close_rows(d, zz, st.a_z, flow_len)

    def close_w(d):
        return _close_cols(d, ww, st.a_w, flow_len)

    d_zx = close_z(_lengths(st.s_zx, st.a_z, flow_len))[z_used]
    d_xy_all = _lengths(st.s_xy_all, st.a_x, flow_len)
    d_yw = close_w(_lengths(st.s_yw, st.a_yn, flow_len))[:, w_used]
    c_zy_all = minplus(d_zx, d_xy_all)
    c_xw = minplus(d_xy_all, d_yw)
    if st.s_zy is not None:
        c_zy_all = np.minimum(c_zy_all, close_z(_lengths(st.s_zy, st.a_z, flow_len))[z_used])
    if st.s_xw is not None:
        c_xw = np.minimum(c_xw, close_w(_lengths(st.s_xw, st.a_x, flow_len))[:, w_used])
    del d_xy_all   # wide layers: every (n_x, n_y) matrix is freed as soon as it is used
    c_zw = _paths_zw(d_zx, c_zy_all, c_xw, d_yw, st.s_zy is not None, st.s_xw is not None)
    if st.s_zw is not None:
        d = close_w(close_z(_lengths(st.s_zw, st.a_z, flow_len)))
        c_zw = np.minimum(c_zw, d[np.ix_(z_used, w_used)])
    c_zy = c_zy_all if selects_all(st.cols, c_zy_all.shape[1]) else c_zy_all[:, st.cols]
    del c_zy_all
    d_xy = _lengths(st.s_direct, st.a_x, flow_len)

    live_x, live_y = st.a_x > 0, a_y > 0
    if conventions is not None:
        live_x, live_y = conventions.live_endpoints(st.a_x, a_y, st.s_zx.shape[0] == 0,
                                                    st.s_yw.shape[1] == 0)
    solve = st.exists & np.isfinite(d_xy) & live_x[:, None] & live_y[None, :]
    c_zw, c_zy, c_xw = cap_costs((c_zw, c_zy, c_xw), d_xy, where=solve, copy=False)
    # length: d where a connection exists; d_xy: where it is solved (one array when they agree)
    length = d_xy
    if not st.exists.all():
        length[~st.exists] = np.inf
    d_solved = length
    if (solve != np.isfinite(length)).any():
        d_solved = np.where(solve, length, np.inf)
    return LayerPairProblem(d_xy=d_solved, c_zw=c_zw, c_zy=c_zy, c_xw=c_xw, pred_idx=pred_idx,
                            pred_mass=pred_mass, succ_idx=succ_idx, succ_mass=succ_mass,
                            alpha=cfg.alpha, solve=solve, name=name, exists=st.exists,
                            length=length)


def solve_problem(prob: LayerPairProblem, cfg: CurvatureConfig) -> np.ndarray:
    """kappa of every pair of ``prob`` (see :meth:`LayerPairProblem.kappa`): solved connections
    from W1 with ``cfg.backend``, dead-endpoint / zero-weight ones 1, absent pairs NaN."""
    prob.validate()
    if not prob.solve.any():
        return prob.kappa(np.full(prob.d_xy.shape, np.nan), overwrite=True)
    from .transport import solve_w1           # imported on first use: POT and the Numba kernels
    opts = dict(cfg.backend_options, validate=False)      # validated just above
    return prob.kappa(solve_w1(prob, backend=cfg.backend, **opts), overwrite=True)


def layer_problems(graph: ChannelGraph, layer: WeightLayer, acts: list, cfg: CurvatureConfig):
    """The :class:`LayerPairProblem` s of ``layer``, one at a time: ``(channels, Y, problem)``
    for each out-junction ``Y`` in ``layer.out_junctions`` that some output channels reach
    first (real junctions before q/k sinks), ``channels`` those output channels (all of them
    for an ordinary layer: one problem)."""
    for ch, Y in _layer_parts(graph, layer, cfg):
        yield ch, Y, _build_part(graph, layer, acts, cfg, ch, Y)


def _layer_parts(graph: ChannelGraph, layer: WeightLayer, cfg: CurvatureConfig) -> list:
    """``(channels, Y)`` of each problem of ``layer`` (:func:`layer_problems`), unbuilt."""
    todo = np.ones(layer.out_channels, dtype=bool)
    parts = []
    for Y in layer.out_junctions:
        _, cols, _ = graph.layer_edges(layer, Y, cfg.p)
        ch = np.nonzero((cols >= 0) & todo)[0]
        if ch.size:
            todo[ch] = False
            parts.append((ch, Y))
    return parts


def _build_part(graph, layer, acts, cfg, ch, Y) -> LayerPairProblem:
    return build_layer_problem(graph, layer, acts, cfg, dst=Y,
                               channels=None if ch.size == layer.out_channels else ch)


def layer_curvature(graph: ChannelGraph, layer: WeightLayer, acts: list,
                    cfg: CurvatureConfig) -> LayerCurvature:
    """Curvature of every connection of ``layer``. Each output channel is scored towards the
    first of ``layer.out_junctions`` it reaches (real junctions before q/k sinks)."""
    parts = [(ch, prob.solve, prob.length, solve_problem(prob, cfg))
             for ch, _, prob in layer_problems(graph, layer, acts, cfg)]
    return _assemble(graph, layer, parts)


def _assemble(graph: ChannelGraph, layer: WeightLayer, parts: list) -> LayerCurvature:
    """The :class:`LayerCurvature` of ``layer`` from its solved parts ``(channels, solved,
    length, kappa)`` (one per problem of :func:`layer_problems`)."""
    c_out = layer.out_channels
    n_x = graph.junctions[layer.in_junction].n_nodes
    if len(parts) == 1 and parts[0][0].size == c_out:
        _, solve, length, kappa = parts[0]
        return LayerCurvature(name=layer.name, module=layer.module, kappa=kappa,
                              solved=solve, in_group=layer.in_group, length=length)
    kappa = np.ones((n_x, c_out), dtype=np.float32)   # channels that reach no junction: 1
    solved = np.zeros((n_x, c_out), dtype=bool)
    length = np.full((n_x, c_out), np.inf, dtype=np.float32)
    for ch, sv, ln, k in parts:
        kappa[:, ch], solved[:, ch], length[:, ch] = k, sv, ln
    return LayerCurvature(name=layer.name, module=layer.module, kappa=kappa, solved=solved,
                          in_group=layer.in_group, length=length)


def _pipelined(graph: ChannelGraph, layers: list, acts: list, cfg: CurvatureConfig,
               sizes: list):
    """``(layer, its size, LayerCurvature)`` for each of ``layers`` in order, the next problem
    built while the current one is solved on a background thread.

    Building a problem is mostly one-threaded numpy, and the solver has one-threaded stretches
    of its own (preparation, stage kernels, exact re-solves) between its parallel calls; run
    one after the other, each leaves a core idle. A problem is solved on the background thread
    while the next is built only when their layers have at most ``OVERLAP_CONNECTIONS``
    connections together (``sizes``: each layer's; two problems are then held at once);
    otherwise it is solved here, and its layer's result is handed on, before the next build,
    as without a pipeline. Each problem is solved exactly as on its own (values are
    identical). An error of either reaches the caller, after the solve in flight has ended."""
    from concurrent.futures import ThreadPoolExecutor

    parts = []                   # the solved parts of the current layer

    def collect(layer, n, ch, prob, kappa, last: bool):
        """Keep a solved part; the layer's result once its last part is in."""
        if prob is not None:
            parts.append((ch, prob.solve, prob.length, kappa))
        if not last:
            return []
        lc = _assemble(graph, layer, parts)
        parts.clear()
        return [(layer, n, lc)]

    with ThreadPoolExecutor(1, thread_name_prefix="tp-curvature") as ex:
        flight = None   # (layer, its size, channels, problem, future of its kappa, last part)
        for k, (layer, n) in enumerate(zip(layers, sizes)):
            todo = _layer_parts(graph, layer, cfg) or [None]     # (here: one layer's worth)
            for i, part in enumerate(todo):
                last = i == len(todo) - 1
                # the next problem: another part of this layer, the next layer's, or none
                after = n if not last else (sizes[k + 1] if k + 1 < len(layers) else None)
                prob = None if part is None else _build_part(graph, layer, acts, cfg, *part)
                if flight is not None:
                    yield from collect(*flight[:4], flight[4].result(), flight[5])
                    flight = None
                ch = None if part is None else part[0]
                if prob is not None and after is not None and n + after <= \
                        OVERLAP_CONNECTIONS:
                    flight = (layer, n, ch, prob, ex.submit(solve_problem, prob, cfg), last)
                else:
                    yield from collect(layer, n, ch, prob, None if prob is None else
                                       solve_problem(prob, cfg), last)
                del prob


AUTO_PROGRESS_CONNECTIONS = 1_000_000   # progress=None shows a bar above this many connections
#: the next problem is built while one is solved when their layers have at most this many
#: connections together (ResNet-50's default scoring, five runs alternating with the code
#: before: 70.9 s against 75.6 s on average; ViT-B/16, whose layers are all larger, peaked at
#: 1,998 MiB instead of 1,861 MiB overlapping them; docs/performance.md)
OVERLAP_CONNECTIONS = 2_000_000
TRIM_CONNECTIONS = 1 << 18               # layers this large hand their freed memory back


def graph_curvature(graph: ChannelGraph, acts: list, cfg: CurvatureConfig,
                    progress: Optional[bool] = None,
                    reduce: Optional[Callable[[LayerCurvature], object]] = None) -> dict:
    """:class:`LayerCurvature` of every scoreable weight layer of ``graph``, by layer name.

    ``reduce``: applied to each layer's result as soon as it is computed, and kept instead of
    it (the importance keeps per-channel reductions only, so the connections' kappa are never
    all held at once). ``progress=None`` shows a tqdm bar (one step per layer, weighted by its
    connections) when the graph has more than ``AUTO_PROGRESS_CONNECTIONS`` connections.
    """
    layers = [l for l in graph.layers if graph.scoreable(l)]
    sizes = [graph.junctions[l.in_junction].n_nodes * l.out_channels for l in layers]
    if progress is None:
        progress = sum(sizes) > AUTO_PROGRESS_CONNECTIONS
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(sizes), desc="curvature", unit="conn", unit_scale=True, leave=False)
    out = {}
    if sum(sizes) >= TRIM_CONNECTIONS:
        release_freed_memory()      # what the caller freed before: the layers' peaks add to it
    try:
        for layer, n, lc in _pipelined(graph, layers, acts, cfg, sizes):
            out[layer.name] = lc if reduce is None else reduce(lc)
            del lc
            if n >= TRIM_CONNECTIONS:
                release_freed_memory()
            if bar is not None:
                bar.set_postfix_str(layer.name, refresh=False)
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    return out


def connection_curvature(model: nn.Module, data, forward_fn: Optional[Callable] = None,
                         max_batches: Optional[int] = None, progress: Optional[bool] = None,
                         config: Optional[CurvatureConfig] = None, **fields) -> dict:
    """Per-connection curvature of every Linear/Conv layer of ``model``.

    Parameters
    ----------
    model : nn.Module
        A network :func:`torch.export.export` can export (layers it cannot represent are left
        out; see :mod:`tp_curvature.graph`).
    data : tensor, (inputs, targets), dict, list of batches or DataLoader
        Calibration data, read in one streaming pass (see
        :class:`tp_curvature.calibration.CalibrationData` for the accepted forms). A one-shot
        iterator (a generator, ``iter(loader)``) needs ``max_batches``.
    forward_fn : callable, optional
        ``forward_fn(model, batch) -> output`` for batches that are not a plain tensor or an
        ``(inputs, targets)`` tuple/list (required for dict batches).
    max_batches : int, optional
        Use at most this many batches (of any form).
    config : CurvatureConfig, optional
        The definition (default ``CurvatureConfig()``); or its fields as keywords.

    Returns
    -------
    dict
        Layer name -> :class:`LayerCurvature` (``kappa`` is ``(in_channels, out_channels)``).

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> from tp_curvature import connection_curvature
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    >>> kappa = connection_curvature(net, torch.randn(32, 6), topk=None, backend="exact")
    >>> {name: lc.kappa.shape for name, lc in kappa.items()}
    {'0': (6, 5), '2': (5, 3)}
    """
    from .calibration import CalibrationData, calibrate
    cfg = resolve_config(config, fields)
    cal = calibrate(model, CalibrationData(data, max_batches, forward_fn), cfg, bool(progress))
    return graph_curvature(cal.graph, cal.acts, cfg, progress)

