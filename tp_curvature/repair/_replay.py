"""Which input features and output channels of each layer a Torch-Pruning run kept.

Either every group is recorded just before it is pruned (:func:`record_group`: exact for any
pruner), or the pruner's history is replayed. A pruner records every group it prunes in its
dependency graph's *pruning history* (the root layer's name, in or out channels, the root
indices at that moment; ``pruner.pruning_history()``), whether the groups were pruned by
``pruner.step()``, interactively or over several iterative steps. :func:`replay` prunes a copy of the model as it was before those groups, group by group
with the same indices, and records what every dependency of every group removed from its
layer. The kept indices compose into indices of the original weight: ``keep_in[name]`` (dim 1
of the weight, the per-group index for a grouped convolution, as Torch-Pruning slices it) and
``keep_out[name]`` (dim 0). A pruner that edits a group after building it (Torch-Pruning's
grouped-query attention heads) prunes otherwise than its history says: the caller checks every
weight against the calibrated one sliced by ``kept``, so such a replay is refused, not
silently wrong.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
import torch_pruning as tp


@dataclass
class Kept:
    """Kept indices of the original weights, by layer name (absent: all kept)."""
    keep_in: dict = field(default_factory=dict)
    keep_out: dict = field(default_factory=dict)

    def removed_inputs(self, name: str) -> bool:
        return name in self.keep_in


def _first_float(out):
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    return out


def dependency_graph(model: nn.Module, example, forward_fn: Callable,
                     pruner_graph=None) -> "tp.DependencyGraph":
    """Torch-Pruning's dependency graph of ``model`` built as the pruner built its own: the
    same customised pruners and unwrapped parameters (matched by name) as ``pruner_graph``."""
    kwargs = {}
    if pruner_graph is not None:
        names = getattr(pruner_graph, "_param_to_name", {})
        unwrapped = []
        for item in getattr(pruner_graph, "unwrapped_parameters", []) or []:
            name = names.get(item.parameters)
            if name is not None:
                unwrapped.append((model.get_parameter(name), item.pruning_dim))
        kwargs = dict(customized_pruners=dict(getattr(pruner_graph, "CUSTOMIZED_PRUNERS", {})),
                      unwrapped_parameters=unwrapped or None)
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example, forward_fn=lambda m, b: forward_fn(m, b),
            output_transform=_first_float, verbose=False, **kwargs)


def replay(copy: nn.Module, graph: "tp.DependencyGraph", history: list, kept: Kept) -> None:
    """Prune ``copy`` (whose dependency graph is ``graph``) by the entries of ``history``, in
    order, composing what each layer loses into ``kept`` (updated in place)."""
    for module_name, is_out, idxs in history:
        module = copy.get_submodule(module_name)
        pruner = graph.get_pruner_of_module(module)
        fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
        group = graph.get_pruning_group(module, fn, list(idxs))
        record_group(group, kept)
        group.prune(record_history=False)


def record_group(group, kept: Kept) -> None:
    """Compose into ``kept`` what each Linear / Conv dependency of ``group`` is about to
    remove (call it before ``group.prune()``)."""
    graph = group._DG
    names = graph._module2name
    for dep, dep_idxs in group:
        layer = dep.target.module
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)) and layer in names:
            _record(kept, names[layer], layer, graph, dep.handler, list(dep_idxs))


def _record(kept: Kept, name: str, layer: nn.Module, graph, handler, idxs: list) -> None:
    """What ``handler(layer, idxs)`` is about to remove, as Torch-Pruning slices it."""
    w = layer.weight
    if graph.is_out_channel_pruning_fn(handler):
        n, table = w.shape[0], kept.keep_out
        rel = sorted(set(range(n)) - set(idxs))
    elif graph.is_in_channel_pruning_fn(handler):
        groups = getattr(layer, "groups", 1)
        if groups > 1 and w.shape[1] == 1:
            return                                  # depthwise: in and out are the same
        n, table = w.shape[1], kept.keep_in
        total = n * groups
        rel = sorted(set(range(total)) - set(idxs))
        if groups > 1:                              # Torch-Pruning's grouped-conv slicing
            rel = rel[:len(rel) // groups]
    else:
        return
    prev = table.get(name, torch.arange(n))
    table[name] = prev[torch.as_tensor(rel, dtype=torch.long)]
