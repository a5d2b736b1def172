"""The element graph: every scalar activation a node, convs unrolled by index arithmetic."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._export import UnsupportedModelError
from ..config import NORMALIZE_MODES
from ._chain import Chain, bn_scale, trace_chain
from ._checks import (OUTPUTS, check_choice, check_layer_values, check_model, check_images,
                      format_indices)
from ._conventions import LIBRARY, Conventions, resolve_conventions


@dataclass
class ElementLayer:
    """One weight layer of the element graph.

    ``strength[i, o]`` is the edge strength from input element ``i`` to output element ``o``
    (0 where there is no edge or, under the library's conventions, the weight is 0);
    ``weight_index[i, o]`` the flat index into ``module.weight`` of the weight that generates
    the edge (-1 = no edge).
    """
    name: str                    # module qualified name
    module: nn.Module
    in_shape: tuple              # per-sample shape of the layer input
    out_shape: tuple             # per-sample shape of the layer output
    strength: np.ndarray         # (n_in, n_out) float64
    weight_index: np.ndarray     # (n_in, n_out) int64, -1 = no edge
    bn: Optional[nn.Module] = None
    bn_name: str = ""

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
    chain: Chain                  # the model's exported program read as a chain
    layers: list                  # ElementLayer, in forward order
    taps: list                    # fx node names whose values are N_0 .. N_{n-1} (layer inputs)
    output: str                   # fx node name of N_n (before the softmax option)
    input_shape: tuple
    conventions: Conventions = LIBRARY   # the strengths follow these (zero weights, BatchNorm)

    @property
    def layer_sizes(self) -> list:
        return [self.layers[0].n_in] + [l.n_out for l in self.layers]


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
              out_shape: tuple, conventions: Conventions = LIBRARY) -> np.ndarray:
    w = layer_module.weight.detach().double().abs().cpu().reshape(-1).numpy()
    w = conventions.weight_strengths(w)
    s = np.where(weight_index >= 0, w[np.maximum(weight_index, 0)], 0.0)
    if bn is not None and conventions.fold_batchnorm:
        scale = bn_scale(bn)
        per_out = np.repeat(scale, int(np.prod(out_shape[1:])) if len(out_shape) > 1 else 1)
        s = s * per_out[None, :]
    return s


def _element_layer(chain: Chain, i: int, weights: list, vals: dict, max_dense: int,
                   conventions: Conventions = LIBRARY) -> ElementLayer:
    """The :class:`ElementLayer` of weight op ``chain.ops[i]`` (``vals``: one sample's values of
    every chain node; the BatchNorm right after it is folded in under the library's
    conventions)."""
    op = chain.ops[i]
    m = op.module
    nxt = chain.ops[i + 1] if i + 1 < len(chain.ops) else None
    bn = nxt if nxt is not None and nxt.kind == "bn" else None
    x_in = vals[op.input]
    in_shape, out_shape = tuple(x_in.shape[1:]), tuple(vals[op.node].shape[1:])
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    if n_in * n_out > max_dense:
        raise ValueError(
            f"layer {op.name!r}: dense element matrix {n_in} x {n_out} exceeds max_dense="
            f"{max_dense}; use sparse_weight_curvature (sparse element graph) for larger models")
    if isinstance(m, nn.Linear):
        if len(in_shape) != 1:
            raise UnsupportedModelError(f"layer {op.name!r}: Linear on a {len(in_shape) + 1}-D "
                                        "input (flatten first)")
        wi = np.arange(m.out_features * m.in_features, dtype=np.int64).reshape(
            m.out_features, m.in_features).T.copy()
    else:
        if len(in_shape) != 3:
            raise UnsupportedModelError(f"layer {op.name!r}: Conv2d needs a (N, C, H, W) input")
        wi = _conv_index(m, in_shape, out_shape)
    # the next layer's input (or the output) must carry the same elements in order
    after = weights[weights.index(i) + 1] if weights.index(i) + 1 < len(weights) else None
    nxt_in = chain.ops[after].input if after is not None else chain.output
    if vals[nxt_in][0].numel() != n_out:
        raise UnsupportedModelError(
            f"fx node {nxt_in!r} changes the number of elements after {op.name!r} "
            f"({n_out} -> {vals[nxt_in][0].numel()})")
    return ElementLayer(name=op.name, module=m, in_shape=in_shape, out_shape=out_shape,
                        strength=_strength(m, wi, bn and bn.module, out_shape, conventions),
                        weight_index=wi, bn=bn and bn.module, bn_name=bn.name if bn else "")


def element_graph(model: nn.Module, example: torch.Tensor, max_dense: int = 20_000_000,
                  conventions: str = "library") -> ElementGraph:
    """Trace ``model`` and build its element graph (strengths from the current weights).

    ``example`` is one input batch (``(N, ...)``; only its shape is used). ``conventions``
    (``"library"`` or ``"authors"``, see :mod:`._conventions`) decides what a zero weight and a
    following BatchNorm do to the strengths. Raises
    :class:`~tp_curvature.graph.UnsupportedModelError` for anything but a supported chain, and
    ``ValueError`` when a layer's dense ``(n_in, n_out)`` matrix would exceed ``max_dense``
    entries.
    """
    check_model(model)
    example = check_images(example, "example")
    conv = resolve_conventions(conventions)
    if not isinstance(max_dense, numbers.Integral) or isinstance(max_dense, bool) or \
            max_dense < 1:
        raise ValueError(f"max_dense must be a positive int, got {max_dense!r}")
    chain = trace_chain(model, example)
    weights = [i for i, op in enumerate(chain.ops) if op.kind == "weight"]
    vals = chain.values(example[:1], {op.node for op in chain.ops}
                        | {op.input for op in chain.ops} | {chain.output})
    layers = [_element_layer(chain, i, weights, vals, max_dense, conv) for i in weights]
    graph = ElementGraph(chain=chain, layers=layers,
                         taps=[chain.ops[i].input for i in weights], output=chain.output,
                         input_shape=tuple(example.shape[1:]), conventions=conv)
    check_layer_values(graph)
    for lay in layers:
        if not np.isfinite(lay.strength).all():
            raise ValueError(f"layer {lay.name!r}: non-finite edge strengths")
    return graph


def node_values(graph: ElementGraph, images: torch.Tensor, output: str = "softmax",
                normalize: str = "minmax", conventions: Optional[str] = None) -> list:
    """Per image, the normalised node values of every element layer.

    Returns a list (one entry per image) of lists ``[a_0, ..., a_n]`` of float64 arrays.
    Raises ``ValueError`` naming the layer when the forward pass produces a non-finite value,
    and under ``conventions="authors"`` (default: the graph's) naming the layer and the image
    when a layer is constant on an image.
    """
    if not isinstance(graph, ElementGraph):
        raise TypeError(f"graph must be an ElementGraph (from element_graph()), got "
                        f"{type(graph).__name__}")
    check_choice("output", output, OUTPUTS)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    conv = graph.conventions if conventions is None else resolve_conventions(conventions)
    images = check_images(images)
    check_layer_values(graph)
    check_image_shape(images, graph.input_shape)
    vals = graph.chain.values(images, set(graph.taps) | {graph.output})
    per_layer, where = [], []
    for l, t in enumerate(graph.taps):
        where.append(f"the input of layer {graph.layers[l].name!r}")
        per_layer.append(np.abs(finite_values(vals[t], where[-1])))
    where.append(f"the model output (after layer {graph.layers[-1].name!r})")
    out = finite_values(vals[graph.output], where[-1])
    if output == "softmax":
        out = conv.output_softmax(out)
    per_layer.append(np.abs(out))
    return [[conv.normalise(a[i], normalize, w, i) for a, w in zip(per_layer, where)]
            for i in range(images.shape[0])]


def check_image_shape(images: torch.Tensor, input_shape: tuple) -> None:
    """Images must have the per-sample shape the element graph was built for."""
    if tuple(images.shape[1:]) != tuple(input_shape):
        raise ValueError(f"images of per-sample shape {tuple(images.shape[1:])} do not fit the "
                         f"element graph (built for {tuple(input_shape)})")


def finite_values(t, where: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor, got {type(t).__name__}")
    a = t.detach().flatten(1).double().cpu().numpy()
    ok = np.isfinite(a).all(axis=1)
    if not ok.all():
        raise ValueError(
            f"non-finite (NaN/inf) activations at {where} in image(s) "
            f"{format_indices(np.flatnonzero(~ok).tolist())}: check the layer's weights and the "
            "calibration images")
    return a
