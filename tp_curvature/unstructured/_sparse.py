"""Sparse element graphs: edges by index arithmetic, costs restricted to receptive fields.

The dense element graph of :mod:`._graph` holds ``(n_in, n_out)`` matrices per layer; this
module never does. Every element op of the chain (a ``Conv2d`` / ``Linear`` weight layer, a
``MaxPool2d`` / ``AvgPool2d``) is described by its *geometry*:

``pos_tab[l, t]``
    the input position read by output position ``l`` at kernel tap ``t`` (-1: padding), from
    :func:`torch.nn.functional.unfold` of an index image (``L x K2`` integers, shared by every
    channel). A ``Linear`` is a 1x1 "conv" on one position whose channels are its input
    features (``L = P = K2 = 1``).
inverse tables ``inv_ptr / inv_l / inv_t``
    for every input position ``q`` the (output position, tap) pairs that read it: the
    successors of an element are the outputs whose receptive fields contain it.
strengths ``S``
    ``|w|`` as ``(O, C*K2)`` (times the BatchNorm scale of a BatchNorm right after the layer,
    as in the dense mode; under ``conventions="authors"`` the raw ``|w|`` clamped at ``1e-30``,
    see :mod:`._conventions`); for a pooling op ``(C, L*K2)``.

Element ``(channel c, position q)`` of a layer has the flat index ``c * P + q`` (the order of
``tensor.flatten(1)``). The in-edges of output ``(o, l)`` are ``(c * P + pos_tab[l, t],
S[o, c*K2 + t])`` for every channel c and valid tap t; its out-edges follow the inverse tables.
Memory is ``O(L*K2 + O*C*K2)`` per layer (the edges are enumerated on the fly inside the Numba
kernels, never stored as a matrix); the number of edges is the closed form
``O * C * #valid(pos_tab)`` (:attr:`SparseOp.n_edges`).

Pooling at element level (an op of the chain that carries no weight and is not scored; its
output is a node layer like any other, with its own node values):

* ``MaxPool2d``: on each image, every window's output element has a single in-edge, from the
  element that won the max on that image (PyTorch's ``return_indices``), with strength 1
  (length 1); the window's other elements have no edge to it.
* ``AvgPool2d``: every element of a window has an edge to the window's output with strength
  ``1/divisor`` (``1/(kh*kw)`` with ``count_include_pad=True``, the number of valid elements
  otherwise, or ``divisor_override``).

``ceil_mode=True``, ``return_indices`` models, adaptive pooling and residual adds are refused
(:class:`~tp_curvature.graph.UnsupportedModelError`).

Curvature of a weight layer's edges (see :mod:`._sparse_scores`) uses exactly the dense mode's
definitions: measures over predecessors / successors (top-k of ``exp(-1/a^2)``), ground costs
= forward shortest paths of at most 3 hops, kappa from the same transport kernels; only the
sets are restricted to what an edge can see (receptive fields), so on small models the sparse
and the dense mode give the same kappa (tested).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numba
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._export import UnsupportedModelError
from ._chain import Chain, ChainOp, bn_scale, trace_chain
from ._conventions import LIBRARY, Conventions, float32_fill, resolve_conventions


class Geometry(NamedTuple):
    """What the Numba kernels read of an op (see :class:`SparseOp`): ``dw`` (depthwise: a
    pool, channel ``c`` to channel ``c``), the sizes ``O, C, L, P, K2``, the window table, its
    inverse and the strengths."""
    dw: bool
    O: int
    C: int
    L: int
    P: int
    K2: int
    pos_tab: np.ndarray
    inv_ptr: np.ndarray
    inv_l: np.ndarray
    inv_t: np.ndarray
    S: np.ndarray


#: the geometry of a missing neighbour op (no predecessors / successors)
NO_GEOMETRY = Geometry(False, 0, 0, 0, 0, 0, np.zeros((0, 0), np.int64), np.zeros(1, np.int64),
                       np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0)))


@dataclass
class SparseOp:
    """One element op of the chain (weight layer or pooling), by its geometry."""
    name: str
    kind: str                     # "conv" | "linear" | "maxpool" | "avgpool"
    module: nn.Module
    in_shape: tuple
    out_shape: tuple
    C: int                        # input channels (Linear: input features)
    P: int                        # input positions per channel
    O: int                        # output channels
    L: int                        # output positions per channel
    K2: int                       # taps per window
    pos_tab: np.ndarray           # (L, K2) int64, -1 = padding
    inv_ptr: np.ndarray           # (P + 1,) int64
    inv_l: np.ndarray             # output position of each (position, tap) reading q
    inv_t: np.ndarray             # the tap
    S: np.ndarray                 # strengths: weight (O, C*K2), pool (C, L*K2)
    bn: Optional[nn.Module] = None
    pool: Optional["PoolSpec"] = None
    node: str = ""                # fx node name of the op's output
    tap: str = ""                 # fx node name whose value is this op's input
    conventions: Conventions = LIBRARY   # what a zero weight and a BatchNorm do to ``S``

    @property
    def depthwise(self) -> bool:
        return self.kind in ("maxpool", "avgpool")

    @property
    def scored(self) -> bool:
        return not self.depthwise

    @property
    def n_in(self) -> int:
        return self.C * self.P

    @property
    def n_out(self) -> int:
        return self.O * self.L

    @property
    def n_valid_taps(self) -> int:
        return int((self.pos_tab >= 0).sum())

    @property
    def n_edges(self) -> int:
        """Edges of the op (closed form): every valid (output position, tap) pair times the
        channel pairs; a max pool keeps one winner per window."""
        if self.kind == "maxpool":
            return self.C * self.L
        if self.depthwise:
            return self.C * self.n_valid_taps
        return self.O * self.C * self.n_valid_taps

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    def geometry(self) -> Geometry:
        return Geometry(bool(self.depthwise), self.O, self.C, self.L, self.P, self.K2,
                        self.pos_tab, self.inv_ptr, self.inv_l, self.inv_t, self.S)


@dataclass
class PoolSpec:
    """A pooling op's arguments (from its ATen call)."""
    kind: str                     # "maxpool" | "avgpool"
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple = (1, 1)
    count_include_pad: bool = True
    divisor_override: Optional[int] = None

    @classmethod
    def of(cls, op: ChainOp, name: str) -> "PoolSpec":
        a = op.args
        if a.get("ceil_mode"):
            raise UnsupportedModelError(f"pooling {name!r}: ceil_mode=True is not supported")
        kernel = _pair(a["kernel_size"])
        stride = _pair(a["stride"]) if a.get("stride") else kernel
        if op.op.startswith("max_pool"):
            return cls("maxpool", kernel, stride, _pair(a["padding"]), _pair(a["dilation"]))
        return cls("avgpool", kernel, stride, _pair(a["padding"]),
                   count_include_pad=bool(a["count_include_pad"]),
                   divisor_override=a.get("divisor_override"))


@dataclass
class SparseElementGraph:
    """The chain as element ops; node layer ``i`` is the input of op ``i`` (``i = n``: output)."""
    chain: Chain
    ops: list
    output: str
    input_shape: tuple
    weight_ops: list = field(default_factory=list)
    conventions: Conventions = LIBRARY

    @property
    def layer_sizes(self) -> list:
        return [self.ops[0].n_in] + [op.n_out for op in self.ops]

    @property
    def n_edges(self) -> int:
        """Edges of the scored (weight) layers."""
        return sum(op.n_edges for op in self.ops if op.scored)


def _inverse(pos_tab: np.ndarray, P: int):
    L, K2 = pos_tab.shape
    flat = pos_tab.ravel()
    nz = np.flatnonzero(flat >= 0)
    q = flat[nz]
    order = np.argsort(q, kind="stable")
    nz, q = nz[order], q[order]
    ptr = np.zeros(P + 1, np.int64)
    np.cumsum(np.bincount(q, minlength=P), out=ptr[1:])
    return ptr, (nz // K2).astype(np.int64), (nz % K2).astype(np.int64)


def _window_table(in_hw: tuple, kernel, stride, padding, dilation, out_hw: tuple,
                  what: str) -> np.ndarray:
    """``pos_tab`` (L, K2): unfold of a one-channel index image (0 = padding)."""
    H, W = in_hw
    idx = torch.arange(1, H * W + 1, dtype=torch.float64).view(1, 1, H, W)
    unf = F.unfold(idx, kernel_size=kernel, dilation=dilation, padding=padding, stride=stride)[0]
    tab = (unf.round().long() - 1).T.contiguous().numpy().astype(np.int64)   # (L, K2)
    if tab.shape[0] != out_hw[0] * out_hw[1]:
        raise UnsupportedModelError(f"{what}: unrolling gives {tab.shape[0]} positions, the "
                                    f"output has {out_hw}")
    return tab


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def make_op(name: str, m: Optional[nn.Module], in_shape: tuple, out_shape: tuple,
            bn: Optional[nn.Module] = None, pool: Optional[PoolSpec] = None,
            conventions: Conventions = LIBRARY) -> SparseOp:
    """The :class:`SparseOp` of module ``m`` (a Linear / Conv2d) or of pooling ``pool`` for
    per-sample shapes ``in_shape -> out_shape`` (strengths under ``conventions``)."""
    if pool is not None:
        if len(in_shape) != 3:
            raise UnsupportedModelError(f"pooling {name!r}: needs a (N, C, H, W) input")
        C, H, W = in_shape
        tab = _window_table((H, W), pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                            out_shape[1:], name)
        kind, O, P, L, K2 = pool.kind, C, H * W, out_shape[1] * out_shape[2], tab.shape[1]
    elif isinstance(m, nn.Linear):
        if len(in_shape) != 1:
            raise UnsupportedModelError(f"layer {name!r}: Linear on a {len(in_shape) + 1}-D "
                                        "input (flatten first)")
        C, O = m.in_features, m.out_features
        tab = np.zeros((1, 1), np.int64)
        kind, P, L, K2 = "linear", 1, 1, 1
    elif isinstance(m, nn.Conv2d):
        if len(in_shape) != 3:
            raise UnsupportedModelError(f"layer {name!r}: Conv2d needs a (N, C, H, W) input")
        C, H, W = in_shape
        O = m.out_channels
        tab = _conv_table(m, (H, W), out_shape[1:], name)
        kind, P, L, K2 = "conv", H * W, out_shape[1] * out_shape[2], tab.shape[1]
    else:
        raise UnsupportedModelError(f"{name!r}: {type(m).__name__} is not an element op")
    ptr, il, it = _inverse(tab, P)
    op = SparseOp(name=name, kind=kind, module=m, in_shape=tuple(in_shape),
                  out_shape=tuple(out_shape), C=C, P=P, O=O, L=L, K2=K2, pos_tab=tab,
                  inv_ptr=ptr, inv_l=il, inv_t=it, S=np.zeros((0, 0)), bn=bn, pool=pool,
                  conventions=conventions)
    set_strengths(op)
    return op


def _conv_table(m: nn.Conv2d, in_hw: tuple, out_hw: tuple, name: str) -> np.ndarray:
    """``pos_tab`` of a Conv2d; string padding ('same') is applied to the index image first."""
    if not isinstance(m.padding, str):
        return _window_table(in_hw, m.kernel_size, m.stride, m.padding, m.dilation, out_hw, name)
    pad = m._reversed_padding_repeated_twice
    if not any(pad):
        return _window_table(in_hw, m.kernel_size, m.stride, 0, m.dilation, out_hw, name)
    # asymmetric 'same' padding: unfold a padded index image without padding
    H, W = in_hw
    idx = F.pad(torch.arange(1, H * W + 1, dtype=torch.float64).view(1, 1, H, W), pad)
    unf = F.unfold(idx, kernel_size=m.kernel_size, dilation=m.dilation, padding=0,
                   stride=m.stride)[0]
    return (unf.round().long() - 1).T.contiguous().numpy().astype(np.int64)


def set_strengths(op: SparseOp, pool_input: Optional[torch.Tensor] = None) -> None:
    """(Re)compute ``op.S`` from the current weights (under ``op.conventions``); a max pool
    needs ``pool_input`` (the raw values of its input for one image, ``(C, H, W)``) to know
    each window's winner."""
    if op.kind in ("conv", "linear"):
        w = op.module.weight.detach().double().abs().cpu().reshape(op.O, -1).numpy()
        w = op.conventions.weight_strengths(w)
        if op.bn is not None and op.conventions.fold_batchnorm:
            w = w * bn_scale(op.bn)[:, None]
        op.S = np.ascontiguousarray(w)
    elif op.kind == "avgpool":
        spec = op.pool
        valid = op.pos_tab >= 0
        if spec.divisor_override:
            div = np.full(op.L, float(spec.divisor_override))
        elif spec.count_include_pad:
            div = np.full(op.L, float(op.K2))
        else:
            div = valid.sum(1).astype(np.float64)
        s = np.where(valid, 1.0 / div[:, None], 0.0).reshape(-1)
        op.S = np.ascontiguousarray(np.broadcast_to(s, (op.C, op.L * op.K2)))
    else:  # maxpool
        if pool_input is None:
            op.S = np.zeros((op.C, op.L * op.K2))
            return
        spec = op.pool
        _, idx = F.max_pool2d(pool_input[None].double(), spec.kernel_size, spec.stride,
                              spec.padding, spec.dilation, ceil_mode=False, return_indices=True)
        idx = idx[0].reshape(op.C, op.L).numpy()                       # winner position
        hit = op.pos_tab[None, :, :] == idx[:, :, None]                 # (C, L, K2)
        first = hit & (np.cumsum(hit, axis=2) == 1)
        op.S = np.ascontiguousarray(first.reshape(op.C, op.L * op.K2).astype(np.float64))


def sparse_element_graph(model: nn.Module, example: torch.Tensor,
                         conventions: str = "library") -> SparseElementGraph:
    """Trace ``model`` (a chain, see :mod:`tp_curvature.unstructured`; pooling allowed) and
    describe each element op by its geometry, with strengths under ``conventions``
    (``"library"`` or ``"authors"``). Nothing of size ``n_in x n_out`` is built."""
    from ._checks import check_model, check_images

    check_model(model)
    example = check_images(example, "example")
    conv = resolve_conventions(conventions)
    chain = trace_chain(model, example, pooling=True)
    elem = [i for i, op in enumerate(chain.ops) if op.kind in ("weight", "pool")]
    vals = chain.values(example[:1], {chain.ops[i].node for i in elem}
                        | {chain.ops[i].input for i in elem} | {chain.output})
    out = []
    for k, i in enumerate(elem):
        c = chain.ops[i]
        nxt = chain.ops[i + 1] if i + 1 < len(chain.ops) else None
        bn = nxt.module if c.kind == "weight" and nxt is not None and nxt.kind == "bn" else None
        name = c.name
        op = make_op(name, c.module, tuple(vals[c.input].shape[1:]),
                     tuple(vals[c.node].shape[1:]), bn,
                     PoolSpec.of(c, name) if c.kind == "pool" else None, conv)
        op.node, op.tap = c.node, c.input
        after = chain.ops[elem[k + 1]].input if k + 1 < len(elem) else chain.output
        if vals[after][0].numel() != op.n_out:
            raise UnsupportedModelError(
                f"fx node {after!r} changes the number of elements after {name!r} "
                f"({op.n_out} -> {vals[after][0].numel()})")
        out.append(op)
    return SparseElementGraph(chain=chain, ops=out, output=chain.output,
                              input_shape=tuple(example.shape[1:]),
                              weight_ops=[i for i, op in enumerate(out) if op.scored],
                              conventions=conv)


# ------------------------------------------------------------------------------ Numba kernels
@numba.njit(cache=True, inline="always")
def _in_edges(y, g, src, st):
    """In-edges of output element ``y`` of the op with geometry ``g``: fills ``src`` / ``st``
    (strength > 0); returns their number."""
    o = y // g.L
    l = y - o * g.L
    n = 0
    if g.dw:
        for t in range(g.K2):
            q = g.pos_tab[l, t]
            if q < 0:
                continue
            s = g.S[o, l * g.K2 + t]
            if s > 0:
                src[n] = o * g.P + q
                st[n] = s
                n += 1
    else:
        for c in range(g.C):
            for t in range(g.K2):
                q = g.pos_tab[l, t]
                if q < 0:
                    continue
                s = g.S[o, c * g.K2 + t]
                if s > 0:
                    src[n] = c * g.P + q
                    st[n] = s
                    n += 1
    return n


@numba.njit(cache=True, inline="always")
def _out_edges(x, g, dst, st):
    """Out-edges of input element ``x`` of the op with geometry ``g``: fills ``dst`` / ``st``
    (strength > 0); returns their number."""
    c = x // g.P
    q = x - c * g.P
    n = 0
    for k in range(g.inv_ptr[q], g.inv_ptr[q + 1]):
        l = g.inv_l[k]
        t = g.inv_t[k]
        if g.dw:
            s = g.S[c, l * g.K2 + t]
            if s > 0:
                dst[n] = c * g.L + l
                st[n] = s
                n += 1
        else:
            for o in range(g.O):
                s = g.S[o, c * g.K2 + t]
                if s > 0:
                    dst[n] = o * g.L + l
                    st[n] = s
                    n += 1
    return n


@numba.njit(cache=True, inline="always")
def _fan_in(g):
    return g.K2 if g.dw else g.C * g.K2


@numba.njit(cache=True, inline="always")
def _fan_out(g):
    fan = 0
    for q in range(g.P):
        fan = max(fan, g.inv_ptr[q + 1] - g.inv_ptr[q])
    return fan * (1 if g.dw else g.O)


@numba.njit(cache=True, inline="always")
def _length(s, a, flow):
    v = s * a if flow else s
    return 1.0 / v if v > 0 else np.inf


#: ``_topk_fill`` selects the ``k`` heaviest atoms by insertion (O(n k)) up to this ``k`` and
#: sorts all ``n`` (O(n log n)) above it; both give the stable order of ``argsort``
SELECT_TOPK = 32


@numba.njit(cache=True)
def _top_order(v, n, kk):
    """The first ``kk`` entries of ``np.argsort(-v[:n], kind="mergesort")`` (largest first,
    ties by index) by insertion into a sorted buffer: O(n kk) instead of O(n log n)."""
    order = np.empty(kk, np.int64)
    if kk == 0:
        return order
    top = np.empty(kk)
    cnt = 0
    for i in range(n):
        x = v[i]
        if cnt == kk:
            if not x > top[kk - 1]:
                continue
            pos = kk - 1
        else:
            pos = cnt
            cnt += 1
        while pos > 0 and top[pos - 1] < x:     # equal values keep their index order
            top[pos] = top[pos - 1]
            order[pos] = order[pos - 1]
            pos -= 1
        top[pos] = x
        order[pos] = i
    return order


@numba.njit(cache=True)
def _topk_fill(nb, lw, n, k, out_idx, out_mass, row, select=SELECT_TOPK):
    """Top-k of log-weights ``lw[:n]`` (neighbours ``nb``), normalised; -1 / 0 padding.
    ``k <= select``: by insertion (:func:`_top_order`), else by a full stable sort (the same
    order)."""
    kk = min(k, n)
    if kk <= select:
        order = _top_order(lw, n, kk)
    else:
        order = np.argsort(-lw[:n], kind="mergesort")
    for i in range(out_idx.shape[1]):
        out_idx[row, i] = -1
        out_mass[row, i] = 0.0
    if kk == 0:
        return
    mx = lw[order[0]]
    if not np.isfinite(mx):
        return
    tot = 0.0
    for i in range(kk):
        v = lw[order[i]]
        if np.isfinite(v):
            tot += np.exp(v - mx)
    for i in range(kk):
        v = lw[order[i]]
        if np.isfinite(v):
            m = np.exp(v - mx) / tot
            if m > 0:
                out_idx[row, i] = nb[order[i]]
                out_mass[row, i] = m


@numba.njit(cache=True)
def _log_weights(nbr, st, m, a, flow_measure):
    """Log measure weight of each of the ``m`` neighbours ``nbr`` (edge strengths ``st``):
    ``log(a |w|)`` (flow) or ``-1/a^2`` (paper); ``-inf`` for an inactive neighbour."""
    lw = np.full(m, -np.inf)
    for i in range(m):
        v = a[nbr[i]]
        if v > 0:
            lw[i] = np.log(v * st[i]) if flow_measure else -1.0 / (v * v)
    return lw


# A parallel loop cannot take a bundle of arrays as a closure variable (Numba's parfor
# lowering refuses it), so the parallel kernels unpack their Geometry before the loop and
# rebuild it in the loop body, where it costs nothing.

@numba.njit(cache=True)
def _active(nb, m, a, out_nb, out_a):
    """The neighbours among ``nb[:m]`` with a positive value ``a`` (into ``out_nb`` /
    ``out_a``); returns their number."""
    c = 0
    for i in range(m):
        v = a[nb[i]]
        if v > 0:
            out_nb[c] = nb[i]
            out_a[c] = v
            c += 1
    return c


@numba.njit(cache=True)
def _fill_support(nb, st, m, a, k, flow_measure, float32, one_minus_alpha, out_idx, out_mass,
                  row, select=SELECT_TOPK):
    """Row ``row`` of a top-k support from the ``m`` neighbours ``nb`` (edge strengths ``st``,
    node values ``a``): the library's log-domain weights, or (``float32``) the authors'
    float32 measure (:func:`._conventions.float32_fill`)."""
    if float32:
        act, av = np.empty(m, np.int64), np.empty(m)
        c = _active(nb, m, a, act, av)
        float32_fill(act, av, c, k, one_minus_alpha, out_idx, out_mass, row)
    else:
        lw = _log_weights(nb, st, m, a, flow_measure)
        _topk_fill(nb, lw, m, k, out_idx, out_mass, row, select)


@numba.njit(parallel=True, cache=True)
def pred_supports(n, k, flow_measure, a_src, g, float32=False, one_minus_alpha=0.0,
                  select=SELECT_TOPK):
    """For every output element x of the op with geometry ``g``: the top-k of its
    predecessors z, weights ``exp(-1/a_z^2)`` (``flow_measure``: ``a_z s``) over active ones
    (``float32``: the authors' float32 measure, :func:`._conventions.float32_fill`);
    (n, k) idx / mass. ``select``: see :func:`_topk_fill` (0: always the full sort)."""
    dw, O, C, L, P, K2, pos_tab, inv_ptr, inv_l, inv_t, S = g
    fan = _fan_in(g)
    out_idx = np.full((n, k), -1, np.int64)
    out_mass = np.zeros((n, k))
    for x in numba.prange(n):
        gx = Geometry(dw, O, C, L, P, K2, pos_tab, inv_ptr, inv_l, inv_t, S)
        src = np.empty(fan, np.int64)
        st = np.empty(fan)
        m = _in_edges(x, gx, src, st)
        _fill_support(src, st, m, a_src, k, flow_measure, float32, one_minus_alpha, out_idx,
                      out_mass, x, select)
    return out_idx, out_mass


@numba.njit(parallel=True, cache=True)
def succ_supports(n, k, flow_measure, a_dst, g, float32=False, one_minus_alpha=0.0,
                  select=SELECT_TOPK):
    """For every input element y of the op with geometry ``g``: the top-k of its successors
    w (``float32``: as in :func:`pred_supports`); (n, k). ``select``: as there."""
    dw, O, C, L, P, K2, pos_tab, inv_ptr, inv_l, inv_t, S = g
    fan = _fan_out(g)
    out_idx = np.full((n, k), -1, np.int64)
    out_mass = np.zeros((n, k))
    for y in numba.prange(n):
        gy = Geometry(dw, O, C, L, P, K2, pos_tab, inv_ptr, inv_l, inv_t, S)
        dst = np.empty(fan, np.int64)
        st = np.empty(fan)
        m = _out_edges(y, gy, dst, st)
        _fill_support(dst, st, m, a_dst, k, flow_measure, float32, one_minus_alpha, out_idx,
                      out_mass, y, select)
    return out_idx, out_mass


class Tile(NamedTuple):
    """The elements of one tile: its sources ``Xp`` (global indices in X), the union ``Zu`` of
    their predecessor supports with ``zmap`` (Z element -> row of ``Zu``, -1 elsewhere), and
    the union ``Wu`` of its outputs' successor supports."""
    Xp: np.ndarray
    Zu: np.ndarray
    zmap: np.ndarray
    Wu: np.ndarray


class Neighbourhood(NamedTuple):
    """The three ops around a tile's edges (``A``: Z -> X, ``B``: X -> Y, ``C``: Y -> W; a
    missing one is :data:`NO_GEOMETRY` with ``has_a`` / ``has_c`` False), the node values of
    Z, X, Y and whether lengths are flow lengths."""
    A: Geometry
    B: Geometry
    C: Geometry
    has_a: bool
    has_c: bool
    a_z: np.ndarray
    a_x: np.ndarray
    a_y: np.ndarray
    flow: bool


class PathBudget:
    """Bytes the :class:`PathCache` objects of one call may still keep (shared by its
    layers)."""

    def __init__(self, max_bytes: int):
        self.left = int(max_bytes)


#: default memory of the shortest-path caches of one ``sparse_weight_curvature`` call (bytes)
PATH_CACHE_BYTES = 1 << 30


class PathCache:
    """The image-independent shortest paths of one weight op ``B`` (X -> Y, followed by ``C``:
    Y -> W), computed on first use and reused by every tile and every image.

    Under the paper's lengths (``length="weight"``: ``d = 1/s``, no node value enters) the
    two-hop row ``b2[w, :]`` (the shortest ``x -> y' -> w`` over every ``y'``, for every
    element x of X; :func:`_two_hops`) of a successor element w depends on the weights only.
    Tiles ask for the rows of the successors their measures use (``Wu``: the top-k supports,
    which change with the image); a row is computed once, the first time any tile of any
    image asks for it, then kept sparse (its finite entries: int32 columns, float64 lengths;
    12 bytes an entry) while ``budget`` allows (later rows are computed per tile and dropped).
    Every value is the one :func:`_two_hops` computes for that tile (the same min over the
    same sums), so the kappa are bit for bit those of recomputing the paths per tile.

    Not valid with flow lengths (``1/(a s)``) or when ``C`` is a max pool (its edges follow
    each image's winners): :func:`path_cache` returns None there. The weights must not
    change while the cache is used (one cache per call).

    Counters: ``hits`` / ``misses`` (rows served from / added to the cache, per tile),
    ``computed`` (rows computed, kept or not), ``nbytes``, ``seconds`` (computing rows).
    """

    def __init__(self, n_x: int, budget: Optional[PathBudget] = None):
        self.n_x = int(n_x)
        self.rows = {}
        self.budget = budget if budget is not None else PathBudget(PATH_CACHE_BYTES)
        self.hits = self.misses = self.computed = self.nbytes = 0
        self.seconds = 0.0

    def stats(self) -> dict:
        return dict(rows=len(self.rows), bytes=self.nbytes, hits=self.hits,
                    misses=self.misses, computed=self.computed,
                    seconds=round(self.seconds, 3))

    def two_hops(self, Wu: np.ndarray, nb: "Neighbourhood") -> np.ndarray:
        """``b2`` (``Wu.size``, n_X) of :func:`_two_hops`, from the cache (missing rows
        computed and kept)."""
        keys = Wu.tolist()
        missing = [w for w in dict.fromkeys(keys) if w not in self.rows]
        fresh = {}
        if missing:
            t0 = time.perf_counter()
            dense = _two_hops(np.asarray(missing, np.int64), nb.B, nb.C, nb.a_x, nb.a_y,
                              nb.flow)
            self.computed += len(missing)
            for w, row in zip(missing, dense):
                cols = np.flatnonzero(np.isfinite(row)).astype(np.int32)
                entry = (cols, row[cols])
                size = 12 * cols.size + 64
                if size <= self.budget.left:
                    self.rows[w] = entry
                    self.budget.left -= size
                    self.nbytes += size
                else:
                    fresh[w] = entry
            self.seconds += time.perf_counter() - t0
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        b2 = np.full((len(keys), self.n_x), np.inf)
        for j, w in enumerate(keys):
            cols, vals = self.rows[w] if w in self.rows else fresh[w]
            b2[j, cols] = vals
        return b2


def path_cache(ops: list, bi: int, cfg, budget: Optional[PathBudget] = None):
    """A :class:`PathCache` for weight op ``bi`` of ``ops`` under ``cfg``, or None where the
    paths depend on the image (flow lengths; a max pool after the op) or there is no next
    op."""
    if cfg.length == "flow" or bi + 1 >= len(ops) or ops[bi + 1].kind == "maxpool":
        return None
    return PathCache(ops[bi].n_in, budget)


def tile_costs(t: Tile, nb: Neighbourhood, cache: Optional[PathCache] = None) -> tuple:
    """Ground costs of tile ``t`` in the neighbourhood ``nb``: ``d_zx`` (nz, nx) among the
    tile's sources, and the 3-hop / 2-hop costs ``c_zw`` (nz, nw), ``c_xw`` (nx, nw) over every
    intermediate node.

    ``b2[j, x]`` = shortest x -> y' -> W[j] over all y' (2 hops); then
    ``c_xw[i, j] = b2[j, Xp[i]]`` and ``c_zw[a, j] = min_x d(Z[a], x) + b2[j, x]`` over the
    successors x of Z[a]: exactly the dense mode's min-plus products, restricted to the
    nodes that can lie on such a path. ``cache`` (:class:`PathCache`): the rows of ``b2``
    come from it (computed once per call, the same values) instead of per tile.
    """
    nx, nz, nw = t.Xp.size, t.Zu.size, t.Wu.size
    if nb.has_a and nz > 0:
        d_zx = _zx_lengths(t.Xp, t.zmap, nz, nb.A, nb.a_z, nb.flow)
    else:
        d_zx = np.full((nz, nx), np.inf)
    if not nb.has_c or nw == 0:
        return d_zx, np.full((nz, nw), np.inf), np.full((nx, nw), np.inf)
    if cache is not None:
        b2 = cache.two_hops(t.Wu, nb)
    else:
        b2 = _two_hops(t.Wu, nb.B, nb.C, nb.a_x, nb.a_y, nb.flow)
    c_xw = np.ascontiguousarray(b2[:, t.Xp].T)
    if nb.has_a and nz > 0:
        c_zw = _zw_costs(t.Zu, nb.A, nb.a_z, b2, nb.flow)
    else:
        c_zw = np.full((nz, nw), np.inf)
    return d_zx, c_zw, c_xw


@numba.njit(parallel=True, cache=True)
def _zx_lengths(Xp, zmap, nz, A, a_z, flow):
    """``d_zx[j, i]``: the length of the edge Z[j] -> Xp[i] of op ``A`` (inf: none)."""
    dw, O, C, L, P, K2, pos_tab, inv_ptr, inv_l, inv_t, S = A
    fan = _fan_in(A)
    d_zx = np.full((nz, Xp.size), np.inf)
    for i in numba.prange(Xp.size):
        g = Geometry(dw, O, C, L, P, K2, pos_tab, inv_ptr, inv_l, inv_t, S)
        src = np.empty(fan, np.int64)
        st = np.empty(fan)
        m = _in_edges(Xp[i], g, src, st)
        for e in range(m):
            j = zmap[src[e]]
            if j >= 0:
                d = _length(st[e], a_z[src[e]], flow)
                if d < d_zx[j, i]:
                    d_zx[j, i] = d
    return d_zx


@numba.njit(parallel=True, cache=True)
def _two_hops(Wu, B, Cg, a_x, a_y, flow):
    """``b2[j, x]``: the shortest path x -> y' -> Wu[j] over every y' (ops ``B`` then
    ``Cg``), for every element x of X."""
    dwB, OB, CB, LB, PB, K2B, posB, iptrB, ilB, itB, SB = B
    dwC, OC, CC, LC, PC, K2C, posC, iptrC, ilC, itC, SC = Cg
    fan_b, fan_c = _fan_in(B), _fan_in(Cg)
    b2 = np.full((Wu.size, CB * PB), np.inf)
    for j in numba.prange(Wu.size):
        gb = Geometry(dwB, OB, CB, LB, PB, K2B, posB, iptrB, ilB, itB, SB)
        gc = Geometry(dwC, OC, CC, LC, PC, K2C, posC, iptrC, ilC, itC, SC)
        src_c = np.empty(fan_c, np.int64)
        st_c = np.empty(fan_c)
        src_b = np.empty(fan_b, np.int64)
        st_b = np.empty(fan_b)
        m = _in_edges(Wu[j], gc, src_c, st_c)
        for e in range(m):
            yp = src_c[e]
            dyw = _length(st_c[e], a_y[yp], flow)
            if not np.isfinite(dyw):
                continue
            mb = _in_edges(yp, gb, src_b, st_b)
            for f in range(mb):
                xx = src_b[f]
                v = _length(st_b[f], a_x[xx], flow) + dyw
                if v < b2[j, xx]:
                    b2[j, xx] = v
    return b2


@numba.njit(parallel=True, cache=True)
def _zw_costs(Zu, A, a_z, b2, flow):
    """``c_zw[a, j]``: min over the successors x of Zu[a] (op ``A``) of ``d(Zu[a], x) +
    b2[j, x]``."""
    dw, O, C, L, P, K2, pos_tab, inv_ptr, inv_l, inv_t, S = A
    fan = _fan_out(A)
    nw = b2.shape[0]
    c_zw = np.full((Zu.size, nw), np.inf)
    for a in numba.prange(Zu.size):
        g = Geometry(dw, O, C, L, P, K2, pos_tab, inv_ptr, inv_l, inv_t, S)
        dst = np.empty(fan, np.int64)
        st = np.empty(fan)
        m = _out_edges(Zu[a], g, dst, st)
        for e in range(m):
            d = _length(st[e], a_z[Zu[a]], flow)
            if not np.isfinite(d):
                continue
            xx = dst[e]
            for j in range(nw):
                v = d + b2[j, xx]
                if v < c_zw[a, j]:
                    c_zw[a, j] = v
    return c_zw
