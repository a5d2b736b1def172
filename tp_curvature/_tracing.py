"""The torch.fx tracing core of the element graph, and :func:`eval_mode` for every pass.

:mod:`tp_curvature.unstructured` (one node per scalar activation) traces a network with
:func:`trace`, runs one forward pass through :class:`Recorder` (which stores every fx node's
output shape, and the values of the nodes asked for), classifies each fx node with the op tables
below, and folds a BatchNorm into the preceding weight layer with :func:`bn_scale`. The channel
graph (:mod:`tp_curvature.graph`) is built from a :mod:`torch.export` program instead
(:mod:`tp_curvature._lineage`). Every forward pass the library makes runs inside
:func:`eval_mode`, which restores each submodule's own ``training`` flag afterwards, also when
the pass raises.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "UnsupportedModelError", "BN_TYPES", "ELEMENTWISE_MODULES", "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_METHODS", "RESHAPE_METHODS", "SHAPE_META", "bn_scale", "trace", "Recorder", "eval_mode",
]


class UnsupportedModelError(ValueError):
    """The model contains a construct the graph cannot represent (re-exported by
    :mod:`tp_curvature.graph` and the package)."""


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)

# ---------------------------------------------------------------------------- op tables
#: modules that act on every element on its own (activations, dropout, identity): they keep
#: both the element and the channel identity and carry no weight of their own
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softmax,
    nn.LogSoftmax, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softmax, F.log_softmax, F.dropout,
    F.dropout2d, torch.relu, torch.sigmoid, torch.tanh, torch.softmax, torch.log_softmax,
}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "softmax",
                       "log_softmax", "detach", "float", "to"}
#: pooling and padding: they mix elements of one channel, so they keep the channel identity
#: only (channel graph yes, element graph no)
RESHAPE_METHODS = {"flatten", "view", "reshape"}


def bn_scale(m: nn.modules.batchnorm._BatchNorm) -> np.ndarray:
    """``|gamma / sqrt(running_var + eps)|`` per channel (float64): the factor an eval-mode
    BatchNorm multiplies a channel by (its shift does not enter an edge strength)."""
    if m.running_var is None:
        raise UnsupportedModelError(
            f"BatchNorm {m} has no running statistics (track_running_stats=False is not "
            "supported)")
    s = 1.0 / torch.sqrt(m.running_var.detach().double() + m.eps)
    if m.affine and m.weight is not None:
        s = s * m.weight.detach().double()
    return s.abs().cpu().numpy()


def trace(model: nn.Module, purpose: str = "tp_curvature builds its channel graph"
          ) -> fx.GraphModule:
    """Symbolically trace ``model`` (the GraphModule shares its submodules and parameters).

    Raises :class:`~tp_curvature.graph.UnsupportedModelError` naming ``purpose`` and the fx
    error when the model cannot be traced.
    """
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types
        raise UnsupportedModelError(
            f"{purpose} with torch.fx, and tracing {type(model).__name__} failed: "
            f"{exc}") from exc


#: key of ``fx.Node.meta`` where :class:`Recorder` stores an output shape (None: not a tensor)
SHAPE_META = "tp_curvature_shape"


class Recorder(fx.Interpreter):
    """Runs a GraphModule node by node; stores each node's output shape in
    ``node.meta[SHAPE_META]`` and the outputs of the nodes in ``keep`` (and of the output node)
    in ``values``."""

    def __init__(self, gm: fx.GraphModule, keep: Iterable[fx.Node] = ()):
        super().__init__(gm)
        self.keep = set(keep)
        self.values: dict = {}

    def run_node(self, n):
        out = super().run_node(n)
        n.meta[SHAPE_META] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if n in self.keep or n.op == "output":
            self.values[n] = out
        return out


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
