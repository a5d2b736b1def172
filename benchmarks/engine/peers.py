"""Calibration-data criteria a user would pick instead of curvature, and FLAP's bias compensation.

Three Torch-Pruning importances that score a channel from the input statistics its consumers
see on the calibration batch, and one repair step:

``activation``  mean absolute activation of the channel where its consumers read it:
                :math:`\\operatorname{mean}_{n,p} |X_c[n, p]|` over the calibration samples ``n``
                and the spatial positions / tokens ``p``.
``wanda``       Wanda-sp, the structured form of Wanda (Sun et al., "A Simple and Effective
                Pruning Approach for Large Language Models", ICLR 2024), as An et al. use it
                (FLAP's code, ``prune_wanda_sp``): :math:`\\|X_c\\|_2 \\sum_i |W_{i,c}|` with the
                norm over all samples and positions; for a convolutional consumer ``W[i, c]``
                is the kernel slice and :math:`|W_{i,c}|` its L1 sum over the kernel.
``flap``        FLAP's "weighted input-feature variance" (An et al., "Fluctuation-based Adaptive
                Structured Pruning for Large Language Models", AAAI 2024):
                :math:`\\operatorname{Var}_{n,p}(X_c) \\, \\|W_{:,c}\\|_2^2` (the kernel slice
                included for convs), standardised per consumer layer (minus the layer mean,
                divided by the layer's sample std over its input channels) so that one global
                ranking over layers is meaningful (FLAP's adaptive structure search).

Group conventions (as ``GroupMagnitudeImportance`` and ``tp_curvature.CurvatureImportance``):
for ``for i, (dep, idxs) in enumerate(group)`` a channel is scored at its *consumers*, the deps
whose handler prunes input channels (``prune_linear_in_channels``, ``prune_conv_in_channels``,
``prune_depthwise_conv_in_channels``); per-layer scores are indexed by ``idxs``, scattered by
``group[i].root_idxs`` and combined by ``group_reduction`` then ``normalizer``. Out-channel
deps (the producing conv / linear, its BatchNorm) contribute nothing: these are input-statistic
criteria. When the features of one channel are several inputs of the consumer (a conv channel
flattened into a Linear: ``root_idxs`` repeats), the channel's statistics pool all its features
(the flattened Linear is treated like a conv whose kernel covers the feature map: the sums
of ``x``, ``x^2``, ``|x|`` and of the weight norms run over all the channel's features), so the
channel counts once. A channel read by several consumers gets the group mean of their scores
(the papers sum over consumers: within a group this is the same factor for every channel, and
the ``mean`` normaliser removes it).

A group with no consumer (its root is an output layer: nothing reads its channels) is scored
where the channel is *produced* instead, from the root layer's output statistics
(``activation``: mean |Y_c|; ``wanda``: ||Y_c||_2; ``flap``: Var(Y_c), standardised over the
layer), so every group gets a score and uniform pruning removes the same channels count for
every criterion. ``compare.py`` never scores such a group (its final classifier is ignored).

Statistics come from one forward pass over the calibration batch (:meth:`calibrate`; hooks are
removed afterwards even on error and the model's training mode is restored).

Bias compensation (FLAP): :func:`input_means` records, on the unpruned model, the mean input of
every consumer layer per input feature; :func:`prune_with_bias_compensation` runs the pruner
interactively and, before each group is pruned, adds to every consumer's bias the removed
channels' mean contribution :math:`\\bar X_J W_{:,J}^T` (convs: the mean over samples and
positions times the kernel slice summed over the kernel), creating the bias where absent.
For a conv with zero padding this is exact only away from the borders (at a border part of the
kernel reads padding, whose contribution was zero, yet the constant adds the full kernel sum);
with ``padding=0`` it is exact for a channel that is constant on the calibration data.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

from .utils import forward_with_hooks

IN_FNS = (function.prune_linear_in_channels, function.prune_conv_in_channels,
          function.prune_depthwise_conv_in_channels)
OUT_FNS = (function.prune_linear_out_channels, function.prune_conv_out_channels,
           function.prune_depthwise_conv_out_channels)
LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
KINDS = ("activation", "wanda", "flap")


# ============================================================================================
# statistics
# ============================================================================================
class ChannelStats:
    """Running per-channel sums (float64): count ``n``, ``s1 = sum x``, ``s2 = sum x^2``,
    ``sabs = sum |x|``, channel = last dim of a Linear's tensor, dim 1 of a conv's."""

    def __init__(self):
        self.n = self.s1 = self.s2 = self.sabs = None

    def add(self, t: torch.Tensor, conv: bool) -> None:
        t = t.detach().to(torch.float64)
        if conv:
            t = t.transpose(0, 1).reshape(t.shape[1], -1).T   # (N * positions, C)
        else:
            t = t.reshape(-1, t.shape[-1])
        n = torch.full((t.shape[1],), float(t.shape[0]), dtype=torch.float64, device=t.device)
        vals = (n, t.sum(0), (t * t).sum(0), t.abs().sum(0))
        if self.n is None:
            self.n, self.s1, self.s2, self.sabs = vals
        else:
            self.n, self.s1, self.s2, self.sabs = (a + b for a, b in
                                                   zip((self.n, self.s1, self.s2, self.sabs), vals))

    def mean(self) -> torch.Tensor:
        return self.s1 / self.n


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def collect_stats(model: nn.Module, x, batch_size: int = 256, outputs: bool = True):
    """One pass of ``x`` (a tensor) through ``model`` in eval mode: ``(inputs, outputs)``, each
    ``{module: ChannelStats}`` for every Linear / conv (input channels / output channels).
    Hooks are removed and the training modes restored even if the forward raises."""
    ins, outs = {}, {}

    def pre(mod, args):
        ins.setdefault(mod, ChannelStats()).add(args[0], _is_conv(mod))

    def post(mod, args, out):
        outs.setdefault(mod, ChannelStats()).add(out, _is_conv(mod))

    layers = [m for m in model.modules() if isinstance(m, LAYER_TYPES)]
    forward_with_hooks(model, x, batch_size, {m: pre for m in layers},
                       {m: post for m in layers} if outputs else None)
    return ins, outs


def input_means(model: nn.Module, x, batch_size: int = 256) -> dict:
    """``{qualified name: mean input per input feature}`` of every Linear / conv on ``x``
    (the unpruned model's statistics that bias compensation uses)."""
    ins, _ = collect_stats(model, x, batch_size, outputs=False)
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: st.mean().float().cpu() for m, st in ins.items()}


def consumer_weight_norms(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input feature of ``layer``: ``(sum_i |W[i, c]|, sum_i ||W[i, c]||^2)`` where for a
    conv ``W[i, c]`` is the kernel slice (L1 / squared L2 over the kernel); grouped convs use
    the rows of the channel's group."""
    w = layer.weight.detach().to(torch.float64)
    if isinstance(layer, nn.Linear):
        return w.abs().sum(0), (w * w).sum(0)
    if getattr(layer, "transposed", False):          # ConvTranspose: (in, out / groups, *k)
        return w.abs().flatten(1).sum(1), (w * w).flatten(1).sum(1)
    g = layer.groups
    cout, cin_g = w.shape[0], w.shape[1]
    l1 = w.abs().flatten(2).sum(2).reshape(g, cout // g, cin_g).sum(1).reshape(-1)
    l2 = (w * w).flatten(2).sum(2).reshape(g, cout // g, cin_g).sum(1).reshape(-1)
    return l1, l2


def _standardise(v: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    if mean is None:
        mean = v.mean()
        std = v.std() if len(v) > 1 else torch.zeros((), dtype=v.dtype)
    std = torch.as_tensor(std, dtype=v.dtype)
    if not torch.isfinite(std) or std <= 0:
        return v - mean
    return (v - mean) / std


# ============================================================================================
# the importances
# ============================================================================================
class InputStatisticImportance(tp.importance.Importance):
    """Base of :class:`ActivationImportance`, :class:`WandaImportance`, :class:`FLAPImportance`.

    ``calibrate(model, x)`` records the statistics (one forward pass); ``imp(group)`` scores a
    group of that model. ``group_reduction`` / ``normalizer`` as in ``GroupMagnitudeImportance``
    (defaults ``"mean"`` / ``"mean"``; FLAP: ``"mean"`` / ``None``, its scores are already
    standardised and may be negative).
    """
    kind = ""

    def __init__(self, group_reduction: str = "mean", normalizer: Optional[str] = "mean",
                 batch_size: int = 256):
        self.group_reduction = group_reduction
        self.normalizer = normalizer
        self.batch_size = batch_size
        self._in: dict = {}
        self._out: dict = {}

    _reduce = tp.importance.GroupMagnitudeImportance._reduce
    _normalize = tp.importance.GroupMagnitudeImportance._normalize
    _lamp = tp.importance.GroupMagnitudeImportance._lamp

    def calibrate(self, model: nn.Module, x) -> "InputStatisticImportance":
        self._in, self._out = collect_stats(model, x, self.batch_size)
        return self

    # ---- per-channel metric from pooled statistics (n, s1, s2, sabs, w_l1, w_l2), float64
    def metric(self, n, s1, s2, sabs, wl1, wl2) -> torch.Tensor:
        raise NotImplementedError

    def _layer_feature_metric(self, layer, st: ChannelStats) -> torch.Tensor:
        wl1, wl2 = consumer_weight_norms(layer)
        return self.metric(st.n, st.s1, st.s2, st.sabs, wl1, wl2)

    def _consumer_scores(self, layer, st: ChannelStats, idxs, root_idxs) -> torch.Tensor:
        """``(scores, root indices)`` of one consumer dep, one per channel: the features of a
        channel (repeated root index) are pooled, so the channel counts once."""
        wl1, wl2 = consumer_weight_norms(layer)
        idx = torch.as_tensor(list(idxs), dtype=torch.long)
        root = torch.as_tensor(list(root_idxs), dtype=torch.long)
        uniq, inv = torch.unique(root, return_inverse=True)

        def pool(v):
            v = v.detach().cpu().to(torch.float64)[idx]
            return torch.zeros(len(uniq), dtype=torch.float64).scatter_add_(0, inv, v)

        chan = self.metric(pool(st.n), pool(st.s1), pool(st.s2), pool(st.sabs), pool(wl1),
                           pool(wl2))
        if self.kind == "flap":
            if len(set(idx.tolist())) == len(st.n):     # the dep covers the whole layer
                chan = _standardise(chan)
            else:   # part of a concatenation: standardise with the whole layer's statistics
                full = self._layer_feature_metric(layer, st).cpu()
                chan = _standardise(chan, full.mean(),
                                    full.std() if len(full) > 1 else torch.tensor(0.0))
        return chan.float(), uniq.tolist()

    def _producer_scores(self, layer, st: ChannelStats, idxs) -> torch.Tensor:
        """Fallback for a group nobody consumes: output statistics of the producing layer."""
        idx = torch.as_tensor(list(idxs), dtype=torch.long)
        one = torch.ones_like(st.n)
        full = self.metric(st.n, st.s1, st.s2, st.sabs, one, one).cpu()
        if self.kind == "flap":
            full = _standardise(full)
        return full[idx].float()

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        if not self._in:
            raise RuntimeError(f"{type(self).__name__}: call calibrate(model, x) first")
        group_imp, producers = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            fn = dep.handler
            root_idxs = group[i].root_idxs
            if fn in IN_FNS:
                st = self._in.get(layer)
                if st is None or not len(idxs) or any(r is None for r in root_idxs):
                    continue
                group_imp.append(self._consumer_scores(layer, st, idxs, root_idxs))
            elif fn in OUT_FNS and layer in self._out:
                producers.append((layer, idxs, root_idxs))
            # BatchNorm / LayerNorm / other out-channel deps: no input statistic
        if not group_imp:
            for layer, idxs, root_idxs in producers:
                if len(idxs) and not any(r is None for r in root_idxs):
                    group_imp.append((self._producer_scores(layer, self._out[layer], idxs),
                                      list(root_idxs)))
        if not group_imp:
            return None
        # Torch-Pruning's _reduce sizes its result on the first entry: scatter every layer's
        # channel scores into a root-sized vector first (same sums as scattering directly)
        n_root = len(group[0].idxs)
        full = []
        for local, root in group_imp:
            v = torch.zeros(n_root, dtype=torch.float32)
            v.scatter_add_(0, torch.as_tensor(root, dtype=torch.long), local)
            full.append(v)
        imp = self._reduce(full, [list(range(n_root))] * len(full))
        return self._normalize(imp, self.normalizer)


class ActivationImportance(InputStatisticImportance):
    """Mean |activation| of the channel over samples and positions, where consumers read it."""
    kind = "activation"

    def metric(self, n, s1, s2, sabs, wl1, wl2):
        return sabs / n


class WandaImportance(InputStatisticImportance):
    """Wanda-sp (Sun et al. 2024; An et al. 2024): ``||X_c||_2 * sum_i |W[i, c]|``."""
    kind = "wanda"

    def metric(self, n, s1, s2, sabs, wl1, wl2):
        return torch.sqrt(s2) * wl1


class FLAPImportance(InputStatisticImportance):
    """FLAP (An et al., AAAI 2024): ``Var(X_c) * ||W[:, c]||_2^2``, standardised per layer."""
    kind = "flap"

    def __init__(self, group_reduction: str = "mean", normalizer: Optional[str] = None,
                 batch_size: int = 256):
        super().__init__(group_reduction, normalizer, batch_size)

    def metric(self, n, s1, s2, sabs, wl1, wl2):
        mu = s1 / n
        var = (s2 / n - mu * mu).clamp_min(0.0)
        return var * wl2


PEERS = {"activation": ActivationImportance, "wanda": WandaImportance, "flap": FLAPImportance}


# ============================================================================================
# FLAP's bias compensation
# ============================================================================================
@torch.no_grad()
def compensate_bias(layer: nn.Module, idxs, mean_in: torch.Tensor) -> bool:
    """Add the mean contribution of input features ``idxs`` (current indexing) of ``layer`` to
    its bias: ``b += W[:, idxs] @ mean_in[idxs]`` (convs: the kernel slice summed over the
    kernel). Returns False (nothing done) for grouped / transposed convs."""
    w = layer.weight.detach()
    j = torch.as_tensor(list(idxs), dtype=torch.long, device=w.device)
    mu = mean_in.to(w.device, w.dtype)[j]
    if isinstance(layer, nn.Linear):
        delta = w[:, j] @ mu
    elif _is_conv(layer) and layer.groups == 1 and not layer.transposed:
        delta = w[:, j].flatten(2).sum(2) @ mu
    else:
        return False
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    layer.bias.data += delta
    return True


def prune_with_bias_compensation(model: nn.Module, pruner, means: dict) -> dict:
    """One ``pruner`` step (interactive) with FLAP's bias compensation.

    ``means`` is :func:`input_means` of the *unpruned* model (qualified names; ``model`` is a
    deep copy of it). Before each group is pruned, every consumer dep of the group (an
    input-channel handler) adds the removed features' mean contribution to its layer's bias;
    the per-layer means are then re-indexed like the layer's inputs, so a layer whose inputs
    are cut by several groups is handled. Returns ``{layer name: features compensated}``.
    """
    mods = dict(model.named_modules())
    names = {m: n for n, m in mods.items()}
    mu = {mods[n]: v.clone() for n, v in means.items() if n in mods}
    done: dict = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            if dep.handler not in IN_FNS or not len(idxs):
                continue
            layer = dep.target.module
            if layer not in mu:
                continue
            cur = mu[layer]
            width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
            if len(cur) != width:
                warnings.warn(f"bias compensation: {names[layer]} has {len(cur)} recorded "
                              f"input means for {width} inputs; skipped")
                continue
            if compensate_bias(layer, idxs, cur):
                done[names[layer]] = done.get(names[layer], 0) + len(idxs)
            drop = set(int(i) for i in idxs)
            keep = [k for k in range(len(cur)) if k not in drop]
            mu[layer] = cur[keep]
        group.prune()
    return done
