"""Input checks of the per-weight mode: options, images, layer values (before any work)."""
from __future__ import annotations

import dataclasses
import torch
import torch.nn as nn

from ..config import CurvatureConfig


WEIGHT_TYPES = (nn.Linear, nn.Conv2d)
AUX_METHODS = {"size", "dim"}
OUTPUTS = ("softmax", "logits")
REDUCES = ("min", "mean")
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(CurvatureConfig))


def check_choice(name: str, value, choices: tuple):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got "
                         f"{value!r}")


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_images(images, what: str = "images") -> torch.Tensor:
    """The image tensor of ``images`` (a tensor ``(N, ...)`` or an ``(images, targets)`` pair,
    targets of any dtype), checked: a non-empty floating-point batch with finite values."""
    if isinstance(images, (tuple, list)):
        if len(images) != 2 or not isinstance(images[0], torch.Tensor):
            raise TypeError(
                f"{what} must be a tensor (N, ...) or an (images, targets) pair, got a "
                f"{type(images).__name__} of {len(images)} item(s)"
                + ("" if len(images) == 2 else " (concatenate batches with torch.cat)"))
        x, y = images
        if isinstance(y, torch.Tensor) and y.dim() > 0 and x.dim() > 0 and \
                y.shape[0] != x.shape[0]:
            raise ValueError(f"{what}: {x.shape[0]} images but {y.shape[0]} targets in the "
                             "(images, targets) pair")
        images = x
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a tensor (N, ...) or an (images, targets) pair, got "
                        f"{type(images).__name__}")
    if images.dim() < 2:
        raise ValueError(f"{what} must be a batch (N, ...) with a batch dimension, got shape "
                         f"{tuple(images.shape)}")
    if images.shape[0] == 0 or images.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(images.shape)}): at least one image "
                         "is needed")
    if not images.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {images.dtype}")
    ok = torch.isfinite(images.detach().reshape(images.shape[0], -1)).all(dim=1)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten().tolist()
        raise ValueError(f"{what} contain non-finite values (NaN/inf) in image(s) "
                         f"{format_indices(bad)}")
    return images


def format_indices(idx: list, limit: int = 8) -> str:
    head = ", ".join(str(i) for i in idx[:limit])
    return f"[{head}{', ...' if len(idx) > limit else ''}] ({len(idx)} in all)" \
        if len(idx) > 1 else f"{idx[0]}"


def element_config(config: dict, sparse: bool = False) -> CurvatureConfig:
    """:meth:`CurvatureConfig.element` (the paper's definition; ``topk`` 32 dense, 8 sparse)
    with the keyword options as overrides. ``node_value`` must stay ``"mean_abs"`` (an
    element's value on one image is one number: it has no spread); unknown keywords are a
    TypeError naming them, and every value is checked by :class:`CurvatureConfig` with a
    message naming the option."""
    unknown = sorted(set(config) - set(_CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"unknown curvature option(s) {', '.join(map(repr, unknown))}; the "
                        f"options are {', '.join(_CONFIG_FIELDS)}")
    if config.get("node_value", "mean_abs") != "mean_abs":
        raise ValueError(f"node_value={config['node_value']!r} does not apply to the per-weight "
                         "mode: an element's value on one image has no spread (use 'mean_abs')")
    return CurvatureConfig.element(sparse, **config)


def check_layer_values(graph) -> None:
    """Weights, biases and BatchNorm parameters / statistics of every layer are finite."""
    for lay in graph.layers:
        tensors = [("weight", lay.module.weight), ("bias", getattr(lay.module, "bias", None))]
        for what, t in tensors:
            if t is not None and not bool(torch.isfinite(t.detach()).all()):
                raise ValueError(
                    f"layer {lay.name!r} ({type(lay.module).__name__}) has a non-finite "
                    f"(NaN/inf) {what}: {int((~torch.isfinite(t.detach())).sum())} of "
                    f"{t.numel()} entries")
        if lay.bn is not None:
            bn_name = lay.bn_name
            for what in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(lay.bn, what, None)
                if t is not None and not bool(torch.isfinite(t.detach()).all()):
                    raise ValueError(
                        f"BatchNorm {bn_name!r} after layer {lay.name!r} has a non-finite "
                        f"(NaN/inf) {what}")
            rv = lay.bn.running_var
            if rv is not None and bool((rv.detach().double() + lay.bn.eps <= 0).any()):
                raise ValueError(f"BatchNorm {bn_name!r} after layer {lay.name!r} has "
                                 f"running_var + eps <= 0")
