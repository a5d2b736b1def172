"""Unstructured (per-weight) curvature pruning: the curvature paper's own experiment.

Tan, Sia, Bogdan, Ivanov ("Post-Training Neural Network Pruning using Graph Curvature", TMLR
2026) score individual weights, not channels. This module rebuilds that mode on top of the
library's tracing core (:mod:`tp_curvature._tracing`), transport problems
(:func:`tp_curvature.curvature.problem_from_strengths`) and kernels
(:func:`tp_curvature.curvature.solve_problem`), so the two modes share one definition of
curvature and one solver.

Element graph
    Every scalar activation is a node. For a chain ``N_0 -W_1-> N_1 -W_2-> ... -W_n-> N_n``
    of weight layers, ``N_{l-1}`` is the (flattened) input tensor of weight layer ``l`` and
    ``N_n`` the model output. A ``Linear`` gives an edge ``i -> o`` for every ``W[o, i]``; a
    ``Conv2d`` is unrolled over its receptive fields: one edge per (input element, output
    element) pair, built by index arithmetic with :func:`torch.nn.functional.unfold` (padded
    positions are not nodes and give no edge). For a given (input element, output element) pair
    the kernel offset is unique, so each edge belongs to exactly one weight
    ``W[o, c, i, j]`` and each weight generates ``H_out * W_out`` edges (fewer at borders).
    Edge strength ``s = |w|`` (times ``|gamma / sqrt(var + eps)|`` of a BatchNorm that directly
    follows the layer, which the paper does not have); length ``d = 1/s`` (``"paper"`` variant)
    or ``1/(a_u s)`` (``"flow"``), exactly as in :mod:`tp_curvature.curvature`.

Node values (per calibration image, never averaged over images)
    ``a = |value|`` of the element in that image: the network input (the tensor fed to the
    model, i.e. normalised pixels) for ``N_0``, the post-activation input of each weight layer
    (after ReLU / BN / flatten) for the hidden layers, and for ``N_n`` either the softmax of
    the output (``output="softmax"``, default; the paper's LeNet) or the raw output
    (``output="logits"``, the paper's VGG). Each layer is min-max normalised to [0, 1] per image
    (``normalize="minmax"``, the paper), so the least active element of every layer counts as
    inactive.

Curvature
    For the edges of weight layer ``l`` the problem is the library's layer-pair problem with
    ``Z = N_{l-2}``, ``X = N_{l-1}``, ``Y = N_l``, ``W = N_{l+1}`` and dense strength matrices
    ``s_zx = S_{l-1}``, ``s_xy = S_l``, ``s_yw = S_{l+1}`` (input nodes have no predecessors:
    ``m_x = delta_x``; output nodes no successors: ``m_y = delta_y``). Conventions are the
    library's: a dead endpoint (``a = 0``) or a zero weight gives ``kappa = 1`` without a solve.

Per-weight score
    ``reduce="min"`` (the paper): the minimum kappa over every edge the weight generates and over
    every calibration image; ``"mean"`` averages instead. A weight that generates no edge at all
    (a kernel tap that only ever sees padding) gets 1. Scores come back as tensors shaped like the
    weights, keyed by parameter name (``"features.0.weight"``).

Pruning
    :func:`prune_by_curvature` removes the *highest*-kappa weights first (``order="lowest"`` is
    the paper's negative-first control), globally or per layer, with
    :func:`torch.nn.utils.prune.custom_from_mask`; :func:`remove_pruning` makes it permanent.
    :func:`prune_by_magnitude` and :func:`prune_random` are the baselines.

Supported models
    Sequential chains (any nesting, traced with :mod:`torch.fx`) of ``Conv2d`` (any stride,
    padding, dilation; ``groups=1``; zero padding), ``Linear`` (2-D input), ``Flatten`` /
    ``torch.flatten`` / ``view(N, -1)``, a ``BatchNorm1d/2d`` right after a weight layer, and
    elementwise activations (ReLU-like, sigmoid, tanh, GELU, dropout, identity). Anything else
    (pooling, residual branches, a module used twice) raises
    :class:`~tp_curvature.graph.UnsupportedModelError` (a ``ValueError``) naming the fx node.

Input checks
    Everything is checked before any work (and, for pruning, before any mask is applied, so a
    refused call never leaves a model half-masked): the options (``output``, ``reduce``, every
    ``CurvatureConfig`` field, ``sparsity``, ``order``, ``scope``, ``tie_break``), the images
    (a non-empty floating-point tensor ``(N, ...)`` or an ``(images, targets)`` pair, all
    finite), the weights, biases and BatchNorm statistics of every layer of the chain, the node
    values the forward pass produces, and every score / mask tensor (its key must be a Conv2d /
    Linear weight of the model, its shape the weight's, its values finite). Errors are
    ``ValueError`` (``TypeError`` for a wrong type) naming the option, image, layer or
    parameter. The model's train/eval flags, hooks and parameters are left as they were.

Cost
    The strength matrices are dense ``(n_in_elements, n_out_elements)``: fine for the paper's
    LeNet (largest 784 x 864) and MLPs, refused above ``max_dense`` entries per layer. The work is
    one transport problem per edge with both endpoints active, per image, of size at most
    ``(topk + 1) x (topk + 1)``: it grows linearly with the number of calibration images.
    ``topk`` (:data:`DEFAULT_TOPK` = 32, the library default) keeps the ``k`` heaviest atoms of
    every measure; with the paper's ``exp(-1/a^2)`` weights almost all mass sits on the few most
    active neighbours. The shortest paths of the problems are recomputed per image. The first
    call in a fresh environment also compiles the Numba kernels (cached afterwards). Timings,
    and the agreement of topk 4..64 and of the exact backend with the default, are in
    ``results/unstructured.md`` and the README, with the commands that produced them
    (``benchmarks/unstructured.py --exact-check --topk-scan ...``).
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune as torch_prune

from ._tracing import (BN_TYPES, ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS,
                       ELEMENTWISE_MODULES, RESHAPE_METHODS, Recorder, UnsupportedModelError,
                       bn_scale, eval_mode, trace)
from .curvature import CurvatureConfig, problem_from_strengths, solve_problem
from .hooks import normalise

__all__ = [
    "ElementLayer", "ElementGraph", "EdgeCurvature", "DEFAULT_TOPK", "element_graph",
    "node_values", "edge_curvature", "weight_curvature", "masks_from_scores", "apply_masks",
    "prune_by_scores", "prune_by_curvature", "prune_by_magnitude", "prune_random",
    "magnitude_scores", "random_scores", "remove_pruning", "weight_sparsity",
    "UnknownWeightError",
]

#: top-k atoms per measure used by this module unless ``topk=`` is passed
DEFAULT_TOPK = 32

WEIGHT_TYPES = (nn.Linear, nn.Conv2d)
AUX_METHODS = {"size", "dim"}
OUTPUTS = ("softmax", "logits")
REDUCES = ("min", "mean")
NORMALIZES = ("minmax", "max")
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(CurvatureConfig))


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _check_choice(name: str, value, choices: tuple):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got "
                         f"{value!r}")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _images(images, what: str = "images") -> torch.Tensor:
    """The image tensor of ``images`` (a tensor ``(N, ...)`` or an ``(images, targets)`` pair,
    targets of any dtype), checked: a non-empty floating-point batch with finite values."""
    if isinstance(images, (tuple, list)):
        if len(images) != 2 or not isinstance(images[0], torch.Tensor):
            raise TypeError(
                f"{what} must be a tensor (N, ...) or an (images, targets) pair, got a "
                f"{type(images).__name__} of {len(images)} item(s)"
                + ("" if len(images) == 2 else " (concatenate batches with torch.cat)"))
        x, y = images
        if isinstance(y, torch.Tensor) and y.dim() > 0 and x.dim() > 0 and \
                y.shape[0] != x.shape[0]:
            raise ValueError(f"{what}: {x.shape[0]} images but {y.shape[0]} targets in the "
                             "(images, targets) pair")
        images = x
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a tensor (N, ...) or an (images, targets) pair, got "
                        f"{type(images).__name__}")
    if images.dim() < 2:
        raise ValueError(f"{what} must be a batch (N, ...) with a batch dimension, got shape "
                         f"{tuple(images.shape)}")
    if images.shape[0] == 0 or images.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(images.shape)}): at least one image "
                         "is needed")
    if not images.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {images.dtype}")
    ok = torch.isfinite(images.detach().reshape(images.shape[0], -1)).all(dim=1)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten().tolist()
        raise ValueError(f"{what} contain non-finite values (NaN/inf) in image(s) "
                         f"{_indices(bad)}")
    return images


def _indices(idx: list, limit: int = 8) -> str:
    head = ", ".join(str(i) for i in idx[:limit])
    return f"[{head}{', ...' if len(idx) > limit else ''}] ({len(idx)} in all)" \
        if len(idx) > 1 else f"{idx[0]}"


def _config(config: dict) -> CurvatureConfig:
    """A :class:`CurvatureConfig` from keyword options (``topk`` defaults to
    :data:`DEFAULT_TOPK`), every option checked with a message naming it."""
    config = dict(config)
    unknown = sorted(set(config) - set(_CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"unknown curvature option(s) {', '.join(map(repr, unknown))}; the "
                        f"options are {', '.join(_CONFIG_FIELDS)}")
    config.setdefault("topk", DEFAULT_TOPK)
    alpha = config.get("alpha", 0.5)
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or \
            not np.isfinite(float(alpha)):
        raise ValueError(f"alpha must be a finite number in [0, 1), got {alpha!r}")
    topk = config["topk"]
    if topk is not None and (not isinstance(topk, numbers.Integral) or isinstance(topk, bool)
                             or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    p = config.get("p", 2.0)
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not p > 0:
        raise ValueError(f"p must be a positive number, got {p!r}")
    _check_choice("normalize", config.get("normalize", "minmax"), NORMALIZES)
    for name in ("variant", "length", "measure", "backend"):
        v = config.get(name)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{name} must be a string, got {v!r}")
    bo = config.get("backend_options")
    if bo is not None and not isinstance(bo, Mapping):
        raise ValueError(f"backend_options must be a dict, got {type(bo).__name__}")
    return CurvatureConfig(**config)


def _module_names(model: nn.Module) -> dict:
    return {id(m): n for n, m in model.named_modules()}


def _check_layer_values(graph: "ElementGraph") -> None:
    """Weights, biases and BatchNorm parameters / statistics of every layer are finite."""
    names = _module_names(graph.gm)
    for lay in graph.layers:
        tensors = [("weight", lay.module.weight), ("bias", getattr(lay.module, "bias", None))]
        for what, t in tensors:
            if t is not None and not bool(torch.isfinite(t.detach()).all()):
                raise ValueError(
                    f"layer {lay.name!r} ({type(lay.module).__name__}) has a non-finite "
                    f"(NaN/inf) {what}: {int((~torch.isfinite(t.detach())).sum())} of "
                    f"{t.numel()} entries")
        if lay.bn is not None:
            bn_name = names.get(id(lay.bn), "?")
            for what in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(lay.bn, what, None)
                if t is not None and not bool(torch.isfinite(t.detach()).all()):
                    raise ValueError(
                        f"BatchNorm {bn_name!r} after layer {lay.name!r} has a non-finite "
                        f"(NaN/inf) {what}")
            rv = lay.bn.running_var
            if rv is not None and bool((rv.detach().double() + lay.bn.eps <= 0).any()):
                raise ValueError(f"BatchNorm {bn_name!r} after layer {lay.name!r} has "
                                 f"running_var + eps <= 0")


# --------------------------------------------------------------------------------------------
# element graph
# --------------------------------------------------------------------------------------------
@dataclass
class ElementLayer:
    """One weight layer of the element graph.

    ``strength[i, o]`` is the edge strength from input element ``i`` to output element ``o``
    (0 where there is no edge or the weight is 0); ``weight_index[i, o]`` the flat index into
    ``module.weight`` of the weight that generates the edge (-1 = no edge).
    """
    name: str                    # module qualified name
    module: nn.Module
    in_shape: tuple              # per-sample shape of the layer input
    out_shape: tuple             # per-sample shape of the layer output
    strength: np.ndarray         # (n_in, n_out) float64
    weight_index: np.ndarray     # (n_in, n_out) int64, -1 = no edge
    bn: Optional[nn.Module] = None

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def exists(self) -> np.ndarray:
        return self.weight_index >= 0

    @property
    def n_in(self) -> int:
        return self.strength.shape[0]

    @property
    def n_out(self) -> int:
        return self.strength.shape[1]

    @property
    def n_edges(self) -> int:
        return int(self.exists.sum())


@dataclass
class ElementGraph:
    """The element-level layered graph of a sequential model (see the module docstring)."""
    gm: fx.GraphModule
    layers: list                  # ElementLayer, in forward order
    taps: list                    # fx nodes whose values are N_0 .. N_{n-1} (layer inputs)
    output_node: fx.Node          # the value of N_n (before the softmax option)
    input_shape: tuple

    @property
    def layer_sizes(self) -> list:
        return [self.layers[0].n_in] + [l.n_out for l in self.layers]


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)} (fx node {node.name!r})"
    if node.op == "call_method":
        return f"method .{node.target}() (fx node {node.name!r})"
    return f"fx node {node.name!r} ({node.op})"


def _unsupported(node: fx.Node, gm: fx.GraphModule, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"unstructured curvature supports sequential chains of Conv2d / Linear / Flatten / "
        f"BatchNorm / elementwise activations only; {_describe(node, gm)}: {why}")


def _tensor_args(node: fx.Node) -> list:
    out = []

    def visit(a):
        if isinstance(a, fx.Node):
            out.append(a)
        return a
    fx.node.map_arg((node.args, node.kwargs), visit)
    return out


def _trace_chain(model: nn.Module):
    """Trace ``model`` and check it is a chain; return (gm, ops) with ops = list of
    (kind, node) where kind is "weight", "bn", "elementwise" or "reshape"."""
    gm = trace(model, "unstructured curvature traces the model")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(
            f"unstructured curvature needs a model with exactly one input, got "
            f"{len(placeholders)}")
    cur = placeholders[0]
    chain = {cur}
    aux = set()
    ops = []
    seen_modules = set()
    prev_kind = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        args = _tensor_args(node)
        chain_args = [a for a in args if a in chain]
        if node.op == "output":
            if chain_args != [cur] or len(args) != 1:
                raise _unsupported(node, gm, "the model output must be the end of the chain")
            break
        if node.op == "get_attr":
            raise _unsupported(node, gm, "parameters or buffers used outside a module")
        if node.op == "call_method" and node.target in AUX_METHODS:
            if chain_args and chain_args != [cur]:
                raise _unsupported(node, gm, "reads a tensor that is not the chain's last one")
            aux.add(node)
            continue
        other = [a for a in args if a not in chain and a not in aux]
        if chain_args != [cur] or other:
            raise _unsupported(
                node, gm, "it does not read exactly the previous chain tensor (branches, "
                "residual connections and multi-input ops are not supported)")
        if node.args and node.args[0] is not cur:
            raise _unsupported(node, gm, "the chain tensor must be its first argument")
        kind = None
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, WEIGHT_TYPES):
                if id(m) in seen_modules:
                    raise _unsupported(node, gm, "a weight module used twice")
                seen_modules.add(id(m))
                if isinstance(m, nn.Conv2d):
                    if m.groups != 1:
                        raise _unsupported(node, gm, f"groups={m.groups} (only groups=1)")
                    if m.padding_mode != "zeros":
                        raise _unsupported(node, gm, f"padding_mode={m.padding_mode!r} (only "
                                                     "'zeros')")
                kind = "weight"
            elif isinstance(m, BN_TYPES):
                if prev_kind != "weight":
                    raise _unsupported(node, gm, "BatchNorm is supported only directly after "
                                                 "a Conv2d / Linear (its scale is folded in)")
                kind = "bn"
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise _unsupported(node, gm, "Flatten must flatten dims 1..-1")
                kind = "reshape"
            elif isinstance(m, ELEMENTWISE_MODULES):
                kind = "elementwise"
            else:
                raise _unsupported(node, gm, "not an elementwise or weight layer (pooling and "
                                             "other element-mixing layers are not supported)")
        elif node.op == "call_function":
            if node.target is torch.flatten:
                kind = "reshape"
            elif node.target in ELEMENTWISE_FUNCTIONS:
                kind = "elementwise"
            else:
                raise _unsupported(node, gm, "function not supported")
        elif node.op == "call_method":
            if node.target in RESHAPE_METHODS:
                kind = "reshape"
            elif node.target in ELEMENTWISE_METHODS:
                kind = "elementwise"
            else:
                raise _unsupported(node, gm, "method not supported")
        else:
            raise _unsupported(node, gm, "unsupported fx op")
        ops.append((kind, node))
        chain.add(node)
        cur = node
        prev_kind = kind
    if not any(k == "weight" for k, _ in ops):
        raise UnsupportedModelError("unstructured curvature: the model has no Conv2d / Linear")
    return gm, ops, cur


def _conv_index(m: nn.Conv2d, in_shape: tuple, out_shape: tuple) -> np.ndarray:
    """``weight_index`` (n_in, n_out) of an unrolled Conv2d, by unfold of an index image."""
    C, H, W = in_shape
    n_in = C * H * W
    idx = torch.arange(1, n_in + 1, dtype=torch.float64).view(1, C, H, W)
    if isinstance(m.padding, str):
        idx = F.pad(idx, m._reversed_padding_repeated_twice)   # zeros = "no element"
        pad = 0
    else:
        pad = m.padding
    unf = F.unfold(idx, kernel_size=m.kernel_size, dilation=m.dilation, padding=pad,
                   stride=m.stride)[0]                          # (C*kh*kw, L)
    src = unf.round().long() - 1                                # -1 = padding
    CK, L = src.shape
    O = m.out_channels
    if (O, L) != (out_shape[0], out_shape[1] * out_shape[2]):
        raise UnsupportedModelError(f"conv unrolling mismatch: {(O, L)} vs {out_shape}")
    o = torch.arange(O).view(O, 1, 1)
    out_idx = (o * L + torch.arange(L).view(1, 1, L)).expand(O, CK, L)
    w_idx = (o * CK + torch.arange(CK).view(1, CK, 1)).expand(O, CK, L)
    in_idx = src.unsqueeze(0).expand(O, CK, L)
    valid = in_idx >= 0
    wi = torch.full((n_in, O * L), -1, dtype=torch.int64)
    wi[in_idx[valid], out_idx[valid]] = w_idx[valid]
    return wi.numpy()


def _strength(layer_module: nn.Module, weight_index: np.ndarray, bn: Optional[nn.Module],
              out_shape: tuple) -> np.ndarray:
    w = layer_module.weight.detach().double().abs().cpu().reshape(-1).numpy()
    s = np.where(weight_index >= 0, w[np.maximum(weight_index, 0)], 0.0)
    if bn is not None:
        scale = bn_scale(bn)
        per_out = np.repeat(scale, int(np.prod(out_shape[1:])) if len(out_shape) > 1 else 1)
        s = s * per_out[None, :]
    return s


def element_graph(model: nn.Module, example: torch.Tensor,
                  max_dense: int = 20_000_000) -> ElementGraph:
    """Trace ``model`` and build its element graph (strengths from the current weights).

    ``example`` is one input batch (``(N, ...)``; only its shape is used). Raises
    :class:`~tp_curvature.graph.UnsupportedModelError` for anything but a supported chain, and
    ``ValueError`` when a layer's dense ``(n_in, n_out)`` matrix would exceed ``max_dense``
    entries.
    """
    _check_model(model)
    example = _images(example, "example")
    if not isinstance(max_dense, numbers.Integral) or isinstance(max_dense, bool) or \
            max_dense < 1:
        raise ValueError(f"max_dense must be a positive int, got {max_dense!r}")
    gm, ops, last = _trace_chain(model)
    weight_nodes = [n for k, n in ops if k == "weight"]
    in_nodes = [n.args[0] for n in weight_nodes]
    rec = Recorder(gm, set(in_nodes) | set(weight_nodes) | {n for _, n in ops})
    with eval_mode(model), torch.no_grad():
        rec.run(example[:1])
    vals = rec.values
    layers = []
    # BN after each weight layer
    kinds = [k for k, _ in ops]
    nodes = [n for _, n in ops]
    for li, wn in enumerate(weight_nodes):
        m = gm.get_submodule(wn.target)
        pos = nodes.index(wn)
        bn = (gm.get_submodule(nodes[pos + 1].target)
              if pos + 1 < len(ops) and kinds[pos + 1] == "bn" else None)
        x_in = vals[wn.args[0]]
        y = vals[wn]
        in_shape, out_shape = tuple(x_in.shape[1:]), tuple(y.shape[1:])
        n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
        if n_in * n_out > max_dense:
            raise ValueError(
                f"layer {wn.target!r}: dense element matrix {n_in} x {n_out} exceeds max_dense="
                f"{max_dense}; unstructured curvature is meant for small models")
        if isinstance(m, nn.Linear):
            if len(in_shape) != 1:
                raise _unsupported(wn, gm, f"Linear on a {len(in_shape) + 1}-D input "
                                           "(flatten first)")
            wi = np.arange(m.out_features * m.in_features, dtype=np.int64).reshape(
                m.out_features, m.in_features).T.copy()
        else:
            if len(in_shape) != 3:
                raise _unsupported(wn, gm, "Conv2d needs a (N, C, H, W) input")
            wi = _conv_index(m, in_shape, out_shape)
        # the next layer's input (or the output) must carry the same elements in order
        nxt = in_nodes[li + 1] if li + 1 < len(weight_nodes) else last
        if vals[nxt][0].numel() != n_out:
            raise _unsupported(nxt, gm, f"changes the number of elements after {wn.target!r} "
                                        f"({n_out} -> {vals[nxt][0].numel()})")
        layers.append(ElementLayer(name=str(wn.target), module=m, in_shape=in_shape,
                                   out_shape=out_shape, strength=_strength(m, wi, bn, out_shape),
                                   weight_index=wi, bn=bn))
    graph = ElementGraph(gm=gm, layers=layers, taps=in_nodes, output_node=last,
                         input_shape=tuple(example.shape[1:]))
    _check_layer_values(graph)
    for lay in layers:
        if not np.isfinite(lay.strength).all():
            raise ValueError(f"layer {lay.name!r}: non-finite edge strengths")
    return graph


def node_values(graph: ElementGraph, images: torch.Tensor, output: str = "softmax",
                normalize: str = "minmax") -> list:
    """Per image, the normalised node values of every element layer.

    Returns a list (one entry per image) of lists ``[a_0, ..., a_n]`` of float64 arrays.
    Raises ``ValueError`` naming the layer when the forward pass produces a non-finite value.
    """
    if not isinstance(graph, ElementGraph):
        raise TypeError(f"graph must be an ElementGraph (from element_graph()), got "
                        f"{type(graph).__name__}")
    _check_choice("output", output, OUTPUTS)
    _check_choice("normalize", normalize, NORMALIZES)
    images = _images(images)
    _check_layer_values(graph)
    model = graph.gm
    rec = Recorder(model, set(graph.taps) | {graph.output_node})
    with eval_mode(model), torch.no_grad():
        rec.run(images)
    per_layer = []
    for l, t in enumerate(graph.taps):
        per_layer.append(np.abs(_finite_values(rec.values[t], f"the input of layer "
                                                              f"{graph.layers[l].name!r}")))
    out = _finite_values(rec.values[graph.output_node],
                         f"the model output (after layer {graph.layers[-1].name!r})")
    if output == "softmax":
        out = np.asarray(torch.softmax(torch.from_numpy(out), dim=1))
    per_layer.append(np.abs(out))
    for l, (a, n) in enumerate(zip(per_layer, graph.layer_sizes)):
        if a.shape[1] != n:
            raise ValueError(
                f"images of per-sample shape {tuple(images.shape[1:])} do not fit the element "
                f"graph (built for {graph.input_shape}): {a.shape[1]} elements at element "
                f"layer {l}, the graph has {n}")
    return [[normalise(a[i], normalize) for a in per_layer] for i in range(images.shape[0])]


def _finite_values(t, where: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor, got {type(t).__name__}")
    a = t.detach().flatten(1).double().cpu().numpy()
    ok = np.isfinite(a).all(axis=1)
    if not ok.all():
        raise ValueError(
            f"non-finite (NaN/inf) activations at {where} in image(s) "
            f"{_indices(np.flatnonzero(~ok).tolist())}: check the layer's weights and the "
            "calibration images")
    return a


# --------------------------------------------------------------------------------------------
# curvature
# --------------------------------------------------------------------------------------------
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
        prob = problem_from_strengths(
            s_zx=s_zx, a_z=a_z, a_x=a[l], s_xy_all=lay.strength, s_direct=lay.strength,
            cols=np.arange(lay.n_out), a_yn=a[l + 1], s_yw=s_yw, a_w=a_w,
            exists=lay.exists, cfg=cfg, name=lay.name)
        t1 = time.perf_counter()
        kappa = solve_problem(prob, cfg)
        t2 = time.perf_counter()
        out.append(EdgeCurvature(name=lay.name, kappa=kappa, weight_index=lay.weight_index,
                                 solved=prob.solve, build_s=t1 - t0, solve_s=t2 - t1))
    return out


def edge_curvature(model: nn.Module, image: torch.Tensor, output: str = "softmax",
                   graph: Optional[ElementGraph] = None, **config) -> list:
    """Per-edge kappa of every weight layer for one image, given as a batch ``(1, ...)``.

    ``**config``: fields of :class:`~tp_curvature.curvature.CurvatureConfig` (``alpha``,
    ``variant``, ``topk`` (default :data:`DEFAULT_TOPK`), ``backend``, ``normalize``...).
    Returns a list of :class:`EdgeCurvature`, in layer order.
    """
    _check_choice("output", output, OUTPUTS)
    cfg = _config(config)
    image = _images(image, "image")
    if graph is None:
        graph = element_graph(model, image)
    a = node_values(graph, image[:1], output, cfg.normalize)[0]
    return _image_edges(graph, a, cfg)


def _reduce_into(acc: torch.Tensor, cnt: Optional[torch.Tensor], ek: EdgeCurvature,
                 reduce: str):
    ex = ek.weight_index >= 0
    wi = torch.from_numpy(ek.weight_index[ex])
    k = torch.from_numpy(ek.kappa[ex])
    if reduce == "min":
        acc.scatter_reduce_(0, wi, k, reduce="amin", include_self=True)
    else:
        acc.index_add_(0, wi, k)
        cnt.index_add_(0, wi, torch.ones_like(k))


def weight_curvature(model: nn.Module, images: torch.Tensor, output: str = "softmax",
                     reduce: str = "min", progress: bool = True, return_info: bool = False,
                     **config):
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
    reduce : ``"min"`` | ``"mean"``
        Over a weight's edges and over images (the paper: min).
    **config
        :class:`~tp_curvature.curvature.CurvatureConfig` fields; ``topk`` defaults to
        :data:`DEFAULT_TOPK`.

    Returns
    -------
    dict
        Parameter name (``"features.0.weight"``) -> float64 tensor shaped like the weight.
        With ``return_info=True`` also a dict of timings and counts.
    """
    _check_model(model)
    _check_choice("output", output, OUTPUTS)
    _check_choice("reduce", reduce, REDUCES)
    cfg = _config(config)
    images = _images(images)
    t_start = time.perf_counter()
    graph = element_graph(model, images)
    t_graph = time.perf_counter() - t_start
    acts = node_values(graph, images, output, cfg.normalize)
    accs, cnts = [], []
    for lay in graph.layers:
        numel = lay.module.weight.numel()
        init = float("inf") if reduce == "min" else 0.0
        accs.append(torch.full((numel,), init, dtype=torch.float64))
        cnts.append(torch.zeros(numel, dtype=torch.float64) if reduce == "mean" else None)
    info = {"n_images": len(acts), "graph_s": t_graph, "per_image_s": [],
            "layers": {l.name: {"n_edges": l.n_edges, "n_weights": l.module.weight.numel(),
                                "solved": 0, "build_s": 0.0, "solve_s": 0.0}
                       for l in graph.layers},
            "config": {**cfg.__dict__, "output": output, "reduce": reduce}}
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
            _reduce_into(accs[li], cnts[li], ek, reduce)
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
        if reduce == "mean":
            acc = torch.where(cnt > 0, acc / cnt.clamp_min(1), torch.ones_like(acc))
        else:
            acc = torch.where(torch.isinf(acc), torch.ones_like(acc), acc)
        if not bool(torch.isfinite(acc).all()):
            raise RuntimeError(f"layer {lay.name!r}: the solver returned non-finite curvature "
                               f"(backend {cfg.backend!r}); try backend='exact'")
        scores[lay.param_name] = acc.view_as(lay.module.weight.detach()).clone()
    info["total_s"] = time.perf_counter() - t_start
    return (scores, info) if return_info else scores


# --------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------
def _weight_params(model: nn.Module) -> dict:
    """Parameter name -> module for every Conv2d / Linear weight (pruned or not)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, WEIGHT_TYPES):
            out[f"{name}.weight" if name else "weight"] = m
    return out


class UnknownWeightError(KeyError, ValueError):
    """A score / mask key that is not a Conv2d / Linear weight of the model (a ``KeyError``
    and a ``ValueError``)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _check_tensors(tensors, what: str, allow_empty: bool = False) -> None:
    """``tensors`` is a dict of finite tensors (``what`` names it in messages)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a dict parameter name -> tensor, got "
                        f"{type(tensors).__name__}")
    if not tensors and not allow_empty:
        raise ValueError(f"{what} is empty: nothing to rank")
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what}[{k!r}] must be a tensor, got {type(v).__name__}")
        if v.is_complex():
            raise TypeError(f"{what}[{k!r}] must be real, got dtype {v.dtype}")
        bad = ~torch.isfinite(v.detach()) if v.dtype != torch.bool else None
        if bad is not None and bool(bad.any()):
            raise ValueError(f"{what}[{k!r}] contains non-finite values (NaN/inf) at "
                             f"{int(bad.sum())} of {v.numel()} entries")


def _resolve(model: nn.Module, tensors: dict, what: str = "scores", masks: bool = False
             ) -> dict:
    """Check every entry of ``tensors`` against ``model`` (key = a Conv2d / Linear weight, same
    shape, finite values; 0/1 values for masks) and return name -> module. Nothing is changed."""
    _check_model(model)
    _check_tensors(tensors, what, allow_empty=masks)
    mods = _weight_params(model)
    out = {}
    for k, v in tensors.items():
        if k not in mods:
            raise UnknownWeightError(
                f"{what}[{k!r}]: {k!r} is not a Conv2d / Linear weight of the model (known: "
                f"{sorted(mods)})")
        shape = tuple(mods[k].weight.shape)
        if tuple(v.shape) != shape:
            raise ValueError(f"{what}[{k!r}] has shape {tuple(v.shape)}, the weight {k!r} has "
                             f"shape {shape}")
        if masks and v.dtype != torch.bool and not bool(((v == 0) | (v == 1)).all()):
            raise ValueError(f"{what}[{k!r}] must be a boolean (or 0/1) keep-mask")
        out[k] = mods[k]
    return out


def _check_secondary(secondary, scores: dict) -> None:
    if secondary is None:
        return
    _check_tensors(secondary, "secondary", allow_empty=True)
    for k, v in scores.items():
        if k not in secondary:
            raise ValueError(f"secondary has no entry for {k!r} (it needs every key of the "
                             "scores)")
        if tuple(secondary[k].shape) != tuple(v.shape):
            raise ValueError(f"secondary[{k!r}] has shape {tuple(secondary[k].shape)}, the "
                             f"scores {tuple(v.shape)}")


def _check_prune_options(sparsity, order: str, scope: str, seed) -> None:
    if not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool):
        raise TypeError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    _check_choice("order", order, ("lowest", "highest"))
    _check_choice("scope", scope, ("global", "layer"))
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int, got {seed!r}")


def magnitude_scores(model: nn.Module) -> dict:
    """|w| of every Conv2d / Linear weight (the magnitude baseline; prune lowest first)."""
    return {k: m.weight.detach().abs().double().cpu().clone()
            for k, m in _weight_params(model).items()}


def random_scores(model: nn.Module, seed: int = 0) -> dict:
    """Uniform random scores (the random baseline)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(m.weight.shape, generator=g, dtype=torch.float64)
            for k, m in _weight_params(model).items()}


def masks_from_scores(scores: dict, sparsity: float, order: str = "lowest",
                      scope: str = "global", seed: int = 0,
                      secondary: Optional[dict] = None) -> dict:
    """Boolean keep-masks removing exactly ``round(sparsity * n)`` weights.

    ``order="lowest"`` removes the lowest scores first, ``"highest"`` the highest. Ties are
    broken by ``secondary`` (same keys and shapes; its *lowest* values are removed first, e.g.
    :func:`magnitude_scores`) when given, then by a seeded random permutation.
    ``scope="global"`` ranks all weights together, ``"layer"`` removes the same fraction from
    every layer.
    """
    _check_prune_options(sparsity, order, scope, seed)
    _check_tensors(scores, "scores")
    _check_secondary(secondary, scores)
    g = np.random.default_rng(seed)

    def removal_order(flat: np.ndarray, sec: Optional[np.ndarray]) -> np.ndarray:
        if np.isnan(flat).any():
            raise ValueError("scores contain NaN")
        key = flat if order == "lowest" else -flat
        keys = [g.permutation(flat.size)] + ([sec] if sec is not None else []) + [key]
        return np.lexsort(keys)

    names = list(scores)
    flats = [scores[k].detach().double().cpu().reshape(-1).numpy() for k in names]
    secs = ([secondary[k].detach().double().cpu().reshape(-1).numpy() for k in names]
            if secondary is not None else [None] * len(names))
    keep = [np.ones(f.size, bool) for f in flats]
    if scope == "global":
        allf = np.concatenate(flats)
        n_rm = int(round(sparsity * allf.size))
        rm = removal_order(allf, np.concatenate(secs) if secondary is not None else None)[:n_rm]
        offs = np.cumsum([0] + [f.size for f in flats])
        for i in range(len(flats)):
            sel = rm[(rm >= offs[i]) & (rm < offs[i + 1])] - offs[i]
            keep[i][sel] = False
    else:
        for i, f in enumerate(flats):
            n_rm = int(round(sparsity * f.size))
            keep[i][removal_order(f, secs[i])[:n_rm]] = False
    return {k: torch.from_numpy(kp).view(scores[k].shape) for k, kp in zip(names, keep)}


def apply_masks(model: nn.Module, masks: dict) -> nn.Module:
    """Apply keep-masks with :func:`torch.nn.utils.prune.custom_from_mask` (combined with any
    existing mask by PyTorch). Every mask is checked (key, shape, 0/1 values) before the first
    one is applied."""
    mods = _resolve(model, masks, "masks", masks=True)
    for k, mask in masks.items():
        m = mods[k]
        torch_prune.custom_from_mask(m, "weight", mask.to(m.weight.device, torch.float32))
    return model


def prune_by_scores(model: nn.Module, scores: dict, sparsity: float, order: str = "lowest",
                    scope: str = "global", seed: int = 0,
                    secondary: Optional[dict] = None) -> dict:
    """Mask ``round(sparsity * n)`` weights of ``model`` chosen by ``scores`` (see
    :func:`masks_from_scores`); return the keep-masks. Options and every score tensor (key,
    shape, finite values) are checked before any mask is applied."""
    _check_prune_options(sparsity, order, scope, seed)
    _resolve(model, scores, "scores")
    _check_secondary(secondary, scores)
    masks = masks_from_scores(scores, sparsity, order, scope, seed, secondary)
    apply_masks(model, masks)
    return masks


def prune_by_curvature(model: nn.Module, scores: dict, sparsity: float,
                       order: str = "highest", scope: str = "global", seed: int = 0,
                       tie_break: str = "random") -> dict:
    """Prune by per-weight curvature: ``order="highest"`` removes the most positive kappa
    first (the paper's method), ``"lowest"`` the most negative first (the paper's control).

    Many weights tie at kappa = 1 (every edge they generate has a dead endpoint on every
    calibration image). ``tie_break="random"`` (seeded) orders them at random,
    ``"magnitude"`` removes the smaller ``|w|`` first.
    """
    _check_choice("tie_break", tie_break, ("random", "magnitude"))
    _check_prune_options(sparsity, order, scope, seed)
    _resolve(model, scores, "scores")
    sec = magnitude_scores(model) if tie_break == "magnitude" else None
    if sec is not None:
        sec = {k: sec[k] for k in scores}
    return prune_by_scores(model, scores, sparsity, order, scope, seed, sec)


def prune_by_magnitude(model: nn.Module, sparsity: float, scope: str = "global") -> dict:
    """Remove the smallest ``|w|`` first."""
    return prune_by_scores(model, magnitude_scores(model), sparsity, "lowest", scope)


def prune_random(model: nn.Module, sparsity: float, seed: int = 0,
                 scope: str = "global") -> dict:
    """Remove weights uniformly at random (seeded)."""
    return prune_by_scores(model, random_scores(model, seed), sparsity, "lowest", scope, seed)


def remove_pruning(model: nn.Module) -> nn.Module:
    """Make masks permanent (:func:`torch.nn.utils.prune.remove` on every pruned weight)."""
    for m in model.modules():
        if torch_prune.is_pruned(m) and hasattr(m, "weight_mask"):
            torch_prune.remove(m, "weight")
    return model


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zero entries over all Conv2d / Linear weights."""
    tot = zero = 0
    for m in _weight_params(model).values():
        w = m.weight.detach()
        tot += w.numel()
        zero += int((w == 0).sum())
    return zero / max(tot, 1)
