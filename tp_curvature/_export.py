"""The one tracer: ``forward_fn(model, batch)`` as a :mod:`torch.export` program, and the
streaming run of that program with taps.

Both graphs of the library are read from the same :class:`Program`: the channel graph
(:mod:`tp_curvature.graph`, by id-tensor lineage) and the element graph of the per-weight mode
(:mod:`tp_curvature.unstructured`). :func:`export_program` exports non-strict with a dynamic
batch dim, then with a static batch of one, then with :func:`torch.export.draft_export`;
parameters and buffers stay the model's own tensors (``get_attr`` targets ``model.<name>``).
:meth:`Program.run` streams batches through a copy of the program's graph with *taps*: calls
of an observer inserted after the fx nodes it asks for, which receive those nodes' values. It
runs as compiled Python code, at the cost of the model's own forward plus the taps' work.

Every pass (export or run) happens in :func:`eval_mode` under ``torch.no_grad()``. During the
export the user's forward / backward hooks (the model's modules' and the global module hooks)
are detached and then put back exactly (:func:`hooks_detached`): a hook would otherwise run on
the tracer's fake tensors. Hooks that compute a weight (``torch.nn.utils.prune``,
``weight_norm``, ``spectral_norm``) are part of the model and stay. Nothing of the process's
global state is left changed: the tracer's log lines and partial-graph dumps of a failed
attempt are silenced for the attempt only.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import pickle
import warnings
from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

#: the wrapper module's attribute under which the model is exported (``model.<param name>``)
PREFIX = "model."


class UnsupportedModelError(ValueError):
    """The model contains a construct the library cannot represent."""


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the block with ``model`` in eval mode (BatchNorm on running statistics, dropout off).

    Afterwards every submodule gets back its own ``training`` flag (a model in train mode with
    one submodule in eval mode stays exactly so), also when the block raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def _weight_hook_types() -> tuple:
    """Hook classes that compute a module's weight (part of the model, kept during export)."""
    out = []
    for mod, name in (("torch.nn.utils.prune", "BasePruningMethod"),
                      ("torch.nn.utils.weight_norm", "WeightNorm"),
                      ("torch.nn.utils.spectral_norm", "SpectralNorm")):
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(out)


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                 "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")


@contextlib.contextmanager
def global_hooks_detached():
    """Run the block with the global module hooks (``register_module_forward_hook`` and
    kin) detached: the library's own modules (the exported program) run in it, and a user's
    global hook is no business of theirs. The hook dicts are restored in place afterwards,
    also when the block raises."""
    glob = importlib.import_module("torch.nn.modules.module")
    saved = []
    try:
        for attr in _GLOBAL_HOOKS:
            d = getattr(glob, attr, None)
            if d:
                saved.append((d, OrderedDict(d)))
                d.clear()
        yield
    finally:
        for d, items in saved:
            d.clear()
            d.update(items)


@contextlib.contextmanager
def hooks_detached(model: nn.Module):
    """Run the block with the user's forward / backward hooks of ``model``'s modules and the
    global module hooks detached; every hook dict is put back afterwards (the same objects,
    so handles keep working), also when the block raises. Hooks that compute a weight
    (``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``) stay."""
    keep = _weight_hook_types()
    saved = []
    try:
        for m in model.modules():
            for attr in _MODULE_HOOKS:
                d = m.__dict__.get(attr)
                if not d:
                    continue
                kept = OrderedDict((k, h) for k, h in d.items() if isinstance(h, keep))
                if len(kept) != len(d):
                    saved.append((m, attr, d))
                    m.__dict__[attr] = kept
        with global_hooks_detached():
            yield model
    finally:
        for m, attr, d in saved:
            m.__dict__[attr] = d


#: loggers whose messages on a failed export attempt are noise (the errors are reported)
_TRACER_LOGGERS = ("torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
                   "torch._dynamo", "torch._functorch", "torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _quiet_tracer():
    """Silence the tracer's warnings and its partial-graph dumps (printed to stderr by a
    failed export) for the block; the loggers' levels and ``sys.stderr`` are restored."""
    levels = [(lg, lg.level) for lg in map(logging.getLogger, _TRACER_LOGGERS)]
    for lg, _ in levels:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in levels:
            lg.setLevel(level)


@contextlib.contextmanager
def _no_stack_traces():
    """Let the tracer skip recording a Python stack trace per fx node (the library reads
    none; 5-15% of a ResNet-56 export); the flag is restored."""
    import torch.fx.config as fx_config
    old = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = old


def op_name(target) -> str:
    """ATen op name without namespace/overload (``aten.view.default`` -> ``view``)."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return getattr(target, "__name__", str(target))


def op_args(node: fx.Node) -> dict:
    """An ATen op's arguments by name, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def batch_size(batch) -> Optional[int]:
    """The size of the first dim of the batch's first tensor (None: no tensor)."""
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def slice_batch(batch, lo: int, hi: int, size: int):
    """Rows ``lo:hi`` of every tensor of ``batch`` whose first dim is the batch size."""
    return pytree.tree_map(lambda t: t[lo:hi] if isinstance(t, torch.Tensor) and t.dim() > 0
                           and t.shape[0] == size else t, batch)


def _example(batch, n: int):
    """An ``n``-sample example of ``batch`` (samples repeated when it has fewer)."""
    b = batch_size(batch)
    if b is None:
        return batch

    def take(t):
        if not (isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b):
            return t
        return t[torch.arange(n, device=t.device) % b]
    return pytree.tree_map(take, batch)


class _Forward(nn.Module):
    """``forward_fn(model, batch)`` as a module with the batch as its single input."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch):
        return self.fn(self.model, batch)


class Program:
    """An exported ``forward_fn(model, batch)``.

    ``gm`` is ``ExportedProgram.module()``: ATen ops as ``call_function`` nodes, parameters and
    buffers as ``get_attr`` nodes (the model's own tensors), the batch as pytree-flat
    placeholders. ``static_batch`` is None when any batch size runs, else the exported batch
    size (batches are then fed in chunks of it).

    A program pickles without its ``gm`` (a ``GraphModule`` of an export does not pickle):
    ``gm`` is exported again from ``model``, ``example`` and ``forward_fn`` when it is next
    needed.
    """

    def __init__(self, gm: Optional[fx.GraphModule], example, static_batch: Optional[int],
                 model: Optional[nn.Module] = None, forward_fn: Optional[Callable] = None):
        self._gm = gm
        self.example = example
        self.static_batch = static_batch
        self.model = model
        self.forward_fn = forward_fn

    @property
    def gm(self) -> fx.GraphModule:
        if self._gm is None:
            if self.model is None or self.forward_fn is None:
                raise RuntimeError("this program was unpickled without the model or the "
                                   "forward_fn it was exported from: export it again")
            self._gm = export_program(self.model, self.example, self.forward_fn)._gm
        return self._gm

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_gm"] = None
        try:
            pickle.dumps(self.forward_fn)
        except Exception:  # noqa: BLE001 - a lambda: the program cannot be exported again
            state["forward_fn"] = None
        return state

    def owner(self, target: str) -> tuple:
        """``(module name, attribute)`` of a ``get_attr`` target (``model.0.weight`` ->
        ``("0", "weight")``)."""
        qual = target[len(PREFIX):] if target.startswith(PREFIX) else target
        mod, _, attr = qual.rpartition(".")
        return mod, attr

    def chunks(self, batch) -> list:
        """``batch`` as the program takes it: whole, or in chunks of ``static_batch``."""
        size = batch_size(batch)
        if self.static_batch is None or size is None:
            return [batch]
        return [slice_batch(batch, i, i + self.static_batch, size)
                for i in range(0, size, self.static_batch)]

    def tapped(self, observers: list) -> fx.GraphModule:
        """A copy of ``gm`` that calls ``observer.observe(key, value)`` after every node that
        ``observer.taps()`` (``{fx node name: [key, ...]}``) names, for each observer."""
        graph = copy.deepcopy(self.gm.graph)
        nodes = {n.name: n for n in graph.nodes}
        for obs in observers:
            for name, keys in obs.taps().items():
                for key in keys:
                    with graph.inserting_after(nodes[name]):
                        graph.call_function(obs.observe, (key, nodes[name]))
        return fx.GraphModule(self.gm, graph)

    def run(self, model: nn.Module, batches: Iterable, observers: list,
            progress: bool = False, total: Optional[int] = None) -> int:
        """Stream ``batches`` through the program tapped by ``observers`` (:meth:`tapped`);
        returns the number of batches.

        Each batch is released before the next is read; the model runs in eval mode under
        ``torch.no_grad()`` and gets its own ``training`` flags back afterwards.
        """
        gm = self.tapped(observers)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            batches = bar = tqdm(batches, desc="calibration", leave=False, total=total)
        n = 0
        try:
            with eval_mode(model), torch.no_grad(), global_hooks_detached():
                for batch in batches:
                    for chunk in self.chunks(batch):
                        gm(chunk)
                    n += 1
                    del batch
        finally:
            if bar is not None:
                bar.close()
        return n

    def modules_of(self, node: fx.Node) -> list:
        """The qualified names of the modules ``node`` was traced in, outermost first
        (without the export wrapper's prefix)."""
        stack = node.meta.get("nn_module_stack") or {}
        return [path[len(PREFIX):] if path.startswith(PREFIX) else path
                for path, _ in stack.values()]


def export_program(model: nn.Module, batch, forward_fn: Callable) -> Program:
    """Export ``forward_fn(model, batch)`` (in eval mode, without gradients, the user's hooks
    detached: :func:`hooks_detached`).

    Tries a dynamic batch dim (traced with a 2-sample example of ``batch``), then a static
    1-sample export, then :func:`torch.export.draft_export`. When every attempt fails, the call
    is run once as plain PyTorch (hooks attached, on real tensors): an error there is the
    model's (or ``forward_fn``'s, or the data's) own and reaches the caller unchanged;
    otherwise :class:`UnsupportedModelError` names every attempt's error.
    """
    wrapper = _Forward(model, forward_fn)
    sized = batch_size(batch) is not None
    errors = []
    with eval_mode(model), torch.no_grad():
        with hooks_detached(model), _quiet_tracer(), _no_stack_traces():
            for kind in (("dynamic", "static", "draft") if sized else ("static", "draft")):
                try:
                    program = _attempt(wrapper, batch, kind, sized)
                except Exception as exc:  # noqa: BLE001 - try the next form, report all
                    errors.append((kind, exc))
                    continue
                program.model, program.forward_fn = model, forward_fn
                return program
        wrapper(batch)                  # the user's own error, if any, is raised here as is
    raise UnsupportedModelError(
        f"tp_curvature builds its graphs with torch.export, and exporting "
        f"{type(model).__name__} failed: " +
        " | ".join(f"{k}: {type(e).__name__}: {str(e)[:300]}" for k, e in errors))


def run_eagerly(model: nn.Module, batch, forward_fn: Callable) -> None:
    """``forward_fn(model, batch)`` as plain PyTorch, in eval mode without gradients: raises
    the model's (or ``forward_fn``'s) own error, if it has one (used to tell such an error
    from a failure of the library's machinery)."""
    with eval_mode(model), torch.no_grad():
        forward_fn(model, batch)


def _attempt(wrapper: nn.Module, batch, kind: str, sized: bool) -> Program:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dynamic":
            ex = _example(batch, 2)
            dyn = pytree.tree_map(lambda t: {0: torch.export.Dim.AUTO}
                                  if isinstance(t, torch.Tensor) and t.dim() > 0
                                  and t.shape[0] == 2 else None, ex)
            gm = torch.export.export(wrapper, (ex,), dynamic_shapes=(dyn,), strict=False).module()
            if not _batch_is_dynamic(gm):
                raise UnsupportedModelError("the batch dim was specialised")
            return Program(gm, ex, None)
        ex = _example(batch, 1) if sized else batch
        if kind == "static":
            gm = torch.export.export(wrapper, (ex,), strict=False).module()
        else:
            gm = torch.export.draft_export(wrapper, (ex,)).module()
        return Program(gm, ex, 1 if sized else None)


def _batch_is_dynamic(gm: fx.GraphModule) -> bool:
    for p in gm.graph.nodes:
        if p.op != "placeholder":
            continue
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0 and not isinstance(val.shape[0], int):
            return True
    return False
