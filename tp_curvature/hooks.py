"""Calibration: the node values of the channel graph, from one streaming pass.

The value of a node (a channel of a junction tensor, see :mod:`tp_curvature.graph`) is

.. math::  \\bar a_u = \\frac{1}{|B|} \\sum_{b \\in B} \\operatorname{mean}_{s} |T_b[u, s]|,

the absolute value averaged over the calibration inputs ``B`` and every position ``s`` outside
the junction's channel dims (spatial positions of a feature map, tokens of an ``(N, T, C)``
tensor; for a Linear after flatten, the features of channel ``u``). The graph uses the min-max
normalised value per junction (:func:`normalise`).

The values are read at the junction tensors themselves: the model's exported program
(:mod:`tp_curvature._lineage`) runs under an :class:`torch.fx.Interpreter` that accumulates
them, so junctions inside modules (attention values, q/k) are seen; module hooks are not used,
so a user's forward hooks do not fire during calibration (they fire during the export), and
every submodule's train/eval flag is restored (:func:`~tp_curvature._tracing.eval_mode`).
Calibration runs in eval mode (BatchNorm uses its running
statistics, dropout is off). :func:`calibrate_graph` is the whole pipeline (trace, record,
normalise) that :func:`~tp_curvature.curvature.connection_curvature` and
:class:`~tp_curvature.importance.CurvatureImportance` share. It reads the calibration data in
ONE streaming pass: the first batch also gives the shapes for the trace, and only running
per-channel sums are kept (see :class:`CalibrationData` for what is kept for a later pass).
"""
from __future__ import annotations

import collections.abc
import itertools
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from ._tracing import eval_mode
from .graph import ChannelGraph, Junction


class CalibrationError(ValueError):
    """The calibration data or the activations it produced cannot give valid scores."""


def check_max_batches(max_batches) -> Optional[int]:
    """``max_batches`` must be a positive int or None (a bool is refused); returns it as int."""
    if max_batches is None:
        return None
    if isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral) \
            or max_batches < 1:
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    return int(max_batches)


def _shape_beyond_batch(t: torch.Tensor) -> tuple:
    return tuple(t.shape[1:])


class CalibrationData:
    """Calibration data as a re-iterable, bounded sequence of batches.

    Accepted forms of ``data`` (``max_batches`` caps the number of batches of every form):

    * a tensor: one batch;
    * a tuple ``(inputs, targets)`` (or ``(inputs, targets, ...)``): one batch, whatever the
      dtype and shape of the targets (class indices, float or one-hot); the model gets
      ``inputs``;
    * a dict: one batch; it needs ``forward_fn(model, batch)``;
    * a list of batches, each a tensor, a tuple/list ``(inputs, targets)`` or a dict (a dict,
      or anything whose first element is not a tensor, needs ``forward_fn``). A list of
      exactly two tensors whose shapes differ beyond the batch dimension (``[x, y]``) is
      ambiguous and refused: pass a tuple ``(x, y)`` for one batch, or a list of same-shaped
      tensors for several batches;
    * any other iterable of such batches, e.g. a ``DataLoader`` (its default collate yields
      lists ``[x, y]``: each is one batch of inputs and targets).

    What is kept for a later pass (a recomputation after the model changed):

    * a tensor, tuple, dict, list or re-iterable source (any object whose ``iter()`` gives a
      fresh iterator: a ``DataLoader``, a ``Dataset``-like object) is kept *by reference* and
      streamed again; no batch is copied or held between passes;
    * a one-shot iterator (a generator, ``iter(loader)``; an object that is its own
      iterator) can be read only once, so it must come with ``max_batches`` (else
      :class:`CalibrationError` before any item is read) and its first ``max_batches``
      batches are then kept in memory, as given (on their device), for the later passes.

    A re-iterable source that never ends (e.g. a ``DataLoader`` over an ``IterableDataset``
    that yields forever) cannot be told apart from a long one: give it ``max_batches``.
    ``forward_fn`` (when given) is called as ``forward_fn(model, batch)`` for every batch.
    """

    def __init__(self, data, max_batches: Optional[int] = None,
                 forward_fn: Optional[Callable] = None):
        self.max_batches = check_max_batches(max_batches)
        self.forward_fn = forward_fn
        self._iterator: Optional[Iterator] = None
        self._kept: Optional[list] = None
        self._passes = 0
        if data is None:
            raise CalibrationError("no calibration data: pass a tensor, an (inputs, targets) "
                                   "tuple, a list of batches or a DataLoader")
        if isinstance(data, (torch.Tensor, tuple, dict)):
            self.kind, self._source = "batch", [data]
        elif isinstance(data, list):
            if (len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
                    and (data[0].dim() != data[1].dim()
                         or _shape_beyond_batch(data[0]) != _shape_beyond_batch(data[1]))):
                raise CalibrationError(
                    f"calibration data is a list of two tensors of shapes "
                    f"{tuple(data[0].shape)} and {tuple(data[1].shape)}: is it one batch of "
                    "(inputs, targets) or two batches? Pass a tuple (inputs, targets) for one "
                    "batch, or a list of same-shaped tensors for several batches")
            self.kind, self._source = "list", data
        elif isinstance(data, (str, bytes)):
            raise CalibrationError(f"cannot use a {type(data).__name__} as calibration data")
        elif isinstance(data, collections.abc.Iterator):
            if self.max_batches is None:
                raise CalibrationError(
                    f"calibration data is a one-shot iterator ({type(data).__name__}): it can "
                    "be read only once and may never end, so pass max_batches=N (its first N "
                    "batches are kept in memory for recomputations), or pass a re-iterable "
                    "source (a list, a tensor, a DataLoader)")
            self.kind, self._source, self._iterator = "iterator", None, data
        elif isinstance(data, collections.abc.Iterable):
            self.kind, self._source = "iterable", data
        else:
            raise CalibrationError(
                f"cannot use a {type(data).__name__} as calibration data: pass a tensor, an "
                "(inputs, targets) tuple, a dict (with forward_fn), a list of batches or an "
                "iterable/DataLoader of batches")

    def __len__(self) -> int:
        """The number of batches a pass yields, when known (TypeError otherwise)."""
        if self.kind == "iterator":
            if self._kept is None:
                raise TypeError("length unknown before the first pass")
            return len(self._kept)
        n = len(self._source)
        return n if self.max_batches is None else min(n, self.max_batches)

    def length_hint(self) -> Optional[int]:
        try:
            return len(self)
        except TypeError:
            return self.max_batches

    def _raw(self):
        if self.kind != "iterator":
            return itertools.islice(self._source, self.max_batches)
        if self._kept is not None:
            return iter(self._kept)
        if self._iterator is None:
            raise CalibrationError("the one-shot calibration iterator was not read to the end "
                                   "(its first pass failed) and cannot be read again: "
                                   "calibrate again with fresh data")
        return self._read_once()

    def _read_once(self):
        kept, source, self._iterator = [], self._iterator, None
        for batch in itertools.islice(source, self.max_batches):
            kept.append(batch)
            yield batch
        self._kept = kept

    def __iter__(self):
        """One pass over the batches (each checked before it reaches the model)."""
        first_pass = self._passes == 0
        self._passes += 1
        n = 0
        for i, batch in enumerate(self._raw()):
            check_batch(batch, i, self.forward_fn)
            n += 1
            yield batch
        if n == 0:
            if first_pass:
                raise CalibrationError("calibration data is empty: at least one batch is needed")
            raise CalibrationError(
                f"calibration data ({type(self._source).__name__}) yielded no batch on a second "
                "pass: it is a one-shot iterable; pass a list, a DataLoader, or the iterator "
                "with max_batches")


def check_batch(batch, i: int = 0, forward_fn: Optional[Callable] = None) -> None:
    """Refuse a batch the model cannot take: an empty tensor, or (without ``forward_fn``) a
    batch that is neither a tensor nor a tuple/list whose first element is a tensor."""
    x = batch_inputs(batch)
    if isinstance(x, torch.Tensor):
        if x.numel() == 0:
            raise CalibrationError(f"calibration batch {i} is empty")
        return
    if forward_fn is None:
        what = ("a dict" if isinstance(batch, dict) else
                f"a {type(batch).__name__} whose first element is a {type(x).__name__}"
                if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}")
        raise CalibrationError(
            f"calibration batch {i} is {what}, not a tensor or (inputs, targets): pass "
            "forward_fn=lambda model, batch: model(...) to say how the model takes it")


def as_batches(data, max_batches: Optional[int] = None,
               forward_fn: Optional[Callable] = None) -> CalibrationData:
    """Wrap calibration data as :class:`CalibrationData` (see there for the accepted forms,
    ``max_batches`` and what is kept); an existing :class:`CalibrationData` is returned as is."""
    if isinstance(data, CalibrationData):
        return data
    return CalibrationData(data, max_batches, forward_fn)


def batch_inputs(batch):
    """The model input of a batch: the tensor itself, or the first element of a tuple/list."""
    if isinstance(batch, (tuple, list)):
        return batch[0] if len(batch) else None
    return batch


def default_forward(model: nn.Module, batch):
    """``model(batch)`` for a tensor, ``model(batch[0])`` for an (inputs, targets) batch."""
    x = batch_inputs(batch)
    if not isinstance(x, torch.Tensor):
        check_batch(batch)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return model(x.to(device))


from .config import NODE_VALUES


def record_activations(graph: ChannelGraph, batches, forward_fn: Optional[Callable] = None,
                       progress: bool = False, total: Optional[int] = None,
                       statistic: str = "mean_abs",
                       layer_inputs: Optional[dict] = None) -> list[np.ndarray]:
    """The value of every node of ``graph``, one array per junction (unnormalised).

    ``statistic`` ``"mean_abs"`` (the paper): :math:`\\mathbb{E}|x|`, the mean absolute
    activation over images and positions. ``"std"``: the spread
    :math:`\\sqrt{\\mathbb{E}[x^2] - \\mathbb{E}[x]^2}` over the same images and positions (a
    channel that is constant on the data carries no information the next layer's bias could not
    absorb, so it counts as silent).

    The exported program of the graph (``forward_fn`` is baked into it) runs under an
    :class:`torch.fx.Interpreter` that accumulates, at every junction, ``sum |x|`` per node over
    all positions of its channel dims' complement (batch, spatial, tokens), so junctions inside
    modules (the value tensor of an ``nn.MultiheadAttention``, q/k entering attention,
    functional linears) are seen too. ``batches`` is read once, in a streaming pass that keeps
    only per-node running sums (float64). Raises :class:`CalibrationError` naming the layer if
    any activation is NaN or infinite.

    ``layer_inputs`` (a dict, filled in place): for every weight layer the graph cannot score
    (:meth:`ChannelGraph.scoreable` is False), ``layer index -> mean |x|`` of its input per
    contraction feature (the last dim for a Linear, dim 1 for a convolution), from the same
    pass; the activation-weighted fallback of
    :class:`~tp_curvature.importance.CurvatureImportance` reads it.
    """
    import torch.fx as fx
    import torch.utils._pytree as pytree
    from ._lineage import slice_batch

    if statistic not in NODE_VALUES:
        raise ValueError(f"node_value must be one of {NODE_VALUES}, got {statistic!r}")
    spread = statistic == "std"
    exp = graph.exported
    gm = exp.gm
    sums: list = [np.zeros(j.n_nodes) for j in graph.junctions]
    sum1: list = [np.zeros(j.n_nodes) for j in graph.junctions] if spread else None
    sum2: list = [np.zeros(j.n_nodes) for j in graph.junctions] if spread else None
    counts: list = [np.zeros(j.n_nodes) for j in graph.junctions]
    at: dict = {}
    for j in graph.junctions:
        at.setdefault(j.name.split(":sink")[0], []).append(j)

    def where(j):
        if j.is_output:
            return "the model output"
        if j.consumers:
            return f"layer {graph.layers[j.consumers[0]].name!r}"
        return f"the tensor {j.name!r}"

    def accumulate(j: Junction, t: torch.Tensor):
        t = t.detach()
        nd = t.dim()
        other = [d for d in range(nd) if d not in j.channel_dims]
        x = t.to(torch.float64)
        a = x.abs()
        if j.valid is not None:
            try:
                v = j.valid.to(a.device).expand(a.shape)
            except RuntimeError:
                v = None
        else:
            v = None
        if v is not None:
            a = a * v
            if spread:
                x = x * v
            cnt = v.to(torch.float64).sum(other) if other else v.to(torch.float64)
        else:
            n_other = int(np.prod([t.shape[d] for d in other])) if other else 1
            cnt = None
        feat = a.sum(other) if other else a
        if not torch.isfinite(feat).all():
            raise CalibrationError(
                f"non-finite (NaN/inf) activations at the input of {where(j)}: check the model "
                "and the calibration data")
        if tuple(feat.shape) != tuple(j.node_ids.shape):
            raise CalibrationError(
                f"{where(j)}: a batch gave {tuple(feat.shape)} channels where the traced graph "
                f"has {tuple(j.node_ids.shape)}; every calibration batch must have the same "
                "shape beyond the batch dimension")
        feat = feat.reshape(-1).cpu().numpy()
        cnt = (np.full(feat.shape, float(n_other)) if cnt is None
               else cnt.reshape(-1).cpu().numpy())
        g = j.group
        ok = g >= 0
        np.add.at(sums[j.index], g[ok], feat[ok])
        np.add.at(counts[j.index], g[ok], cnt[ok])
        if spread:
            for acc, m in ((sum1, x), (sum2, x * x)):
                f = (m.sum(other) if other else m).reshape(-1).cpu().numpy()
                np.add.at(acc[j.index], g[ok], f[ok])

    fb: dict = {}                     # fx node name -> unscoreable layer (its input is recorded)
    fb_sums: dict = {}
    if layer_inputs is not None:
        for l in graph.layers:
            if not graph.scoreable(l):
                for name in l.nodes:
                    fb[name] = l

    def accumulate_input(l, x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return
        dim = x.dim() - 1 if l.kind == "linear" else min(1, x.dim() - 1)
        a = x.detach().abs().to(torch.float64).movedim(dim, -1)
        feat = a.reshape(-1, a.shape[-1]).sum(0).cpu().numpy()
        cnt = a.numel() // max(a.shape[-1], 1)
        prev = fb_sums.get(l.index)
        if prev is None or prev[0].shape != feat.shape:
            fb_sums[l.index] = [feat, float(cnt)]
        else:
            prev[0] += feat
            prev[1] += cnt

    class Rec(fx.Interpreter):
        def run_node(self, n):
            if n.name in fb and n.args and isinstance(n.args[0], fx.Node):
                accumulate_input(fb[n.name], self.env.get(n.args[0]))
            out = super().run_node(n)
            for j in at.get(n.name, ()):
                accumulate(j, out)
            return out

    it = batches
    bar = None
    if progress:
        from tqdm.auto import tqdm
        it = bar = tqdm(batches, desc="calibration", leave=False, total=total)
    try:
        with eval_mode(graph.model), torch.no_grad():
            for b in it:
                from ._lineage import _batch_size
                size = _batch_size(b)
                chunks = [b] if exp.static_batch is None or size is None else \
                    [slice_batch(b, i, i + exp.static_batch, size)
                     for i in range(0, size, exp.static_batch)]
                for c in chunks:
                    flat = pytree.tree_leaves(((c,), {}))
                    Rec(gm).run(*flat)
                del b
    finally:
        if bar is not None:
            bar.close()
    if layer_inputs is not None:
        for k, (f, c) in fb_sums.items():
            layer_inputs[k] = f / max(c, 1.0)
    acts = []
    for j, s, c in zip(graph.junctions, sums, counts):
        if j.n_nodes and not (c > 0).any():
            raise CalibrationError(f"junction {j.name!r} saw no activation during calibration")
        mean_abs = np.divide(s, c, out=np.zeros_like(s), where=c > 0)
        if not spread:
            acts.append(mean_abs)
            continue
        m1 = np.divide(sum1[j.index], c, out=np.zeros_like(s), where=c > 0)
        m2 = np.divide(sum2[j.index], c, out=np.zeros_like(s), where=c > 0)
        var = m2 - m1 * m1
        # cancellation: a spread below float64 resolution of the mean square is no spread
        var[var <= 1e-12 * np.maximum(m2, 1e-300)] = 0.0
        acts.append(np.sqrt(var))
    return acts


@dataclass
class Calibration:
    """The result of :func:`calibrate_graph`: the channel graph of a model and the normalised
    value of every node, one float64 array per junction (``acts[j][u]`` in [0, 1]), and
    ``layer_inputs``: for each layer the graph cannot score, its index -> mean |input| per
    contraction feature (unnormalised; see :func:`record_activations`)."""
    graph: ChannelGraph
    acts: list
    layer_inputs: dict = field(default_factory=dict)


def calibrate_graph(model: nn.Module, data, forward_fn: Optional[Callable] = None,
                    normalize: str = "minmax", progress: bool = False,
                    max_batches: Optional[int] = None,
                    node_value: str = "mean_abs") -> Calibration:
    """The calibration pipeline: trace ``model`` into its :class:`~tp_curvature.graph.ChannelGraph`
    (shapes from one sample of the first batch), record the value of every node (mean
    |activation|, or its spread with ``node_value="std"``; :func:`record_activations`) and
    normalise them per junction (:func:`normalise`).

    ``data`` is read in one streaming pass: its first batch gives the shapes and is then the
    first batch recorded. It may be a :class:`CalibrationData` (as :func:`as_batches` returns;
    it can be passed again for a recomputation) or any form that class accepts (then
    ``max_batches`` caps it).
    """
    data = as_batches(data, max_batches, forward_fn)
    forward_fn = forward_fn or data.forward_fn or default_forward
    it = iter(data)
    try:
        first = next(it)
        graph = ChannelGraph.from_model(model, first, forward_fn)
        inputs: dict = {}
        raw = record_activations(graph, itertools.chain((first,), it), forward_fn, progress,
                                 data.length_hint(), node_value, layer_inputs=inputs)
    finally:
        it.close()                   # a failed pass releases the source's iterator at once
    _warn_unvalidated(graph)
    return Calibration(graph, [normalise(a, normalize) for a in raw], inputs)


class UnvalidatedCurvatureWarning(UserWarning):
    """The model has constructs whose curvature is not yet checked against an independent
    reference (see the README's Limitations)."""


def _warn_unvalidated(graph: ChannelGraph) -> None:
    found = getattr(graph, "unvalidated", ())
    if found:
        warnings.warn(
            f"tp_curvature: this model has {', '.join(found)} junctions; their curvature is "
            "computed but not yet validated against an independent exact reference (open "
            "work, see the README's Limitations): treat those layers' scores with care",
            UnvalidatedCurvatureWarning, stacklevel=4)


def normalise(a: np.ndarray, mode: str = "minmax") -> np.ndarray:
    """Per-junction normalisation of node values to [0, 1].

    ``"minmax"`` (the paper): ``(a - min) / (max - min)``; the least active node becomes 0
    (and so counts as inactive). ``"max"``: ``a / max`` keeps zero only for truly silent
    nodes. A constant junction maps to all ones (all zeros if it is silent).
    """
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return a
    hi, lo = a.max(), a.min()
    if mode == "minmax":
        if hi - lo <= 1e-12 * max(hi, 1e-300):
            return np.ones_like(a) if hi > 0 else np.zeros_like(a)
        return (a - lo) / (hi - lo)
    if mode == "max":
        return a / hi if hi > 0 else np.zeros_like(a)
    raise ValueError(f"normalize must be 'minmax' or 'max', got {mode!r}")
