"""``ElementCurvatureImportance``: channel scores aggregated from element-level curvature.

The curvature paper scores individual weights on the element graph (one node per scalar
activation; :func:`tp_curvature.unstructured.sparse_weight_curvature`). This sibling of
:class:`~tp_curvature.CurvatureImportance` brings that granularity to Torch-Pruning's channel
pruning, so the two granularities can be compared on equal terms:

1. per weight, ``kappa_w`` = min (``weight_reduction="min"``, the paper) or mean of the curvature
   of every element edge the weight generates, over its positions and the calibration images;
2. per channel of a Conv2d / Linear, over the weights of that channel: for an output channel
   ``o`` the slice ``W[o]`` (all input channels and taps), for an input channel ``c`` the slice
   ``W[:, c]``; ``reduction="mean"`` scores ``kmax - mean kappa_w``, ``"min"``
   ``kmax - min kappa_w`` (its strongest bottleneck), with ``kmax = 1/(1-alpha)``, so scores
   are non-negative and higher = more important, as in :class:`~tp_curvature.CurvatureImportance`;
3. per group, scattered by ``root_idxs`` and reduced with ``group_reduction`` / ``normalizer``
   exactly as ``GroupMagnitudeImportance`` does (BatchNorm items add nothing); the features of
   one channel flattened into a Linear share that channel's item (as in
   :class:`~tp_curvature.CurvatureImportance`).

Supported models are those of the sparse element graph (chains of Conv2d / Linear / BatchNorm
/ elementwise activations / Flatten / MaxPool2d / AvgPool2d). The per-weight kappa is computed
at :meth:`calibrate` and again whenever the model's weights change (a float64 checksum per
weight tensor), e.g. between the steps of an iterative pruner (the images are kept).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch_pruning as tp

from .config import renamed_keyword
from .importance import IN_FNS, OUT_FNS, feature_share

CHANNEL_REDUCTIONS = ("mean", "min")


class ElementCurvatureImportance(tp.importance.GroupMagnitudeImportance):
    """Channel importance from per-weight (element-level) curvature; see the module docstring.

    ``**config``: :class:`~tp_curvature.curvature.CurvatureConfig` fields (``alpha``,
    ``variant``, ``topk`` (default :data:`~tp_curvature.unstructured.SPARSE_DEFAULT_TOPK`),
    ``backend``, ...). ``output``: node values of the output layer (``"logits"`` as in the
    paper's VGG, or ``"softmax"``). ``conventions``: ``"library"`` or ``"authors"`` (the paper
    authors' code, :mod:`tp_curvature.unstructured._conventions`): the per-weight kappa is
    computed under them, so under ``"authors"`` an edge of a layer between two hidden layers
    with ``|kappa - 1| < 1e-6`` counts 2.0 before the weight and channel reductions, as it does
    in their pruning ranking.
    """

    def __init__(self, *, reduction: str = "mean", weight_reduction: str = "min",
                 output: str = "logits", group_reduction: str = "mean",
                 normalizer: Optional[str] = "mean", progress: bool = False,
                 channel_reduction: Optional[str] = None, weight_reduce: Optional[str] = None,
                 conventions: str = "library", **config):
        super().__init__(p=1, group_reduction=group_reduction, normalizer=normalizer)
        from .unstructured._checks import element_config
        from .unstructured._conventions import resolve_conventions
        reduction = renamed_keyword("channel_reduction", channel_reduction, "reduction",
                                    reduction)
        weight_reduction = renamed_keyword("weight_reduce", weight_reduce, "weight_reduction",
                                           weight_reduction)
        if reduction not in CHANNEL_REDUCTIONS:
            raise ValueError(f"reduction must be one of {CHANNEL_REDUCTIONS}, got "
                             f"{reduction!r}")
        if weight_reduction not in ("min", "mean"):
            raise ValueError(f"weight_reduction must be 'min' or 'mean', got "
                             f"{weight_reduction!r}")
        if output not in ("logits", "softmax"):
            raise ValueError(f"output must be 'logits' or 'softmax', got {output!r}")
        self.config = element_config(config, sparse=True)
        self.conventions = resolve_conventions(conventions, self.config).name
        self._options = dict(config)
        self.reduction = reduction
        self.weight_reduction = weight_reduction
        self.output = output
        self.progress = progress
        self.model: Optional[nn.Module] = None
        self.images: Optional[torch.Tensor] = None
        self.scores: dict = {}          # module id -> per-weight kappa (tensor like the weight)
        self._sum = None

    def calibrate(self, model: nn.Module, images) -> "ElementCurvatureImportance":
        """Score every weight of ``model`` on ``images`` (a tensor ``(N, ...)`` or an
        ``(images, targets)`` pair); the images are kept for recomputations."""
        from .unstructured._checks import check_images
        self.model = model
        self.images = check_images(images).detach()
        self._compute()
        return self

    def _checksum(self):
        return tuple((n, tuple(m.weight.shape), float(m.weight.detach().double().sum()),
                      float(m.weight.detach().double().square().sum()))
                     for n, m in self.model.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear)))

    def _compute(self):
        from .unstructured import sparse_weight_curvature
        kappa = sparse_weight_curvature(self.model, self.images, output=self.output,
                                        reduction=self.weight_reduction, progress=self.progress,
                                        conventions=self.conventions, **self._options)
        mods = dict(self.model.named_modules())
        self.scores = {id(mods[k[:-len(".weight")] if k != "weight" else ""]): v
                       for k, v in kappa.items()}
        self._sum = self._checksum()

    def weight_curvatures(self) -> dict:
        """Module id -> per-weight kappa of the latest computation."""
        return dict(self.scores)

    def _channel(self, kappa: torch.Tensor, out: bool, idxs) -> torch.Tensor:
        kmax = 1.0 / (1.0 - self.config.alpha)
        k = kappa.transpose(0, 1) if not out else kappa
        k = k.flatten(1)[torch.as_tensor(idxs, dtype=torch.long)]
        red = k.mean(1) if self.reduction == "mean" else k.min(1).values
        return (kmax - red).float()

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        if self.model is None:
            raise RuntimeError("ElementCurvatureImportance: call calibrate(model, images) first")
        if self._checksum() != self._sum:
            self._compute()
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            fn = dep.pruning_fn
            root_idxs = group[i].root_idxs
            if fn not in OUT_FNS and fn not in IN_FNS:
                continue
            if any(r is None for r in root_idxs):
                continue
            kappa = self.scores.get(id(dep.layer))
            if kappa is None:
                continue
            local = self._channel(kappa, fn in OUT_FNS, idxs)
            group_imp.append(feature_share(local, root_idxs, self.group_reduction))
            group_idxs.append(root_idxs)
        if not group_imp:
            return None
        imp = self._reduce(group_imp, group_idxs)
        return self._normalize(imp, self.normalizer)
