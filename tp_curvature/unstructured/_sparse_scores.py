"""Per-weight curvature on the sparse element graph: one pass over the layers per image.

For weight op ``B`` (input node layer X, output Y) with neighbour ops ``A`` (Z -> X) and
``C`` (Y -> W), the edges are processed in *tiles*, one per output position ``p`` of ``B``:
the tile holds every edge into the outputs at ``p`` (all output channels), whose sources are
the receptive field ``X_p`` of ``p`` (``C_in * #taps`` elements; a ``Linear`` is one tile).
For the tile, Z is the union of the top-k predecessor supports of ``X_p`` and W the union of
the successor supports of the outputs at ``p``; the ground costs are forward shortest paths
over *every* intermediate node (:func:`~._sparse.tile_costs`), so each value equals the dense
mode's entry. The tile is one :class:`~tp_curvature.problem.LayerPairProblem` (its ``c_zw``
block is shared by all of the tile's edges, as a layer pair's is in the structured mode) and is
solved by :func:`~tp_curvature.curvature.solve_problem`, i.e. the same kernels and the same
certificate. Memory per tile: ``O(|X_p| * C_out + |Z| * |X_p| + |W| * n_X)``.

Under the paper's lengths (``1/|w|``) the two-hop shortest paths depend on the weights only:
a layer's :class:`~._sparse.PathCache` computes the row of a successor element the first time
a tile needs it and serves it to every later tile and image (the same values, so the same
kappa bit for bit; ``cache_paths=False`` recomputes them per tile). What stays per image: the
node values, the top-k supports of the measures (:func:`layer_context`) and the transport
problems. Measured gains: docs/paper.md (performance).
"""
from __future__ import annotations

import time
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn

from ..curvature import CurvatureConfig, solve_problem
from ..problem import LayerPairProblem, cap_costs
from ..shortest_paths import minplus
from ..config import renamed_keyword
from ._checks import OUTPUTS, REDUCES, check_choice, check_model, element_config, check_images
from ._conventions import resolve_conventions
from ._graph import finite_values, check_image_shape
from ._sparse import (NO_GEOMETRY, Neighbourhood, PathBudget, PathCache, SparseElementGraph,
                      Tile, path_cache, pred_supports, set_strengths, sparse_element_graph,
                      succ_supports, tile_costs, PATH_CACHE_BYTES)



def sparse_node_values(graph: SparseElementGraph, images: torch.Tensor,
                       output: str = "softmax", normalize: str = "minmax",
                       first_image: int = 0):
    """Per image: ``(a, raw)`` with ``a`` the normalised node values of every node layer
    (inputs of the ops, then the output; under the graph's conventions) and ``raw`` the raw
    input tensor of every max pool (op index -> (C, H, W)), used to find the winners.
    ``first_image`` numbers the images in error messages."""
    check_choice("output", output, OUTPUTS)
    images = check_images(images)
    check_image_shape(images, graph.input_shape)
    conv = graph.conventions
    taps = [op.tap for op in graph.ops]
    vals = graph.chain.values(images, set(taps) | {graph.output})
    where = [f"the input of {op.name!r}" for op in graph.ops] + ["the model output"]
    per_layer = [np.abs(finite_values(vals[t], w)) for t, w in zip(taps, where)]
    out = finite_values(vals[graph.output], where[-1])
    if output == "softmax":
        out = conv.output_softmax(out)
    per_layer.append(np.abs(out))
    res = []
    for i in range(images.shape[0]):
        raw = {j: vals[op.tap][i].detach().cpu()
               for j, op in enumerate(graph.ops) if op.kind == "maxpool"}
        res.append(([conv.normalise(a[i], normalize, w, first_image + i)
                     for a, w in zip(per_layer, where)], raw))
    return res


def _k(topk, fan):
    return max(1, fan if topk is None else min(topk, max(fan, 1)))


def _max_fanout(op) -> int:
    if op.P == 0:
        return 0
    return int(np.diff(op.inv_ptr).max()) * (1 if op.depthwise else op.O)


def _tile_sources(B, p: int) -> tuple:
    """The sources of output position ``p`` of op ``B``: their global indices in X and their
    column in ``B.S`` (channel-major, taps in order)."""
    taps = np.flatnonzero(B.pos_tab[p] >= 0)
    q = B.pos_tab[p, taps]
    cc = np.repeat(np.arange(B.C), taps.size)
    tt = np.tile(taps, B.C)
    return cc * B.P + np.tile(q, B.C), cc * B.K2 + tt


def _tile_edges(B, ps: list, oo: np.ndarray) -> tuple:
    """The edges of the output positions ``ps`` of op ``B`` as one problem: sources ``Xp``
    (nx,), targets ``Yp`` (position-major, every output channel), strengths ``s``
    (nx, ny; 0 where no edge), weight flat index ``wi`` (-1 where no edge) and the edge mask
    (None: every pair is an edge, the one-position tile)."""
    if len(ps) == 1:
        p = ps[0]
        Xp, cols = _tile_sources(B, p)
        Yp = oo * B.L + p
        s = B.S[:, cols].T                                      # (nx, O)
        wi = oo[None, :] * (B.C * B.K2) + cols[:, None]
        return Xp, Yp, s, wi, None
    parts = [_tile_sources(B, p) for p in ps]
    Xp = np.unique(np.concatenate([x for x, _ in parts]))
    Yp = (np.asarray(ps)[:, None] + oo[None, :] * B.L).ravel()
    n_o = oo.size
    s = np.zeros((Xp.size, len(ps) * n_o))
    wi = np.full(s.shape, -1, np.int64)
    for b, (xb, cols) in enumerate(parts):
        r = np.searchsorted(Xp, xb)
        blk = slice(b * n_o, (b + 1) * n_o)
        s[r, blk] = B.S[:, cols].T
        wi[r, blk] = oo[None, :] * (B.C * B.K2) + cols[:, None]
    return Xp, Yp, s, wi, wi >= 0


class LayerContext(NamedTuple):
    """What every tile of weight op ``B`` shares on one image: its neighbour ops, the top-k
    supports of the measures (predecessors of X, successors of Y), the scratch maps of Z / W
    and the :class:`~._sparse.Neighbourhood` of the path kernels."""
    A: object
    B: object
    C: object
    pred_idx: np.ndarray
    pred_mass: np.ndarray
    succ_idx: np.ndarray
    succ_mass: np.ndarray
    zmap: np.ndarray
    wmap: np.ndarray
    nb: Neighbourhood


def layer_context(graph: SparseElementGraph, bi: int, a: list,
                  cfg: CurvatureConfig) -> LayerContext:
    """The :class:`LayerContext` of weight op ``bi`` for one image's node values ``a``."""
    ops = graph.ops
    f32 = graph.conventions.float32_measure
    B = ops[bi]
    A = ops[bi - 1] if bi > 0 else None
    C = ops[bi + 1] if bi + 1 < len(ops) else None
    a_z = a[bi - 1] if A is not None else np.zeros(0)
    a_x, a_y = a[bi], a[bi + 1]
    a_w = a[bi + 2] if C is not None else np.zeros(0)
    flow_m = cfg.measure == "flow"
    if A is not None:
        fan_a = A.K2 if A.depthwise else A.C * A.K2
        pred_idx, pred_mass = pred_supports(B.n_in, _k(cfg.topk, fan_a), flow_m, a_z,
                                            A.geometry(), f32, 1.0 - cfg.alpha)
        zmap = np.full(A.n_in, -1, np.int64)
    else:
        pred_idx, pred_mass = np.full((B.n_in, 0), -1, np.int64), np.zeros((B.n_in, 0))
        zmap = np.full(0, -1, np.int64)
    if C is not None:
        succ_idx, succ_mass = succ_supports(C.n_in, _k(cfg.topk, _max_fanout(C)), flow_m,
                                            a_w, C.geometry(), f32, 1.0 - cfg.alpha)
        wmap = np.full(C.n_out, -1, np.int64)
    else:
        succ_idx, succ_mass = np.full((B.n_out, 0), -1, np.int64), np.zeros((B.n_out, 0))
        wmap = np.full(0, -1, np.int64)
    nb = Neighbourhood(A.geometry() if A is not None else NO_GEOMETRY, B.geometry(),
                       C.geometry() if C is not None else NO_GEOMETRY, A is not None,
                       C is not None, a_z, a_x, a_y, cfg.length == "flow")
    return LayerContext(A, B, C, pred_idx, pred_mass, succ_idx, succ_mass, zmap, wmap, nb)


def layer_tiles(graph: SparseElementGraph, bi: int, a: list, cfg: CurvatureConfig,
                keep_edges: bool = False, tiles=None, max_solved: Optional[int] = None,
                rng: Optional[np.random.Generator] = None, cache: Optional[PathCache] = None,
                tiles_per_call: int = 1, context: Optional[LayerContext] = None):
    """Yield, per tile of weight op ``bi``: (weight flat index (nx, ny), kappa (nx, ny),
    solved (nx, ny), x global (nx,), y global (ny,), seconds), for one image's node values
    ``a``; ``ny`` = the op's output channels.

    ``tiles``: only these output positions (default all). ``max_solved``: solve at most this
    many (random, ``rng``) of a tile's edges, the others come back unsolved (kappa 1; for
    accuracy checks on a sample of edges). ``cache``: the op's :class:`~._sparse.PathCache`
    (shortest paths computed once per call; the same values). ``tiles_per_call``: positions
    solved together as one transport problem (default 1, one tile per position); a group
    yields one item whose ``ny`` is ``len(group) * O`` (position-major) and whose pairs that
    are no edge have weight index -1 and kappa NaN. A group gives the same ground costs as
    its tiles (the sources of a position are its whole receptive field), but the solver's
    approximations (Sinkhorn's shared potentials, eps levels, the cap of unreachable pairs)
    are set per problem, so values differ within the backend's tolerance. ``context``: the
    op's :func:`layer_context` on this image (computed here when None)."""
    conv = graph.conventions
    ctx = context if context is not None else layer_context(graph, bi, a, cfg)
    A, B, C = ctx.A, ctx.B, ctx.C
    pred_idx, pred_mass, succ_idx, succ_mass = (ctx.pred_idx, ctx.pred_mass, ctx.succ_idx,
                                                ctx.succ_mass)
    zmap, wmap, nb = ctx.zmap, ctx.wmap, ctx.nb
    a_x, a_y = nb.a_x, nb.a_y
    flow_l = nb.flow
    oo = np.arange(B.O)
    positions = list(range(B.L) if tiles is None else tiles)
    for g0 in range(0, len(positions), tiles_per_call):
        ps = positions[g0:g0 + tiles_per_call]
        t0 = time.perf_counter()
        Xp, Yp, s, wi, edge = _tile_edges(B, ps, oo)
        if flow_l:
            s = s * a_x[Xp][:, None]
        with np.errstate(divide="ignore"):
            d_xy = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), np.inf)
        pi = pred_idx[Xp]
        Zu = np.unique(pi[pi >= 0])
        zmap[Zu] = np.arange(Zu.size)
        si = succ_idx[Yp]
        Wu = np.unique(si[si >= 0])
        wmap[Wu] = np.arange(Wu.size)
        d_zx, c_zw, c_xw = tile_costs(Tile(Xp, Zu, zmap, Wu), nb, cache)
        c_zy = minplus(d_zx, d_xy)
        live_x, live_y = conv.live_endpoints(a_x[Xp], a_y[Yp], A is None, C is None)
        solve = np.isfinite(d_xy) & live_x[:, None] & live_y[None, :]
        if max_solved is not None and solve.sum() > max_solved:
            on = np.flatnonzero(solve)
            keep = (rng or np.random.default_rng(0)).choice(on, max_solved, replace=False)
            solve = np.zeros_like(solve)
            solve.flat[keep] = True
        c_zw, c_zy, c_xw = cap_costs((c_zw, c_zy, c_xw), d_xy[solve])
        name = f"{B.name}@{ps[0]}" + (f"-{ps[-1]}" if len(ps) > 1 else "")
        prob = LayerPairProblem(
            d_xy=np.where(solve, d_xy, np.inf), c_zw=c_zw, c_zy=c_zy, c_xw=c_xw,
            pred_idx=np.where(pi >= 0, zmap[np.maximum(pi, 0)] if zmap.size else -1, -1),
            pred_mass=pred_mass[Xp], succ_idx=np.where(si >= 0, wmap[np.maximum(si, 0)]
                                                       if wmap.size else -1, -1),
            succ_mass=succ_mass[Yp], alpha=cfg.alpha, solve=solve, name=name,
            exists=np.ones_like(solve) if edge is None else edge, length=d_xy)
        kappa = solve_problem(prob, cfg)
        zmap[Zu] = -1
        wmap[Wu] = -1
        yield wi, kappa, solve, (Xp if keep_edges else None), \
            (Yp if keep_edges else None), time.perf_counter() - t0


def check_speed_options(cache_paths, tiles_per_call) -> None:
    """``cache_paths`` a bool, ``tiles_per_call`` a positive int."""
    if not isinstance(cache_paths, bool):
        raise TypeError(f"cache_paths must be True or False, got {cache_paths!r}")
    if isinstance(tiles_per_call, bool) or not isinstance(tiles_per_call, (int, np.integer)) \
            or tiles_per_call < 1:
        raise ValueError(f"tiles_per_call must be a positive integer, got {tiles_per_call!r}")


def scored_ops(graph: SparseElementGraph, layers) -> list:
    """The weight ops to score: all, or those named in ``layers`` (module names such as
    ``"features.0"``; a ValueError names any that is no weight layer of the chain)."""
    if layers is None:
        return list(graph.weight_ops)
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise TypeError(f"layers must be a list of layer names, got {layers!r}")
    names = {graph.ops[bi].name: bi for bi in graph.weight_ops}
    bad = [n for n in layers if n not in names]
    if bad or not layers:
        raise ValueError(f"layers: {bad or 'empty'} (the weight layers are "
                         f"{', '.join(map(repr, names))})")
    return [bi for bi in graph.weight_ops if graph.ops[bi].name in set(layers)]


def path_caches(graph: SparseElementGraph, ops: list, cfg: CurvatureConfig, on: bool,
                max_bytes: int = PATH_CACHE_BYTES) -> dict:
    """Weight op index -> its :class:`~._sparse.PathCache` (None where the paths depend on
    the image, or ``on`` is False), sharing ``max_bytes``."""
    budget = PathBudget(max_bytes)
    return {bi: path_cache(graph.ops, bi, cfg, budget) if on else None for bi in ops}


def sparse_edge_curvature(model: nn.Module, image: torch.Tensor, output: str = "softmax",
                          graph: Optional[SparseElementGraph] = None,
                          conventions: str = "library", *, cache_paths: bool = True,
                          tiles_per_call: int = 1, **config) -> dict:
    """Per-edge kappa of every weight layer for one image ``(1, ...)`` (for checks on small
    models): layer name -> ``(x, y, weight index, kappa)`` flat arrays, one entry per edge
    (x / y: flat element indices of the layer's input / output). ``conventions`` as in
    :func:`~tp_curvature.unstructured.edge_curvature`; ``cache_paths`` and
    ``tiles_per_call`` as in :func:`sparse_weight_curvature`."""
    from ._scores import check_graph_conventions

    cfg = element_config(config, sparse=True)
    conv = resolve_conventions(conventions, cfg)
    check_speed_options(cache_paths, tiles_per_call)
    image = check_images(image, "image")
    if graph is None:
        graph = sparse_element_graph(model, image, conventions=conv)
    check_graph_conventions(graph, conv)
    a, raw = sparse_node_values(graph, image[:1], output, cfg.normalize)[0]
    set_image_strengths(graph, raw)
    caches = path_caches(graph, graph.weight_ops, cfg, cache_paths)
    out = {}
    for bi in graph.weight_ops:
        parts = []
        for wi, k, _, x, y, _ in layer_tiles(graph, bi, a, cfg, keep_edges=True,
                                             cache=caches[bi], tiles_per_call=tiles_per_call):
            e = wi.ravel() >= 0
            parts.append((np.repeat(x, y.size)[e], np.tile(y, x.size)[e], wi.ravel()[e],
                          k.ravel()[e]))
        out[graph.ops[bi].name] = tuple(np.concatenate(z) for z in zip(*parts))
    return out


def set_image_strengths(graph: SparseElementGraph, raw: dict) -> None:
    for j, op in enumerate(graph.ops):
        if op.kind == "maxpool":
            set_strengths(op, raw[j])


def sparse_weight_curvature(model: nn.Module, images, output: str = "softmax",
                            reduction: str = "min", progress: bool = True,
                            return_info: bool = False, *, reduce: Optional[str] = None,
                            conventions: str = "library", cache_paths: bool = True,
                            tiles_per_call: int = 1, layers=None, **config):
    """Per-weight curvature of every Conv2d / Linear weight, on the sparse element graph.

    Same contract as :func:`~tp_curvature.unstructured.weight_curvature` (same definitions,
    min over a weight's positions and over the images), for chains that may also hold
    ``MaxPool2d`` / ``AvgPool2d`` and whose element matrices are far too large for the dense
    mode (the paper's VGG-9: 43M edges per image). ``topk`` defaults to
    :data:`SPARSE_DEFAULT_TOPK`. A tqdm bar counts edges. ``return_info`` adds timings, edges
    and solved edges per layer. ``conventions``: ``"library"`` or ``"authors"``, as in
    :func:`~tp_curvature.unstructured.weight_curvature`.

    Speed options (the default outputs are those of recomputing everything per tile, bit for
    bit):

    ``cache_paths`` (default True)
        Under the paper's lengths (``length="weight"``) the shortest paths depend on the
        weights only: each layer's two-hop paths are computed once, when a tile first needs
        them, and reused by every tile and image (:class:`~._sparse.PathCache`; at most
        :data:`~._sparse.PATH_CACHE_BYTES` in all, per-layer counters in ``info["layers"]``
        under ``"path_cache"``). Flow lengths and layers followed by a max pool recompute
        them per tile, as does ``cache_paths=False``; the kappa are the same bit for bit.
    ``tiles_per_call`` (default 1)
        Output positions solved as one transport problem (one solver call) instead of one
        per position: same ground costs, but the Sinkhorn backend's shared potentials, eps
        levels and the cap of unreachable pairs are set per problem, so scores move within
        the backend's tolerance (``kappa_tol``); the exact backend gives the same kappa.
    ``layers``
        Score only these weight layers (module names, e.g. ``["features.0"]``); the result
        holds only their weights (the graph, node values and measures are the whole
        model's, so a layer's scores equal those of a full run).
    """
    check_model(model)
    check_choice("output", output, OUTPUTS)
    reduction = renamed_keyword("reduce", reduce, "reduction", reduction)
    check_choice("reduction", reduction, REDUCES)
    cfg = element_config(config, sparse=True)
    conv = resolve_conventions(conventions, cfg)
    check_speed_options(cache_paths, tiles_per_call)
    images = check_images(images)
    t_start = time.perf_counter()
    graph = sparse_element_graph(model, images, conventions=conv)
    scored = scored_ops(graph, layers)
    for op in graph.ops:
        set_strengths(op)
    t_graph = time.perf_counter() - t_start
    caches = path_caches(graph, scored, cfg, cache_paths)
    wops = [graph.ops[i] for i in scored]
    accs, cnts = {}, {}
    for op in wops:
        n = op.module.weight.numel()
        accs[op.name] = np.full(n, np.inf if reduction == "min" else 0.0)
        cnts[op.name] = np.zeros(n) if reduction == "mean" else None
    info = {"n_images": int(images.shape[0]), "graph_s": t_graph, "per_image_s": [],
            "n_edges_per_image": sum(op.n_edges for op in wops),
            "layers": {op.name: {"n_edges": op.n_edges, "n_weights": op.module.weight.numel(),
                                 "tiles": op.L, "solved": 0, "seconds": 0.0} for op in wops},
            "config": {**cfg.__dict__, "output": output, "reduction": reduction,
                       "conventions": conv.name, "cache_paths": cache_paths,
                       "tiles_per_call": int(tiles_per_call)}}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=info["n_edges_per_image"] * int(images.shape[0]),
                   desc="element curvature",
                   unit="edge", unit_scale=True, leave=False)
    try:
        for i in range(images.shape[0]):
            t0 = time.perf_counter()
            a, raw = sparse_node_values(graph, images[i:i + 1], output, cfg.normalize,
                                        first_image=i)[0]
            set_image_strengths(graph, raw)
            for bi in scored:
                op = graph.ops[bi]
                acc, cnt, rec = accs[op.name], cnts[op.name], info["layers"][op.name]
                if bar is not None:
                    bar.set_postfix(image=i, layer=op.name, refresh=False)
                hidden = 0 < bi < len(graph.ops) - 1
                for wi, kappa, solved, _, _, sec in layer_tiles(
                        graph, bi, a, cfg, cache=caches[bi], tiles_per_call=tiles_per_call):
                    ok = ~np.isnan(kappa)
                    kappa = conv.relabel(kappa, hidden)
                    if reduction == "min":
                        np.minimum.at(acc, wi[ok], kappa[ok])
                    else:
                        np.add.at(acc, wi[ok], kappa[ok])
                        np.add.at(cnt, wi[ok], 1.0)
                    rec["solved"] += int(solved.sum())
                    rec["seconds"] += sec
                    if bar is not None:
                        bar.update(kappa.size)
            info["per_image_s"].append(time.perf_counter() - t0)
    finally:
        if bar is not None:
            bar.close()
    for bi, cache in caches.items():
        if cache is not None:
            info["layers"][graph.ops[bi].name]["path_cache"] = cache.stats()
    scores = {}
    for op in wops:
        acc = accs[op.name]
        if reduction == "mean":
            cnt = cnts[op.name]
            acc = np.where(cnt > 0, acc / np.maximum(cnt, 1), 1.0)
        else:
            acc = np.where(np.isinf(acc), 1.0, acc)
        if not np.isfinite(acc).all():
            raise RuntimeError(f"layer {op.name!r}: the solver returned non-finite curvature "
                               f"(backend {cfg.backend!r}); try backend='exact'")
        scores[op.param_name] = torch.from_numpy(acc).view_as(op.module.weight.detach()).clone()
    info["total_s"] = time.perf_counter() - t_start
    return (scores, info) if return_info else scores
