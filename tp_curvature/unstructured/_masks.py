"""Masks from per-weight scores (torch.nn.utils.prune), and the magnitude / random baselines."""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

from ._checks import WEIGHT_TYPES, check_choice, check_model


def _weight_params(model: nn.Module) -> dict:
    """Parameter name -> module for every Conv2d / Linear weight (pruned or not)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, WEIGHT_TYPES):
            out[f"{name}.weight" if name else "weight"] = m
    return out


class UnknownWeightError(KeyError, ValueError):
    """A score / mask key that is not a Conv2d / Linear weight of the model (a ``KeyError``
    and a ``ValueError``)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _check_tensors(tensors, what: str, allow_empty: bool = False) -> None:
    """``tensors`` is a dict of finite tensors (``what`` names it in messages)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a dict parameter name -> tensor, got "
                        f"{type(tensors).__name__}")
    if not tensors and not allow_empty:
        raise ValueError(f"{what} is empty: nothing to rank")
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what}[{k!r}] must be a tensor, got {type(v).__name__}")
        if v.is_complex():
            raise TypeError(f"{what}[{k!r}] must be real, got dtype {v.dtype}")
        bad = ~torch.isfinite(v.detach()) if v.dtype != torch.bool else None
        if bad is not None and bool(bad.any()):
            raise ValueError(f"{what}[{k!r}] contains non-finite values (NaN/inf) at "
                             f"{int(bad.sum())} of {v.numel()} entries")


def _resolve(model: nn.Module, tensors: dict, what: str = "scores", masks: bool = False
             ) -> dict:
    """Check every entry of ``tensors`` against ``model`` (key = a Conv2d / Linear weight, same
    shape, finite values; 0/1 values for masks) and return name -> module. Nothing is changed."""
    check_model(model)
    _check_tensors(tensors, what, allow_empty=masks)
    mods = _weight_params(model)
    out = {}
    for k, v in tensors.items():
        if k not in mods:
            raise UnknownWeightError(
                f"{what}[{k!r}]: {k!r} is not a Conv2d / Linear weight of the model (known: "
                f"{sorted(mods)})")
        shape = tuple(mods[k].weight.shape)
        if tuple(v.shape) != shape:
            raise ValueError(f"{what}[{k!r}] has shape {tuple(v.shape)}, the weight {k!r} has "
                             f"shape {shape}")
        if masks and v.dtype != torch.bool and not bool(((v == 0) | (v == 1)).all()):
            raise ValueError(f"{what}[{k!r}] must be a boolean (or 0/1) keep-mask")
        out[k] = mods[k]
    return out


def _check_secondary(secondary, scores: dict) -> None:
    if secondary is None:
        return
    _check_tensors(secondary, "secondary", allow_empty=True)
    for k, v in scores.items():
        if k not in secondary:
            raise ValueError(f"secondary has no entry for {k!r} (it needs every key of the "
                             "scores)")
        if tuple(secondary[k].shape) != tuple(v.shape):
            raise ValueError(f"secondary[{k!r}] has shape {tuple(secondary[k].shape)}, the "
                             f"scores {tuple(v.shape)}")


def _check_prune_options(sparsity, order: str, scope: str, seed) -> None:
    if not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool):
        raise TypeError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    check_choice("order", order, ("lowest", "highest"))
    check_choice("scope", scope, ("global", "layer"))
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int, got {seed!r}")


def magnitude_scores(model: nn.Module) -> dict:
    """|w| of every Conv2d / Linear weight (the magnitude baseline; prune lowest first)."""
    return {k: m.weight.detach().abs().double().cpu().clone()
            for k, m in _weight_params(model).items()}


def random_scores(model: nn.Module, seed: int = 0) -> dict:
    """Uniform random scores (the random baseline)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(m.weight.shape, generator=g, dtype=torch.float64)
            for k, m in _weight_params(model).items()}


def masks_from_scores(scores: dict, sparsity: float, order: str = "lowest",
                      scope: str = "global", seed: int = 0,
                      secondary: Optional[dict] = None) -> dict:
    """Boolean keep-masks removing exactly ``round(sparsity * n)`` weights.

    ``order="lowest"`` removes the lowest scores first, ``"highest"`` the highest. Ties are
    broken by ``secondary`` (same keys and shapes; its *lowest* values are removed first, e.g.
    :func:`magnitude_scores`) when given, then by a seeded random permutation.
    ``scope="global"`` ranks all weights together, ``"layer"`` removes the same fraction from
    every layer.
    """
    _check_prune_options(sparsity, order, scope, seed)
    _check_tensors(scores, "scores")
    _check_secondary(secondary, scores)
    g = np.random.default_rng(seed)

    def removal_order(flat: np.ndarray, sec: Optional[np.ndarray]) -> np.ndarray:
        if np.isnan(flat).any():
            raise ValueError("scores contain NaN")
        key = flat if order == "lowest" else -flat
        keys = [g.permutation(flat.size)] + ([sec] if sec is not None else []) + [key]
        return np.lexsort(keys)

    names = list(scores)
    flats = [scores[k].detach().double().cpu().reshape(-1).numpy() for k in names]
    secs = ([secondary[k].detach().double().cpu().reshape(-1).numpy() for k in names]
            if secondary is not None else [None] * len(names))
    keep = [np.ones(f.size, bool) for f in flats]
    if scope == "global":
        allf = np.concatenate(flats)
        n_rm = int(round(sparsity * allf.size))
        rm = removal_order(allf, np.concatenate(secs) if secondary is not None else None)[:n_rm]
        offs = np.cumsum([0] + [f.size for f in flats])
        for i in range(len(flats)):
            sel = rm[(rm >= offs[i]) & (rm < offs[i + 1])] - offs[i]
            keep[i][sel] = False
    else:
        for i, f in enumerate(flats):
            n_rm = int(round(sparsity * f.size))
            keep[i][removal_order(f, secs[i])[:n_rm]] = False
    return {k: torch.from_numpy(kp).view(scores[k].shape) for k, kp in zip(names, keep)}


def apply_masks(model: nn.Module, masks: dict) -> nn.Module:
    """Apply keep-masks with :func:`torch.nn.utils.prune.custom_from_mask` (combined with any
    existing mask by PyTorch). Every mask is checked (key, shape, 0/1 values) before the first
    one is applied."""
    mods = _resolve(model, masks, "masks", masks=True)
    for k, mask in masks.items():
        m = mods[k]
        torch_prune.custom_from_mask(m, "weight", mask.to(m.weight.device, torch.float32))
    return model


def prune_by_scores(model: nn.Module, scores: dict, sparsity: float, order: str = "lowest",
                    scope: str = "global", seed: int = 0,
                    secondary: Optional[dict] = None) -> dict:
    """Mask ``round(sparsity * n)`` weights of ``model`` chosen by ``scores`` (see
    :func:`masks_from_scores`); return the keep-masks. Options and every score tensor (key,
    shape, finite values) are checked before any mask is applied."""
    _check_prune_options(sparsity, order, scope, seed)
    _resolve(model, scores, "scores")
    _check_secondary(secondary, scores)
    masks = masks_from_scores(scores, sparsity, order, scope, seed, secondary)
    apply_masks(model, masks)
    return masks


def prune_by_curvature(model: nn.Module, scores: dict, sparsity: float,
                       order: str = "highest", scope: str = "global", seed: int = 0,
                       tie_break: str = "random") -> dict:
    """Prune by per-weight curvature: ``order="highest"`` removes the most positive kappa
    first (the paper's method), ``"lowest"`` the most negative first (the paper's control).

    Many weights tie at kappa = 1 (every edge they generate has a dead endpoint on every
    calibration image). ``tie_break="random"`` (seeded) orders them at random,
    ``"magnitude"`` removes the smaller ``|w|`` first.
    """
    check_choice("tie_break", tie_break, ("random", "magnitude"))
    _check_prune_options(sparsity, order, scope, seed)
    _resolve(model, scores, "scores")
    sec = magnitude_scores(model) if tie_break == "magnitude" else None
    if sec is not None:
        sec = {k: sec[k] for k in scores}
    return prune_by_scores(model, scores, sparsity, order, scope, seed, sec)


def prune_by_magnitude(model: nn.Module, sparsity: float, scope: str = "global") -> dict:
    """Remove the smallest ``|w|`` first."""
    return prune_by_scores(model, magnitude_scores(model), sparsity, "lowest", scope)


def prune_random(model: nn.Module, sparsity: float, seed: int = 0,
                 scope: str = "global") -> dict:
    """Remove weights uniformly at random (seeded)."""
    return prune_by_scores(model, random_scores(model, seed), sparsity, "lowest", scope, seed)


def remove_pruning(model: nn.Module) -> nn.Module:
    """Make masks permanent (:func:`torch.nn.utils.prune.remove` on every pruned weight)."""
    for m in model.modules():
        if torch_prune.is_pruned(m) and hasattr(m, "weight_mask"):
            torch_prune.remove(m, "weight")
    return model


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zero entries over all Conv2d / Linear weights."""
    tot = zero = 0
    for m in _weight_params(model).values():
        w = m.weight.detach()
        tot += w.numel()
        zero += int((w == 0).sum())
    return zero / max(tot, 1)
