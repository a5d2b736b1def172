"""The chain of element ops of a sequential model, read from its exported program.

The per-weight mode uses the tracer of the channel graph: the model is exported with
:func:`tp_curvature._export.export_program` (``model(images)``) and the program's ATen ops are
read in order. A supported model is a chain: every op reads exactly the previous op's output
(and parameters or constants). The ops, by kind:

``weight``       ``aten.linear`` (a 2-D input) and ``aten.conv2d`` (``groups=1``, zero padding);
``bn``           an eval-mode ``aten.batch_norm`` right after a weight op (its scale is folded
                 into the strengths);
``pool``         ``aten.max_pool2d`` / ``aten.avg_pool2d`` (sparse element graphs only);
``reshape``      view / reshape / flatten / (un)squeeze: the element order is kept;
``elementwise``  activations, dropout (an identity in eval mode), softmax, copies.

Shape queries (``x.size(0)``) may read the chain tensor. Anything else (a residual add, a
branch, a LayerNorm, a module used twice) raises
:class:`~tp_curvature.graph.UnsupportedModelError` naming the op and the module it was traced
in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .._export import Program, UnsupportedModelError, export_program, op_args, op_name
from .._lineage import IDENTITY, UNARY
from ..calibration import default_forward

WEIGHTS = {"linear", "conv2d"}
BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"}
POOLS = {"max_pool2d", "max_pool2d_with_indices", "avg_pool2d"}
RESHAPES = {"flatten", "view", "_unsafe_view", "reshape", "unflatten", "squeeze",
            "unsqueeze"}
ELEMENTWISE = (UNARY | IDENTITY | {"clone", "contiguous", "alias"}) - {"neg", "abs"}
SHAPE_QUERIES = {"sym_size", "sym_numel", "sym_stride", "size", "dim",
                 "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}
POOL_CLASSES = {"max_pool2d": "MaxPool2d", "max_pool2d_with_indices": "MaxPool2d",
                "avg_pool2d": "AvgPool2d"}


@dataclass
class ChainOp:
    """One op of the chain: ``node`` is the fx node of its output, ``input`` of its input;
    ``module`` the Linear / Conv2d of a weight op or the BatchNorm of a bn op (None for the
    others), ``name`` that module's qualified name; ``args`` the op's arguments by name
    (for pools: kernel_size, stride, padding, dilation, ceil_mode, ...)."""
    kind: str
    op: str
    node: str
    input: str
    name: str = ""
    module: Optional[nn.Module] = None
    args: dict = field(default_factory=dict)


@dataclass
class Chain:
    """A model as a chain of :class:`ChainOp` (``output``: the fx node of the model output)."""
    model: nn.Module
    program: Program
    ops: list
    output: str

    def values(self, images: torch.Tensor, names) -> dict:
        """The value of each fx node in ``names`` for the batch ``images`` (one pass)."""
        capture = _Capture(set(names))
        self.program.run(self.model, [images], [capture])
        return capture.values


class _Capture:
    """An observer of :meth:`Program.run` keeping the values of some nodes."""

    def __init__(self, names: set):
        self.names = names
        self.values: dict = {}

    def taps(self) -> dict:
        return {n: [n] for n in self.names}

    def observe(self, name: str, value) -> None:
        self.values[name] = value


def trace_chain(model: nn.Module, example: torch.Tensor, pooling: bool = False) -> Chain:
    """Export ``model(example)`` and read it as a chain (see the module docstring); pools are
    accepted only with ``pooling`` (the sparse element graph)."""
    program = export_program(model, example, default_forward)
    gm = program.gm
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"unstructured curvature needs a model with exactly one "
                                    f"input, got {len(inputs)}")
    reader = _ChainReader(model, program, inputs[0], pooling)
    for node in gm.graph.nodes:
        if node.op == "output":
            return reader.finish(node)
        if node.op == "call_function":
            reader.read(node)
    raise UnsupportedModelError("unstructured curvature: the exported program has no output")


class _ChainReader:
    """Reads the call_function nodes of a program in order, checking the chain."""

    def __init__(self, model, program: Program, start: fx.Node, pooling: bool):
        self.model = model
        self.program = program
        self.pooling = pooling
        self.cur = start
        self.chain = {start.name}
        self.aux: set = set()
        self.ops: list = []
        self.weights_seen: set = set()

    def read(self, node: fx.Node) -> None:
        name = op_name(node.target)
        args = [a for a in node.all_input_nodes if a.op != "get_attr"]
        on_chain = [a for a in args if a.name in self.chain]
        if name in SHAPE_QUERIES:
            if on_chain and on_chain != [self.cur]:
                raise self.unsupported(node, "reads a tensor that is not the chain's last one")
            self.aux.add(node.name)
            return
        other = [a for a in args if a.name not in self.chain and a.name not in self.aux]
        if on_chain != [self.cur] or other:
            raise self.unsupported(node, "it does not read exactly the previous chain tensor "
                                         "(branches, residual connections and multi-input ops "
                                         "are not supported)")
        if not node.args or node.args[0] is not self.cur:
            raise self.unsupported(node, "the chain tensor must be its first argument")
        if name == "getitem":
            if node.args[1] != 0:
                raise self.unsupported(node, "only the first output of an op can continue the "
                                             "chain")
            self._append(ChainOp("elementwise", name, node.name, self.cur.name), node)
            return
        self._append(self.classify(node, name), node)

    def _append(self, op: ChainOp, node: fx.Node) -> None:
        self.ops.append(op)
        self.chain.add(node.name)
        self.cur = node

    def classify(self, node: fx.Node, name: str) -> ChainOp:
        if name in WEIGHTS:
            return self.weight_op(node, name)
        if name in BATCH_NORMS:
            return self.bn_op(node, name)
        if name in POOLS:
            if not self.pooling:
                raise self.unsupported(node, f"{POOL_CLASSES[name]}: pooling is supported by "
                                             "sparse_weight_curvature only")
            path = self.program.modules_of(node)
            return ChainOp("pool", name, node.name, self.cur.name,
                           path[-1] if path else node.name, args=op_args(node))
        if name in RESHAPES:
            return ChainOp("reshape", name, node.name, self.cur.name)
        if name in ELEMENTWISE:
            return ChainOp("elementwise", name, node.name, self.cur.name)
        if name in ("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d",
                    "circular_pad2d"):
            mod = self._module_of(node)
            if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
                raise self.unsupported(node, f"padding_mode={mod.padding_mode!r} (only "
                                             "'zeros')")
        raise self.unsupported(node, "not an elementwise or weight op (pooling is supported "
                                     "by sparse_weight_curvature only; other element-mixing "
                                     "ops are not supported)")

    def weight_op(self, node: fx.Node, name: str) -> ChainOp:
        target = node.args[1].target
        if target in self.weights_seen:
            raise self.unsupported(node, "a weight module used twice")
        self.weights_seen.add(target)
        mod_name, _ = self.program.owner(target)
        module = self.model.get_submodule(mod_name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise self.unsupported(node, f"the weight of a {type(module).__name__} (only "
                                         "nn.Linear / nn.Conv2d modules)")
        args = op_args(node)
        if name == "conv2d" and args.get("groups", 1) != 1:
            raise self.unsupported(node, f"groups={args['groups']} (only groups=1)")
        return ChainOp("weight", name, node.name, self.cur.name, mod_name, module, args)

    def bn_op(self, node: fx.Node, name: str) -> ChainOp:
        if not self.ops or self.ops[-1].kind != "weight":
            raise self.unsupported(node, "BatchNorm is supported only directly after a "
                                         "Conv2d / Linear (its scale is folded in)")
        args = op_args(node)
        running_var = args.get("running_var")
        if not isinstance(running_var, fx.Node) or bool(args.get("training", False)):
            raise self.unsupported(node, "a BatchNorm without running statistics "
                                         "(track_running_stats=False is not supported)")
        mod_name, _ = self.program.owner(running_var.target)
        return ChainOp("bn", name, node.name, self.cur.name, mod_name,
                       self.model.get_submodule(mod_name), args)

    def finish(self, out: fx.Node) -> Chain:
        leaves = [a for a in pytree.tree_leaves(out.args) if isinstance(a, fx.Node)]
        if leaves != [self.cur]:
            raise self.unsupported(out, "the model output must be the end of the chain")
        if not any(op.kind == "weight" for op in self.ops):
            raise UnsupportedModelError("unstructured curvature: the model has no Conv2d / "
                                        "Linear")
        return Chain(self.model, self.program, self.ops, self.cur.name)

    def _module_of(self, node: fx.Node) -> Optional[nn.Module]:
        path = self.program.modules_of(node)
        if not path:
            return None
        try:
            return self.model.get_submodule(path[-1])
        except AttributeError:
            return None

    def unsupported(self, node: fx.Node, why: str) -> UnsupportedModelError:
        where = f"op {op_name(node.target) if node.op == 'call_function' else node.op} " \
                f"(fx node {node.name!r})"
        mod = self._module_of(node)
        if mod is not None:
            where += f" in module {self.program.modules_of(node)[-1]!r} ({type(mod).__name__})"
        return UnsupportedModelError(
            f"unstructured curvature supports sequential chains of Conv2d / Linear / Flatten / "
            f"BatchNorm / elementwise activations only; {where}: {why}")


def bn_scale(bn: nn.Module) -> np.ndarray:
    """``|gamma / sqrt(running_var + eps)|`` per channel (float64): the factor an eval-mode
    BatchNorm multiplies a channel by (its shift does not enter an edge strength)."""
    if bn.running_var is None:
        raise UnsupportedModelError(
            f"BatchNorm {bn} has no running statistics (track_running_stats=False is not "
            "supported)")
    s = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.affine and bn.weight is not None:
        s = s * bn.weight.detach().double()
    return s.abs().cpu().numpy()
