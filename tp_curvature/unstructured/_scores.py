"""Per-edge and per-weight curvature of the element graph (min over positions and images)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..curvature import (CurvatureConfig, PairStrengths, problem_from_strengths,
                         solve_problem)
from ..config import renamed_keyword
from ._checks import OUTPUTS, REDUCES, check_choice, check_model, element_config, check_images
from ._conventions import Conventions, resolve_conventions
from ._graph import ElementGraph, element_graph, node_values


@dataclass
class EdgeCurvature:
    """kappa of every edge of one weight layer for one image.

    ``kappa[i, o]``: input element ``i`` -> output element ``o``; NaN where there is no edge.
    ``solved``: edges that went through the solver (the others have kappa 1).
    """
    name: str
    kappa: np.ndarray
    weight_index: np.ndarray
    solved: np.ndarray
    build_s: float = 0.0
    solve_s: float = 0.0


def _image_edges(graph: ElementGraph, a: list, cfg: CurvatureConfig,
                 layers: Optional[Iterable[int]] = None) -> list:
    out = []
    L = graph.layers
    n = len(L)
    for l in (range(n) if layers is None else layers):
        lay = L[l]
        if l > 0:
            s_zx, a_z = L[l - 1].strength, a[l - 1]
        else:
            s_zx, a_z = np.zeros((0, lay.n_in)), np.zeros(0)
        if l + 1 < n:
            s_yw, a_w = L[l + 1].strength, a[l + 2]
        else:
            s_yw, a_w = np.zeros((lay.n_out, 0)), np.zeros(0)
        t0 = time.perf_counter()
        prob = problem_from_strengths(PairStrengths(
            s_zx=s_zx, a_z=a_z, a_x=a[l], s_xy_all=lay.strength, s_direct=lay.strength,
            cols=np.arange(lay.n_out), a_yn=a[l + 1], s_yw=s_yw, a_w=a_w,
            exists=lay.exists), cfg, lay.name, conventions=graph.conventions)
        t1 = time.perf_counter()
        kappa = solve_problem(prob, cfg)
        t2 = time.perf_counter()
        out.append(EdgeCurvature(name=lay.name, kappa=kappa, weight_index=lay.weight_index,
                                 solved=prob.solve, build_s=t1 - t0, solve_s=t2 - t1))
    return out


def edge_curvature(model: nn.Module, image: torch.Tensor, output: str = "softmax",
                   graph: Optional[ElementGraph] = None, conventions: str = "library",
                   **config) -> list:
    """Per-edge kappa of every weight layer for one image, given as a batch ``(1, ...)``.

    ``conventions``: ``"library"`` or ``"authors"`` (the paper authors' code; see
    :mod:`tp_curvature.unstructured._conventions`); a given ``graph`` must have been built with
    the same. ``**config``: fields of :class:`~tp_curvature.curvature.CurvatureConfig`
    (``alpha``, ``variant``, ``topk`` (default :data:`DEFAULT_TOPK`), ``backend``,
    ``normalize``...). Returns a list of :class:`EdgeCurvature`, in layer order.
    """
    check_choice("output", output, OUTPUTS)
    cfg = element_config(config)
    conv = resolve_conventions(conventions, cfg)
    image = check_images(image, "image")
    if graph is None:
        graph = element_graph(model, image, conventions=conv)
    check_graph_conventions(graph, conv)
    a = node_values(graph, image[:1], output, cfg.normalize)[0]
    return _image_edges(graph, a, cfg)


def check_graph_conventions(graph, conv: Conventions) -> None:
    """A graph passed in must carry the strengths of the conventions asked for."""
    if graph.conventions != conv:
        raise ValueError(f"the graph was built with conventions={graph.conventions.name!r}, "
                         f"not {conv.name!r} (its strengths differ); build it with "
                         f"conventions={conv.name!r} or leave graph=None")


def _reduce_into(acc: torch.Tensor, cnt: Optional[torch.Tensor], ek: EdgeCurvature,
                 reduction: str, conv: Conventions, hidden: bool):
    ex = ek.weight_index >= 0
    wi = torch.from_numpy(ek.weight_index[ex])
    k = torch.from_numpy(conv.relabel(ek.kappa[ex], hidden))
    if reduction == "min":
        acc.scatter_reduce_(0, wi, k, reduce="amin", include_self=True)
    else:
        acc.index_add_(0, wi, k)
        cnt.index_add_(0, wi, torch.ones_like(k))


def weight_curvature(model: nn.Module, images: torch.Tensor, output: str = "softmax",
                     reduction: str = "min", progress: bool = True, return_info: bool = False,
                     *, reduce: Optional[str] = None, conventions: str = "library", **config):
    """Per-weight curvature scores of every Conv2d / Linear weight of ``model``.

    Parameters
    ----------
    model : nn.Module
        A supported sequential chain (see the module docstring).
    images : tensor ``(N, ...)`` or ``(x, y)`` pair
        Calibration images, e.g. ``engine.data.calibration_batch`` (benchmarks) with
        ``per_class=True, model=model`` (the paper: one correctly classified image per class).
    output : ``"softmax"`` | ``"logits"``
        Node values of the output layer.
    reduction : ``"min"`` | ``"mean"``
        Over a weight's edges and over images (the paper: min). ``reduce=`` is a deprecated
        alias.
    conventions : ``"library"`` | ``"authors"``
        The library's conventions or the paper authors' code's (dead input / output nodes
        solved, float32 measures with a uniform fallback, zero weights as ``1e30`` edges, BN
        not folded, a constant layer an error, and in the score an edge of a layer between two
        hidden layers with ``|kappa - 1| < 1e-6`` counting 2.0); see
        :mod:`tp_curvature.unstructured._conventions`.
    **config
        Overrides of the preset :meth:`CurvatureConfig.element()
        <tp_curvature.CurvatureConfig.element>` (the paper's definition, ``alpha=0.9``,
        ``topk`` :data:`DEFAULT_TOPK`).

    Returns
    -------
    dict
        Parameter name (``"features.0.weight"``) -> float64 tensor shaped like the weight.
        With ``return_info=True`` also a dict of timings and counts.

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> from tp_curvature.unstructured import weight_curvature, prune_by_curvature
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> scores = weight_curvature(net, torch.randn(4, 1, 4, 4), progress=False)
    >>> {name: tuple(s.shape) for name, s in scores.items()}
    {'1.weight': (8, 16), '3.weight': (3, 8)}
    >>> bool(max(s.max() for s in scores.values()) <= 1 / (1 - 0.9))   # kappa <= 1/(1-alpha)
    True
    """
    check_model(model)
    check_choice("output", output, OUTPUTS)
    reduction = renamed_keyword("reduce", reduce, "reduction", reduction)
    check_choice("reduction", reduction, REDUCES)
    cfg = element_config(config)
    conv = resolve_conventions(conventions, cfg)
    images = check_images(images)
    t_start = time.perf_counter()
    graph = element_graph(model, images, conventions=conv)
    t_graph = time.perf_counter() - t_start
    acts = node_values(graph, images, output, cfg.normalize)
    accs, cnts = [], []
    for lay in graph.layers:
        numel = lay.module.weight.numel()
        init = float("inf") if reduction == "min" else 0.0
        accs.append(torch.full((numel,), init, dtype=torch.float64))
        cnts.append(torch.zeros(numel, dtype=torch.float64) if reduction == "mean" else None)
    info = {"n_images": len(acts), "graph_s": t_graph, "per_image_s": [],
            "layers": {l.name: {"n_edges": l.n_edges, "n_weights": l.module.weight.numel(),
                                "solved": 0, "build_s": 0.0, "solve_s": 0.0}
                       for l in graph.layers},
            "config": {**cfg.__dict__, "output": output, "reduction": reduction,
                       "conventions": conv.name}}
    it = range(len(acts))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(acts) * len(graph.layers), desc="unstructured curvature",
                   leave=False)
    for i in it:
        t0 = time.perf_counter()
        for li in range(len(graph.layers)):
            ek = _image_edges(graph, acts[i], cfg, layers=[li])[0]
            _reduce_into(accs[li], cnts[li], ek, reduction, conv,
                         hidden=0 < li < len(graph.layers) - 1)
            rec = info["layers"][ek.name]
            rec["solved"] += int(ek.solved.sum())
            rec["build_s"] += ek.build_s
            rec["solve_s"] += ek.solve_s
            if bar is not None:
                bar.update(1)
                bar.set_postfix(image=i, layer=ek.name)
        info["per_image_s"].append(time.perf_counter() - t0)
    if bar is not None:
        bar.close()
    scores = {}
    for lay, acc, cnt in zip(graph.layers, accs, cnts):
        if reduction == "mean":
            acc = torch.where(cnt > 0, acc / cnt.clamp_min(1), torch.ones_like(acc))
        else:
            acc = torch.where(torch.isinf(acc), torch.ones_like(acc), acc)
        if not bool(torch.isfinite(acc).all()):
            raise RuntimeError(f"layer {lay.name!r}: the solver returned non-finite curvature "
                               f"(backend {cfg.backend!r}); try backend='exact'")
        scores[lay.param_name] = acc.view_as(lay.module.weight.detach()).clone()
    info["total_s"] = time.perf_counter() - t_start
    return (scores, info) if return_info else scores
