"""``CurvatureImportance``: neural curvature as a Torch-Pruning criterion.

A channel's score comes from the curvature of its connections: for an output channel ``v`` of
a layer, its incoming connections ``kappa[:, v]``; for an input channel ``u`` of a consumer
layer, its outgoing connections ``kappa[u, :]``. Bottlenecks (negative curvature) are
important, so the per-layer score of a channel is

=============  ==================================================================
``reduction``  score (higher = more important, always >= 0)
=============  ==================================================================
``"mean"``     :math:`\\kappa_{max} - \\operatorname{mean}_e \\kappa_e`
``"min"``      :math:`\\kappa_{max} - \\min_e \\kappa_e` (its strongest bottleneck)
``"neg_sum"``  :math:`\\sum_e \\max(-\\kappa_e, 0)` (total bottleneck mass)
=============  ==================================================================

with :math:`\\kappa_{max} = 1/(1-\\alpha)` the largest possible curvature (``W_1 = 0``), so
scores are non-negative and Torch-Pruning's normalizers (``mean``, ``sum``, ``max``, ``lamp``)
keep their meaning. Per-layer scores are indexed by the group's ``idxs``, scattered by
``root_idxs`` and combined with ``group_reduction`` / ``normalizer`` exactly as
``GroupMagnitudeImportance`` does. A dead channel (zero activation on the calibration data) or
one whose weights are all zero has every connection at ``kappa = 1``: a finite, low score,
removed first. BatchNorm layers contribute no score of their own (their scale is folded into
the connection lengths).

Scores are recomputed (graph, calibration pass, curvature) whenever the model's module tree,
parameters or buffers change (see :class:`CurvatureImportance`), so ``iterative_steps > 1``
sees the pruned network.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

from ._export import UnsupportedModelError
from .calibration import CalibrationData, CalibrationError, calibrate, check_max_batches
from .config import CurvatureConfig, resolve_config
from .curvature import LayerCurvature, graph_curvature, layer_problems
from .graph import ChannelGraph

OUT_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels,
           function.prune_depthwise_conv_out_channels)
IN_FNS = (function.prune_conv_in_channels, function.prune_linear_in_channels,
          function.prune_depthwise_conv_in_channels)
MHA_FNS = (function.prune_multihead_attention_out_channels,
           function.prune_multihead_attention_in_channels)
EMBED_FNS = (function.prune_embedding_out_channels,)
#: the layer items Torch-Pruning's GroupMagnitudeImportance scores
BUILTIN_LAYER_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels,
                     function.prune_conv_in_channels, function.prune_linear_in_channels)
REDUCTIONS = ("mean", "min", "neg_sum")
SIDES = ("both", "consumer")


def feature_share(local: torch.Tensor, root_idxs, group_reduction) -> torch.Tensor:
    """Several features of one channel (a Linear after flatten) share a root index: under a
    ``mean`` / ``sum`` group reduction each carries an equal share, so the channel counts once
    in the group (as one item), not once per feature."""
    if group_reduction in ("mean", "sum") and len(root_idxs):
        r = torch.as_tensor(root_idxs)
        if (r >= 0).all():
            return local / torch.bincount(r)[r].to(local.dtype)
    return local


def reduce_kappa(kappa: np.ndarray, axis: int, reduction: str, alpha: float) -> np.ndarray:
    """Channel scores from a kappa matrix, reducing over ``axis`` (NaN = no connection)."""
    kmax = 1.0 / (1.0 - alpha)
    absent = np.isnan(kappa)
    has = (~absent).any(axis=axis)             # channels without any connection count as kappa=1
    if reduction == "mean":
        cnt = (~absent).sum(axis=axis)
        red = np.where(has, np.where(absent, 0.0, kappa).sum(axis=axis) / np.maximum(cnt, 1), 1.0)
        return kmax - red
    if reduction == "min":
        red = np.where(has, np.min(np.where(absent, np.inf, kappa), axis=axis), 1.0)
        return kmax - red
    if reduction == "neg_sum":
        return np.maximum(-np.where(absent, 1.0, kappa), 0.0).sum(axis=axis)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


@dataclass
class ChannelCurvature:
    """One layer's curvature reduced to its channels: all that scoring reads, kept instead of
    the connections' kappa (a ViT-B/16 has 85.7M connections; these are per channel).

    ``rows[u]``: input node u's score from its outgoing connections ``kappa[u, :]``;
    ``cols[v]``: output channel v's from its incoming ``kappa[:, v]`` (:func:`reduce_kappa`
    with ``reduction``); ``in_group`` maps the module's input features to nodes (as in
    :class:`~tp_curvature.curvature.LayerCurvature`); ``n_connections`` / ``n_solved``
    count the structural and the solved connections; ``constant`` is the kappa of every
    connection when they are all equal (scores that are ties), else None.
    """
    name: str
    module: nn.Module
    in_group: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    reduction: str
    n_connections: int
    n_solved: int
    constant: Optional[float] = None

    @classmethod
    def of(cls, lc: LayerCurvature, reduction: str, alpha: float) -> "ChannelCurvature":
        k = lc.kappa
        finite = k[np.isfinite(k)]
        constant = (float(finite[0]) if finite.size > 1 and min(k.shape) > 1
                    and float(np.ptp(finite)) == 0.0 else None)
        return cls(lc.name, lc.module, lc.in_group, reduce_kappa(k, 1, reduction, alpha),
                   reduce_kappa(k, 0, reduction, alpha), reduction,
                   int(lc.exists.sum()), int(lc.solved.sum()), constant)


GROUP_REDUCTIONS = ("mean", "sum", "max", "prod", "first", "gate")
NORMALIZERS = ("mean", "sum", "max", "gaussian", "standarization", "lamp", "sentinel_<q>")


def check_normalizer(normalizer):
    """Torch-Pruning's ``_normalize`` options: None, a callable, one of :data:`NORMALIZERS`
    (``sentinel_<q>``, q in [0, 1): divide by the q-quantile score)."""
    if normalizer is None or callable(normalizer) or normalizer in NORMALIZERS[:-1]:
        return
    if isinstance(normalizer, str) and normalizer.startswith("sentinel_"):
        try:
            q = float(normalizer.split("_", 1)[1])
        except ValueError:
            q = float("nan")
        if 0.0 <= q < 1.0:
            return
    raise ValueError(f"normalizer must be None, a callable or one of {NORMALIZERS} "
                     f"(q in [0, 1)), got {normalizer!r}")


def _fingerprint(model: nn.Module) -> tuple:
    """What the scores of ``model`` depend on: the module tree (names, ids, types) and every
    parameter and buffer (name, id, storage pointer, shape, dtype, device, ``_version``) plus a
    content checksum per tensor (float64 sum and sum of squares, so that writes through
    ``.data``, which do not bump ``_version``, are seen)."""
    tree = tuple((n, id(m), type(m)) for n, m in model.named_modules())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = tuple((n, id(t), t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), t._version)
                 for n, t in tensors)
    check = b"".join(_checksum(t.detach()).tobytes() for _, t in tensors)
    return tree, meta, check


def _checksum(t: torch.Tensor) -> np.ndarray:
    """Float64 sum and sum of squares of a tensor: a content check cheap enough to run at
    every scoring call (NumPy reductions on CPU, no copy; torch reductions elsewhere)."""
    if t.numel() == 0 or t.is_complex():
        return np.zeros(0)
    if t.device.type != "cpu" or t.dtype in (torch.bfloat16, torch.float16):
        t = t.double()
        return torch.stack([t.sum(), t.square().sum()]).cpu().numpy()
    a = t.numpy().ravel()
    if a.dtype.kind == "b":
        return np.array([a.sum(dtype=np.float64), 0.0])
    return np.array([np.add.reduce(a, dtype=np.float64), float(np.vdot(a, a))])


def _describe_change(old, model: nn.Module, own: bool = True) -> str:
    """What differs between the fingerprint ``old`` and ``model`` now, in words (the
    parameters / buffers whose shape changed, the submodules added, removed or swapped)."""
    if old is None:
        return ("a model other than the calibrated one" if not own else "fingerprint unknown")
    tree0, meta0, _ = old
    before = {n: (shape, dtype) for n, _, _, shape, dtype, _, _ in meta0}
    now = {n: (tuple(t.shape), t.dtype) for n, t in
           list(model.named_parameters()) + list(model.named_buffers())}
    out = []
    for n in before:
        if n in now and now[n][0] != before[n][0]:
            out.append(f"{n!r} has shape {now[n][0]}, was {before[n][0]}")
        elif n in now and now[n][1] != before[n][1]:
            out.append(f"{n!r} is {now[n][1]}, was {before[n][1]}")
    types0 = {n: t for n, _, t in tree0}
    types1 = {n: type(m) for n, m in model.named_modules()}
    out += [f"submodule {n!r} is a {types1[n].__name__}, was a {types0[n].__name__}"
            for n in types0 if n in types1 and types1[n] is not types0[n]]
    out += [f"submodule {n!r} was removed" for n in types0 if n not in types1]
    out += [f"submodule {n!r} was added" for n in types1 if n not in types0]
    if not out:
        return "its parameters changed"
    return "; ".join(out[:4]) + (f"; and {len(out) - 4} more" if len(out) > 4 else "")


class UninformativeCalibrationWarning(UserWarning):
    """The calibration data does not tell the channels of some layers apart: their scores are
    ties, not a ranking."""


def _warn_ties(curv: dict, model_name: str) -> None:
    """One warning naming the layers whose connections all have the same curvature (every
    channel silent or alike on the calibration data, e.g. one image with constant channels):
    their channel scores are ties that only look like scores."""
    tied = [(name, cc.constant) for name, cc in curv.items() if cc.constant is not None]
    if not tied:
        return
    names = ", ".join(repr(n) for n, _ in tied[:8]) + (f" and {len(tied) - 8} more"
                                                       if len(tied) > 8 else "")
    warnings.warn(
        f"CurvatureImportance: the calibration data does not tell the channels of "
        f"{len(tied)} layer(s) of {model_name} apart ({names}): every connection of such a "
        f"layer has the same curvature (kappa = {tied[0][1]:g}: its channels are silent or "
        "alike on the data, or its weights are all zero), so their scores are ties, not a "
        "ranking. Calibrate on more, and more varied, data", UninformativeCalibrationWarning,
        stacklevel=4)


class _ModelScores:
    """Calibration and curvature of one model, recomputed when its fingerprint changes.

    It pickles (and deep-copies) without what is keyed by object ids (module names, the
    layer curvatures by module, the fingerprint) or held by the exported program; those are
    rebuilt for the unpickled model on first use (:meth:`rebind`), so the scores are kept,
    not recomputed, when the model is the one they were computed for."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.fingerprint = None
        self.graph: Optional[ChannelGraph] = None
        self.acts = None
        self.layer_inputs: dict = {}                # unscoreable layer index -> mean |input|
        self.curv: Optional[dict] = None            # layer name -> ChannelCurvature
        self.full: Optional[dict] = None            # layer name -> LayerCurvature, on request
        self.by_module: dict = {}
        self.failure: Optional[str] = None          # why no graph could be built (fallback)
        self.coverage = {"curvature": set(), "fallback": set()}
        self.tie_warned = False
        self._rebind: Optional[bool] = None         # after unpickling: were the scores fresh

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_rebind"] = (self.fingerprint is not None
                            and _fingerprint(self.model) == self.fingerprint)
        state["names"], state["by_module"], state["fingerprint"] = {}, {}, None
        state["full"] = None
        return state

    def rebind(self) -> None:
        """After unpickling: the id-keyed tables of the (new) model objects, and its
        fingerprint when the pickled scores were up to date."""
        if self._rebind is None:
            return
        fresh, self._rebind = self._rebind, None
        self.names = {id(m): n for n, m in self.model.named_modules()}
        if self.graph is not None:
            self.graph.rebind()
        if self.curv is not None:
            self.by_module = {id(lc.module): lc for lc in self.curv.values()}
        self.fingerprint = _fingerprint(self.model) if fresh else None


class CurvatureImportance(tp.importance.GroupMagnitudeImportance):
    """Neural-curvature (Ollivier-Ricci) channel importance for Torch-Pruning pruners.

    Usage::

        imp = CurvatureImportance(topk=16)   # same as config=CurvatureConfig(topk=16)
        imp.calibrate(model, calib_loader)        # a tensor, a list of batches or a loader
        pruner = tp.pruner.BasePruner(model, example_inputs, importance=imp, pruning_ratio=0.5)
        pruner.step()

    Every option is checked when the object is built (``ValueError`` naming the option).

    Calibration data (see :class:`~tp_curvature.calibration.CalibrationData`): a tensor (one batch),
    a tuple ``(inputs, targets)`` (one batch, any target dtype), a dict (one batch, needs
    ``forward_fn``), a list of batches or any iterable / ``DataLoader`` of batches. It is read
    in one streaming pass. A re-iterable source (list, tensor, ``DataLoader``) is kept by
    reference and streamed again when the scores are recomputed; a one-shot iterator
    (generator, ``iter(loader)``) must come with ``max_batches``, and its first
    ``max_batches`` batches are then kept in memory.

    Scores are recomputed (graph, calibration pass, curvature) whenever the model's module
    tree (a submodule added, removed or swapped), a parameter or buffer (replaced, reshaped,
    changed in place, also through ``.data``: a float64 sum and sum-of-squares checksum per
    tensor is compared) changes, so ``iterative_steps > 1`` sees the pruned network. A
    ``.data`` write that keeps every tensor's sum and sum of squares (e.g. swapping two rows)
    is not seen: call :meth:`calibrate` again after such a change.

    The pruner's model: a Torch-Pruning group carries its dependency graph (``group._DG``),
    whose ``model`` is the model being pruned. When that is not the calibrated model (a
    ``copy.deepcopy``, a model rebuilt from a checkpoint), the calibration pipeline runs again
    on the pruner's model with the retained calibration data and that model is scored (one
    such other model is cached at a time). When a group does not say its model (``_DG`` is
    None) and its layers are not in the calibrated model, :class:`CalibrationError` ("...
    calibrated on a different model ...") is raised rather than scoring nothing.

    Parameters
    ----------
    config : CurvatureConfig, optional
        The curvature definition and its solver (``alpha``, ``variant``, ``length``,
        ``measure``, ``p``, ``normalize``, ``node_value``, ``topk``, ``backend``,
        ``backend_options``; see
        :class:`~tp_curvature.curvature.CurvatureConfig`). ``p`` is also the norm of
        Torch-Pruning's ``GroupMagnitudeImportance`` base.
    **config_fields
        Shortcut: the fields of :class:`~tp_curvature.curvature.CurvatureConfig` as keywords
        (``CurvatureImportance(alpha=0.5, topk=8)`` is
        ``CurvatureImportance(config=CurvatureConfig(alpha=0.5, topk=8))``). Passing both
        ``config`` and fields raises ``TypeError``.
    reduction : {"mean", "min", "neg_sum"}
        How a channel's connection curvatures become its score (see the module docstring).
    sides : {"both", "consumer"}
        Which connections of a channel enter its score: ``"both"`` (default) its incoming
        connections (as an output channel of its producer) and its outgoing ones (as an input
        channel of its consumers); ``"consumer"`` only the outgoing ones, where the channel is
        read, as Wanda and FLAP score (the incoming ones are used only for a group without a
        scored consumer).
    group_reduction : {"mean", "sum", "max", "prod", "first", "gate"} or None
        As in Torch-Pruning's ``GroupMagnitudeImportance``. ``None``: no reduction, the
        per-item scores stacked in group order, one row per item the built-in scores
        (Conv / Linear input or output channels, affine BatchNorm / LayerNorm; a norm's row
        is the mean of the layer rows at its channels, its scale being folded into the
        connections), so the output has the built-in's shape.
    normalizer : None, callable or {"mean", "sum", "max", "gaussian", "standarization", "lamp", "sentinel_<q>"}
        As in Torch-Pruning's ``GroupMagnitudeImportance``.
    max_batches : int, optional
        Use at most this many calibration batches (any form); required for a one-shot
        iterator. A positive int or None.
    progress : bool or None
        tqdm progress bars for calibration and curvature; None (default) shows the curvature
        bar only for graphs of over a million connections.

    Examples
    --------
    >>> import torch, torch.nn as nn, torch_pruning as tp
    >>> from tp_curvature import CurvatureImportance
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                       nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    >>> images = torch.randn(16, 3, 8, 8)
    >>> imp = CurvatureImportance(topk=8).calibrate(model, images)
    >>> pruner = tp.pruner.BasePruner(model, images[:1], importance=imp, pruning_ratio=0.5,
    ...                               ignored_layers=[model[-1]])
    >>> pruner.step()
    >>> model[0].out_channels, model(images).shape
    (4, torch.Size([16, 4]))
    >>> imp.coverage()
    {'curvature': ['0', '4'], 'fallback': []}
    """

    def __init__(self, config: Optional[CurvatureConfig] = None, *, reduction: str = "mean",
                 sides: str = "both", group_reduction: Optional[str] = "mean",
                 normalizer: Optional[str] = "mean",
                 max_batches: Optional[int] = None, progress: Optional[bool] = None,
                 **config_fields):
        config = resolve_config(config, config_fields)
        super().__init__(p=config.p, group_reduction=group_reduction, normalizer=normalizer)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if sides not in SIDES:
            raise ValueError(f"sides must be one of {SIDES}, got {sides!r}")
        if group_reduction is not None and group_reduction not in GROUP_REDUCTIONS:
            raise ValueError(f"group_reduction must be None or one of {GROUP_REDUCTIONS}, got "
                             f"{group_reduction!r}")
        check_normalizer(normalizer)
        if progress not in (None, True, False):
            raise ValueError(f"progress must be True, False or None, got {progress!r}")
        self.reduction = reduction
        self.sides = sides
        self.config = config
        self.max_batches = check_max_batches(max_batches)
        self.progress = progress
        self.model: Optional[nn.Module] = None
        self._data: Optional[CalibrationData] = None
        self._warned: set = set()                     # layers whose fallback was announced
        self._own: Optional[_ModelScores] = None      # the calibrated model
        self._other: Optional[_ModelScores] = None    # the last other model a pruner asked for
        self._last: Optional[_ModelScores] = None

    # ------------------------------------------------------------------ calibration
    def calibrate(self, model: nn.Module, data, forward_fn: Optional[Callable] = None,
                  max_batches: Optional[int] = None) -> "CurvatureImportance":
        """Trace the graph of ``model`` and record its activations on ``data``.

        ``data``: a tensor (one batch), a tuple ``(inputs, targets)`` (one batch, any target
        dtype/shape), a dict (one batch, needs ``forward_fn``), a list of batches (tensors,
        ``(inputs, targets)`` tuples/lists or dicts) or any iterable/``DataLoader`` of them;
        see :class:`~tp_curvature.calibration.CalibrationData`. It is read in one streaming pass
        (at most ``max_batches`` batches, default the constructor's). What is kept for the
        recomputations (when the model changes, see the class docstring): a re-iterable
        source by reference (streamed again, nothing copied); a one-shot iterator, which
        must come with ``max_batches``, its at most ``max_batches`` batches.

        ``forward_fn(model, batch) -> output`` handles batches that are not a tensor or an
        ``(inputs, targets)`` pair (default: ``model(batch)`` or ``model(batch[0])``).
        On error the previous calibration (if any) is left as it was.
        """
        cap = self.max_batches if max_batches is None else check_max_batches(max_batches)
        data = CalibrationData(data, cap, forward_fn)
        own = _ModelScores(model)
        self._recalibrate(own, data)
        self.model, self._data = model, data
        self._own, self._other = own, None
        return self

    def _recalibrate(self, state: _ModelScores, data: Optional[CalibrationData] = None):
        recompute = data is None
        try:
            data = self._data if data is None else data
            cal = calibrate(state.model, data, self.config, bool(self.progress))
        except UnsupportedModelError as exc:
            if "no Linear or Conv" in str(exc):
                raise
            # the whole model falls back (one warning when it is scored)
            state.graph, state.acts, state.curv, state.by_module = None, None, {}, {}
            state.full = None
            state.layer_inputs = {}
            state.failure = str(exc)
        except CalibrationError:
            raise
        except Exception as exc:
            if not recompute:
                raise                     # the user's own error (model, forward_fn, data)
            # the retained data no longer runs through the model that changed
            raise CalibrationError(
                f"the model changed since it was calibrated ("
                f"{_describe_change(state.fingerprint, state.model, state is self._own)}) "
                f"and the retained calibration data no longer runs through it: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                ". Call imp.calibrate(model, data) with data that fits the changed model"
            ) from exc
        else:
            state.graph, state.acts, state.curv, state.by_module = cal.graph, cal.acts, None, {}
            state.full = None
            state.layer_inputs = cal.layer_inputs
            state.failure = None
        state.coverage = {"curvature": set(), "fallback": set()}
        state.tie_warned = False
        state.fingerprint = _fingerprint(state.model)

    def _refresh(self, compute_curvature: bool = True, model: Optional[nn.Module] = None,
                 full: bool = False) -> _ModelScores:
        """The up-to-date scores of ``model`` (default: the calibrated model); ``full``: also
        the connections' kappa (``state.full``), from which the channel reductions follow."""
        if self.model is None:
            raise RuntimeError("CurvatureImportance needs calibration data: call "
                               "imp.calibrate(model, data) before pruning")
        if model is None or model is self.model:
            state = self._own
        else:
            if self._other is None or self._other.model is not model:
                self._other = _ModelScores(model)
            state = self._other
        state.rebind()
        if state.fingerprint is None or _fingerprint(state.model) != state.fingerprint:
            self._recalibrate(state)
        if state.curv and next(iter(state.curv.values())).reduction != self.reduction:
            state.curv = None                     # imp.reduction changed since
        if full and state.full is None and state.graph is not None:
            state.full = graph_curvature(state.graph, state.acts, self.config, self.progress)
        if compute_curvature and state.curv is None:
            reduce = partial(ChannelCurvature.of, reduction=self.reduction,
                             alpha=self.config.alpha)
            if state.full is not None:
                state.curv = {n: reduce(lc) for n, lc in state.full.items()}
            else:
                state.curv = graph_curvature(state.graph, state.acts, self.config,
                                             self.progress, reduce=reduce)
            state.by_module = {id(cc.module): cc for cc in state.curv.values()}
            state.coverage = {"curvature": set(), "fallback": set()}
        if state.curv is not None and not state.tie_warned:
            state.tie_warned = True
            _warn_ties(state.curv, type(state.model).__name__)
        return state

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_last"] = None
        return state

    def _group_model(self, group) -> Optional[nn.Module]:
        """The model a group belongs to: its pruner's (``group._DG.model``), or the calibrated
        one when the group does not say and its layers are in it."""
        dg = getattr(group, "_DG", None)
        model = getattr(dg, "model", None)
        if isinstance(model, nn.Module):
            return model
        if self.model is None:
            return None
        mine = {id(m) for m in self.model.modules()}
        layers = [dep.layer for dep, _ in group if isinstance(dep.layer, nn.Module)]
        foreign = [m for m in layers if id(m) not in mine]
        if foreign:
            raise CalibrationError(
                f"CurvatureImportance was calibrated on a different model: this group's "
                f"{type(foreign[0]).__name__} layer is not in the calibrated "
                f"{type(self.model).__name__}, and the group does not carry its dependency "
                "graph (group._DG) to say which model it prunes. Call imp.calibrate(model, "
                "data) with the model being pruned")
        return self.model

    # ------------------------------------------------------------------ inspection
    def curvatures(self) -> dict:
        """Layer name -> :class:`~tp_curvature.curvature.LayerCurvature` of the current model
        (``kappa[u, v]``: input channel u -> output channel v).

        Scoring keeps only per-channel reductions (:meth:`channel_curvatures`); the first call
        computes the connections' kappa (the solver runs again if the model was scored
        already) and keeps them until the model changes."""
        return dict(self._refresh(full=True).full or {})

    def channel_curvatures(self) -> dict:
        """Layer name -> :class:`ChannelCurvature` (what scoring reads: per-channel reductions
        of kappa and the connection counts) of the current model."""
        return dict(self._refresh().curv)

    def layer_problems(self) -> dict:
        """Layer name -> :class:`~tp_curvature.problem.LayerPairProblem` (for benchmarks). A
        layer whose output channels reach several junctions (a packed q / k / v projection)
        gives one problem per junction, keyed ``"name->junction"``."""
        st = self._refresh(compute_curvature=False)
        out = {}
        for l in st.graph.layers:
            if not st.graph.scoreable(l):
                continue
            parts = list(layer_problems(st.graph, l, st.acts, self.config))
            if len(parts) == 1 and parts[0][0].size == l.out_channels:
                out[l.name] = parts[0][2]
                continue
            for _, Y, prob in parts:
                out[f"{l.name}->{st.graph.junctions[Y].name}"] = prob
        return out

    @property
    def graph(self) -> ChannelGraph:
        """The channel graph of the calibrated model (as it is now)."""
        return self._refresh(compute_curvature=False).graph

    @property
    def _fingerprint(self):
        """The fingerprint of the calibrated model the current scores belong to."""
        return None if self._own is None else self._own.fingerprint

    def channel_scores(self) -> dict:
        """Layer name -> ``(in_scores, out_scores)``: per input node and per output channel
        scores of that layer alone (before group reduction / normalisation)."""
        return {n: (cc.rows, cc.cols) for n, cc in self._refresh().curv.items()}

    # ------------------------------------------------------------------ Torch-Pruning API
    def coverage(self) -> dict:
        """``{"curvature": [...], "fallback": [...]}``: the names of the layers the latest
        scoring (the groups scored since the scores were last computed) scored by curvature
        and by the fallback (see :meth:`__call__`)."""
        st = self._other if self._other is not None and self._last is self._other else self._own
        if st is None:
            return {"curvature": [], "fallback": []}
        return {k: sorted(v) for k, v in st.coverage.items()}

    def _fallback(self, state, layer, fn, idxs, name) -> torch.Tensor:
        """The fallback score of a layer the channel graph cannot represent, divided by its
        mean over the layer's channels so that it has the scale of a curvature score (about 1).

        * Input channels of a Linear / Conv whose input was recorded in the calibration pass
          (every layer of an exported model; :class:`~tp_curvature.calibration.FallbackInputs`):
          **activation-weighted magnitude** (Wanda-like), ``mean|X_c| * sum_v |W[v, c]|``
          (L1 over the channel's weight slice; ``mean|X_c|`` over batch, positions and
          tokens), so a channel that is silent on the calibration data scores 0 however
          large its weights.
        * Everything else (output channels, ``nn.MultiheadAttention`` and ``nn.Embedding``
          channels, and every layer when no channel graph could be built, e.g. the model does
          not export): Torch-Pruning's magnitude ``sum |W|^p`` over the channel's weight slice
          (as GroupMagnitudeImportance).
        """
        p = self.p
        if fn in MHA_FNS:
            w = layer.out_proj.weight.detach()[idxs].flatten(1)
        elif fn in EMBED_FNS:
            w = layer.weight.detach().T.flatten(1)
            w = w / w.abs().pow(p).sum(1).mean().clamp(min=1e-30).pow(1 / p)
            return w[idxs].abs().pow(p).sum(1).float()
        else:
            W = layer.weight.detach()
            transposed = getattr(layer, "transposed", False)
            if fn in OUT_FNS:
                all_ = (W.transpose(0, 1) if transposed else W).flatten(1)
            else:
                all_ = (W if transposed else W.transpose(0, 1)).flatten(1)
            groups = getattr(layer, "groups", 1)
            x_mean = self._input_means(state, layer) if fn in IN_FNS else None
            if x_mean is not None:
                imp = all_.abs().sum(1).double()
            else:
                imp = all_.abs().pow(p).sum(1)
            if fn in IN_FNS and groups not in (1, getattr(layer, "in_channels", 1)):
                imp = imp.repeat(groups)
            if x_mean is not None and x_mean.numel() == imp.numel():
                imp = imp * x_mean.to(imp.device)
            imp = imp / imp.mean().clamp(min=1e-30)
            return imp[idxs].float()
        imp = w.abs().pow(p).sum(1)
        return (imp / imp.mean().clamp(min=1e-30)).float()

    @staticmethod
    def _input_means(state, layer) -> Optional[torch.Tensor]:
        """mean |input| per contraction feature of ``layer`` from the calibration pass, or
        None when it was not recorded."""
        graph = state.graph
        if graph is None:
            return None
        l = graph.layer_of_module.get(id(layer))
        x = state.layer_inputs.get(l.index) if l is not None else None
        return None if x is None else torch.as_tensor(x, dtype=torch.float64)

    def _warn_fallback(self, state, name, layer):
        if state.failure is not None:
            # no channel graph at all: one warning for the model, naming the construct
            key = ("model", id(state.model), state.failure)
            if key in self._warned:
                return
            self._warned.add(key)
            warnings.warn(f"CurvatureImportance: no channel graph could be built for "
                          f"{type(state.model).__name__} ({state.failure[:500]}); every layer "
                          "(imp.coverage()['fallback'] lists them) is scored by the documented "
                          "fallback (normalised activation-weighted magnitude of its input "
                          "channels, weight magnitude otherwise)", stacklevel=3)
            return
        if name in self._warned:
            return
        self._warned.add(name)
        ops = state.graph.unknown_ops if state.graph is not None else {}
        why = ("its input or output passes through an op the channel graph does not "
               f"represent ({', '.join(sorted(ops)) or 'shared weights or no consumer'})")
        warnings.warn(f"CurvatureImportance: layer {name!r} ({type(layer).__name__}) is not "
                      f"part of the channel graph: {why}; it is scored by the documented "
                      "fallback (normalised activation-weighted magnitude of its input "
                      "channels, weight magnitude otherwise)", stacklevel=3)

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        """Score a Torch-Pruning group.

        Per item: Conv/Linear out (in) channels from the incoming (outgoing) connections of the
        layer; an ``nn.MultiheadAttention``'s embed channels from its out-projection's incoming
        and its packed in-projection's outgoing connections; an ``nn.Embedding``'s channels
        from the outgoing connections of its junction (the layers that read it); norm and
        parameter items carry no score of their own (their scale is in the strengths); items
        whose ``root_idxs`` contain None (Torch-Pruning's GQA mapping) are skipped. A weight
        layer the graph cannot represent gets :meth:`_fallback` and ONE warning naming it;
        :meth:`coverage` lists both kinds.
        """
        if self.model is None:
            self._refresh()                      # raises: not calibrated
        state = self._refresh(model=self._group_model(group))
        self._last = state
        if self.group_reduction is None:
            return self._stacked(state, group)
        by_module = state.by_module
        group_imp, group_idxs = [], []
        skip_out = self.sides == "consumer" and any(
            dep.pruning_fn in IN_FNS and id(dep.layer) in by_module for dep, _ in group)
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            fn = dep.pruning_fn
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            if fn not in OUT_FNS and fn not in IN_FNS and fn not in MHA_FNS \
                    and fn not in EMBED_FNS:
                continue
            if skip_out and fn in OUT_FNS and id(layer) in by_module:
                continue
            local = self._item_score(state, layer, fn, idxs)
            group_imp.append(feature_share(local, root_idxs, self.group_reduction))
            group_idxs.append(root_idxs)
        if not group_imp:
            return None
        imp = self._reduce_to_root(group_imp, group_idxs, len(group[0].idxs))
        return self._normalize(imp, self.normalizer)

    def _item_score(self, state, layer, fn, idxs) -> torch.Tensor:
        """One group item's per-index scores (float32): its curvature scores, or the
        fallback (with its warning); recorded in :meth:`coverage`."""
        by_module, graph = state.by_module, state.graph
        idxs = np.asarray(idxs, dtype=np.int64)
        name = state.names.get(id(layer), type(layer).__name__)
        local = None
        if fn in MHA_FNS:
            parts = []
            lin = by_module.get(id(layer))
            if lin is not None:
                parts.append(lin.rows[lin.in_group[idxs]])
            lout = by_module.get(id(getattr(layer, "out_proj", None)))
            if lout is not None:
                parts.append(lout.cols[idxs])
            if parts:
                local = np.mean(parts, axis=0)
        elif fn in EMBED_FNS:
            j = graph.embedding_junctions.get(id(layer)) if graph is not None else None
            if j is not None:
                local = self._embedding_scores(state, j, idxs)
        else:
            cc: Optional[ChannelCurvature] = by_module.get(id(layer))
            if cc is not None:
                if fn in OUT_FNS:
                    local = cc.cols[idxs]
                else:
                    nodes = cc.in_group[idxs]
                    local = np.where(nodes >= 0, cc.rows[np.maximum(nodes, 0)], 0.0)
        if local is None:
            local = self._fallback(state, layer, fn, idxs, name)
            state.coverage["fallback"].add(name)
            self._warn_fallback(state, name, layer)
            return local
        state.coverage["curvature"].add(name)
        return torch.as_tensor(local, dtype=torch.float32)

    def _stacked(self, state, group) -> Optional[torch.Tensor]:
        """``group_reduction=None``: one row per item Torch-Pruning's
        ``GroupMagnitudeImportance`` scores (Conv / Linear input or output channels, affine
        BatchNorm / LayerNorm), in group order, each indexed by the item's ``idxs``
        (unreduced, unscattered), stacked and normalised as the built-in does. A norm item's
        row is the mean of the layer rows at its root channels (its scale is folded into
        the connections: it has no curvature of its own)."""
        rows, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.layer, dep.pruning_fn
            if fn in BUILTIN_LAYER_FNS and isinstance(layer, (nn.modules.conv._ConvNd,
                                                              nn.Linear)):
                rows.append(self._item_score(state, layer, fn, idxs))
            elif (fn == function.prune_batchnorm_out_channels and isinstance(
                    layer, nn.modules.batchnorm._BatchNorm) and layer.affine) or (
                    fn == function.prune_layernorm_out_channels and isinstance(
                        layer, nn.LayerNorm) and layer.elementwise_affine):
                rows.append(None)
            else:
                continue
            roots.append(group[i].root_idxs)
        if not rows:
            return None
        if any(r is None for r in rows):
            n_root = len(group[0].idxs)
            acc = torch.zeros(n_root, dtype=torch.float64)
            cnt = torch.zeros(n_root, dtype=torch.float64)
            for r, ridx in zip(rows, roots):
                if r is not None and len(r) == len(ridx) and all(x is not None for x in ridx):
                    ridx = torch.as_tensor(ridx, dtype=torch.long)
                    acc.index_add_(0, ridx, r.double())
                    cnt.index_add_(0, ridx, torch.ones(len(ridx), dtype=torch.float64))
            mean = (acc / cnt.clamp(min=1)).float()
            rows = [mean[torch.as_tensor([x if x is not None else 0 for x in ridx],
                                         dtype=torch.long)] if r is None else r
                    for r, ridx in zip(rows, roots)]
        return self._normalize(torch.stack(rows, dim=0), self.normalizer)

    #: how many identity edges an embedding's channels are followed through to a reader
    _EMBEDDING_DEPTH = 4

    def _embedding_scores(self, state, j, idxs) -> Optional[np.ndarray]:
        """An ``nn.Embedding``'s channel scores: the outgoing connections of the layers that
        read its junction, or, when none reads it directly (BERT's word, position and
        token-type embeddings are summed first), of the layers reading the junction its
        channels reach through identity edges (the sum), node for node; None when no
        layer is reached."""
        graph = state.graph
        nodes = j.node_ids.reshape(-1)[idxs].numpy()
        level = [(j.index, np.arange(j.n_nodes))]       # junction, j's node -> its node
        seen = set()
        for _ in range(self._EMBEDDING_DEPTH + 1):
            parts, nxt = [], []
            for ji, m in level:
                if ji in seen:
                    continue
                seen.add(ji)
                J = graph.junctions[ji]
                rows = m[nodes]
                for li in J.consumers:
                    cc = state.curv.get(graph.layers[li].name) if state.curv else None
                    if cc is not None and cc.rows.shape[0] == J.n_nodes and (rows >= 0).all():
                        parts.append(cc.rows[rows])
                for s_ in graph.successors(ji):
                    for t in graph.junctions[s_].inflows:
                        if t.kind != "junction" or t.src != ji:
                            continue
                        inv = np.full(J.n_nodes, -1, dtype=np.int64)
                        c = np.nonzero(t.idx >= 0)[0]
                        inv[t.idx[c]] = c
                        nxt.append((s_, np.where(m >= 0, inv[np.maximum(m, 0)], -1)))
            if parts:
                return np.mean(parts, axis=0)
            if not nxt:
                return None
            level = nxt
        return None

    #: an item that leaves ``group_reduction`` unchanged (Torch-Pruning's ``_reduce`` buffer)
    _NEUTRAL = {"sum": 0.0, "mean": 0.0, "max": -99999.0, "prod": 1.0, "gate": 0.0}

    def _reduce_to_root(self, group_imp, group_idxs, n_root: int) -> torch.Tensor:
        """Torch-Pruning's ``_reduce``, whose buffer takes the size of the first item: with
        ``sides="consumer"`` the first item can be a consumer whose features are more than
        the root's channels (a Linear after flatten), so a neutral root-sized item goes first
        (and is not counted in the mean)."""
        if group_imp[0].numel() == n_root or self.group_reduction is None:
            return self._reduce(group_imp, group_idxs)
        if self.group_reduction == "first":
            out = torch.zeros(n_root, dtype=torch.float32)
            return out.scatter_(0, torch.as_tensor(group_idxs[0]), group_imp[0].float())
        pad = torch.full((n_root,), self._NEUTRAL[self.group_reduction])
        out = self._reduce([pad, *group_imp], [list(range(n_root)), *group_idxs])
        if self.group_reduction == "mean":
            out = out * (len(group_imp) + 1) / len(group_imp)
        return out
