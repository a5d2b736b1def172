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
"""
from __future__ import annotations

import time
from typing import Optional

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
from ._sparse import (NO_GEOMETRY, Neighbourhood, SparseElementGraph, Tile, pred_supports,
                      set_strengths, sparse_element_graph, succ_supports, tile_costs)



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


def layer_tiles(graph: SparseElementGraph, bi: int, a: list, cfg: CurvatureConfig,
                keep_edges: bool = False, tiles=None, max_solved: Optional[int] = None,
                rng: Optional[np.random.Generator] = None):
    """Yield, per tile of weight op ``bi``: (weight flat index (nx, O), kappa (nx, O), solved
    (nx, O), x global (nx,), y global (O,), seconds), for one image's node values ``a``.

    ``tiles``: only these output positions (default all). ``max_solved``: solve at most this
    many (random, ``rng``) of a tile's edges, the others come back unsolved (kappa 1; for
    accuracy checks on a sample of edges)."""
    ops = graph.ops
    conv = graph.conventions
    f32 = conv.float32_measure
    B = ops[bi]
    A = ops[bi - 1] if bi > 0 else None
    C = ops[bi + 1] if bi + 1 < len(ops) else None
    a_z = a[bi - 1] if A is not None else np.zeros(0)
    a_x, a_y = a[bi], a[bi + 1]
    a_w = a[bi + 2] if C is not None else np.zeros(0)
    flow_m = cfg.measure == "flow"
    flow_l = cfg.length == "flow"
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
                       C is not None, a_z, a_x, a_y, flow_l)
    oo = np.arange(B.O)
    for p in (range(B.L) if tiles is None else tiles):
        t0 = time.perf_counter()
        taps = np.flatnonzero(B.pos_tab[p] >= 0)
        q = B.pos_tab[p, taps]
        cc = np.repeat(np.arange(B.C), taps.size)
        tt = np.tile(taps, B.C)
        Xp = cc * B.P + np.tile(q, B.C)
        cols = cc * B.K2 + tt
        Yp = oo * B.L + p
        s = B.S[:, cols].T                                      # (nx, O)
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
        d_zx, c_zw, c_xw = tile_costs(Tile(Xp, Zu, zmap, Wu), nb)
        c_zy = minplus(d_zx, d_xy)
        live_x, live_y = conv.live_endpoints(a_x[Xp], a_y[Yp], A is None, C is None)
        solve = np.isfinite(d_xy) & live_x[:, None] & live_y[None, :]
        if max_solved is not None and solve.sum() > max_solved:
            on = np.flatnonzero(solve)
            keep = (rng or np.random.default_rng(0)).choice(on, max_solved, replace=False)
            solve = np.zeros_like(solve)
            solve.flat[keep] = True
        c_zw, c_zy, c_xw = cap_costs((c_zw, c_zy, c_xw), d_xy[solve])
        prob = LayerPairProblem(
            d_xy=np.where(solve, d_xy, np.inf), c_zw=c_zw, c_zy=c_zy, c_xw=c_xw,
            pred_idx=np.where(pi >= 0, zmap[np.maximum(pi, 0)] if zmap.size else -1, -1),
            pred_mass=pred_mass[Xp], succ_idx=np.where(si >= 0, wmap[np.maximum(si, 0)]
                                                       if wmap.size else -1, -1),
            succ_mass=succ_mass[Yp], alpha=cfg.alpha, solve=solve, name=f"{B.name}@{p}",
            exists=np.ones_like(solve), length=d_xy)
        kappa = solve_problem(prob, cfg)
        zmap[Zu] = -1
        wmap[Wu] = -1
        wi = oo[None, :] * (B.C * B.K2) + cols[:, None]
        yield wi, kappa, solve, (Xp if keep_edges else None), \
            (Yp if keep_edges else None), time.perf_counter() - t0


def sparse_edge_curvature(model: nn.Module, image: torch.Tensor, output: str = "softmax",
                          graph: Optional[SparseElementGraph] = None,
                          conventions: str = "library", **config) -> dict:
    """Per-edge kappa of every weight layer for one image ``(1, ...)`` (for checks on small
    models): layer name -> ``(x, y, weight index, kappa)`` flat arrays, one entry per edge
    (x / y: flat element indices of the layer's input / output). ``conventions`` as in
    :func:`~tp_curvature.unstructured.edge_curvature`."""
    from ._scores import check_graph_conventions

    cfg = element_config(config, sparse=True)
    conv = resolve_conventions(conventions, cfg)
    image = check_images(image, "image")
    if graph is None:
        graph = sparse_element_graph(model, image, conventions=conv)
    check_graph_conventions(graph, conv)
    a, raw = sparse_node_values(graph, image[:1], output, cfg.normalize)[0]
    set_image_strengths(graph, raw)
    out = {}
    for bi in graph.weight_ops:
        parts = [(np.repeat(x, y.size), np.tile(y, x.size), wi.ravel(), k.ravel())
                 for wi, k, _, x, y, _ in layer_tiles(graph, bi, a, cfg, keep_edges=True)]
        out[graph.ops[bi].name] = tuple(np.concatenate(z) for z in zip(*parts))
    return out


def set_image_strengths(graph: SparseElementGraph, raw: dict) -> None:
    for j, op in enumerate(graph.ops):
        if op.kind == "maxpool":
            set_strengths(op, raw[j])


def sparse_weight_curvature(model: nn.Module, images, output: str = "softmax",
                            reduction: str = "min", progress: bool = True,
                            return_info: bool = False, *, reduce: Optional[str] = None,
                            conventions: str = "library", **config):
    """Per-weight curvature of every Conv2d / Linear weight, on the sparse element graph.

    Same contract as :func:`~tp_curvature.unstructured.weight_curvature` (same definitions,
    min over a weight's positions and over the images), for chains that may also hold
    ``MaxPool2d`` / ``AvgPool2d`` and whose element matrices are far too large for the dense
    mode (the paper's VGG-9: 43M edges per image). ``topk`` defaults to
    :data:`SPARSE_DEFAULT_TOPK`. A tqdm bar counts edges. ``return_info`` adds timings, edges
    and solved edges per layer. ``conventions``: ``"library"`` or ``"authors"``, as in
    :func:`~tp_curvature.unstructured.weight_curvature`.
    """
    check_model(model)
    check_choice("output", output, OUTPUTS)
    reduction = renamed_keyword("reduce", reduce, "reduction", reduction)
    check_choice("reduction", reduction, REDUCES)
    cfg = element_config(config, sparse=True)
    conv = resolve_conventions(conventions, cfg)
    images = check_images(images)
    t_start = time.perf_counter()
    graph = sparse_element_graph(model, images, conventions=conv)
    for op in graph.ops:
        set_strengths(op)
    t_graph = time.perf_counter() - t_start
    wops = [graph.ops[i] for i in graph.weight_ops]
    accs, cnts = {}, {}
    for op in wops:
        n = op.module.weight.numel()
        accs[op.name] = np.full(n, np.inf if reduction == "min" else 0.0)
        cnts[op.name] = np.zeros(n) if reduction == "mean" else None
    info = {"n_images": int(images.shape[0]), "graph_s": t_graph, "per_image_s": [],
            "n_edges_per_image": graph.n_edges,
            "layers": {op.name: {"n_edges": op.n_edges, "n_weights": op.module.weight.numel(),
                                 "tiles": op.L, "solved": 0, "seconds": 0.0} for op in wops},
            "config": {**cfg.__dict__, "output": output, "reduction": reduction,
                       "conventions": conv.name}}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=graph.n_edges * int(images.shape[0]), desc="element curvature",
                   unit="edge", unit_scale=True, leave=False)
    try:
        for i in range(images.shape[0]):
            t0 = time.perf_counter()
            a, raw = sparse_node_values(graph, images[i:i + 1], output, cfg.normalize,
                                        first_image=i)[0]
            set_image_strengths(graph, raw)
            for bi in graph.weight_ops:
                op = graph.ops[bi]
                acc, cnt, rec = accs[op.name], cnts[op.name], info["layers"][op.name]
                if bar is not None:
                    bar.set_postfix(image=i, layer=op.name, refresh=False)
                hidden = 0 < bi < len(graph.ops) - 1
                for wi, kappa, solved, _, _, sec in layer_tiles(graph, bi, a, cfg):
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
