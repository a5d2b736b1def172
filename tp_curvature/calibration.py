"""Calibration: the data a user gives, streamed once through the exported model, becomes the
statistics the library needs.

One pipeline, read top to bottom (:func:`observe`):

1. **batches**: the user's data wrapped once as :class:`CalibrationData` (the accepted forms,
   ``max_batches``, ``forward_fn``, what is kept for a later pass);
2. **export**: its first batch is the example for :func:`~tp_curvature._export.export_program`;
3. **one streaming pass**: every batch, the first included, runs once through the exported
   program, whose *taps* hand the tensors the observers asked for to them
   (:meth:`~tp_curvature._export.Program.run`); only running sums are kept;
4. **statistics**: each observer turns its sums into what its user needs.

:func:`calibrate` is this pipeline for the curvature: the observers are :class:`NodeStatistics`
(the value of every node of the channel graph) and :class:`FallbackInputs` (the mean |input|
of the layers the graph cannot score). The least-squares repair (:mod:`tp_curvature.repair`)
runs the same pipeline with its own observer.

The value of a node (a channel of a junction tensor, see :mod:`tp_curvature.graph`) is

.. math::  \\bar a_u = \\frac{1}{|B|} \\sum_{b \\in B} \\operatorname{mean}_{s} |T_b[u, s]|

(``node_value="mean_abs"``, the paper), or the spread
:math:`\\sqrt{\\mathbb{E}[x^2] - \\mathbb{E}[x]^2}` over the same images and positions
(``"std"``, the default), over the calibration inputs ``B`` and every position ``s`` outside
the junction's channel dims (spatial positions of a feature map, tokens of an ``(N, T, C)``
tensor; for a Linear after flatten, the features of channel ``u``), min-max normalised per
junction (:func:`normalise`).

The pass runs the exported program, not the model's modules: the user's forward hooks do not
fire during it, and every submodule's train/eval flag is restored afterwards (calibration runs
in eval mode: BatchNorm on running statistics, dropout off).
"""
from __future__ import annotations

import collections.abc
import contextlib
import inspect
import itertools
import numbers
import pickle
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ._export import Program, UnsupportedModelError, export_program, run_eagerly
from ._memory import release_freed_memory
from .config import NODE_VALUES, NORMALIZE_MODES, CurvatureConfig
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

    ``forward_fn(model, batch)`` says how the model takes a batch (default
    :func:`default_forward`: ``model(batch)``, or ``model(batch[0])`` for ``(inputs,
    targets)``; a torchvision detection model through its backbone and detection head,
    :func:`detection_forward`). It is *traced once*, at export, on the first batch; it does
    not run per batch. Python control flow and Python values it reads from a batch are fixed
    by that batch; the tensors of every batch then flow through the traced program. A later
    batch that needs another trace (a different Python value the trace depends on, a
    different shape beyond the batch dim) raises :class:`CalibrationError` naming the
    mismatch.
    """

    def __init__(self, data, max_batches: Optional[int] = None,
                 forward_fn: Optional[Callable] = None):
        self.max_batches = check_max_batches(max_batches)
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn must be a callable forward_fn(model, batch), got "
                            f"{type(forward_fn).__name__}")
        self.custom_forward = forward_fn is not None
        self.forward_fn = forward_fn or default_forward
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
            check_batch(batch, i, self.custom_forward)
            n += 1
            yield batch
        if n == 0:
            if first_pass:
                raise CalibrationError("calibration data is empty: at least one batch is needed")
            raise CalibrationError(
                f"calibration data ({type(self._source).__name__}) yielded no batch on a second "
                "pass: it is a one-shot iterable; pass a list, a DataLoader, or the iterator "
                "with max_batches")


    def __getstate__(self):
        """Pickling keeps the source (by value: a re-iterable source is pickled with it) and
        ``forward_fn``; a ``forward_fn`` that does not pickle (a lambda, a local function)
        is left out with a warning, and a later pass then asks for a new calibration."""
        state = dict(self.__dict__)
        if self.custom_forward and not _picklable(self.forward_fn):
            warnings.warn(
                f"tp_curvature: forward_fn {getattr(self.forward_fn, '__qualname__', '?')!r} "
                "cannot be pickled and is left out: the unpickled CurvatureImportance keeps "
                "its scores, but once the model changes it must be calibrated again "
                "(imp.calibrate(model, data, forward_fn=...)); define forward_fn at module "
                "level to keep it", UserWarning, stacklevel=2)
            state["forward_fn"] = None
            state["_lost"] = "forward_fn"
        return state

    @contextlib.contextmanager
    def open(self):
        """``(first, batches)``: the first batch (the export's example) and an iterator over
        every batch from the first, read in one pass; the source's iterator is closed when the
        block ends, also after an error."""
        if getattr(self, "_lost", None):
            raise CalibrationError(
                f"this calibration data was unpickled without its {self._lost}, which cannot "
                "be pickled: call imp.calibrate(model, data, forward_fn=...) again")
        it = iter(self)
        try:
            first = next(it)
            yield first, itertools.chain((first,), it)
        finally:
            it.close()


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - any pickling error means no
        return False
    return True


def check_batch(batch, i: int = 0, custom_forward: bool = False) -> None:
    """Refuse a batch the model cannot take: an empty tensor, or (without ``forward_fn``) a
    batch that is neither a tensor nor a tuple/list whose first element is a tensor."""
    x = batch_inputs(batch)
    if isinstance(x, torch.Tensor):
        if x.numel() == 0:
            raise CalibrationError(f"calibration batch {i} is empty")
        return
    if not custom_forward:
        what = ("a dict" if isinstance(batch, dict) else
                f"a {type(batch).__name__} whose first element is a {type(x).__name__}"
                if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}")
        raise CalibrationError(
            f"calibration batch {i} is {what}, not a tensor or (inputs, targets): pass "
            "forward_fn=lambda model, batch: model(...) to say how the model takes it")


def batch_inputs(batch):
    """The model input of a batch: the tensor itself, or the first element of a tuple/list."""
    if isinstance(batch, (tuple, list)):
        return batch[0] if len(batch) else None
    return batch


def default_forward(model: nn.Module, batch):
    """``model(batch)`` for a tensor, ``model(batch[0])`` for an (inputs, targets) batch; a
    torchvision detection model goes through :func:`detection_forward`."""
    if is_detection_model(model):
        return detection_forward(model, batch)
    x = batch_inputs(batch)
    if not isinstance(x, torch.Tensor):
        check_batch(batch)
    check_default_call(model, batch)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return model(x.to(device))


def check_default_call(model: nn.Module, batch) -> None:
    """Refuse, with the cause, a model whose ``forward`` cannot take the default call's one
    input (a model of several inputs given a tuple: the tuple reads as ``(inputs,
    targets)``)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(batch_inputs(batch))
    except TypeError as exc:
        what = (f"a {type(batch).__name__} of {len(batch)}, read as (inputs, targets)"
                if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}")
        raise CalibrationError(
            f"the default forward calls model(inputs) with one input (the batch is {what}), "
            f"but {type(model).__name__}.forward{sig} cannot take it ({exc}): pass "
            "forward_fn=lambda model, batch: model(*batch) (or whatever call the model "
            "needs)") from None


def is_detection_model(model: nn.Module) -> bool:
    """A torchvision detection model (Faster / Mask / Keypoint R-CNN, RetinaNet, FCOS, SSD):
    its eval output is post-processed detections, with no float tensor traced to the input."""
    return (type(model).__module__.startswith("torchvision.models.detection")
            and hasattr(model, "backbone") and hasattr(model, "transform")
            and (hasattr(model, "rpn") or hasattr(model, "head")))


def detection_forward(model: nn.Module, batch):
    """The default forward of a torchvision detection model (:func:`is_detection_model`):
    its eval output (boxes after non-maximum suppression) carries no float tensor back to
    the input, so calibration runs the image batch ``(N, 3, H, W)`` (or ``(images,
    targets)``) through the model's normalisation, its backbone (with the FPN) and its
    detection head (the RPN head of an R-CNN, the head of RetinaNet / FCOS / SSD), and
    returns the head's outputs flattened and concatenated. The resizing of the model's
    transform is left out (images are taken at their size); the ROI heads, which read
    ``roi_align`` boxes, are not traced (Torch-Pruning's examples ignore them)."""
    x = batch_inputs(batch)
    if not (isinstance(x, torch.Tensor) and x.dim() == 4):
        raise CalibrationError(
            f"calibration batches of the detection model {type(model).__name__} must be "
            "image tensors (N, 3, H, W) or (images, targets) with such a tensor, got "
            f"{_describe(x)}: stack same-sized images into one tensor (or pass forward_fn)")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    feats = model.backbone(model.transform.normalize(x.to(device)))
    feats = [feats] if isinstance(feats, torch.Tensor) else list(feats.values())
    head = model.rpn.head if hasattr(model, "rpn") else model.head
    outs = [t for t in pytree.tree_leaves(head(feats))
            if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat([t.flatten(1) for t in outs], 1)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


# ------------------------------------------------------------------------------ the pass
def observe(model: nn.Module, data: "CalibrationData", make_observers: Callable,
            progress: bool = False) -> tuple:
    """The calibration pass every statistic of the library comes from.

    ``data``'s first batch is the example of the export; ``make_observers(program)`` returns
    the observers (objects with ``taps() -> {fx node name: [key, ...]}`` and
    ``observe(key, value)``); then every batch, the first included, streams once through the
    program with their taps. Returns ``(program, observers)``.

    Errors: the user's own (the model's or ``forward_fn``'s, raised when the call runs as
    plain PyTorch) reach the caller unchanged; a batch the traced program does not fit (a
    Python value or a shape the trace depends on) raises :class:`CalibrationError` naming
    it; any other failure of the library's machinery (building the graph, the observers)
    becomes :class:`~tp_curvature._export.UnsupportedModelError` naming where it happened,
    which :class:`~tp_curvature.importance.CurvatureImportance` turns into its documented
    fallback.
    """
    if not isinstance(data, CalibrationData):
        raise TypeError(f"data must be a CalibrationData, got {type(data).__name__}")
    with data.open() as (first, batches):
        program = export_program(model, first, data.forward_fn)
        try:
            observers = make_observers(program)
        except (CalibrationError, UnsupportedModelError):
            raise
        except Exception as exc:  # noqa: BLE001 - the user's error, or the library's
            run_eagerly(model, first, data.forward_fn)        # raises the user's own error
            raise UnsupportedModelError(
                f"building the channel graph of {type(model).__name__} failed"
                f"{_where_failed(program, exc)}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
        current: dict = {}

        def tracked():
            for i, batch in enumerate(batches):
                current["i"], current["batch"] = i, batch
                yield batch
            current.clear()
        try:
            program.run(model, tracked(), observers, progress, data.length_hint())
        except (CalibrationError, UnsupportedModelError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise _run_failure(model, data, program, current, exc) from exc
    return program, observers


def _where_failed(program: Program, exc: Exception) -> str:
    """`` at <op> (fx node ..., module ...)`` for an error raised while the lineage pass ran
    a node (:attr:`~tp_curvature._lineage.LineagePass.failed_node`)."""
    node = getattr(exc, "tp_curvature_node", None)
    if node is None:
        return ""
    from ._export import op_name
    mods = program.modules_of(node)
    where = f" in module {mods[-1]!r}" if mods and mods[-1] else ""
    return f" at {op_name(node.target)} (fx node {node.name!r}{where})"


def _run_failure(model, data, program: Program, current: dict, exc: Exception) -> Exception:
    """The error to raise for an exception of the streaming pass: the user's own (the batch
    run as plain PyTorch), a batch that does not fit the traced program, or the library's."""
    if "batch" not in current:
        return UnsupportedModelError(f"the calibration pass failed: {type(exc).__name__}: "
                                     f"{str(exc)[:300]}")
    i, batch = current["i"], current["batch"]
    current.clear()
    try:
        run_eagerly(model, batch, data.forward_fn)
    except Exception as user:  # noqa: BLE001 - the user's own error reaches the user
        return user
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "Guard failed" in msg or isinstance(exc, AssertionError) or _shape_differs(
            program.example, batch):
        return CalibrationError(
            f"calibration batch {i} does not fit the program traced on batch 0 ({msg}): "
            "forward_fn is traced once, on the first batch, so the Python values it reads "
            "from a batch (not tensors) and the shapes beyond the batch dimension must be "
            "the same in every batch; pass per-batch values as tensors, or calibrate on "
            "batches that agree")
    return UnsupportedModelError(f"the calibration pass failed on batch {i}: "
                                 f"{type(exc).__name__}: {msg[:300]}")


def _shape_differs(example, batch) -> bool:
    a, spec_a = pytree.tree_flatten(example)
    b, spec_b = pytree.tree_flatten(batch)
    if spec_a != spec_b:
        return True
    return any(isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor)
               and tuple(u.shape[1:]) != tuple(v.shape[1:]) for u, v in zip(a, b))


@dataclass
class Calibration:
    """The result of :func:`calibrate`: the channel graph of a model, the normalised value of
    every node (one float64 array per junction, ``acts[j][u]`` in [0, 1]) and, for each layer
    the graph cannot score, its index -> mean |input| per contraction feature (unnormalised;
    :class:`FallbackInputs`)."""
    graph: ChannelGraph
    acts: list
    layer_inputs: dict


def calibrate(model: nn.Module, data: "CalibrationData", config: CurvatureConfig,
              progress: bool = False) -> Calibration:
    """The curvature's calibration: :func:`observe` with :class:`NodeStatistics` (statistic
    ``config.node_value``) and :class:`FallbackInputs` on the channel graph built from the
    exported program, then :func:`normalise` (``config.normalize``) per junction."""
    def observers(program: Program) -> list:
        graph = ChannelGraph.from_program(model, program)
        return [NodeStatistics(graph, config.node_value), FallbackInputs(graph)]

    _, (nodes, inputs) = observe(model, data, observers, progress)
    _warn_unvalidated(nodes.graph)
    acts = [normalise(a, config.normalize) for a in nodes.values()]
    release_freed_memory()                   # the pass's activations, freed but resident
    return Calibration(nodes.graph, acts, inputs.means())


# ------------------------------------------------------------------------------ observers
class NodeStatistics:
    """Running per-node sums (float64) at every junction of ``graph``: the number of values
    and ``sum |x|`` (``statistic="mean_abs"``) or ``sum x`` and ``sum x^2`` (``"std"``), over
    the batch and every position outside the junction's channel dims.

    Each batch is reduced in its own floating dtype (float32 for float32 / half activations,
    float64 for float64 ones; torch's sums are pairwise) and only per-feature sums enter the
    float64 accumulators. The second moment is taken around the feature's batch mean
    (``q = sum (x - m)^2``: no cancellation in float32) and moved to 0 in float64,
    ``sum x^2 = q + n m^2``: a spread 1e-4 of the mean keeps its digits, where a float32
    ``sum x^2`` would lose them all.
    """

    def __init__(self, graph: ChannelGraph, statistic: str = "mean_abs"):
        if statistic not in NODE_VALUES:
            raise ValueError(f"node_value must be one of {NODE_VALUES}, got {statistic!r}")
        self.graph = graph
        self.spread = statistic == "std"
        sizes = [j.n_nodes for j in graph.junctions]
        self.abs_sum = None if self.spread else [np.zeros(n) for n in sizes]
        self.count = [np.zeros(n) for n in sizes]
        self.sum = [np.zeros(n) for n in sizes] if self.spread else None
        self.sq_sum = [np.zeros(n) for n in sizes] if self.spread else None

    def taps(self) -> dict:
        """Junction fx node -> the junctions read there (a q/k sink shares its tensor)."""
        taps: dict = {}
        for j in self.graph.junctions:
            taps.setdefault(j.name.split(":sink")[0], []).append(j.index)
        return taps

    def observe(self, index: int, t: torch.Tensor) -> None:
        j = self.graph.junctions[index]
        x = t.detach()
        if x.dtype != torch.float64:
            x = x.float()
        other = [d for d in range(x.dim()) if d not in j.channel_dims]
        mask = _validity(j, x)
        xm = x if mask is None else x * mask
        # per feature: sum x (the spread's first moment) or sum |x|; a NaN / inf makes it
        # non-finite either way
        v = xm if self.spread else xm.abs()
        s = v.sum(other, keepdim=True) if other else v
        feat_t = s.reshape([n for d, n in enumerate(x.shape) if d not in other])
        if not torch.isfinite(feat_t).all():
            raise CalibrationError(
                f"non-finite (NaN/inf) activations at the input of {self._where(j)}: check the "
                "model and the calibration data")
        if tuple(feat_t.shape) != tuple(j.node_ids.shape):
            raise CalibrationError(
                f"{self._where(j)}: a batch gave {tuple(feat_t.shape)} channels where the traced "
                f"graph has {tuple(j.node_ids.shape)}; every calibration batch must have the "
                "same shape beyond the batch dimension")
        if mask is None:
            n_other = int(np.prod([x.shape[d] for d in other])) if other else 1
            cnt = np.full(feat_t.numel(), float(n_other))
        else:
            cnt = _numpy(_per_feature(mask.expand(x.shape), other)).astype(np.float64)
        g = j.group
        ok = g >= 0
        np.add.at(self.count[index], g[ok], cnt[ok])
        if self.spread:
            self._add_moments(index, x, mask, other, s, cnt)
        else:
            np.add.at(self.abs_sum[index], g[ok], _numpy(feat_t).astype(np.float64)[ok])

    def _add_moments(self, index: int, x: torch.Tensor, mask, other: list, s: torch.Tensor,
                     cnt: np.ndarray) -> None:
        """Add ``sum x`` and ``sum x^2`` of one batch (through its centred second moment);
        ``s``: the per-feature ``sum x`` (dims ``other`` kept)."""
        g = self.graph.junctions[index].group
        ok = g >= 0
        n = torch.from_numpy(cnt).to(x.dtype).reshape(s.shape).clamp_min(1.0)
        m = s / n                                   # the feature's batch mean, x's dtype
        c = x - m                                   # one full-size temporary, squared in place
        if mask is not None:
            c.mul_(mask)
        q = _numpy(_per_feature(c.square_(), other)).astype(np.float64)
        m64 = _numpy(m).astype(np.float64)
        np.add.at(self.sum[index], g[ok], (cnt * m64)[ok])
        np.add.at(self.sq_sum[index], g[ok], (q + cnt * m64 * m64)[ok])

    def _where(self, j: Junction) -> str:
        if j.is_output:
            return "the model output"
        if j.consumers:
            return f"layer {self.graph.layers[j.consumers[0]].name!r}"
        return f"the tensor {j.name!r}"

    def values(self) -> list:
        """The unnormalised value of every node, one array per junction: the mean |x|, or
        the spread (a variance below 1e-12 of the mean square, under float32 resolution, is
        0)."""
        out = []
        for j, c in zip(self.graph.junctions, self.count):
            if j.n_nodes and not (c > 0).any():
                raise CalibrationError(f"junction {j.name!r} saw no activation during "
                                       "calibration")
            if not self.spread:
                out.append(_mean(self.abs_sum[j.index], c))
                continue
            m1, m2 = _mean(self.sum[j.index], c), _mean(self.sq_sum[j.index], c)
            var = m2 - m1 * m1
            var[var <= 1e-12 * np.maximum(m2, 1e-300)] = 0.0    # below float32 resolution
            out.append(np.sqrt(var))
        return out


class FallbackInputs:
    """Mean |input| per contraction feature (the last dim of a Linear's input, dim 1 of a
    convolution's) of every weight layer the channel graph cannot score: the activation-weighted
    fallback of :class:`~tp_curvature.importance.CurvatureImportance` reads it."""

    def __init__(self, graph: ChannelGraph):
        self.graph = graph
        self.sums: dict = {}                 # layer index -> [sum |x| per feature, count]

    def taps(self) -> dict:
        nodes = {n.name: n for n in self.graph.program.gm.graph.nodes}
        taps: dict = {}
        for l in self.graph.layers:
            if self.graph.scoreable(l):
                continue
            for name in l.nodes:
                arg = nodes[name].args[0] if nodes[name].args else None
                if arg is not None and hasattr(arg, "name"):
                    taps.setdefault(arg.name, []).append(l.index)
        return taps

    def observe(self, index: int, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return
        l = self.graph.layers[index]
        dim = x.dim() - 1 if l.kind == "linear" else min(1, x.dim() - 1)
        a = x.detach().abs().to(torch.float64).movedim(dim, -1)
        feat = _numpy(a.reshape(-1, a.shape[-1]).sum(0))
        cnt = a.numel() // max(a.shape[-1], 1)
        prev = self.sums.get(index)
        if prev is None or prev[0].shape != feat.shape:
            self.sums[index] = [feat, float(cnt)]
        else:
            prev[0] += feat
            prev[1] += cnt

    def means(self) -> dict:
        return {k: f / max(c, 1.0) for k, (f, c) in self.sums.items()}


def _validity(j: Junction, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The junction's mask of positions that carry a node (a class-token row), as float."""
    if j.valid is None:
        return None
    try:
        return j.valid.to(x.device).expand(x.shape).to(x.dtype)
    except RuntimeError:
        return None


def _per_feature(t: torch.Tensor, other: list) -> torch.Tensor:
    return t.sum(other) if other else t


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).cpu().numpy()


def _mean(s: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.divide(s, c, out=np.zeros_like(s), where=c > 0)


# ------------------------------------------------------------------------------ results
class UnvalidatedCurvatureWarning(UserWarning):
    """The model has constructs whose curvature is not yet checked against an independent
    reference (see docs/method.md, open work)."""


def _warn_unvalidated(graph: ChannelGraph) -> None:
    if graph.unvalidated:
        warnings.warn(
            f"tp_curvature: this model has {', '.join(graph.unvalidated)} junctions; their "
            "curvature is computed but not yet validated against an independent exact "
            "reference (open work, see docs/method.md): treat those layers' scores with care",
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
    raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
