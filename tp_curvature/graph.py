"""Channel-level layered graph of a real network, traced with :mod:`torch.export`.

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
    reshape to ``(N, -1)``; the op tables of :mod:`tp_curvature._lineage`) are collapsed;
    BatchNorm only scales.
    Grouped and depthwise convolutions connect only channels of the same group; the other pairs
    are *structurally absent* (no edge, no connection).

How the graph is obtained
    ``forward_fn(model, batch)`` is exported with :func:`torch.export.export` (non-strict, the
    batch dim dynamic; fallbacks: a static batch-1 export, then ``draft_export``;
    :mod:`tp_curvature._export`) and every
    tensor's channel identity is tracked by *id-tensor lineage* (:mod:`tp_curvature._lineage`):
    the same ATen data-movement op runs on integer id tensors, so permute, transpose,
    flatten(2), a split into heads and back, cat/chunk/split and channel shuffles need no case
    analysis and the channel dim is tracked, never assumed (dim 1 of conv maps, the last dim of
    ``(N, T, C)`` tokens, also when T == C). Why not Torch-Pruning's ``DependencyGraph``: it
    stores no shapes or channel dims (only private autograd attributes, keyed by backward-op
    names that change across devices and versions), hides module internals (MHA's packed
    in-projection, functional linears) and has no index mapping for permute/transpose/head
    splits/shuffles. Why not extending ``torch.fx.symbolic_trace``: every op comes in several
    spellings (module / function / method) and control flow on shapes fails; export gives one
    ATen spelling per op and real shapes. Calibration streams the data through the same
    exported program (:mod:`tp_curvature.calibration`).

Semantics of the constructs (documented; checked in ``tests/test_coverage.py``)
    * junction discovery: the inputs of weight ops, the model output (the first floating leaf of
      a tuple / dict / ModelOutput), and q / k entering attention (*sinks*: no consumers, so
      q / k channels are scored by their incoming connections). The *pre-norm rule*: from a
      weight op's input the junction moves back through unary channel-preserving ops (norms,
      scaling, data movement, dropout; not activations) to a merge (add / sub / cat of two
      traced tensors), the network input or an Embedding output, and the scales on the way
      become the consumer's ``in_scale``; a norm right after a weight op folds on the
      producer side like BatchNorm;
    * BatchNorm (module or timm's functional ``batch_norm``): ``|gamma| / sqrt(var + eps)``;
      LayerNorm / RMSNorm / GroupNorm: ``|weight|`` per channel (the per-token ``1/sigma`` is a
      statistic without channel identity: factor 1); layer scale and any multiplication by a
      parameter / constant: ``|factor|`` per channel;
    * multiplicative gates (SE ``x * gate``, SwiGLU ``silu(g) * u``): both operands' channels
      reach the product, each with factor 1 (structure only);
    * DropPath / StochasticDepth / Dropout: exported in eval mode they are identities;
    * nn.Embedding: its output is an input junction (no inflows); its channels are scored by
      the outgoing connections of that junction;
    * attention (SDPA, nn.MultiheadAttention, explicit ``softmax(q @ k^T) @ v``, GQA by
      ``repeat_interleave`` or ``enable_gqa``), checked against a hand-built neuron graph in
      ``test_attention_block_against_reference``:

      - *values*: the attention weights are a statistic without channel identity (they mix
        tokens, never channels), so output feature ``c`` of ``attn @ v`` carries value
        channel ``c`` with factor 1 (through the head split and merge, by lineage; with GQA
        each kv head reaches all the query heads sharing it). The value channels therefore
        flow to the output projection's inputs: the tensor ``out_proj`` reads is an ordinary
        junction whose node ``c`` has one inflow, value channel ``c`` of the v projection;
      - *queries and keys*: q and k end in the scores, so the tensors entering attention
        (after the head split, RoPE, q/k norms) are *sink* junctions: no consumers, no
        successors. A q / k channel is scored through its incoming connections only
        (``m_y = delta_y``); a constant factor on the way (timm's ``q * scale``) is folded
        into the strengths like any constant factor;
      - an MHA's packed in-projection is one layer (weight ``in_proj_weight``) whose q / k / v
        thirds reach the q sink, the k sink and the value junction (kappa columns 0..E-1,
        E..2E-1, 2E..3E-1); Torch-Pruning's embed-dim channels of the MHA are scored from
        the out-projection's incoming and the in-projection's outgoing connections;
      - node values are mean |activation| of q, k (the sink tensors) and of ``out_proj``'s
        input, min-max normalised per junction like every junction;
      - the residual ``x + attn(x)`` is an identity edge from the stream x to the merge y, so
        the layer reading y has Z = {x, value junction}; the in-projection's value edges
        x -> v are then edges *among* Z, and the ground costs take them into account (a path
        ``x_a -> v_i -> y_j -> o`` can be far shorter than ``x_a -> y_a -> o``; see
        :func:`tp_curvature.curvature.problem_from_strengths`);
    * pooling / interpolate / Upsample / padding keep channels; ConvTranspose2d connects
      ``W[u, v]`` (input channel first) within its groups;
    * reductions (``mean`` / ``sum`` / ``amax`` ... over some dims, also after a channel
      slice as in GhostNet): a reduced dim along which the channel ids are constant (spatial
      positions, tokens) keeps the channel (factor 1); reducing the channel dim itself is a
      statistic (an RMSNorm's ``x.pow(2).mean(-1)``); reducing a dim whose slices each still
      carry channels is a *merge* of those channel maps (ResNeSt's radix split-and-sum
      ``x.view(B, r, C, H, W).sum(1)``: channel ``i C + c`` reaches node ``c``, factor 1 for
      ``sum`` / ``amax``, ``1/r`` for ``mean``; parallel edges count with the strongest);
      checked in ``test_radix_split_and_sum_against_reference`` and
      ``test_reduction_over_several_dims_after_a_slice_against_reference``;
    * ``addcmul(input, t1, t2, value=v)`` (timm's ``Affine`` in ResMLP) is ``input + v t1
      t2``: a parameter times the traced tensor scales it by ``|v t1|`` like a norm's weight
      (the pre-norm rule walks through it); ``test_addcmul_affine_against_reference``;
    * token mixing: a Linear whose contracted (last) dim carries no channel identity while
      another dim does (MLP-Mixer's ``mlp_tokens`` on ``x.transpose(1, 2)``) mixes
      positions, not channels: its input's channels flow through it (factor 1, as through
      attention weights) and it is not a channel layer of the graph (Torch-Pruning cannot
      prune it either); ``test_token_mixing_against_reference``;
    * summed embeddings (BERT's word + position + token-type embeddings): each embedding is an
      input junction with identity edges into the sum the layers read; an embedding's
      channels are scored through the layers reading the junctions it reaches by identity
      edges, node for node; ``test_summed_embeddings_against_reference``;
    * every floating-point output traced to the input is an output junction (a BERT
      pooler's output beside the last hidden state), so the layers writing only into a
      second output are scored;
    * a weight computed from parameters and buffers only (``torch.nn.utils.prune``'s
      ``weight_orig * weight_mask``, ``torch.nn.utils.parametrize``, ``weight_norm``) is the
      weight of the module the op runs in: its strengths are read from the computed value;
    * an op the lineage does not know makes its output *opaque*: layers reading it, or writing
      only into it, are not scored (:meth:`ChannelGraph.scoreable`) and get the documented
      fallback of :class:`~tp_curvature.importance.CurvatureImportance` with one warning.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

import torch.utils._pytree as pytree

from ._export import PREFIX, Program, UnsupportedModelError, global_hooks_detached, op_name
from ._lineage import (ADD, AFFINE, CAT, IDENTITY, MOVE, MUL, NORMS, OPAQUE, LineagePass,
                       Term, constant_along, channel_ids)
from .problem import selects_all

#: Bytes of per-layer strength matrices a graph keeps (least recently used dropped first): the
#: layers around the one being scored, not every layer of a large model.
NODE_WEIGHT_CACHE_BYTES = 128 << 20
WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)


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
    """A tensor whose channels are graph nodes.

    ``channel_dims`` are the dims of the traced tensor along which node identities vary
    (dim 1 of a conv map, the last dim of ``(N, T, C)`` tokens, dim 1 of a flattened map);
    ``node_ids`` (shape of those dims) gives each position's node (-1: none), ``valid`` (or
    None) masks positions without a node along the other dims (a class-token row).
    """
    index: int
    name: str
    n_nodes: int
    channel_dims: tuple = ()
    node_ids: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    inflows: list = field(default_factory=list)
    consumers: list = field(default_factory=list)   # layer indices reading this junction
    is_input: bool = False
    is_output: bool = False
    is_sink: bool = False        # q / k entering attention: scored by their inflows only
    source_module: Optional[nn.Module] = None        # the Embedding of an embedding junction

    @property
    def group(self) -> np.ndarray:
        """Feature (flattened channel-dim position) -> node."""
        return self.node_ids.reshape(-1).numpy()

    @property
    def n_features(self) -> int:
        return int(self.node_ids.numel())


@dataclass
class WeightLayer:
    """A weight op (Linear, Conv1d/2d, ConvTranspose, the packed in-projection of an
    ``nn.MultiheadAttention``): edges from ``in_junction`` to every junction in
    ``out_junctions``. ``in_group[f]`` is the junction node of contraction feature ``f`` (-1:
    none) and ``in_scale[f]`` the |factor| between the junction and the op (the affine weight
    of a pre-norm), None when 1."""
    index: int
    name: str
    module: nn.Module
    in_junction: Optional[int]
    out_junctions: list = field(default_factory=list)
    weight_name: str = ""
    kind: str = "linear"          # "linear" | "conv" | "conv_transpose"
    groups: int = 1
    in_group: Optional[np.ndarray] = None
    in_scale: Optional[np.ndarray] = None
    shared: bool = False          # the weight is used by several ops: not scored
    nodes: list = field(default_factory=list)   # fx node names of its weight op(s)
    token_mixing: bool = False    # a Linear over positions (tokens), not channels: not scored
    #: the weight the program computed from parameters (a pruning mask, a parametrization),
    #: None for a plain parameter (read live from the module)
    weight_value: Optional[torch.Tensor] = None

    @property
    def weight(self) -> torch.Tensor:
        if self.weight_value is not None:
            return self.weight_value
        return _get_param(self.module, self.weight_name)

    @property
    def out_channels(self) -> int:
        w = self.weight
        if self.kind == "conv_transpose":
            return w.shape[1] * self.groups
        return w.shape[0]


def _get_param(module, name):
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
    return getattr(module, name.split(".")[-1])


def _transparent(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    name = op_name(n.target)
    return (name in MOVE or name in IDENTITY or name in NORMS or name in MUL
            or name in AFFINE) \
        and name not in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split")


class _Builder:
    """The hooks :class:`~tp_curvature._lineage.LineagePass` calls: junctions and layers."""

    def __init__(self, model, junction_at: set):
        self.model = model
        self.junction_at = junction_at          # fx node names that are junctions
        self.junctions: list[Junction] = []
        self.layers: list[WeightLayer] = []
        self.by_weight: dict = {}
        self.at_node: dict = {}                 # fx node name -> junction index
        self.candidates: list = []              # (fx node, consumer layer index)
        self.input_consumer_fail: dict = {}     # placeholder name -> reason
        self.input_junctions: dict = {}         # placeholder name -> junction index
        self.pending_sinks: list = []

    # -- hooks -------------------------------------------------------------------------
    def input(self, n, ids, value):
        j = self._new_junction(n.name, [Term("junction", -1, ids, None)], value,
                               is_input=True, keep_terms=False)
        self.input_junctions[n.name] = j.index
        self.at_node[n.name] = j.index
        return [Term("junction", j.index, self._full_ids(j, value), None)]

    def weight(self, n, kind, wname, x_lin, x_val, out, groups=1, value=None):
        T = Term
        qual = wname[len(PREFIX):] if wname.startswith(PREFIX) else wname
        mod_name, _, pname = qual.rpartition(".")
        module = self.model.get_submodule(mod_name) if mod_name else self.model
        if kind == "embedding":
            j = self._new_junction(n.name, [T("junction", -1, channel_ids(tuple(out.shape), -1),
                                              None)], out, is_input=True, keep_terms=False)
            j.source_module = module
            self.at_node[n.name] = j.index
            return [T("junction", j.index, self._full_ids(j, out), None)]
        key = qual
        mixing = kind == "linear" and self._mixes_positions(x_lin)
        if key in self.by_weight:
            l = self.layers[self.by_weight[key]]
            l.shared = True
            l.in_junction = None
            l.nodes.append(n.name)
        else:
            k = len(self.layers)
            l = WeightLayer(k, mod_name, module, None, weight_name=pname, kind=kind,
                            groups=groups, token_mixing=mixing,
                            weight_value=None if value is None else value.clone())
            l.nodes.append(n.name)
            self.layers.append(l)
            self.by_weight[key] = k
            if not mixing and x_lin is not OPAQUE and isinstance(x_lin, list) and x_lin:
                self._attach_input(l, n.args[0], x_lin, x_val)
        if mixing:
            # a Linear over tokens (MLP-Mixer's token mixing on x.transpose(1, 2)) mixes
            # positions, not channels: the channels of its input flow through it, as
            # through the attention weights of ``attn @ v`` (factor 1)
            shape = tuple(out.shape)
            return [T(t.kind, t.src, t.ids.narrow(-1, 0, 1).expand(shape),
                      None if t.scale is None else
                      t.scale.expand(t.ids.shape).narrow(-1, 0, 1).expand(shape))
                    for t in x_lin]
        cdim = -1 if kind == "linear" else 1
        return [T("layer", l.index, channel_ids(tuple(out.shape), cdim), None)]

    def _mixes_positions(self, x_lin) -> bool:
        """Whether a Linear reading ``x_lin`` contracts a dim without channel identity (the
        ids are constant along its last dim and vary along another): a token-mixing layer.
        An input placeholder's ids are not judged (its channel dim is chosen by its
        consumers, :data:`INPUT_MODES`)."""
        if not isinstance(x_lin, list) or not x_lin:
            return False
        varies = False
        for t in x_lin:
            if t.kind == "junction" and t.src >= 0:
                j = self.junctions[t.src]
                if j.is_input and j.source_module is None:
                    return False
            ids = t.ids
            if ids.dim() < 2:
                return False
            if not bool((ids.amax(-1) == ids.amin(-1)).all()):
                return False
            varies = varies or any(ids.shape[d] > 1 and not bool(
                (ids.amax(d) == ids.amin(d)).all()) for d in range(ids.dim() - 1))
        return varies

    def junction(self, n, lin, value):
        if n.name in self.junction_at and n.name not in self.at_node and isinstance(lin, list) \
                and lin and isinstance(value, torch.Tensor):
            j = self._new_junction(n.name, lin, value)
            self.at_node[n.name] = j.index
            return [Term("junction", j.index, self._full_ids(j, value), None)]
        return None

    def sink(self, n, lin, value):
        if any(t.kind == "layer" for t in lin):
            j = self._new_junction(n.name + ":sink", lin, value)
            j.is_sink = True

    # -- helpers -----------------------------------------------------------------------
    def _attach_input(self, layer, xnode, x_lin, x_val):
        """Contraction feature -> junction node of ``layer`` (a junction is made at the input
        when it is not a single junction term)."""
        cdim = -1 if layer.kind == "linear" else 1
        if not (len(x_lin) == 1 and x_lin[0].kind == "junction"):
            if xnode.name in self.at_node:
                return
            j = self._new_junction(xnode.name, x_lin, x_val)
            self.at_node[xnode.name] = j.index
            x_lin = [Term("junction", j.index, self._full_ids(j, x_val), None)]
        t = x_lin[0]
        ids = t.ids.movedim(cdim, -1)
        F_ = ids.shape[-1]
        g = ids.reshape(-1, F_)
        grp = g.amax(0)
        if not bool(((g == grp) | (g < 0)).all()):
            jn = self.junctions[t.src]
            if jn.is_input:
                self.input_consumer_fail[jn.name] = "ids vary"
            return
        layer.in_junction = t.src
        layer.in_group = grp.numpy().astype(np.int64)
        if t.scale is not None:
            sc = t.scale.expand(t.ids.shape).movedim(cdim, -1).reshape(-1, F_)
            w = (g >= 0).double()
            layer.in_scale = ((sc * w).sum(0) / w.sum(0).clamp(min=1)).numpy()
        jn = self.junctions[t.src]
        if jn.is_input and jn.source_module is None:
            counts = np.bincount(layer.in_group[layer.in_group >= 0])
            if counts.size and counts.max() > 1 and layer.kind == "linear":
                self.input_consumer_fail[jn.name] = "features share a node"

    @staticmethod
    def _full_ids(j: Junction, value) -> torch.Tensor:
        shape = tuple(value.shape)
        v = [1] * len(shape)
        for d in j.channel_dims:
            v[d] = shape[d]
        ids = j.node_ids.reshape(v).expand(shape)
        if j.valid is not None:
            ids = torch.where(j.valid.expand(shape), ids, torch.full((), -1, dtype=torch.long))
        return ids

    def _new_junction(self, name, lin, value, is_input=False, keep_terms=True) -> Junction:
        shape = tuple(value.shape)
        nd = len(shape)
        ids_list = [t.ids.expand(shape) for t in lin]
        valid_full = None
        for ids in ids_list:
            v = ids >= 0
            valid_full = v if valid_full is None else (valid_full | v)
        # a dim is a channel dim when some term's ids vary along it (checked on the terms'
        # own, unexpanded ids: a broadcast dim never varies)
        own = [t.ids.reshape((1,) * (nd - t.ids.dim()) + tuple(t.ids.shape)) for t in lin]
        cdims = []
        for d in range(nd):
            if shape[d] <= 1:
                continue
            for ids in own:
                if ids.shape[d] <= 1:
                    continue
                m = torch.where(ids >= 0, ids, ids.amax(d, keepdim=True))
                if not constant_along(m, d):
                    cdims.append(d)
                    break
        other = [d for d in range(nd) if d not in cdims]
        red = [ids.amax(other, keepdim=False) if other else ids for ids in ids_list] \
            if nd else [ids.reshape(()) for ids in ids_list]
        csh = tuple(shape[d] for d in cdims)
        stack = torch.stack([r.reshape(-1) for r in red]) if red else \
            torch.zeros((0, int(math.prod(csh))), dtype=torch.long)
        M = stack.shape[1]
        ok = (stack >= 0).any(0)
        node = torch.full((M,), -1, dtype=torch.long)
        if bool(ok.any()):
            cols = stack[:, ok]
            uniq, inv = torch.unique(cols, dim=1, return_inverse=True)
            first = torch.full((uniq.shape[1],), M, dtype=torch.long)
            pos = torch.arange(cols.shape[1])
            first = first.scatter_reduce(0, inv, pos, "amin")
            order = torch.argsort(first)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            node[ok] = rank[inv]
        n_nodes = int(node.max()) + 1 if bool(ok.any()) else 0
        valid = None
        if not bool(valid_full.all()):
            vr = valid_full
            for d in range(nd):
                if vr.shape[d] > 1 and constant_along(vr, d):
                    vr = vr.narrow(d, 0, 1)
            if any(vr.shape[d] > 1 for d in other):
                valid = vr.clone()
        j = Junction(index=len(self.junctions), name=name, n_nodes=n_nodes,
                     channel_dims=tuple(cdims), node_ids=node.reshape(csh), valid=valid,
                     is_input=is_input)
        if keep_terms:
            okpos = torch.nonzero(node >= 0).squeeze(1)
            first_pos = torch.full((n_nodes,), M, dtype=torch.long).scatter_reduce(
                0, node[okpos], okpos, "amin", include_self=True)
            for t, r in zip(lin, red):
                idx = r.reshape(-1)[first_pos].numpy().astype(np.int64).copy()
                if t.scale is None:
                    scale = np.ones(n_nodes)
                else:
                    sc = t.scale.expand(shape)
                    sc = sc.mean(other) if other else sc
                    scale = sc.reshape(-1)[first_pos].numpy().astype(np.float64).copy()
                if np.any(idx >= 0) and t.src >= 0:
                    j.inflows.append(Inflow(t.kind, t.src, idx, np.abs(scale)))
        self.junctions.append(j)
        return j


def _walk_prenorm(gm: fx.GraphModule, kinds: dict, cands: list) -> set:
    """Junction fx nodes: each candidate, moved back through transparent unary ops to a merge
    (add/sub/cat of two traced tensors), the network input or an embedding (the pre-norm
    rule); else the candidate itself."""
    out = set()
    for c in cands:
        cur = c
        target = c
        while True:
            if cur.op == "placeholder" or (cur.op == "call_function" and
                                           op_name(cur.target) == "embedding"):
                target = cur
                break
            if cur.op != "call_function":
                break
            nm = op_name(cur.target)
            traced = [a for a in cur.all_input_nodes if kinds.get(a.name) == "T"]
            if nm in ADD or nm in CAT:
                if len(traced) >= 2:
                    target = cur
                break
            if _transparent(cur) and len(traced) == 1:
                cur = traced[0]
                continue
            break
        out.add(target.name)
    return out




WEIGHT_OPS = ("linear", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
              "conv_transpose2d", "_convolution")
#: an input placeholder's channel ids, tried in this order until its consumers read channels
INPUT_MODES = {"dim1": "last", "last": "element"}


def _lineage_pass(program: Program, builder: "_Builder", modes: dict) -> LineagePass:
    p = LineagePass(program.gm, builder, modes)
    with torch.no_grad(), global_hooks_detached():
        p.run(*pytree.tree_leaves(((program.example,), {})))
    return p


def _build_with_input_modes(model, program: Program, junction_at: set):
    """Build passes until every input placeholder's channel ids suit its consumers (at most
    three: dim 1, the last dim, one node per element)."""
    modes: dict = {}
    for _ in range(len(INPUT_MODES) + 1):
        builder = _Builder(model, junction_at)
        lineage = _lineage_pass(program, builder, modes)
        bumped = False
        for name, why in builder.input_consumer_fail.items():
            cur = modes.get(name, "dim1")
            nxt = INPUT_MODES.get(cur)
            if why == "features share a node":
                nxt = "element" if cur != "element" else None
            if nxt:
                modes[name] = nxt
                bumped = True
        if not bumped:
            break
    return builder, lineage


def _output_leaves(gm: fx.GraphModule, lineage: LineagePass) -> list:
    """The floating-point output tensors traced back to the input, in output order (the
    graph's output junctions: the first is the model output proper; the others, e.g. a
    BERT pooler's output beside the last hidden state, are outputs too, so the layers that
    write only into them are scored)."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = []
    for a in pytree.tree_leaves(out_node.args[0]):
        if isinstance(a, fx.Node) and isinstance(lineage.lin.get(a), list) and a not in leaves:
            v = lineage.env.get(a)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                leaves.append(a)
    return leaves


class ChannelGraph:
    """The channel-level layered graph of ``model`` (see the module docstring).

    Build it with :meth:`from_program`; it holds structure only (which channels connect, the
    norm scales on the way); strengths are read from the live weights by :meth:`node_weights`.
    ``unvalidated`` names the constructs met whose curvature has no independent reference check
    yet; ``unknown_ops`` the ATen ops the lineage does not know (op name -> first fx node).
    """

    def __init__(self, model: nn.Module, junctions: list, layers: list, output_junction: int,
                 program: Optional[Program] = None, unknown_ops: Optional[dict] = None,
                 unvalidated: tuple = ()):
        self.model = model
        self.junctions: list[Junction] = junctions
        self.layers: list[WeightLayer] = layers
        self.output_junction = output_junction
        self.program = program
        self.unknown_ops = dict(unknown_ops or {})
        self.unvalidated = tuple(unvalidated)
        self.rebind()
        self._node_weight_cache: OrderedDict = OrderedDict()
        self._successors = {i: [] for i in range(len(junctions))}
        for d in range(len(junctions)):
            for src in self.predecessors(d):
                self._successors[src].append(d)

    def rebind(self) -> None:
        """(Re)build the tables keyed by module ids (after unpickling or a deep copy)."""
        self.layer_of_module = {}
        for l in self.layers:
            self.layer_of_module.setdefault(id(l.module), l)
        self.embedding_junctions = {id(j.source_module): j for j in self.junctions
                                    if j.source_module is not None}

    def scoreable(self, layer: WeightLayer) -> bool:
        """Whether ``layer``'s connections get a curvature (else: the importance fallback)."""
        return (not layer.shared and layer.in_junction is not None
                and bool(layer.out_junctions) and layer.in_group is not None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_program(cls, model: nn.Module, program: Program) -> "ChannelGraph":
        """The channel graph of ``model`` from its exported program
        (:func:`tp_curvature._export.export_program`), by id-tensor lineage on the program's
        example batch: a first pass finds the junctions (the pre-norm rule), then the graph is
        built, re-reading an input placeholder's channels along another dim when its consumers
        cannot use dim 1 (the last dim of tokens, or one node per element)."""
        first = _lineage_pass(program, _Builder(model, set()), {})
        out_nodes = _output_leaves(program.gm, first)
        if not out_nodes:
            raise UnsupportedModelError(
                "the model output has no floating-point tensor derived from the input")
        kinds = {n.name: ("T" if isinstance(v, list) else None) for n, v in first.lin.items()}
        cands = [n.args[0] for n in program.gm.graph.nodes if n.op == "call_function" and n.args
                 and isinstance(n.args[0], fx.Node) and op_name(n.target) in WEIGHT_OPS]
        junction_at = _walk_prenorm(program.gm, kinds, cands) | {o.name for o in out_nodes}
        builder, lineage = _build_with_input_modes(model, program, junction_at)
        return cls._assemble(model, program, builder, lineage, out_nodes)

    @classmethod
    def _assemble(cls, model, program, b: "_Builder", lineage, out_nodes) -> "ChannelGraph":
        """Link the layers and junctions the builder found into a graph."""
        junctions, layers = b.junctions, b.layers
        outs = []
        for k, out_node in enumerate(out_nodes):
            if out_node.name in b.at_node:
                out_j = b.at_node[out_node.name]
            else:
                lin = lineage.lin.get(out_node)
                if not isinstance(lin, list) or not lin:
                    if k:
                        continue
                    raise UnsupportedModelError("the model output is not traced to its layers")
                out_j = b._new_junction(out_node.name, lin, lineage.env[out_node]).index
                b.at_node[out_node.name] = out_j
            junctions[out_j].is_output = True
            outs.append(out_j)
        out_j = outs[0]
        if not layers:
            raise UnsupportedModelError("the model has no Linear or Conv layer to score")
        for j in junctions:
            for t in j.inflows:
                if t.kind == "layer" and j.index not in layers[t.src].out_junctions:
                    layers[t.src].out_junctions.append(j.index)
        for l in layers:
            if l.shared:
                l.in_junction = None
            if l.in_junction is not None:
                junctions[l.in_junction].consumers.append(l.index)
            # real junctions before q/k sinks
            l.out_junctions.sort(key=lambda j: (junctions[j].is_sink, j))
        return cls(model, junctions, layers, out_j, program, lineage.unknown,
                   sorted(lineage.constructs))

    # ------------------------------------------------------------------ strengths
    def node_weights(self, layer: WeightLayer, p: float = 2.0):
        """``(|W|_p per (input node, output channel), structural mask)``, both (n_in, C_out).

        For a conv the norm runs over the kernel slice ``W[v, u, ...]``; for a Linear after
        flatten over the features of input channel ``u``. Pairs of different groups of a
        grouped / depthwise conv are structurally absent (mask False). Cached per graph (a
        graph is rebuilt whenever the model changes), the most recently used up to
        ``NODE_WEIGHT_CACHE_BYTES``.
        """
        key = (layer.index, float(p))
        cache = self._node_weight_cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = cache[key] = self._node_weights(layer, p)
        size = sum(a.nbytes for v in cache.values() for a in v)
        while size > NODE_WEIGHT_CACHE_BYTES and len(cache) > 1:   # least recently used out
            size -= sum(a.nbytes for a in cache.popitem(last=False)[1])
        return value

    def _node_weights(self, layer: WeightLayer, p: float):
        junc = self.junctions[layer.in_junction]
        # one float64 copy, then in place: a wide layer's temporaries cost tens of MB each
        w = layer.weight.detach().to(device="cpu", dtype=torch.float64, copy=True).abs_()
        n_nodes = junc.n_nodes
        g = torch.as_tensor(layer.in_group)
        sc = None if layer.in_scale is None else torch.as_tensor(layer.in_scale, dtype=torch.float64)
        if layer.kind == "linear":
            wf = w if w.dim() == 2 else w.flatten(1)          # (C_out, F)
            if sc is not None:
                wf.mul_(sc[None, :])
            wf.pow_(p)
            ok = g >= 0
            if selects_all(layer.in_group, n_nodes):
                acc = wf                                      # one feature per node
            else:
                acc = torch.zeros(wf.shape[0], n_nodes, dtype=torch.float64)
                acc.index_add_(1, g[ok], wf[:, ok])
            cnt = torch.zeros(n_nodes, dtype=torch.float64)
            cnt.index_add_(0, g[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
            s = acc.pow_(1.0 / p).T.contiguous()
            mask = (cnt > 0)[:, None].expand(n_nodes, wf.shape[0]).clone()
            return s.numpy(), mask.numpy()
        groups = layer.groups
        if layer.kind == "conv" and groups == 1 and selects_all(layer.in_group, n_nodes):
            # the usual conv: node u is input channel u and every pair is an edge (the
            # general scatter below took 5.4 s of ResNet-50's problem building, 1.1 s now)
            norms = w.flatten(2).pow_(p).sum(2)                  # (C_out, C_in)
            if sc is not None:
                norms.mul_(sc.pow(p)[None, :])
            s = norms.pow_(1.0 / p).T.contiguous()
            return s.numpy(), np.ones(s.shape, dtype=bool)
        if layer.kind == "conv":
            c_out, c_in_g = w.shape[0], w.shape[1]
            norms = w.flatten(2).pow_(p).sum(2)                  # (C_out, C_in/groups)
            per_out = c_out // groups
            v = torch.arange(c_out)[:, None].expand(c_out, c_in_g)
            f = (v // per_out) * c_in_g + torch.arange(c_in_g)[None, :]
        else:                                                      # conv_transpose
            c_in, c_out_g = w.shape[0], w.shape[1]
            c_out = c_out_g * groups
            norms = w.flatten(2).pow_(p).sum(2)                  # (C_in, C_out/groups)
            per_in = c_in // groups
            f = torch.arange(c_in)[:, None].expand(c_in, c_out_g)
            v = (f // per_in) * c_out_g + torch.arange(c_out_g)[None, :]
        f, v, norms = f.reshape(-1), v.reshape(-1), norms.reshape(-1)
        if sc is not None:
            norms = norms * sc[f].pow(p)
        u = g[f]
        ok = u >= 0
        s = torch.zeros(n_nodes, c_out, dtype=torch.float64)
        mask = torch.zeros(n_nodes, c_out, dtype=torch.bool)
        s.index_put_((u[ok], v[ok]), norms[ok], accumulate=True)
        mask[u[ok], v[ok]] = True
        return s.pow(1.0 / p).numpy(), mask.numpy()

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
            _max_into(out, c, _scaled_columns(s, t.idx[c], t.scale[c]))
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
                _max_into(out, c, _scaled_columns(s, t.idx[c], t.scale[c]))
        return out

    def predecessors(self, j: int) -> list[int]:
        """Junctions with an edge into junction ``j`` (topological order)."""
        srcs = {t.src if t.kind == "junction" else self.layers[t.src].in_junction
                for t in self.junctions[j].inflows}
        return sorted(s for s in srcs if s is not None)

    def successors(self, j: int) -> list[int]:
        """Junctions that junction ``j`` has an edge into (topological order)."""
        return self._successors[j]


def _scaled_columns(s: np.ndarray, idx: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``s[:, idx] * scale`` as one new array (no copy of ``s`` when ``idx`` takes every
    column in order)."""
    if selects_all(idx, s.shape[1]):
        return s * scale[None, :]
    out = s[:, idx]
    out *= scale[None, :]
    return out


def _max_into(out: np.ndarray, c: np.ndarray, vals: np.ndarray) -> None:
    """``out[:, c] = max(out[:, c], vals)``, overwriting ``vals`` (no other temporaries when
    ``c`` is every column in order)."""
    if selects_all(c, out.shape[1]):
        np.maximum(out, vals, out=out)
        return
    np.maximum(out[:, c], vals, out=vals)
    out[:, c] = vals
