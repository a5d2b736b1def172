"""The sequential refit: each layer on the inputs the already repaired pruned layers produce.

The unpruned copy and the pruned model run side by side on every calibration batch (one
exported program of the pair, so one streaming pass gives both inputs of a layer). With a
single calibration batch, one pass refits every layer: the observer refits a layer at its tap,
before the pruned model runs it, so the layers after it see its repaired output. With several
batches the layers to refit are taken by depth (a layer's depth is one more than the deepest layer to refit
upstream of it); each depth is one pass accumulating, per layer, ``A = E[x^_S x^_S^T]`` (the
pruned model's input, its kept features and a constant) and ``C = E[x~ x^_S^T]`` (against the
unpruned model's input), then every layer of that depth is refit
(:func:`~tp_curvature.repair._solve.ridge_refit`) and written into the model before the next
pass. A bias is created, zero, before the first pass for a layer without one. After an error
the model gets back every value this function changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .._export import export_program
from ._solve import ridge_refit
from ._statistics import layer_specs, row_seed, sampled_positions


class _Pair(nn.Module):
    def __init__(self, original: nn.Module, pruned: nn.Module):
        super().__init__()
        self.original = original
        self.pruned = pruned


@dataclass
class CrossMoments:
    """Observer: for each layer of one depth, the moments of the pruned input against itself
    and against the unpruned input (``specs``: name -> (unpruned spec, pruned spec); rows
    capped by ``max_rows`` with the same sampled positions on both sides)."""
    specs: dict
    max_rows: Optional[int] = None
    on_seen: object = None          # called (name, self) after each pruned input (one batch)
    pending: dict = field(default_factory=dict)
    auto: dict = field(default_factory=dict)
    cross: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    batches: dict = field(default_factory=dict)

    def taps(self) -> dict:
        taps: dict = {}
        for name, (orig, pruned) in self.specs.items():
            taps.setdefault(orig.node, []).append(f"o:{name}")
            taps.setdefault(pruned.node, []).append(f"p:{name}")
        return taps

    def observe(self, key: str, x: torch.Tensor) -> None:
        side, name = key.split(":", 1)
        if side == "o":                      # the unpruned model runs first
            self.pending[name] = x.detach().clone()
            return
        orig_spec, pruned_spec = self.specs[name]
        xo = self.pending.pop(name)
        b = self.batches[name] = self.batches.get(name, -1) + 1
        keep = sampled_positions(orig_spec, xo, self.max_rows, row_seed(name, b))
        fo = orig_spec.features(xo, keep)                # (groups, F, rows) float64
        fp = pruned_spec.features(x.detach(), keep)      # (groups, k, rows)
        if name not in self.auto:
            g, f, k = fo.shape[0], fo.shape[1], fp.shape[1]
            zeros = dict(dtype=torch.float64, device=fp.device)
            self.auto[name] = torch.zeros(g, k + 1, k + 1, **zeros)
            self.cross[name] = torch.zeros(g, f + 1, k + 1, **zeros)
            self.rows[name] = 0
        _accumulate(self.auto[name], fp, fp)
        _accumulate(self.cross[name], fo, fp)
        self.rows[name] += fp.shape[2]
        if self.on_seen is not None:    # refit now: the pruned layer runs after its tap
            self.on_seen(name, self)


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += [a; 1] [b; 1]^T`` per group without building the constant rows."""
    fa, fb = a.shape[1], b.shape[1]
    out[:, :fa, :fb].baddbmm_(a, b.transpose(1, 2))
    out[:, :fa, fb] += a.sum(2)
    out[:, fa, :fb] += b.sum(2)
    out[:, fa, fb] += a.shape[2]


def sequential_refits(repair, model: nn.Module, track, todo: list) -> dict:
    """``{layer: ((weight, bias) or None, info)}``, each refit written into ``model`` as soon
    as it is computed (restored after an error). With a single calibration batch one pass does
    it all: each layer is refit at its tap, before the pruned model runs it; otherwise one pass
    per depth (:func:`_waves`)."""
    if not todo:
        return {}
    saved = {n: _snapshot(model.get_submodule(n)) for n in todo}
    try:
        return _refit_all(repair, model, track, todo)
    except BaseException:
        for n, snap in saved.items():
            _restore(model.get_submodule(n), snap)
        raise


def _refit_all(repair, model: nn.Module, track, todo: list) -> dict:
    from ._repair import _assign, _feature_index, _original_rows, _rows_by_group, _unflatten
    for n in todo:
        module = model.get_submodule(n)
        if module.bias is None:
            _assign(module, module.weight.detach(), torch.zeros(module.weight.shape[0]))
    pair = _Pair(repair._original, model)
    data = repair._data

    def pair_forward(p, batch):
        return data.forward_fn(p.original, batch), data.forward_fn(p.pruned, batch)

    with data.open() as (first, _):
        program = export_program(pair, first, pair_forward)
    specs = {s.name: s for s in layer_specs(program, pair)}
    todo = [n for n in todo if "original." + n in specs and "pruned." + n in specs]
    refits = {}

    def refit(n: str, obs: CrossMoments) -> None:
        spec = specs["original." + n]
        keep = _feature_index(spec, track.kept.keep_in[n])
        w0, b0 = _original_rows(repair._original.get_submodule(n), track.kept.keep_out.get(n))
        rows = _rows_by_group(spec, track.kept.keep_out.get(n), w0.shape[0])
        flat, info = _refit_layer(repair, spec, obs, n, w0, b0, keep, rows)
        new = None if flat is None else _unflatten(
            spec, repair._original.get_submodule(n), flat, keep.numel())
        if new is not None:
            _assign(model.get_submodule(n), *new)
        refits[n] = (new, info)

    def pairs(names):
        return {n: (specs["original." + n], specs["pruned." + n]) for n in names}

    if data.length_hint() == 1:
        obs = CrossMoments(pairs(todo), repair.max_rows, on_seen=refit)
        program.run(pair, iter(data), [obs], repair.progress, 1)
        return refits
    for wave in _waves(program, specs, todo):
        obs = CrossMoments(pairs(wave), repair.max_rows)
        program.run(pair, iter(data), [obs], repair.progress, data.length_hint())
        for n in wave:
            refit(n, obs)
    return refits


def _refit_layer(repair, spec, obs: CrossMoments, name, w0, b0, keep, rows) -> tuple:
    n = max(obs.rows[name], 1)
    out = torch.empty(w0.shape[0], keep.numel() + 1, dtype=torch.float64)
    for g, r in enumerate(rows):
        wt = torch.cat([w0[r], b0[r, None]], 1)
        auto = (obs.auto[name][g] / n).cpu()
        cross = (obs.cross[name][g] / n).cpu()
        sol, used = ridge_refit(wt, cross, auto, keep, repair.ridge)
        if used is not None and used > repair.ridge:
            repair._warn(name, f"its system is singular at ridge={repair.ridge:g}; solved with "
                               f"ridge={used:g}")
        if sol is None:
            return None, {"method": "left as pruned",
                          "why": "no ridge gave a finite solution of its system"}
        out[r] = sol
    return out, {"method": "lsq (sequential)", "kept_features": int(keep.numel()) * spec.groups,
                 "removed_features": (spec.group_features - int(keep.numel())) * spec.groups}


def _waves(program, specs: dict, todo: list) -> list:
    """The layers of ``todo`` grouped by depth in the pruned model (see the module
    docstring), shallowest first."""
    tap_of = {specs["pruned." + n].node: n for n in todo}
    layer_node = {}
    for node in program.gm.graph.nodes:
        if node.op == "call_function" and node.args and hasattr(node.args[0], "name") \
                and node.args[0].name in tap_of and len(node.args) > 1 \
                and getattr(node.args[1], "op", None) == "get_attr" \
                and str(node.args[1].target).startswith("model.pruned."):
            layer_node[node.name] = tap_of[node.args[0].name]
    depth_at: dict = {}                      # fx node -> depth of the deepest todo layer above
    depth = {}
    for node in program.gm.graph.nodes:
        above = max((depth_at.get(a.name, -1) for a in node.all_input_nodes), default=-1)
        if node.name in tap_of:
            depth[tap_of[node.name]] = above + 1
        if node.name in layer_node:
            above = max(above, depth[layer_node[node.name]])
        depth_at[node.name] = above
    waves: dict = {}
    for n in todo:
        waves.setdefault(depth.get(n, 0), []).append(n)
    return [waves[d] for d in sorted(waves)]


def _snapshot(module: nn.Module) -> tuple:
    return (module.weight.detach().clone(),
            None if module.bias is None else module.bias.detach().clone())


def _restore(module: nn.Module, snap: tuple) -> None:
    with torch.no_grad():
        module.weight.copy_(snap[0])
        if snap[1] is None:
            module.bias = None
        else:
            module.bias.copy_(snap[1])
