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

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

from .curvature import CurvatureConfig, LayerCurvature, build_layer_problem, graph_curvature
from .graph import ChannelGraph
from .hooks import (CalibrationData, CalibrationError, as_batches, calibrate_graph,
                    check_max_batches)

OUT_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels,
           function.prune_depthwise_conv_out_channels)
IN_FNS = (function.prune_conv_in_channels, function.prune_linear_in_channels,
          function.prune_depthwise_conv_in_channels)
REDUCTIONS = ("mean", "min", "neg_sum")


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


class _ModelScores:
    """Calibration and curvature of one model, recomputed when its fingerprint changes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.fingerprint = None
        self.graph: Optional[ChannelGraph] = None
        self.acts = None
        self.curv: Optional[dict] = None
        self.by_module: dict = {}


class CurvatureImportance(tp.importance.GroupMagnitudeImportance):
    """Neural-curvature (Ollivier-Ricci) channel importance for Torch-Pruning pruners.

    Usage::

        imp = CurvatureImportance(topk=16)   # same as config=CurvatureConfig(topk=16)
        imp.calibrate(model, calib_loader)        # a tensor, a list of batches or a loader
        pruner = tp.pruner.BasePruner(model, example_inputs, importance=imp, pruning_ratio=0.5)
        pruner.step()

    Every option is checked when the object is built (``ValueError`` naming the option).

    Calibration data (see :class:`~tp_curvature.hooks.CalibrationData`): a tensor (one batch),
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
        ``measure``, ``p``, ``normalize``, ``topk``, ``backend``, ``backend_options``; see
        :class:`~tp_curvature.curvature.CurvatureConfig`). ``p`` is also the norm of
        Torch-Pruning's ``GroupMagnitudeImportance`` base.
    **config_fields
        Shortcut: the fields of :class:`~tp_curvature.curvature.CurvatureConfig` as keywords
        (``CurvatureImportance(alpha=0.5, topk=8)`` is
        ``CurvatureImportance(config=CurvatureConfig(alpha=0.5, topk=8))``). Passing both
        ``config`` and fields raises ``TypeError``.
    reduction : {"mean", "min", "neg_sum"}
        How a channel's connection curvatures become its score (see the module docstring).
    group_reduction : {"mean", "sum", "max", "prod", "first", "gate"}
        As in Torch-Pruning's ``GroupMagnitudeImportance``.
    normalizer : None, callable or {"mean", "sum", "max", "gaussian", "standarization", "lamp", "sentinel_<q>"}
        As in Torch-Pruning's ``GroupMagnitudeImportance``.
    max_batches : int, optional
        Use at most this many calibration batches (any form); required for a one-shot
        iterator. A positive int or None.
    progress : bool or None
        tqdm progress bars for calibration and curvature; None (default) shows the curvature
        bar only for graphs of over a million connections.
    """

    def __init__(self, config: Optional[CurvatureConfig] = None, *, reduction: str = "mean",
                 group_reduction: str = "mean", normalizer: Optional[str] = "mean",
                 max_batches: Optional[int] = None, progress: Optional[bool] = None,
                 **config_fields):
        if config is None:
            config = CurvatureConfig(**config_fields)
        elif not isinstance(config, CurvatureConfig):
            raise TypeError(f"config must be a CurvatureConfig, got {type(config).__name__}; "
                            "pass CurvatureConfig fields as keywords instead")
        elif config_fields:
            raise TypeError(f"pass either config=CurvatureConfig(...) or its fields as keywords, "
                            f"not both (got config and {sorted(config_fields)})")
        super().__init__(p=config.p, group_reduction=group_reduction, normalizer=normalizer)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if group_reduction not in GROUP_REDUCTIONS:
            raise ValueError(f"group_reduction must be one of {GROUP_REDUCTIONS}, got "
                             f"{group_reduction!r}")
        check_normalizer(normalizer)
        if progress not in (None, True, False):
            raise ValueError(f"progress must be True, False or None, got {progress!r}")
        self.reduction = reduction
        self.config = config
        self.max_batches = check_max_batches(max_batches)
        self.progress = progress
        self.model: Optional[nn.Module] = None
        self._data: Optional[CalibrationData] = None
        self._forward_fn = None
        self._own: Optional[_ModelScores] = None      # the calibrated model
        self._other: Optional[_ModelScores] = None    # the last other model a pruner asked for

    # ------------------------------------------------------------------ calibration
    def calibrate(self, model: nn.Module, data, forward_fn: Optional[Callable] = None,
                  max_batches: Optional[int] = None) -> "CurvatureImportance":
        """Trace the graph of ``model`` and record its activations on ``data``.

        ``data``: a tensor (one batch), a tuple ``(inputs, targets)`` (one batch, any target
        dtype/shape), a dict (one batch, needs ``forward_fn``), a list of batches (tensors,
        ``(inputs, targets)`` tuples/lists or dicts) or any iterable/``DataLoader`` of them;
        see :class:`~tp_curvature.hooks.CalibrationData`. It is read in one streaming pass
        (at most ``max_batches`` batches, default the constructor's). What is kept for the
        recomputations (when the model changes, see the class docstring): a re-iterable
        source by reference (streamed again, nothing copied); a one-shot iterator, which
        must come with ``max_batches``, its at most ``max_batches`` batches.

        ``forward_fn(model, batch) -> output`` handles batches that are not a tensor or an
        ``(inputs, targets)`` pair (default: ``model(batch)`` or ``model(batch[0])``).
        On error the previous calibration (if any) is left as it was.
        """
        cap = self.max_batches if max_batches is None else check_max_batches(max_batches)
        data = as_batches(data, cap, forward_fn)
        own = _ModelScores(model)
        self._recalibrate(own, data, forward_fn)
        self.model, self._data, self._forward_fn = model, data, forward_fn
        self._own, self._other = own, None
        return self

    def _recalibrate(self, state: _ModelScores, data=None, forward_fn=None):
        data = self._data if data is None else data
        cal = calibrate_graph(state.model, data, forward_fn or self._forward_fn,
                              self.config.normalize, bool(self.progress))
        state.graph, state.acts, state.curv, state.by_module = cal.graph, cal.acts, None, {}
        state.fingerprint = _fingerprint(state.model)

    def _refresh(self, compute_curvature: bool = True, model: Optional[nn.Module] = None
                 ) -> _ModelScores:
        """The up-to-date scores of ``model`` (default: the calibrated model)."""
        if self.model is None:
            raise RuntimeError("CurvatureImportance needs calibration data: call "
                               "imp.calibrate(model, data) before pruning")
        if model is None or model is self.model:
            state = self._own
        else:
            if self._other is None or self._other.model is not model:
                self._other = _ModelScores(model)
            state = self._other
        if state.fingerprint is None or _fingerprint(state.model) != state.fingerprint:
            self._recalibrate(state)
        if compute_curvature and state.curv is None:
            state.curv = graph_curvature(state.graph, state.acts, self.config, self.progress)
            state.by_module = {id(lc.module): lc for lc in state.curv.values()}
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
        (``kappa[u, v]``: input channel u -> output channel v)."""
        return dict(self._refresh().curv)

    def layer_problems(self) -> dict:
        """Layer name -> :class:`~tp_curvature.problem.LayerPairProblem` (for benchmarks)."""
        st = self._refresh(compute_curvature=False)
        return {l.name: build_layer_problem(st.graph, l, st.acts, self.config)
                for l in st.graph.layers if l.out_junctions}

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
        curv = self._refresh().curv
        a = self.config.alpha
        return {n: (reduce_kappa(lc.kappa, 1, self.reduction, a),
                    reduce_kappa(lc.kappa, 0, self.reduction, a)) for n, lc in curv.items()}

    # ------------------------------------------------------------------ Torch-Pruning API
    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        if self.model is None:
            self._refresh()                      # raises: not calibrated
        by_module = self._refresh(model=self._group_model(group)).by_module
        alpha = self.config.alpha
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            fn = dep.pruning_fn
            lc: Optional[LayerCurvature] = by_module.get(id(layer))
            if lc is None:
                continue
            idxs = np.asarray(idxs, dtype=np.int64)
            root_idxs = group[i].root_idxs
            if fn in OUT_FNS:
                local = reduce_kappa(lc.kappa[:, idxs], 0, self.reduction, alpha)
            elif fn in IN_FNS:
                nodes = lc.in_group[idxs]
                local = reduce_kappa(lc.kappa[nodes, :], 1, self.reduction, alpha)
            else:
                continue
            local = torch.as_tensor(local, dtype=torch.float32)
            if self.group_reduction in ("mean", "sum") and len(root_idxs):
                # several features of one channel (a Linear after flatten) share a root index:
                # each carries an equal share so the channel counts once
                r = torch.as_tensor([-1 if x is None else x for x in root_idxs])
                if (r >= 0).all():
                    counts = torch.bincount(r)[r].to(local.dtype)
                    local = local / counts
            group_imp.append(local)
            group_idxs.append(root_idxs)
        if not group_imp:
            return None
        imp = self._reduce(group_imp, group_idxs)
        return self._normalize(imp, self.normalizer)
