"""Channel-level layered graph of a real network, traced with :mod:`torch.fx`.

Nodes
    The channels of every *junction tensor*: a tensor that a weight layer (``nn.Linear``,
    ``nn.Conv1d``, ``nn.Conv2d``) reads, plus the network input and output. A junction is the
    post-activation tensor of the paper: in ``conv -> BN -> ReLU -> conv`` the junction is the
    ReLU output; in a ResNet block it is the tensor after the residual add and ReLU; in a
    DenseNet layer it is ``ReLU(BN(cat(features)))``. After ``flatten`` a Linear layer's input
    features are grouped back to the channel they came from (feature ``f`` of a ``C x H x W``
    map belongs to channel ``f // (H W)``), so the nodes stay channels. Features that come
    straight from the network input (an MLP on flattened pixels) stay one node each.

Edges and their strength ``s(u, v)`` (the length is ``d = 1 / s``)
    * a weight layer from its input junction to every junction its output reaches:
      ``s(u, v) = |gamma_v / sqrt(var_v + eps)| * ||W[v, u]||_p`` where the BatchNorm scale of
      every BN on the way is folded in and ``W[v, u]`` is the kernel slice (conv) or the
      slice of features of channel ``u`` (Linear after flatten); ``p = 2`` by default;
    * an identity path (residual add, concatenation) from a junction to a later junction with
      ``s = |BN scale|`` (1 without BN).
    Channel-preserving operations (activations, pooling, dropout, identity, flatten,
    reshape to ``(N, -1)``; the op tables of :mod:`tp_curvature._tracing`, shared with the
    element graph of :mod:`tp_curvature.unstructured`) are collapsed; BatchNorm only scales.
    Grouped and depthwise convolutions connect only channels of the same group; the other pairs
    are *structurally absent* (no edge, no connection).

Anything else (attention, channel shuffles, multiplicative gates, LayerNorm, transposed
convolutions, a module called twice) raises :class:`UnsupportedModelError` naming the fx node,
never a silently wrong graph.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ._tracing import (ADD_FUNCTIONS, ADD_METHODS, BN_TYPES, ELEMENTWISE_FUNCTIONS,
                       ELEMENTWISE_METHODS, ELEMENTWISE_MODULES, POOL_FUNCTIONS, POOL_MODULES,
                       RESHAPE_METHODS, InterpreterModule, UnsupportedModelError, bn_scale,
                       eval_mode, tensor_shape, trace)


WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
# operations that keep channel identity and carry no weight of their own
PASS_MODULES = ELEMENTWISE_MODULES + POOL_MODULES
PASS_FUNCTIONS = ELEMENTWISE_FUNCTIONS | POOL_FUNCTIONS
PASS_METHODS = ELEMENTWISE_METHODS


@dataclass
class _Term:
    """``value[:, f] = scale[f] * src[:, idx[f]]`` (up to elementwise nonlinearities)."""
    kind: str            # "layer" or "junction"
    src: int             # layer or junction index
    idx: np.ndarray      # (F,) source channel per feature; -1 where this term adds nothing
    scale: np.ndarray    # (F,) |multiplicative factor| per feature


@dataclass
class _Lineage:
    terms: list
    n_features: int
    group: np.ndarray    # (F,) node (channel) of each feature
    from_input: bool     # derived from the network input only (no layer on the way)


@dataclass
class Inflow:
    """An edge map into a junction: node ``c`` of the junction receives ``src`` node/channel
    ``idx[c]`` (-1: nothing) with strength factor ``scale[c]``."""
    kind: str            # "layer" (idx = output channel of that layer) or "junction"
    src: int
    idx: np.ndarray
    scale: np.ndarray


@dataclass
class Junction:
    """A post-activation tensor whose channels are graph nodes."""
    index: int
    name: str
    n_features: int
    group: np.ndarray            # (n_features,) feature -> node
    n_nodes: int
    inflows: list = field(default_factory=list)
    consumers: list = field(default_factory=list)   # layer indices reading this junction
    is_input: bool = False
    is_output: bool = False
    spatial: int = 1             # features per node (H*W after a flatten)


@dataclass
class WeightLayer:
    """A Linear / Conv layer: edges from ``in_junction`` to every junction in ``out_junctions``."""
    index: int
    name: str
    module: nn.Module
    in_junction: int
    out_junctions: list = field(default_factory=list)

    @property
    def out_channels(self) -> int:
        m = self.module
        return m.out_features if isinstance(m, nn.Linear) else m.out_channels


class ChannelGraph:
    """The channel-level layered graph of ``model`` (see the module docstring).

    Build it with :meth:`from_model`; it holds structure only (which channels connect, the
    BN scales on the way); strengths are read from the live weights by :meth:`strength`.
    """

    def __init__(self, model: nn.Module, junctions: list, layers: list, output_junction: int):
        self.model = model
        self.junctions: list[Junction] = junctions
        self.layers: list[WeightLayer] = layers
        self.output_junction = output_junction
        self.layer_of_module = {id(l.module): l for l in layers}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, example_batch, forward_fn: Optional[Callable] = None):
        """Trace ``model`` and propagate one sample of ``example_batch`` for the shapes."""
        gm = trace(model)
        example_batch = _first_sample(example_batch)
        runner = InterpreterModule(gm)
        with eval_mode(model), torch.no_grad():
            (forward_fn or (lambda mod, b: mod(b)))(runner, example_batch)
        return cls._build(model, gm)

    @classmethod
    def _build(cls, model: nn.Module, gm: fx.GraphModule):
        modules = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        # which fx nodes are junctions: inputs of weight layers, and the output
        junction_nodes = {}
        seen_modules = {}
        out_node = None
        for n in nodes:
            if n.op == "call_module" and isinstance(modules[n.target], WEIGHT_TYPES):
                if n.target in seen_modules:
                    raise UnsupportedModelError(
                        f"module {n.target!r} is called more than once (shared weights); its "
                        "connections would not be a single layer of the graph")
                seen_modules[n.target] = n
                if not isinstance(n.args[0], fx.Node):
                    raise UnsupportedModelError(f"{n.target!r}: input is not a traced tensor")
                junction_nodes.setdefault(n.args[0], None)
            if n.op == "output":
                out_node = n
        outs = out_node.args[0]
        if not isinstance(outs, fx.Node):
            raise UnsupportedModelError(
                "the model must return a single tensor (got a tuple/dict); wrap it so that "
                "forward returns the logits")
        junction_nodes.setdefault(outs, None)

        lineage: dict = {}
        junctions: list[Junction] = []
        layers: list[WeightLayer] = []

        for n in nodes:
            if n.op == "output":
                continue
            shape = tensor_shape(n)
            lin = cls._propagate(n, shape, lineage, modules, layers, junction_nodes)
            if n in junction_nodes:
                if lin is None:
                    raise UnsupportedModelError(f"fx node {n.name!r} feeds a layer but is not a "
                                                "traced tensor")
                j = cls._make_junction(n, lin, junctions)
                junction_nodes[n] = j.index
                if n.op == "placeholder":
                    j.is_input = True
                lin = _Lineage([_Term("junction", j.index, np.arange(lin.n_features),
                                      np.ones(lin.n_features))],
                               lin.n_features, lin.group, lin.from_input)
            lineage[n] = lin
        out_j = junction_nodes[outs]
        junctions[out_j].is_output = True
        for j in junctions:
            for t in j.inflows:
                if t.kind == "layer" and j.index not in layers[t.src].out_junctions:
                    layers[t.src].out_junctions.append(j.index)
        for l in layers:
            junctions[l.in_junction].consumers.append(l.index)
        if not layers:
            raise UnsupportedModelError("the model has no Linear or Conv layer to score")
        return cls(model, junctions, layers, out_j)

    @staticmethod
    def _make_junction(n, lin: _Lineage, junctions: list) -> Junction:
        group = lin.group
        n_nodes = int(group.max()) + 1 if group.size else 0
        spatial = lin.n_features // max(n_nodes, 1)
        j = Junction(index=len(junctions), name=n.name, n_features=lin.n_features,
                     group=group, n_nodes=n_nodes, spatial=spatial)
        first = np.full(n_nodes, -1, dtype=np.int64)
        order = np.arange(lin.n_features)[::-1]
        first[group[order]] = order        # first feature of each node
        for t in lin.terms:
            idx = t.idx[first].copy()
            scale = t.scale[first].copy()
            if t.kind == "junction":     # junction terms index features: map to nodes
                src_group = junctions[t.src].group
                ok = idx >= 0
                idx[ok] = src_group[idx[ok]]
            if np.any(idx >= 0):
                j.inflows.append(Inflow(t.kind, t.src, idx, scale))
        junctions.append(j)
        return j

    @classmethod
    def _propagate(cls, n: fx.Node, shape, lineage, modules, layers, junction_nodes):
        """Lineage of fx node ``n`` from its inputs' lineages."""
        def lin_of(a):
            return lineage.get(a) if isinstance(a, fx.Node) else None

        if n.op == "placeholder":
            if shape is None:
                return None
            nf = shape[1] if len(shape) > 1 else 1
            return _Lineage([], nf, np.arange(nf), True)
        if n.op == "get_attr":
            return None
        tensor_args = [a for a in n.all_input_nodes if lineage.get(a) is not None]
        if shape is None:
            # non-tensor result (size(), shape, getitem on a tuple of sizes, ...)
            if n.op == "call_function" and n.target is operator.getitem and tensor_args:
                raise UnsupportedModelError(
                    f"fx node {n.name!r}: indexing a tensor result is not supported")
            return None
        if not tensor_args:
            return None          # constants / tensors not derived from the input

        first = lin_of(n.args[0]) if n.args else None
        if n.op == "call_module":
            m = modules[n.target]
            if isinstance(m, WEIGHT_TYPES):
                in_j = junction_nodes.get(n.args[0])
                k = len(layers)
                layers.append(WeightLayer(k, n.target, m, in_junction=in_j))
                c_out = shape[1]
                return _Lineage([_Term("layer", k, np.arange(c_out), np.ones(c_out))], c_out,
                                np.arange(c_out), False)
            if isinstance(m, BN_TYPES):
                return cls._scaled(first, bn_scale(m), n)
            if isinstance(m, PASS_MODULES):
                return cls._same_channels(first, shape, n)
            if isinstance(m, nn.Flatten):
                return cls._flatten(first, tensor_shape(n.args[0]), shape, n)
            raise UnsupportedModelError(
                f"module {n.target!r} of type {type(m).__name__} is not supported by the "
                "channel graph (supported: Linear, Conv1d/2d incl. grouped/depthwise, BatchNorm, "
                "activations, pooling, dropout, flatten, residual add, concatenation)")
        if n.op in ("call_function", "call_method"):
            # function targets are callables, method targets names: one table lookup serves both
            t = n.target
            if t in PASS_FUNCTIONS or t in PASS_METHODS:
                return cls._same_channels(first, shape, n)
            if t in ADD_FUNCTIONS or t in ADD_METHODS:
                return cls._add(n, [lin_of(a) for a in n.args[:2]])
            if t in (torch.mean, torch.amax, "mean", "amax"):
                return cls._reduce_spatial(n, first, shape)
            if t in RESHAPE_METHODS:
                return cls._flatten(first, tensor_shape(n.args[0]), shape, n)
            if t is torch.cat:
                dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
                return cls._cat(n, n.args[0], dim, lineage, shape)
            if t is torch.flatten:
                start = n.kwargs.get("start_dim", n.args[1] if len(n.args) > 1 else 0)
                if start not in (1,):
                    raise UnsupportedModelError(f"fx node {n.name!r}: flatten must start at dim 1")
                return cls._flatten(first, tensor_shape(n.args[0]), shape, n)
            if t in (operator.mul, torch.mul, operator.truediv, torch.div) and len(tensor_args) == 1:
                other = n.args[1] if n.args[0] is tensor_args[0] else n.args[0]
                if isinstance(other, (int, float)):
                    f = abs(float(other))
                    if t in (operator.truediv, torch.div) and n.args[0] is tensor_args[0]:
                        f = 1.0 / f if f else math.inf
                    return cls._scaled(first if first is not None else lin_of(n.args[1]),
                                       np.full(shape[1], f), n)
            what = (f"tensor method .{t}()" if n.op == "call_method"
                    else f"function {getattr(t, '__name__', t)}")
            raise UnsupportedModelError(
                f"fx node {n.name!r}: {what} is not supported by the channel graph")
        raise UnsupportedModelError(f"fx node {n.name!r}: op {n.op} is not supported")

    # ------------------------------------------------------------------ lineage algebra
    @staticmethod
    def _same_channels(lin, shape, n):
        if lin is None:
            return None
        if shape[1] != lin.n_features:
            raise UnsupportedModelError(
                f"fx node {n.name!r} changes the channel count ({lin.n_features} -> {shape[1]})")
        return lin

    @staticmethod
    def _scaled(lin, factor, n):
        if lin is None:
            return None
        factor = np.abs(np.asarray(factor, dtype=np.float64))
        if factor.shape[0] != lin.n_features:
            raise UnsupportedModelError(
                f"fx node {n.name!r}: {factor.shape[0]} scales for {lin.n_features} channels")
        terms = [_Term(t.kind, t.src, t.idx, t.scale * factor) for t in lin.terms]
        return _Lineage(terms, lin.n_features, lin.group, lin.from_input)

    @staticmethod
    def _add(n, lins):
        lins = [l for l in lins if l is not None]
        if not lins:
            return None
        if len({l.n_features for l in lins}) != 1:
            raise UnsupportedModelError(f"fx node {n.name!r}: adding tensors of different widths")
        terms = [t for l in lins for t in l.terms]
        return _Lineage(terms, lins[0].n_features, lins[0].group,
                        all(l.from_input for l in lins))

    @staticmethod
    def _cat(n, parts, dim, lineage, shape):
        if dim % len(shape) != 1:
            raise UnsupportedModelError(f"fx node {n.name!r}: concatenation along dim {dim}; "
                                        "only the channel dim (1) is supported")
        lins = [lineage.get(p) for p in parts]
        if any(l is None for l in lins):
            raise UnsupportedModelError(f"fx node {n.name!r}: concatenates an untraced tensor")
        total = sum(l.n_features for l in lins)
        terms, groups, off, goff = [], [], 0, 0
        for l in lins:
            for t in l.terms:
                idx = np.full(total, -1, dtype=np.int64)
                scale = np.ones(total)
                idx[off:off + l.n_features] = t.idx
                scale[off:off + l.n_features] = t.scale
                terms.append(_Term(t.kind, t.src, idx, scale))
            groups.append(l.group + goff)
            goff += int(l.group.max()) + 1 if l.group.size else 0
            off += l.n_features
        return _Lineage(terms, total, np.concatenate(groups), all(l.from_input for l in lins))

    @staticmethod
    def _flatten(lin, in_shape, out_shape, n):
        if lin is None:
            return None
        if len(out_shape) != 2 or out_shape[0] != in_shape[0]:
            raise UnsupportedModelError(
                f"fx node {n.name!r}: only reshapes to (batch, features) are supported "
                f"({tuple(in_shape)} -> {tuple(out_shape)})")
        if len(in_shape) == 2:
            return lin
        per = int(np.prod(in_shape[2:]))
        f = np.arange(out_shape[1]) // per
        terms = [_Term(t.kind, t.src, t.idx[f], t.scale[f]) for t in lin.terms]
        group = np.arange(out_shape[1]) if lin.from_input else lin.group[f]
        return _Lineage(terms, out_shape[1], group, lin.from_input)

    @classmethod
    def _reduce_spatial(cls, n, lin, shape):
        dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if not dims or any(d in (0, 1) for d in dims) or len(shape) < 2:
            raise UnsupportedModelError(
                f"fx node {n.name!r}: only reductions over spatial dims (>= 2) are supported")
        return cls._same_channels(lin, shape, n)

    # ------------------------------------------------------------------ strengths
    def node_weights(self, layer: WeightLayer, p: float = 2.0):
        """``(|W|_p per (input node, output channel), structural mask)``, both (n_in, C_out).

        For a conv the norm runs over the kernel slice ``W[v, u, ...]``; for a Linear after
        flatten over the features of input channel ``u``. Pairs of different groups of a
        grouped / depthwise conv are structurally absent (mask False). Cached per graph (a
        graph is rebuilt whenever the model changes).
        """
        key = (layer.index, float(p))
        if not hasattr(self, "_nw_cache"):
            self._nw_cache = {}
        if key not in self._nw_cache:
            self._nw_cache[key] = self._node_weights(layer, p)
        return self._nw_cache[key]

    def _node_weights(self, layer: WeightLayer, p: float):
        m = layer.module
        junc = self.junctions[layer.in_junction]
        w = m.weight.detach().to(torch.float64).abs().cpu()
        if isinstance(m, nn.Linear):
            g = torch.as_tensor(junc.group)
            wp = w.pow(p)                                        # (C_out, F)
            acc = torch.zeros(w.shape[0], junc.n_nodes, dtype=torch.float64)
            acc.index_add_(1, g, wp)
            s = acc.pow(1.0 / p).T.contiguous()
            mask = torch.ones_like(s, dtype=torch.bool)
        else:
            c_out, c_in_g = w.shape[0], w.shape[1]
            groups = m.groups
            per_out = c_out // groups
            norms = w.flatten(2).pow(p).sum(2).pow(1.0 / p)     # (C_out, C_in/groups)
            s = torch.zeros(junc.n_nodes, c_out, dtype=torch.float64)
            mask = torch.zeros(junc.n_nodes, c_out, dtype=torch.bool)
            v = torch.arange(c_out)
            for j in range(c_in_g):
                u = (v // per_out) * c_in_g + j
                s[u, v] = norms[:, j]
                mask[u, v] = True
        return s.numpy(), mask.numpy()

    def layer_edges(self, layer: WeightLayer, dst: int, p: float = 2.0):
        """Strength matrix (n_in_nodes, n_dst_nodes) of ``layer``'s edges into junction ``dst``
        (BN scales folded) and ``cols``: for each output channel v, the dst node it reaches."""
        s, mask = self.node_weights(layer, p)
        j = self.junctions[dst]
        out = np.zeros((s.shape[0], j.n_nodes))
        cols = np.full(layer.out_channels, -1, dtype=np.int64)
        for t in j.inflows:
            if t.kind != "layer" or t.src != layer.index:
                continue
            c = np.nonzero(t.idx >= 0)[0]
            out[:, c] = np.maximum(out[:, c], s[:, t.idx[c]] * t.scale[c][None, :])
            cols[t.idx[c]] = c
        return out, cols, mask

    def junction_edges(self, src: int, dst: int, p: float = 2.0):
        """Combined strength matrix (n_src, n_dst) of every edge map from junction ``src`` to
        ``dst`` (parallel edges: the strongest, i.e. the shortest)."""
        js, jd = self.junctions[src], self.junctions[dst]
        out = np.zeros((js.n_nodes, jd.n_nodes))
        for t in jd.inflows:
            c = np.nonzero(t.idx >= 0)[0]
            if t.kind == "junction" and t.src == src:
                out[t.idx[c], c] = np.maximum(out[t.idx[c], c], t.scale[c])
            elif t.kind == "layer" and self.layers[t.src].in_junction == src:
                s, _ = self.node_weights(self.layers[t.src], p)
                out[:, c] = np.maximum(out[:, c], s[:, t.idx[c]] * t.scale[c][None, :])
        return out

    def predecessors(self, j: int) -> list[int]:
        """Junctions with an edge into junction ``j`` (topological order)."""
        srcs = {t.src if t.kind == "junction" else self.layers[t.src].in_junction
                for t in self.junctions[j].inflows}
        return sorted(srcs)

    def successors(self, j: int) -> list[int]:
        """Junctions that junction ``j`` has an edge into (topological order)."""
        if not hasattr(self, "_succ"):
            self._succ = {i: [] for i in range(len(self.junctions))}
            for d in range(len(self.junctions)):
                for s in self.predecessors(d):
                    self._succ[s].append(d)
        return self._succ[j]


def _first_sample(batch):
    """The first sample of a batch (tensors sliced to ``[:1]``, recursively); the shape pass
    needs one sample, not the whole calibration batch."""
    if isinstance(batch, torch.Tensor):
        return batch[:1] if batch.dim() > 0 else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_first_sample(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _first_sample(v) for k, v in batch.items()}
    return batch
