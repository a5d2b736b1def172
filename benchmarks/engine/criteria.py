"""Pruning criteria for the benchmarks: Torch-Pruning's baselines (Hessian fixed), the
calibration-data peers of :mod:`engine.peers` (activation, Wanda-sp, FLAP), the curvature
importance, and the loop that scores every prunable group once.

Every criterion is registered in :data:`CRITERIA` (``@register_criterion(name, help=...)`` on
a factory ``(seed, overrides) -> Criterion``); the curvature criteria are one family whose
names follow :data:`engine.presets.CURVATURE_GRAMMAR`. To add a criterion, register one more
factory. ``make_criterion(name, seed, args)`` builds a :class:`Criterion` (an importance plus
what it needs before scoring: a backward pass, per-sample squared gradients, a calibration);
:func:`score_all_groups` scores every group one ``tp.pruner.BasePruner`` step would score
(final classifier ignored, see :func:`final_classifier`) and :class:`CachedImportance` replays
those scores on deep copies of the same model. Used by ``benchmarks/compare.py`` and
``benchmarks/end_to_end.py``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from .peers import PEERS
from .presets import (CURVATURE_GRAMMAR, PRESETS, CurvatureOverrides, parse_curvature_name,
                      preset_call)
from .registry import Registry

# ============================================================================================
# Baseline criteria: Torch-Pruning's, with the Hessian accumulation fixed
# ============================================================================================
class FixedHessianImportance(tp.importance.GroupHessianImportance):
    """``GroupHessianImportance`` whose ``accumulate_grad`` really averages over samples.

    Torch-Pruning 1.6.1 checks ``if name not in self._accu_grad`` but stores the buffer under
    the parameter, so the check always fails and every call *replaces* the buffer (and resets
    the counter to 1): the score uses only the last sample's squared gradient. Here the buffer
    and the counter are keyed by the parameter, so after ``n`` calls ``p.grad`` holds
    :math:`\\frac1n \\sum_i g_i^2` when the group is scored (the diagonal empirical Fisher that
    approximates the Hessian in Optimal Brain Damage).
    """

    def accumulate_grad(self, model: nn.Module) -> None:
        for _, param in model.named_parameters():
            if param.grad is None:
                continue
            g2 = param.grad.detach().clone().pow(2)
            if param in self._accu_grad:
                self._accu_grad[param] += g2
                self._counter[param] += 1
            else:
                self._accu_grad[param] = g2
                self._counter[param] = 1


def per_sample_squared_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             hessian_imp, chunk: int = 1) -> int:
    """Backward each sample's loss separately and feed ``hessian_imp.accumulate_grad``.

    The model is in eval mode (BatchNorm uses running statistics, so the samples of a chunk
    are independent). ``chunk=1`` runs one forward per sample, which on a CPU is cheaper than
    back-propagating every sample through a shared batch graph. Returns the number of samples.
    """
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    n = 0
    for s in range(0, len(x), chunk):
        losses = loss_fn(model(x[s:s + chunk]), y[s:s + chunk])
        for i, l in enumerate(losses):
            model.zero_grad(set_to_none=True)
            l.backward(retain_graph=i < len(losses) - 1)
            hessian_imp.accumulate_grad(model)
            n += 1
    return n


# ============================================================================================
# Criteria registry
# ============================================================================================
@dataclass
class Criterion:
    """A named importance plus what it needs before scoring (``prepare(model, x, y)``) and a
    note for the results (meta.json, summary.md)."""
    name: str
    importance: object
    prepare: Callable = field(default=lambda model, x, y: None)
    note: str = ""


#: every criterion: ``CRITERIA.get(name)(seed, overrides) -> Criterion`` (a family's factory
#: gets the full name first); ``make_criterion`` is the way to build one
CRITERIA = Registry("criterion")
register_criterion = CRITERIA.register


def make_criterion(name: str, seed: int, args=None) -> Criterion:
    """Build criterion ``name`` for one seed (a fresh importance object: no state is shared).
    ``args``: anything with the curvature overrides ``alpha``, ``topk``, ``backend``,
    ``backend_options`` as attributes (an argparse namespace; missing or None: the preset's)."""
    return CRITERIA.get(name)(seed, CurvatureOverrides.from_args(args))


def _backward_mean_loss(model, x, y):
    model.eval()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


@register_criterion("random", help="Torch-Pruning's RandomImportance (seeded per seed)")
def _random(seed, overrides) -> Criterion:
    def seed_rng(model, x, y):
        torch.manual_seed(10_000 + seed)
    return Criterion("random", tp.importance.RandomImportance(), seed_rng)


def _register_plain(name: str, help: str, make_importance: Callable) -> None:
    """A criterion that needs nothing before scoring: ``make_importance()`` is its importance."""
    def factory(seed, overrides) -> Criterion:
        return Criterion(name, make_importance())
    register_criterion(name, help=help)(factory)


_register_plain("l1", "GroupMagnitudeImportance(p=1) (group mean, mean-normalised)",
                lambda: tp.importance.GroupMagnitudeImportance(p=1))
_register_plain("l2", "GroupMagnitudeImportance(p=2) (group mean, mean-normalised)",
                lambda: tp.importance.GroupMagnitudeImportance(p=2))
_register_plain("magnitude", "the same as l2", lambda: tp.importance.GroupMagnitudeImportance(p=2))
_register_plain("lamp", "LAMPImportance(p=2)", lambda: tp.importance.LAMPImportance(p=2))
_register_plain("fpgm", "FPGMImportance(p=2)", lambda: tp.importance.FPGMImportance(p=2))


@register_criterion("taylor", help="GroupTaylorImportance after loss.backward() on the "
                                   "calibration batch (eval mode)")
def _taylor(seed, overrides) -> Criterion:
    """Torch-Pruning 1.6.1 never scores BatchNorm layers in it (its BN branch tests the
    GroupNorm handler); kept as is."""
    return Criterion("taylor", tp.importance.GroupTaylorImportance(), _backward_mean_loss,
                     note="Torch-Pruning's GroupTaylorImportance does not score BatchNorm "
                          "layers (its BN branch tests the GroupNorm handler)")


def _hessian_criterion(name: str, imp, note: str) -> Criterion:
    def accumulate(model, x, y):
        imp.zero_grad()
        per_sample_squared_grads(model, x, y, imp)
    return Criterion(name, imp, accumulate, note=note)


@register_criterion("hessian", help="GroupHessianImportance (OBD, diagonal empirical Fisher) "
                                    "with accumulate_grad fixed (FixedHessianImportance)")
def _hessian(seed, overrides) -> Criterion:
    return _hessian_criterion("hessian", FixedHessianImportance(),
                              "accumulate_grad fixed: per-sample squared gradients averaged "
                              "over the whole calibration batch")


@register_criterion("hessian-tp", help="Torch-Pruning's GroupHessianImportance as shipped "
                                       "(last sample only), for reference")
def _hessian_tp(seed, overrides) -> Criterion:
    return _hessian_criterion("hessian-tp", tp.importance.GroupHessianImportance(),
                              "Torch-Pruning 1.6.1 as shipped: only the last sample's squared "
                              "gradient")


def _register_peer(name: str, help: str, note: str) -> None:
    """The calibration-data peers of :mod:`engine.peers` (scored at the consumers)."""
    def factory(seed, overrides) -> Criterion:
        peer = PEERS[name]()

        def collect(model, x, y):
            peer.calibrate(model, x)
        return Criterion(name, peer, collect, note=note)
    register_criterion(name, help=help)(factory)


_register_peer("activation", "mean |activation| of the channel where its consumers read it",
               "mean |input| of the channel at its consumers (calibration batch)")
_register_peer("wanda", "Wanda-sp: ||X_c||_2 * sum_i |W[i, c]| summed over the consumers",
               "Wanda-sp: ||X_c||_2 * sum_i |W[i, c]| at the consumers")
_register_peer("flap", "FLAP: Var(X_c) * ||W[:, c]||_2^2, standardised per consumer layer",
               "FLAP WIFV: Var(X_c) * ||W[:, c]||^2 at the consumers, standardised per layer")


@register_criterion(CURVATURE_GRAMMAR, prefix="curvature",
                    help="CurvatureImportance: curvature = CurvatureConfig(), -paper = "
                         "CurvatureConfig.paper(); -flow variant, -spread / -meanabs node "
                         "values, -consumer sides, -min / -negsum reductions (e.g. "
                         "curvature-consumer, curvature-meanabs, curvature-paper-spread)")
def _curvature(name, seed, overrides) -> Criterion:
    from tp_curvature import CurvatureImportance
    parsed = parse_curvature_name(name)
    imp = CurvatureImportance(parsed.config(overrides), reduction=parsed.reduction,
                              sides=parsed.sides)

    def calibrate(model, x, y):
        imp.calibrate(model, x)
    return Criterion(parsed.name, imp, calibrate, note=parsed.note(overrides))


ELEMENT_IMAGES = 10


def one_per_class(x: torch.Tensor, y: torch.Tensor, n: int = ELEMENT_IMAGES) -> torch.Tensor:
    """Up to ``n`` images of ``x``: the first image of each class in order of appearance (the
    paper's one calibration image per class), then the next images to fill ``n``."""
    seen, first = set(), []
    for i, c in enumerate(y.tolist()):
        if c not in seen:
            seen.add(c)
            first.append(i)
    rest = [i for i in range(len(y)) if i not in set(first)]
    return x[(first + rest)[:n]]


@register_criterion("curvature-element",
                    help=f"channel scores from per-weight curvature "
                         f"(ElementCurvatureImportance, CurvatureConfig.element(sparse=True)) on "
                         f"{ELEMENT_IMAGES} calibration images; sequential models only")
def _element_criterion(seed, overrides) -> Criterion:
    """``curvature-element``: channel scores from element-level (per-weight) curvature, the
    paper's own granularity (:class:`tp_curvature.ElementCurvatureImportance`: per weight the
    min kappa over positions and images, per channel ``kmax - mean``), on
    :data:`ELEMENT_IMAGES` images of the calibration batch (one per class), because its cost
    grows with every image's element graph. Its config: ``CurvatureConfig.element(sparse=True)``
    with the command line's overrides. Sequential models only (no residual adds)."""
    from tp_curvature import ElementCurvatureImportance
    changes = overrides.changes()
    config = PRESETS["element"](sparse=True, **changes)
    imp = ElementCurvatureImportance(**{f.name: getattr(config, f.name)
                                        for f in dataclasses.fields(config)})

    def calibrate(model, x, y):
        imp.calibrate(model, one_per_class(x, y))
    return Criterion("curvature-element", imp, calibrate,
                     note=f"element-level curvature on {ELEMENT_IMAGES} calibration images (one "
                          f"per class), {preset_call('element', changes, sparse=True)} = "
                          f"{imp.config.describe()}, weight score min over positions/images, "
                          "channel kmax - mean")


# ============================================================================================
# Groups: key, final classifier, pruner, the score-every-group loop, the score cache
# ============================================================================================
def _handler_name(handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


def group_key(group, names: dict) -> tuple:
    """(qualified name of the root layer, name of the root pruning handler)."""
    dep = group[0].dep
    return names[id(dep.target.module)], _handler_name(dep.handler)


def final_classifier(model: nn.Module) -> nn.Module:
    """The output layer, left unpruned (timm's ``get_classifier()``, else the last Linear)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if lin:
        return lin[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError("model has no Linear or Conv layer")
    return convs[-1]


#: the largest share of one group's channels global pruning may remove
GLOBAL_MAX_RATIO = 0.9


def make_pruner(model, example_inputs, importance, ratio=0.0, mode="uniform"):
    """``BasePruner`` of the comparison: final classifier ignored, one step; global mode
    ranks every group together with ``max_pruning_ratio`` :data:`GLOBAL_MAX_RATIO`."""
    return tp.pruner.BasePruner(
        model, example_inputs, importance=importance, global_pruning=(mode == "global"),
        pruning_ratio=ratio, max_pruning_ratio=GLOBAL_MAX_RATIO if mode == "global" else 1.0,
        ignored_layers=[final_classifier(model)], iterative_steps=1)


def score_all_groups(model: nn.Module, example_inputs, importance, prepare: Callable = None,
                     name: str = "") -> tuple[dict, float]:
    """Score every group one pruner step on ``model`` would score (no pruning).

    Builds the pruner of :func:`make_pruner` (its dependency graph, final classifier ignored),
    calls ``prepare()`` if given (backward passes, calibration), then ``importance(group)`` for
    every prunable group. Returns ``({group_key: 1-D scores or None}, seconds)``; the time
    covers ``prepare`` and the scoring calls, not Torch-Pruning's dependency graph. Scores that
    are not one finite value per channel raise ``RuntimeError``.
    """
    pruner = make_pruner(model, example_inputs, importance)
    names = {id(m): n for n, m in model.named_modules()}
    groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                           root_module_types=pruner.root_module_types))
    scores = {}
    t0 = time.perf_counter()
    if prepare is not None:
        prepare()
    with torch.no_grad():
        for g in groups:
            key = group_key(g, names)
            s = importance(g)
            if s is not None:
                s = s.detach().float().cpu().clone()
                if s.shape != (len(g[0].idxs),) or not torch.isfinite(s).all():
                    raise RuntimeError(f"{name}: bad scores for group {key}: {s}")
            scores[key] = s
    return scores, time.perf_counter() - t0


def compute_scores(model: nn.Module, example_inputs, crit: Criterion, x, y) -> tuple[dict, float]:
    """:func:`score_all_groups` for a :class:`Criterion` (``crit.prepare(model, x, y)`` first);
    ``model`` is modified (gradients, calibration)."""
    return score_all_groups(model, example_inputs, crit.importance,
                            prepare=lambda: crit.prepare(model, x, y), name=crit.name)


class CachedImportance(tp.importance.Importance):
    """Replays precomputed group scores on a deep copy of the model they were computed on.

    ``bind(model)`` before building a pruner on a copy. With ``keep_best=True`` (global mode)
    the best-scored channel of every group is made unprunable (+inf) so that a global threshold
    never empties a layer (Torch-Pruning would skip that group entirely).
    """

    def __init__(self, scores: dict, name: str = ""):
        self.scores = scores
        self.name = name
        self.keep_best = False
        self._names: dict = {}

    def bind(self, model: nn.Module, keep_best: bool = False) -> "CachedImportance":
        self._names = {id(m): n for n, m in model.named_modules()}
        self.keep_best = keep_best
        return self

    @torch.no_grad()
    def __call__(self, group):
        key = group_key(group, self._names)
        if key not in self.scores:
            raise KeyError(f"{self.name}: no cached scores for group {key} (was the model "
                           "changed since the scores were computed?)")
        s = self.scores[key]
        if s is None:
            return None
        if len(s) != len(group[0].idxs):
            raise RuntimeError(f"{self.name}: group {key} has {len(group[0].idxs)} channels, "
                               f"cached scores have {len(s)}")
        s = s.clone()
        if self.keep_best and len(s):
            s[int(torch.argmax(s))] = float("inf")
        return s

