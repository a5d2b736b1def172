"""Calibration: forward hooks record the node values of the channel graph.

The value of a node (a channel of a junction tensor, see :mod:`tp_curvature.graph`) is

.. math::  \\bar a_u = \\frac{1}{|B|} \\sum_{b \\in B} \\operatorname{mean}_{s} |T_b[u, s]|,

the absolute post-activation averaged over the calibration inputs ``B`` and the spatial
positions ``s`` (for a Linear after flatten, over the features of channel ``u``). The graph
uses the min-max normalised value per junction (:func:`normalise`).

Hooks sit on the first layer that reads each junction (the tensor that layer receives is the
junction) and the model's output gives the last junction. They are removed afterwards even on
error, and every submodule's train/eval flag is restored (:func:`~tp_curvature._tracing.eval_mode`);
user hooks are left untouched. Calibration runs in eval mode (BatchNorm uses its running
statistics, dropout is off). :func:`calibrate_graph` is the whole pipeline (trace, record,
normalise) that :func:`~tp_curvature.curvature.connection_curvature` and
:class:`~tp_curvature.importance.CurvatureImportance` share.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ._tracing import eval_mode
from .graph import ChannelGraph


class CalibrationError(ValueError):
    """The calibration data or the activations it produced cannot give valid scores."""


def as_batches(data, max_batches: Optional[int] = None) -> list:
    """Normalise calibration data to a list of batches.

    Accepts a tensor (one batch), an ``(inputs, targets)`` pair (one batch), a list/tuple of
    batches, or any iterable of batches such as a ``DataLoader`` (at most ``max_batches``).
    """
    if data is None:
        raise CalibrationError("no calibration data: pass a tensor, a list of batches or a "
                               "DataLoader to calibrate()")
    if isinstance(data, torch.Tensor):
        batches = [data]
    elif (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)
          and isinstance(data[1], torch.Tensor) and data[1].dim() == 1
          and not data[1].is_floating_point() and data[1].shape[0] == data[0].shape[0]
          and data[0].dim() > 1):
        batches = [tuple(data)]
    elif isinstance(data, (list, tuple)):
        batches = list(data)
    else:
        batches = list(itertools.islice(iter(data), max_batches))
    if max_batches is not None:
        batches = batches[:max_batches]
    if not batches:
        raise CalibrationError("calibration data is empty: at least one batch is needed")
    for i, b in enumerate(batches):
        x = batch_inputs(b)
        if isinstance(x, torch.Tensor) and x.numel() == 0:
            raise CalibrationError(f"calibration batch {i} is empty")
    return batches


def batch_inputs(batch):
    """The model input of a batch: the tensor itself, or the first element of a tuple/list."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def default_forward(model: nn.Module, batch):
    """``model(batch)`` for a tensor, ``model(batch[0])`` for an (inputs, targets) batch."""
    x = batch_inputs(batch)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(x, torch.Tensor):
        x = x.to(device)
    return model(x)


def record_activations(graph: ChannelGraph, batches: list,
                       forward_fn: Optional[Callable] = None, progress: bool = False
                       ) -> list[np.ndarray]:
    """Mean |activation| of every node of ``graph``, one array per junction (unnormalised).

    Raises :class:`CalibrationError` naming the layer if any activation is NaN or infinite.
    """
    model = graph.model
    forward_fn = forward_fn or default_forward
    names = {id(m): n for n, m in model.named_modules()}
    sums = [np.zeros(j.n_nodes) for j in graph.junctions]
    counts = [0 for _ in graph.junctions]
    handles = []

    def accumulate(ji: int, t: torch.Tensor, where: str):
        if not isinstance(t, torch.Tensor):
            raise CalibrationError(f"{where}: expected a tensor, got {type(t).__name__}")
        t = t.detach()
        dims = [0] + list(range(2, t.dim()))
        # one pass, float64 accumulation; a NaN/inf anywhere makes its channel sum non-finite
        feat = t.abs().sum(dim=dims, dtype=torch.float64)
        if not torch.isfinite(feat).all():
            raise CalibrationError(
                f"non-finite (NaN/inf) activations at the input of {where}: check the model and "
                "the calibration data")
        feat = (feat / (t.numel() / t.shape[1])).cpu().numpy()      # mean |a| per feature
        j = graph.junctions[ji]
        node = np.zeros(j.n_nodes)
        np.add.at(node, j.group, feat)
        node /= np.bincount(j.group, minlength=j.n_nodes)
        sums[ji] += node * t.shape[0]
        counts[ji] += t.shape[0]

    for j in graph.junctions:
        if j.is_output or not j.consumers:
            continue
        layer = graph.layers[j.consumers[0]]

        def hook(mod, inp, out, ji=j.index, where=names.get(id(layer.module), layer.name)):
            accumulate(ji, inp[0], f"layer {where!r}")
        handles.append(layer.module.register_forward_hook(hook))

    it = batches
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc="calibration", leave=False)
    try:
        with eval_mode(model), torch.no_grad():
            for b in it:
                out = forward_fn(model, b)
                accumulate(graph.output_junction, out, "the model output")
    finally:
        for h in handles:
            h.remove()
    acts = []
    for j, s, c in zip(graph.junctions, sums, counts):
        if c == 0:
            raise CalibrationError(f"junction {j.name!r} saw no activation during calibration")
        acts.append(s / c)
    return acts


@dataclass
class Calibration:
    """The result of :func:`calibrate_graph`: the channel graph of a model and the normalised
    value of every node, one float64 array per junction (``acts[j][u]`` in [0, 1])."""
    graph: ChannelGraph
    acts: list


def calibrate_graph(model: nn.Module, batches: list, forward_fn: Optional[Callable] = None,
                    normalize: str = "minmax", progress: bool = False) -> Calibration:
    """The calibration pipeline: trace ``model`` into its :class:`~tp_curvature.graph.ChannelGraph`
    (shapes from one sample of the first batch), record the mean |activation| of every node over
    ``batches`` (:func:`record_activations`) and normalise them per junction
    (:func:`normalise`). ``batches`` is a list, as :func:`as_batches` returns."""
    forward_fn = forward_fn or default_forward
    graph = ChannelGraph.from_model(model, batches[0], forward_fn)
    raw = record_activations(graph, batches, forward_fn, progress)
    return Calibration(graph, [normalise(a, normalize) for a in raw])


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
