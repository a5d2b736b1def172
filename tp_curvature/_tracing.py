"""The torch.fx tracing core shared by the channel graph and the element graph.

:mod:`tp_curvature.graph` (one node per channel) and :mod:`tp_curvature.unstructured` (one node
per scalar activation) read a network the same way: they trace it with :func:`trace`, run one
forward pass through :class:`Recorder` (which stores every fx node's output shape, and the
values of the nodes asked for), classify each fx node with the op tables below, and fold a
BatchNorm into the preceding weight layer with :func:`bn_scale`. Every forward pass the library
makes runs inside :func:`eval_mode`, which restores each submodule's own ``training`` flag
afterwards, also when the pass raises.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Iterable, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "UnsupportedModelError", "BN_TYPES", "ELEMENTWISE_MODULES", "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_METHODS", "POOL_MODULES", "POOL_FUNCTIONS", "ADD_FUNCTIONS", "ADD_METHODS",
    "RESHAPE_METHODS", "SHAPE_META", "bn_scale", "trace", "Recorder", "tensor_shape",
    "InterpreterModule", "eval_mode",
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
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d,
    nn.ConstantPad2d,
)
POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.pad,
}
#: residual connections (a subtraction is an add with factor -1: strengths use |factor|)
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
ADD_METHODS = {"add", "add_", "sub", "sub_"}
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


def tensor_shape(node: fx.Node) -> Optional[tuple]:
    """The output shape :class:`Recorder` stored for ``node`` (None if not a tensor / not run)."""
    return node.meta.get(SHAPE_META)


class InterpreterModule(nn.Module):
    """Lets a user ``forward_fn(model, batch)`` drive a :class:`Recorder` (keyword inputs are
    matched to the graph's placeholders by name)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args, **kwargs):
        if kwargs:
            names = [n.target for n in self.gm.graph.nodes if n.op == "placeholder"]
            args = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
        return Recorder(self.gm).run(*args)


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
