"""``LeastSquaresRepair``: refit every layer that reads a pruned channel, for any pruner."""
from __future__ import annotations

import copy
import numbers
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..calibration import CalibrationData, check_max_batches, observe
from ._replay import Kept, dependency_graph, record_group, replay
from ._solve import relative_error, ridge_refit
from ._statistics import GramStatistics, LayerSpec, layer_specs

#: ridge relative to the mean diagonal of the kept features' second moment, by refit
#: (sequential or not): the best of the measured sweep on four Fashion-MNIST models
#: (docs/repair.md, ``benchmarks/repair_sweep.py``)
DEFAULT_RIDGE = {True: 1e-1, False: 1e-2}
#: the largest Gram matrix kept per layer (float64); larger layers get the bias-only repair
DEFAULT_MAX_GRAM_BYTES = 256 << 20
#: rows (sample x position) per layer and calibration batch entering the moments: a
#: convolution's positions are sampled beyond it (the same positions for the unpruned and
#: the pruned input), its cost then no longer grows with the feature map
DEFAULT_MAX_ROWS = 16384


class RepairError(RuntimeError):
    """The model cannot be repaired as asked (it changed since calibration, or no
    calibration)."""


@dataclass
class _Track:
    """What one pruner has done to the model, as far as this repair has followed it: either
    recorded group by group (:meth:`LeastSquaresRepair.step`) or replayed from its history on
    a copy of the calibrated model (``copy``, ``graph``)."""
    copy: Optional[nn.Module] = None  # the calibrated model pruned by the replayed history
    graph: object = None              # Torch-Pruning's dependency graph of ``copy``
    n_history: int = 0                # history entries followed
    recorded: bool = False            # followed by recording the groups as they were pruned
    kept: Kept = field(default_factory=Kept)
    done: dict = field(default_factory=dict)     # layer -> kept-feature count at its last refit


class LeastSquaresRepair:
    r"""Least-squares repair of the layers that read pruned channels (any Torch-Pruning
    pruner, any importance).

    Before pruning, :meth:`calibrate` streams calibration data once through the model (the
    library's calibration pipeline: the same data forms, ``max_batches`` and ``forward_fn`` as
    :meth:`CurvatureImportance.calibrate <tp_curvature.CurvatureImportance.calibrate>`) and keeps,
    for every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layer (Linear on tokens or after
    ``flatten``, grouped convolutions per group; depthwise convolutions have nothing to refit),
    the float64 second moment :math:`\mathbb E[\tilde x \tilde x^T]` of its input features
    (conv: input channel x kernel tap, unfolded with the layer's stride, padding, dilation)
    and a constant. After the pruner has pruned (``pruner.step()``, interactive, iterative),
    :meth:`apply` refits every layer whose input features were removed, weights and bias, so
    that its output matches the unpruned layer's on the calibration data:

    .. math::  \min_{W', b'} \mathbb E \|W x + b - (W'_S x_S + b')\|^2 +
               \lambda \|W' - W_S\|^2

    over the kept features ``S`` (:mod:`tp_curvature.repair._solve`), with
    ``lambda = ridge * mean(diag E[x_S x_S^T])``. By default the refit is *sequential*: the
    layers in forward order, each on the inputs the already repaired pruned layers before it
    produce (the error-propagation fix of SparseGPT / SlimGPT), from one paired pass of the
    unpruned and the pruned model after pruning (one pass per depth level when the calibration
    data has several batches). ``sequential=False`` refits each layer on the unpruned model's
    inputs, from the statistics of the pass before pruning (cheaper with many batches, less
    accurate: see docs/repair.md). ``bias_only=True`` refits the bias alone: FLAP's bias
    compensation :math:`b' = b + W_R \mathbb E[x_R]`.

    Which channels each layer kept is read from the pruner's pruning history, replayed on a
    copy of the calibrated model: the replayed copy must equal the pruned model parameter by
    parameter, so a model changed other than by the pruner since :meth:`calibrate` raises
    :class:`RepairError` naming the parameter. Nothing is changed before every refit is
    computed. A layer whose system cannot be solved (no ridge gives a finite solution) is left
    as pruned with one warning naming it; a layer whose Gram matrix would exceed
    ``max_gram_bytes`` gets the bias-only repair, with one warning. The model's train/eval
    flags, hooks and ``requires_grad`` are left as they were.

    Parameters
    ----------
    ridge : float >= 0, optional
        Relative ridge (default :data:`DEFAULT_RIDGE`: 0.1 sequential, 0.01 independent).
    bias_only : bool
        Refit the bias alone (FLAP's bias compensation; implies ``sequential=False``).
    sequential : bool, optional
        Refit layer after layer on the repaired pruned model's inputs (default True unless
        ``bias_only``).
    max_gram_bytes : int
        The largest Gram matrix (float64) kept for one layer.
    max_rows : int or None
        At most this many rows (sample x output position, or tokens) per layer and batch
        enter the moments; beyond it a fixed random subset of positions is used, the same for
        every sample of the batch (default :data:`DEFAULT_MAX_ROWS`; None: all).
    max_batches : int, optional
        Use at most this many calibration batches.
    progress : bool
        tqdm bars for the calibration passes.

    Examples
    --------
    >>> import torch, torch.nn as nn, torch_pruning as tp
    >>> from tp_curvature import LeastSquaresRepair
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> x = torch.randn(256, 8)
    >>> repair = LeastSquaresRepair().calibrate(model, x)
    >>> imp = tp.importance.GroupMagnitudeImportance()
    >>> pruner = tp.pruner.BasePruner(model, x[:1], importance=imp, pruning_ratio=0.5,
    ...                               ignored_layers=[model[2]])
    >>> pruner.step()
    >>> _, log = repair.apply(model, pruner, log=True)
    >>> sorted(log["layers"]), model[2].weight.shape
    (['2'], torch.Size([4, 8]))
    """

    def __init__(self, *, ridge: Optional[float] = None, bias_only: bool = False,
                 sequential: Optional[bool] = None,
                 max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
                 max_rows: Optional[int] = DEFAULT_MAX_ROWS,
                 max_batches: Optional[int] = None, progress: bool = False):
        if sequential is None:
            sequential = not bias_only
        if ridge is None and isinstance(sequential, bool):
            ridge = DEFAULT_RIDGE[sequential]
        if not (isinstance(ridge, numbers.Real) and not isinstance(ridge, bool) and ridge >= 0):
            raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
        for name, v in (("bias_only", bias_only), ("sequential", sequential),
                        ("progress", progress)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be True or False, got {v!r}")
        if bias_only and sequential:
            raise ValueError("bias_only and sequential cannot be combined: the bias-only "
                             "repair reads the unpruned model's means")
        if not isinstance(max_gram_bytes, numbers.Integral) or max_gram_bytes < 0:
            raise ValueError(f"max_gram_bytes must be an int >= 0, got {max_gram_bytes!r}")
        self.ridge = float(ridge)
        self.bias_only = bias_only
        self.sequential = sequential
        self.max_gram_bytes = int(max_gram_bytes)
        if max_rows is not None and (not isinstance(max_rows, numbers.Integral)
                                     or isinstance(max_rows, bool) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
        self.max_rows = None if max_rows is None else int(max_rows)
        self.max_batches = check_max_batches(max_batches)
        self.progress = progress
        self._original: Optional[nn.Module] = None
        self._data: Optional[CalibrationData] = None
        self._specs: dict = {}
        self._moments: dict = {}
        self._tracks = weakref.WeakKeyDictionary()      # pruner -> _Track
        self._warned: set = set()

    # ------------------------------------------------------------------ calibration
    def calibrate(self, model: nn.Module, data, forward_fn: Optional[Callable] = None,
                  max_batches: Optional[int] = None) -> "LeastSquaresRepair":
        """Keep a copy of the unpruned ``model`` (the targets of the refits) and the data (any
        form of :class:`~tp_curvature.calibration.CalibrationData`). The independent refit
        records every layer's input statistics now, in one streaming pass; the sequential one
        only reads the data through once (checking every batch; a one-shot iterator's batches
        are kept) and makes its pass after pruning, in :meth:`apply`."""
        cap = self.max_batches if max_batches is None else check_max_batches(max_batches)
        data = CalibrationData(data, cap, forward_fn)
        specs, moments = {}, {}
        if self.sequential:
            for _ in data:
                pass
        else:
            stats: list = []

            def observers(program):
                stats.append(GramStatistics(layer_specs(program, model), self.max_gram_bytes,
                                            self.max_rows))
                return stats

            observe(model, data, observers, self.progress)
            specs = {s.name: s for s in stats[0].specs}
            moments = stats[0].moments
        self._original = copy.deepcopy(model)
        self._data = data
        self._specs, self._moments = specs, moments
        self._tracks = weakref.WeakKeyDictionary()
        return self

    # ------------------------------------------------------------------ repair
    def step(self, pruner) -> None:
        """``pruner.step()``, each group recorded just before it is pruned: exact for any
        pruner, also one that edits its groups after building them (Torch-Pruning's
        grouped-query attention heads), which a replay of the pruning history cannot follow.
        Then :meth:`apply`."""
        for group in pruner.step(interactive=True):
            self.record(pruner, group)
            group.prune()

    def record(self, pruner, group) -> None:
        """Record what ``group`` (of ``pruner``, about to be pruned: ``group.prune()``
        next) removes from every layer; for interactive pruning."""
        if self._original is None:
            raise RepairError("LeastSquaresRepair needs calibration data: call "
                              "repair.calibrate(model, data) before pruning")
        track = self._tracks.get(pruner)
        if track is None:
            track = self._tracks[pruner] = _Track(recorded=True)
        elif not track.recorded:
            raise RepairError("LeastSquaresRepair: this pruner's earlier groups were not "
                              "recorded; record every group of a pruner, or none")
        record_group(group, track.kept)
        track.n_history = len(pruner.pruning_history()) + 1

    def apply(self, model: nn.Module, pruner, log: bool = False):
        """Refit, in ``model``, every layer whose input features ``pruner`` removed since the
        last :meth:`apply` with that pruner (see the class docstring). Returns ``model``, or
        ``(model, log)`` with ``log=True``: ``log["layers"][name]`` gives the kept / removed
        features, the method (``"lsq"``, ``"bias"`` or ``"left as pruned"``) and the relative
        output error on the calibration data before and after the refit (independent
        refits)."""
        if self._original is None:
            raise RepairError("LeastSquaresRepair needs calibration data: call "
                              "repair.calibrate(model, data) before pruning")
        track = self._follow(pruner)
        _check_weights(model, self._original, track)
        todo = [n for n, k in track.kept.keep_in.items()
                if (self.sequential or n in self._specs) and track.done.get(n) != k.numel()]
        if self.sequential:
            from ._sequential import sequential_refits
            refits = sequential_refits(self, model, track, todo)
        else:
            refits = {n: self._refit(n, track.kept) for n in todo}
        report = {}
        for name, (new, info) in refits.items():
            report[name] = info
            if new is None:
                self._warn(name, info["why"])
        for name, (new, _) in refits.items():       # every refit computed: now assign
            if new is not None:
                _assign(model.get_submodule(name), *new)
                if track.copy is not None:
                    _assign(track.copy.get_submodule(name), *new)
            track.done[name] = track.kept.keep_in[name].numel()
        return (model, {"layers": report}) if log else model

    def _follow(self, pruner) -> _Track:
        """The pruner's track, brought up to date: recorded groups as they are, or the new
        entries of its pruning history replayed on a copy of the calibrated model."""
        history = list(pruner.pruning_history())
        track = self._tracks.get(pruner)
        if track is not None and track.recorded:
            if track.n_history != len(history):
                raise RepairError(
                    f"LeastSquaresRepair: the pruner pruned {len(history) - track.n_history} "
                    "group(s) this repair did not record: prune through repair.step(pruner) "
                    "(or record every group) each time")
            return track
        if track is None or track.n_history > len(history):
            clone = copy.deepcopy(self._original)
            with self._data.open() as (first, _):
                graph = dependency_graph(clone, first, self._data.forward_fn,
                                         getattr(pruner, "DG", None))
            track = self._tracks[pruner] = _Track(clone, graph)
        replay(track.copy, track.graph, history[track.n_history:], track.kept)
        track.n_history = len(history)
        return track

    def _refit(self, name: str, kept: Kept) -> tuple:
        """The independent refit of layer ``name``: ``((weight, bias) or None, info)``."""
        spec: LayerSpec = self._specs[name]
        mom = self._moments.get(name)
        w0, b0 = _original_rows(self._original.get_submodule(name), kept.keep_out.get(name))
        keep = _feature_index(spec, kept.keep_in[name])
        rows = _rows_by_group(spec, kept.keep_out.get(name), w0.shape[0])
        info = {"kept_features": int(keep.numel()) * spec.groups,
                "removed_features": (spec.group_features - int(keep.numel())) * spec.groups}
        if mom is None:
            return None, dict(info, method="left as pruned",
                              why="it saw no input during calibration")
        second = mom.second_moment()
        bias_only = self.bias_only or second is None
        if second is None:
            self._warn(name, f"its Gram matrix ({spec.gram_bytes() / 2**20:.0f} MiB) exceeds "
                             "max_gram_bytes; it gets the bias-only repair")
            second = _mean_moment(mom.mean())
        out = torch.empty(w0.shape[0], keep.numel() + 1, dtype=torch.float64)
        err_before = err_after = ridge_used = 0.0
        for g, r in enumerate(rows):
            wt = torch.cat([w0[r], b0[r, None]], 1).to(second.device)
            if bias_only:
                sol = _bias_refit(wt, second[g], keep)
            else:
                k1 = torch.cat([keep, torch.tensor([spec.group_features])]).to(second.device)
                sol, used = ridge_refit(wt, second[g][:, k1], second[g][k1][:, k1],
                                        keep.to(second.device), self.ridge)
                if used is not None and used > self.ridge:
                    ridge_used = max(ridge_used, used)
            if sol is None:
                return None, dict(info, method="left as pruned",
                                  why="no ridge gave a finite solution of its system")
            if not bias_only or mom.gram is not None:
                full = mom.second_moment()[g] if mom.gram is not None else second[g]
                pruned = torch.cat([wt[:, keep], wt[:, -1:]], 1)
                err_before += relative_error(wt, pruned, full, keep.to(full.device)) / len(rows)
                err_after += relative_error(wt, sol, full, keep.to(full.device)) / len(rows)
            out[r] = sol.cpu()
        if ridge_used:
            self._warn(name, f"its system is singular at ridge={self.ridge:g} (duplicate or "
                             f"constant features, or fewer samples than features); solved "
                             f"with ridge={ridge_used:g}")
        info.update(method="bias" if bias_only else "lsq", error_pruned=err_before,
                    error_repaired=err_after, ridge=max(ridge_used, self.ridge))
        return _unflatten(spec, self._original.get_submodule(name), out, keep.numel()), info

    def _warn(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"LeastSquaresRepair: layer {name!r}: {why}", stacklevel=3)


# ------------------------------------------------------------------------------ helpers
def _check_weights(model: nn.Module, original: nn.Module, track: _Track) -> None:
    """Every Linear / Conv weight (and bias) of the pruned ``model`` must be the calibrated
    model's, sliced as the pruner removed channels (values checked for the layers this repair
    has not refit yet)."""
    hint = (" (a pruner that edits its groups after building them, e.g. Torch-Pruning's "
            "grouped-query attention heads, must prune through repair.step(pruner))"
            if not track.recorded else "")
    for name, m0 in original.named_modules():
        if not isinstance(m0, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise RepairError(f"LeastSquaresRepair: layer {name!r} of the calibrated model is "
                              "not in the model") from None
        for attr in ("weight", "bias"):
            t0, t = getattr(m0, attr), getattr(m, attr, None)
            if t0 is None:
                continue
            want = _sliced(t0.detach(), track.kept, name, attr)
            why = None
            if t is None or tuple(t.shape) != tuple(want.shape):
                why = (f"has shape {None if t is None else tuple(t.shape)}, the calibrated "
                       f"one pruned as the pruner did {tuple(want.shape)}")
            elif name not in track.done and not torch.equal(t.detach().to(want.device), want):
                why = "has other values than the calibrated one pruned as the pruner did"
            if why:
                raise RepairError(
                    f"LeastSquaresRepair: parameter '{name}.{attr}' {why}: the model was "
                    "changed other than by this pruner since calibrate() (or another pruner "
                    f"pruned it){hint}; call repair.calibrate(model, data) again before "
                    "pruning")


def _sliced(t: torch.Tensor, kept: Kept, name: str, attr: str) -> torch.Tensor:
    out = kept.keep_out.get(name)
    if out is not None:
        t = t[out.to(t.device)]
    inp = kept.keep_in.get(name)
    if attr == "weight" and inp is not None:
        t = t[:, inp.to(t.device)]
    return t


def _original_rows(module: nn.Module, keep_out) -> tuple:
    w = module.weight.detach().to(torch.float64).cpu()
    w = w.reshape(w.shape[0], -1)
    b = module.bias.detach().to(torch.float64).cpu() if module.bias is not None \
        else torch.zeros(w.shape[0], dtype=torch.float64)
    if keep_out is not None:
        w, b = w[keep_out], b[keep_out]
    return w, b


def _feature_index(spec: LayerSpec, keep_in: torch.Tensor) -> torch.Tensor:
    """Kept input channels (per group) as feature indices (channel x kernel tap)."""
    return (keep_in[:, None] * spec.taps + torch.arange(spec.taps)[None, :]).reshape(-1)


def _rows_by_group(spec: LayerSpec, keep_out, n_rows: int) -> list:
    """The kept output rows of each group (positions in the kept rows)."""
    if spec.groups == 1:
        return [torch.arange(n_rows)]
    per = spec.out_channels // spec.groups
    orig = keep_out if keep_out is not None else torch.arange(n_rows)
    return [torch.nonzero(orig // per == g).flatten() for g in range(spec.groups)]


def _bias_refit(wt: torch.Tensor, second: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Weights kept, bias plus the removed features' mean contribution."""
    f = wt.shape[1] - 1
    removed = torch.ones(f, dtype=torch.bool)
    removed[keep] = False
    mean = second[:f, f]
    bias = wt[:, f] + wt[:, :f][:, removed] @ mean[removed.to(mean.device)]
    return torch.cat([wt[:, keep], bias[:, None]], 1)


def _mean_moment(mean: torch.Tensor) -> torch.Tensor:
    """A stand-in second moment carrying only the means (for the bias-only repair)."""
    g, f = mean.shape
    out = torch.zeros(g, f + 1, f + 1, dtype=torch.float64, device=mean.device)
    out[:, :f, f] = mean
    out[:, f, :f] = mean
    out[:, f, f] = 1.0
    return out


def _unflatten(spec: LayerSpec, original: nn.Module, out: torch.Tensor, k: int) -> tuple:
    shape = (out.shape[0], k // spec.taps, *original.weight.shape[2:])
    return out[:, :k].reshape(shape), out[:, k]


def _assign(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy the refit into ``module`` in place (a bias is created where there was none)."""
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.dtype))
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=module.weight.dtype,
                                                   device=module.weight.device),
                                       requires_grad=module.weight.requires_grad)
        module.bias.copy_(bias.to(module.bias.dtype))
