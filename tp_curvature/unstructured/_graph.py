"""The element graph: every scalar activation a node, convs unrolled by index arithmetic."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .._tracing import (BN_TYPES, ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS,
                        ELEMENTWISE_MODULES, RESHAPE_METHODS, Recorder, UnsupportedModelError,
                        bn_scale, eval_mode, trace)
from ..hooks import normalise
from ..config import NORMALIZE_MODES
from ._checks import (AUX_METHODS, OUTPUTS, WEIGHT_TYPES, _check_choice,
                      _check_layer_values, _check_model, _images, _indices)


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


def _trace_chain(model: nn.Module, pooling: bool = False):
    """Trace ``model`` and check it is a chain; return (gm, ops) with ops = list of
    (kind, node) where kind is "weight", "bn", "elementwise" or "reshape" (and "pool" for a
    ``MaxPool2d`` / ``AvgPool2d`` when ``pooling``: the sparse element graph)."""
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
            elif pooling and isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                if getattr(m, "return_indices", False):
                    raise _unsupported(node, gm, "return_indices=True")
                kind = "pool"
            else:
                raise _unsupported(node, gm, "not an elementwise or weight layer (pooling is "
                                             "supported by sparse_weight_curvature only; "
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
                f"{max_dense}; use sparse_weight_curvature (sparse element graph) for larger "
                "models")
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
    _check_choice("normalize", normalize, NORMALIZE_MODES)
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
