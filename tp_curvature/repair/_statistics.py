"""Second moments of the inputs of every refittable weight layer, from the calibration pass.

A layer ``y = W x + b`` of the exported program (``aten.linear``, ``aten.conv1d``,
``aten.conv2d``) whose weight is an ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` is described
by its *features*: the last dim of a Linear's input (the ``C`` of ``(N, T, C)`` tokens, the
``C*H*W`` of a flattened map), the (input channel, kernel tap) pairs of a convolution's input
unfolded with the layer's stride, padding and dilation, per group for a grouped convolution
(``W.view(O, -1)`` has the same feature order). Depthwise convolutions (one input channel per
group) have nothing to refit and are left out, and so is a weight used by several ops.

:class:`GramStatistics` is an observer of the calibration pass
(:func:`tp_curvature.calibration.observe`): at each layer's input it accumulates, in float64,
``sum x x^T`` (per group), ``sum x`` and the number of rows. A layer whose Gram matrix would
exceed ``max_bytes`` keeps the sums only (its repair is then the bias-only compensation, see
:mod:`tp_curvature.repair`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from scipy.linalg import blas

from .._export import Program, op_args, op_name

LAYER_OPS = {"linear": "linear", "conv1d": "conv", "conv2d": "conv"}
#: rows of unfolded features processed at once (bounds the float64 copy of a batch)
CHUNK_BYTES = 64 << 20


@dataclass
class LayerSpec:
    """A refittable layer, as it was when calibrated: the fx node of its op's input (the tap),
    its geometry and its sizes (the module itself may be pruned later)."""
    name: str
    node: str
    kind: str                      # "linear" | "conv"
    in_per_group: int              # weight.shape[1]: in features, or input channels per group
    out_channels: int
    groups: int = 1
    kernel: tuple = ()
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()

    @property
    def taps(self) -> int:
        n = 1
        for k in self.kernel:
            n *= k
        return n

    @property
    def group_features(self) -> int:
        """Features per group: ``in_features``, or ``(C / groups) * prod(kernel)``."""
        return self.in_per_group * self.taps

    def gram_bytes(self) -> int:
        return 8 * self.groups * self.group_features ** 2

    def positions(self, x: torch.Tensor) -> int:
        """Output positions per sample of the layer on input ``x`` (tokens for a Linear)."""
        if self.kind == "linear":
            return x[0].numel() // x.shape[-1]
        size = x.shape[2:] if x.dim() == 4 else (1,) + tuple(x.shape[2:])
        n = 1
        for s, k, st, p, d in zip(size, self.kernel, self.stride, self.padding, self.dilation):
            n *= (s + 2 * p - d * (k - 1) - 1) // st + 1
        return n

    def features(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's input as feature-major float64 columns, ``(groups, group_features,
        rows)``: one column per (sample, position) or token; ``keep``: only these positions
        (tokens) of every sample."""
        if self.kind == "linear":
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            if keep is not None:
                x = x[:, keep]
            return x.reshape(-1, x.shape[-1]).T.to(torch.float64).unsqueeze(0)
        if x.dim() == 3:                                    # conv1d: (N, C, L) as (N, C, 1, L)
            x = x.unsqueeze(2)
        if self.taps == 1 and all(s == 1 for s in self.stride) and not any(self.padding):
            cols = x.flatten(2)                             # 1x1: no unfolding
        else:
            cols = F.unfold(x, self.kernel, dilation=self.dilation, padding=self.padding,
                            stride=self.stride)             # (N, C * taps, L)
        if keep is not None:
            cols = cols[:, :, keep]
        n, f, length = cols.shape
        # (N, F, L) -> (F, N L): whole position rows move, then one cast
        return cols.transpose(0, 1).reshape(self.groups, f // self.groups, n * length) \
            .to(torch.float64)


def sampled_positions(spec: LayerSpec, x: torch.Tensor, max_rows: Optional[int],
                      seed: int) -> Optional[torch.Tensor]:
    """The positions of each sample to keep so that a batch gives at most ``max_rows`` rows
    (None: all), drawn without replacement from a generator seeded by ``seed``: the same
    positions for the unpruned and the pruned input of a layer."""
    length = spec.positions(x)
    if max_rows is None or x.shape[0] * length <= max_rows:
        return None
    k = max(1, max_rows // x.shape[0])
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=g)[:k].sort().values.to(x.device)


def layer_specs(program: Program, model: nn.Module) -> list:
    """Every refittable layer of the program, in forward order (see the module docstring)."""
    uses: dict = {}
    for node in program.gm.graph.nodes:
        if node.op == "call_function" and op_name(node.target) in LAYER_OPS \
                and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
            uses.setdefault(node.args[1].target, []).append(node)
    specs = []
    for target, nodes in uses.items():
        mod_name, attr = program.owner(target)
        module = model.get_submodule(mod_name)
        if len(nodes) != 1 or attr != "weight":
            continue                                        # a shared or foreign weight
        spec = _spec(mod_name, module, nodes[0])
        if spec is not None:
            specs.append(spec)
    return specs


def _spec(name: str, module: nn.Module, node: fx.Node) -> Optional[LayerSpec]:
    kind = LAYER_OPS[op_name(node.target)]
    tap = node.args[0].name
    w = module.weight
    if kind == "linear":
        return LayerSpec(name, tap, kind, w.shape[1], w.shape[0]) \
            if isinstance(module, nn.Linear) else None
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.weight.shape[1] == 1:
        return None                                         # depthwise: nothing to refit
    a = op_args(node)                   # the op's own geometry (a non-zero padding_mode pads
    k = tuple(module.kernel_size)       # the input before the op, which then has padding 0)
    d = _tuple(a["dilation"], len(k))
    pad = a["padding"]
    if isinstance(pad, str):
        total = [di * (ki - 1) for di, ki in zip(d, k)]
        if pad == "same" and any(t % 2 for t in total):
            return None                                     # asymmetric "same" padding
        pad = [t // 2 for t in total] if pad == "same" else [0] * len(k)
    one = (1,) if len(k) == 1 else ()                       # conv1d runs as a 1 x L conv2d
    return LayerSpec(name, tap, kind, w.shape[1], w.shape[0], int(a["groups"]), one + k,
                     one + _tuple(a["stride"], len(k)), (0,) * len(one) + _tuple(pad, len(k)),
                     one + d)


def _tuple(v, n: int) -> tuple:
    v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    return v * n if len(v) == 1 else v


@dataclass
class Moments:
    """Running sums of one layer's input features: ``gram`` ``(groups, F, F)`` float64 (its
    upper triangle while accumulating; None when it is over the byte budget), ``total``
    ``(groups, F)``, ``rows``."""
    gram: Optional[np.ndarray]
    total: torch.Tensor
    rows: int = 0

    def add(self, cols: torch.Tensor) -> None:
        """Accumulate float64 feature columns ``(groups, F, n)``: the Gram matrix by a
        symmetric rank-k update (BLAS ``dsyrk``: half the work of a product) on CPU."""
        if self.gram is not None:
            for g in range(cols.shape[0]):
                c = cols[g]
                if c.is_cuda:
                    self.gram[g] += (c @ c.T).cpu().numpy()
                    continue
                a = c.numpy()
                if not a.flags.c_contiguous:                # a C-order (F, n) array is the
                    a = np.ascontiguousarray(a)             # Fortran (n, F) of its transpose
                self.gram[g] = blas.dsyrk(1.0, a.T, beta=1.0, c=self.gram[g], trans=1,
                                          lower=0, overwrite_c=1)
        self.total += cols.sum(2)
        self.rows += cols.shape[2]

    def second_moment(self) -> Optional[torch.Tensor]:
        """``E[x~ x~^T]`` of the features with a constant 1 appended: ``(groups, F+1, F+1)``
        (None without a Gram matrix)."""
        if self.gram is None:
            return None
        g, f = self.total.shape
        upper = torch.from_numpy(np.triu(self.gram))
        gram = upper + upper.transpose(1, 2) - torch.diag_embed(upper.diagonal(0, 1, 2))
        out = torch.empty(g, f + 1, f + 1, dtype=torch.float64, device=self.total.device)
        out[:, :f, :f] = gram.to(out.device)
        out[:, :f, f] = self.total
        out[:, f, :f] = self.total
        out[:, f, f] = self.rows
        return out / max(self.rows, 1)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.rows, 1)


@dataclass
class GramStatistics:
    """An observer of the calibration pass accumulating :class:`Moments` per layer of
    ``specs`` (``max_bytes``: the largest Gram matrix kept, larger layers keep means only;
    ``max_rows``: at most this many rows per layer and batch, sampled positions)."""
    specs: list
    max_bytes: int
    max_rows: Optional[int] = None
    moments: dict = field(default_factory=dict)
    batches: dict = field(default_factory=dict)

    def taps(self) -> dict:
        taps: dict = {}
        for i, s in enumerate(self.specs):
            taps.setdefault(s.node, []).append(i)
        return taps

    def observe(self, index: int, x: torch.Tensor) -> None:
        spec = self.specs[index]
        f = spec.group_features
        mom = self.moments.get(spec.name)
        if mom is None:
            keep_gram = spec.gram_bytes() <= self.max_bytes
            mom = self.moments[spec.name] = Moments(
                np.zeros((spec.groups, f, f)) if keep_gram else None,
                torch.zeros(spec.groups, f, dtype=torch.float64, device=x.device))
        b = self.batches[spec.name] = self.batches.get(spec.name, -1) + 1
        keep = sampled_positions(spec, x, self.max_rows, row_seed(spec.name, b))
        step = max(1, CHUNK_BYTES // (8 * max(x[0].numel(), 1) * spec.taps))
        for lo in range(0, x.shape[0], step):
            mom.add(spec.features(x[lo:lo + step].detach(), keep))


def row_seed(name: str, batch: int) -> int:
    """A deterministic seed per (layer, batch) for the sampled positions."""
    h = 0
    for ch in name:
        h = (h * 131 + ord(ch)) % 2_147_483_647
    return (h + 1_000_003 * batch) % 2_147_483_647
