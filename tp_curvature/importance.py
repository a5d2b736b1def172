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

Scores are recomputed (graph, calibration pass, curvature) whenever the model's parameters
change, so ``iterative_steps > 1`` sees the pruned network.
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
from .hooks import as_batches, calibrate_graph, default_forward

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


class CurvatureImportance(tp.importance.GroupMagnitudeImportance):
    """Neural-curvature (Ollivier-Ricci) channel importance for Torch-Pruning pruners.

    Usage::

        imp = CurvatureImportance(topk=16)   # same as config=CurvatureConfig(topk=16)
        imp.calibrate(model, calib_loader)        # a tensor, a list of batches or a loader
        pruner = tp.pruner.BasePruner(model, example_inputs, importance=imp, pruning_ratio=0.5)
        pruner.step()

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
    group_reduction, normalizer :
        As in Torch-Pruning's ``GroupMagnitudeImportance``.
    max_batches : int, optional
        Cap on calibration batches taken from an iterable.
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
        self.reduction = reduction
        self.config = config
        self.max_batches = max_batches
        self.progress = progress
        self.model: Optional[nn.Module] = None
        self._batches = None
        self._forward_fn = None
        self._fingerprint = None
        self._graph: Optional[ChannelGraph] = None
        self._acts = None
        self._curv: Optional[dict] = None
        self._by_module: dict = {}

    # ------------------------------------------------------------------ calibration
    def calibrate(self, model: nn.Module, data, forward_fn: Optional[Callable] = None,
                  max_batches: Optional[int] = None) -> "CurvatureImportance":
        """Store the model and calibration data; trace the graph and record activations.

        ``forward_fn(model, batch) -> output`` handles batches that are not a plain tensor
        (default: ``model(batch)`` or ``model(batch[0])``). The batches are kept so scores
        can be recomputed after the model changes (``iterative_steps > 1``).
        """
        self.model = model
        self._forward_fn = forward_fn or default_forward
        self._batches = as_batches(data, max_batches or self.max_batches)
        self._fingerprint = None
        self._refresh(compute_curvature=False)
        return self

    def _model_fingerprint(self):
        state = []
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            state.append((name, id(t), tuple(t.shape), t._version))
        return tuple(state)

    def _refresh(self, compute_curvature: bool = True):
        if self.model is None:
            raise RuntimeError("CurvatureImportance needs calibration data: call "
                               "imp.calibrate(model, data) before pruning")
        fp = self._model_fingerprint()
        if fp != self._fingerprint:
            cal = calibrate_graph(self.model, self._batches, self._forward_fn,
                                  self.config.normalize, bool(self.progress))
            self._graph, self._acts = cal.graph, cal.acts
            self._curv = None
            self._fingerprint = fp
        if compute_curvature and self._curv is None:
            self._curv = graph_curvature(self._graph, self._acts, self.config, self.progress)
            self._by_module = {id(lc.module): lc for lc in self._curv.values()}

    # ------------------------------------------------------------------ inspection
    def curvatures(self) -> dict:
        """Layer name -> :class:`~tp_curvature.curvature.LayerCurvature` of the current model
        (``kappa[u, v]``: input channel u -> output channel v)."""
        self._refresh()
        return dict(self._curv)

    def layer_problems(self) -> dict:
        """Layer name -> :class:`~tp_curvature.problem.LayerPairProblem` (for benchmarks)."""
        self._refresh(compute_curvature=False)
        return {l.name: build_layer_problem(self._graph, l, self._acts, self.config)
                for l in self._graph.layers if l.out_junctions}

    @property
    def graph(self) -> ChannelGraph:
        self._refresh(compute_curvature=False)
        return self._graph

    def channel_scores(self) -> dict:
        """Layer name -> ``(in_scores, out_scores)``: per input node and per output channel
        scores of that layer alone (before group reduction / normalisation)."""
        self._refresh()
        a = self.config.alpha
        return {n: (reduce_kappa(lc.kappa, 1, self.reduction, a),
                    reduce_kappa(lc.kappa, 0, self.reduction, a)) for n, lc in self._curv.items()}

    # ------------------------------------------------------------------ Torch-Pruning API
    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        self._refresh()
        alpha = self.config.alpha
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            fn = dep.pruning_fn
            lc: Optional[LayerCurvature] = self._by_module.get(id(layer))
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
