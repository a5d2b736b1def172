"""Id-tensor lineage over an exported program (:mod:`tp_curvature._export`): the engine
under :mod:`tp_curvature.graph`.

:class:`LineagePass` runs the program's ATen graph once on an example batch
(for concrete shapes and the values of parameters, buffers and size computations) and, beside
every real value, a *lineage*: a list of :class:`Term` ``(kind, src, ids, scale)``. ``ids`` is
an integer tensor with the value's shape: the channel (of layer ``src``'s output, or the node of
junction ``src``) each element comes from, -1 where the term contributes nothing; ``scale`` the
|multiplicative factor| on the way (None = 1). Data-movement ops (view, reshape, permute,
transpose, flatten, unflatten, select, slice, split, chunk, unbind, expand, repeat,
repeat_interleave, cat, stack, pixel_shuffle...) are executed *on the id tensors themselves*, so
the channel dimension of every tensor is tracked, never assumed: channels along dim 1 of a conv
map, along the last dim of ``(N, T, C)`` tokens, through ``flatten(2).transpose``, a split into
heads and back, a channel shuffle. Two markers complete the lattice: :data:`STAT` (a statistic
with no channel identity: a norm's denominator, attention scores) and :data:`OPAQUE` (an op the
lineage does not know; layers reading it, or writing only into it, are not scored by curvature
and get the documented fallback of :class:`~tp_curvature.importance.CurvatureImportance`).
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ._export import PREFIX, op_name

class _Marker:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


STAT = _Marker("STAT")
OPAQUE = _Marker("OPAQUE")


@dataclass
class Term:
    kind: str                       # "layer" | "junction"
    src: int
    ids: torch.Tensor               # int64, the value's shape; -1: nothing
    scale: Optional[torch.Tensor]   # float64, broadcastable to ids (None: 1)


#: pure data movement: the same op is run on the id (and scale) tensors
MOVE = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "select", "unflatten",
        "flatten", "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "clone",
        "unbind", "repeat_interleave", "slice", "split", "split_with_sizes", "chunk",
        "tensor_split", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "alias",
        "repeat", "narrow", "movedim", "swapaxes", "flip", "roll", "index_select",
        "view_as", "reshape_as", "unfold"}
#: elementwise, channel-preserving, no weight: identity on the lineage
UNARY = {"relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh",
         "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh",
         "hardtanh_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu",
         "mish", "mish_", "softplus", "prelu", "log_sigmoid", "softmax", "_softmax",
         "log_softmax", "_log_softmax", "exp", "log", "sqrt", "rsqrt", "pow", "square",
         "reciprocal", "erf", "sin", "cos"}
#: unary ops that keep values up to a factor (walked through by the pre-norm rule)
IDENTITY = {"dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
            "_to_copy", "to", "type_as", "detach", "lift_fresh_copy", "neg", "abs",
            "clamp", "clamp_min", "clamp_max", "clamp_", "float", "bfloat16", "half",
            "native_dropout"}
NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
         "_native_batch_norm_legit", "cudnn_batch_norm", "layer_norm", "native_layer_norm",
         "group_norm", "native_group_norm", "rms_norm", "_fused_rms_norm", "instance_norm"}
SPATIAL = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "avg_pool1d",
           "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
           "adaptive_max_pool1d", "adaptive_max_pool2d", "_adaptive_avg_pool2d",
           "upsample_nearest1d", "upsample_nearest2d", "upsample_bilinear2d",
           "upsample_bicubic2d", "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa",
           "upsample_linear1d", "upsample_nearest3d", "upsample_trilinear3d", "interpolate"}
PAD = {"constant_pad_nd", "pad", "reflection_pad2d", "replication_pad2d", "reflection_pad1d",
       "replication_pad1d", "zero_pad2d"}
REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean",
          "logsumexp", "norm", "linalg_vector_norm"}
#: reductions that merge the channel maps of the slices along a reduced dim (radix split-and-sum)
MERGE_REDUCE = {"sum", "mean", "amax", "amin", "max", "min"}
#: at most this many slices are merged by one reduction (more: a statistic)
MAX_MERGE = 64
ADD = {"add", "add_", "sub", "sub_", "rsub"}
MUL = {"mul", "mul_", "div", "div_"}
#: ``input + value * t1 * t2`` (``addcdiv``: ``t1 / t2``), e.g. timm's Affine in ResMLP
AFFINE = {"addcmul", "addcmul_", "addcdiv", "addcdiv_"}
CAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention"}
MATMUL = {"matmul", "bmm", "mm"}
WEIGHT = {"linear", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
          "conv_transpose2d", "conv_transpose3d", "_convolution", "embedding"}
SHAPE_ONLY = {"sym_size", "sym_numel", "sym_stride", "size", "dim", "_assert_scalar",
              "_assert_tensor_metadata", "sym_constrain_range_for_size", "_guards_fn",
              "arange", "zeros", "ones", "full", "empty", "zeros_like", "ones_like",
              "full_like", "empty_like", "scalar_tensor", "tensor", "triu", "tril",
              "_assert_async", "eq", "ne", "lt", "gt", "le", "ge", "logical_not", "bitwise_not",
              "masked_fill", "masked_fill_", "where", "isnan", "any", "all"}


# ------------------------------------------------------------------------------- lineage
def _full(shape, value=-1):
    return torch.full(tuple(shape), value, dtype=torch.long)


def channel_ids(shape, dim: int) -> torch.Tensor:
    """``arange(shape[dim])`` along ``dim``, expanded (stride 0) to ``shape``."""
    dim = dim % len(shape)
    v = [1] * len(shape)
    v[dim] = shape[dim]
    return torch.arange(shape[dim]).view(v).expand(tuple(shape))


def constant_along(ids: torch.Tensor, d: int) -> bool:
    """Whether ``ids`` is the same along dim ``d``."""
    return bool((ids == ids.amax(d, keepdim=True)).all())    # (amin is far slower on CPU)


def _broadcast_scale(scale: torch.Tensor, shape) -> torch.Tensor:
    """A term's scale as a view of the ids' shape (a scale is broadcastable to its ids)."""
    return scale.expand(tuple(shape))


def _squeeze(t: torch.Tensor, dims: list) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        t = t.squeeze(d)
    return t


def _is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def _terms(lin) -> bool:
    return isinstance(lin, list)


def _last_uses(graph: fx.Graph) -> dict:
    """Node -> the nodes it is the last user of, except the output node's inputs (read after
    the pass). Freeing those values and their id tensors as the pass goes keeps its memory to
    the live tensors: holding every node's (a ViT-B/16 has ~1,500) took 0.9 GB."""
    keep = set()
    for n in graph.nodes:
        if n.op == "output":
            keep.update(n.all_input_nodes)
    seen, out = set(), {}
    for n in reversed(graph.nodes):
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                if a not in keep:
                    out.setdefault(n, []).append(a)
    return out


class LineagePass(fx.Interpreter):
    """Run ``gm`` on the example, computing the lineage of every node.

    ``hooks`` decides the graph: ``hooks.weight(node, kind, wname, x_lin, x_value, value)``
    returns the lineage of a weight op's output; ``hooks.junction(node, lin, value)`` is asked for every node
    whether it is a junction (returns the replacement lineage or None); ``hooks.sink(node, lin,
    value)`` records q/k tensors. ``input_mode[name]`` gives each float placeholder's ids:
    ``"dim1"`` (channels along dim 1), ``"last"`` or ``"element"`` (one id per element).
    """

    def __init__(self, gm: fx.GraphModule, hooks, input_mode: dict):
        super().__init__(gm, garbage_collect_values=False)
        self.hooks = hooks
        self.input_mode = input_mode
        self.lin: dict = {}
        self.unknown: dict = {}        # op name -> first node name
        self.constructs: set = set()   # constructs met whose kappa is not validated yet
        self.attr_names = {}
        self.last_uses = _last_uses(gm.graph)

    def run_node(self, n):
        try:
            out = super().run_node(n)
            lin = self._lineage(n, out)
            rep = self.hooks.junction(n, lin, out)
        except Exception as exc:
            if getattr(exc, "tp_curvature_node", None) is None:
                try:
                    exc.tp_curvature_node = n          # where the graph building failed
                except AttributeError:
                    pass
            raise
        self.lin[n] = rep if rep is not None else lin
        for a in self.last_uses.get(n, ()):   # no later node reads them: free value and ids
            self.env.pop(a, None)
            if isinstance(self.lin.get(a), list):
                self.lin[a] = []              # (still a traced tensor, for the caller's kinds)
        return out

    # -------------------------------------------------------------- helpers
    def L(self, a):
        return self.lin.get(a) if isinstance(a, fx.Node) else None

    def val(self, a):
        return self.env[a] if isinstance(a, fx.Node) else a

    def _opaque(self, n):
        self.unknown.setdefault(op_name(n.target), n.name)
        return OPAQUE

    def _sub(self, a, repl):
        if isinstance(a, fx.Node):
            return repl[a] if a in repl else self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self._sub(b, repl) for b in a)
        if isinstance(a, dict):
            return {k: self._sub(v, repl) for k, v in a.items()}
        return a

    def _move(self, n, out):
        """Run ``n``'s op on the ids/scales of each term of each traced input."""
        traced = [a for a in n.all_input_nodes if _terms(self.L(a))]
        kinds = [self.L(a) for a in n.all_input_nodes]
        if any(k is OPAQUE for k in kinds):
            return OPAQUE
        if not traced:
            return STAT if any(k is STAT for k in kinds) else None
        res = []
        for x in traced:
            for t in self.L(x):
                repl = {a: (t.ids if a is x else _full(self.val(a).shape))
                        for a in n.all_input_nodes if _is_tensor(self.val(a))}
                ids = n.target(*self._sub(n.args, repl), **self._sub(n.kwargs, repl))
                sc = None
                if t.scale is not None:
                    srep = {a: (t.scale.expand(t.ids.shape) if a is x else
                                torch.ones(self.val(a).shape, dtype=torch.float64))
                            for a in n.all_input_nodes if _is_tensor(self.val(a))}
                    sc = n.target(*self._sub(n.args, srep), **self._sub(n.kwargs, srep))
                res.append((t, ids, sc))
        if isinstance(out, (list, tuple)):
            return tuple([Term(t.kind, t.src, ids[i], None if sc is None else sc[i])
                          for t, ids, sc in res] for i in range(len(out)))
        return [Term(t.kind, t.src, ids, sc) for t, ids, sc in res]

    @staticmethod
    def _expand(lin, shape):
        return [Term(t.kind, t.src, t.ids.expand(shape),
                     None if t.scale is None else t.scale.expand(shape)) for t in lin]

    @staticmethod
    def _scaled(lin, factor):
        """Multiply every term's scale by ``|factor|`` (broadcast)."""
        if not _terms(lin):
            return lin
        f = torch.as_tensor(factor).detach().to("cpu", torch.float64).abs()
        out = []
        for t in lin:
            f_ = f
            while f_.dim() > t.ids.dim():
                f_ = f_.amax(0)
            sc = f_ if t.scale is None else t.scale * f_
            out.append(Term(t.kind, t.src, t.ids, sc))
        return out

    @staticmethod
    def _collapse(lin, out_shape):
        """Spatial ops: ids must be constant along every dim whose size changes; keep one
        index there and expand to ``out_shape``."""
        res = []
        for t in lin:
            ids, sc = t.ids, t.scale
            if ids.dim() != len(out_shape):
                return None
            for d in range(ids.dim()):
                if ids.shape[d] != out_shape[d]:
                    if ids.shape[d] > 1 and not constant_along(ids, d):
                        return None
                    ids = ids.narrow(d, 0, 1)
                    if sc is not None and sc.dim() == t.ids.dim() and sc.shape[d] > 1:
                        sc = sc.mean(d, keepdim=True)
            res.append(Term(t.kind, t.src, ids.expand(out_shape),
                            None if sc is None else sc.expand_as(ids).expand(out_shape)
                            if sc.dim() == ids.dim() else sc))
        return res

    # -------------------------------------------------------------- rules
    def _lineage(self, n, out):
        if n.op == "placeholder":
            return self._placeholder(n, out)
        if n.op == "get_attr":
            self.attr_names[n] = n.target
            return None
        if n.op != "call_function":
            return None
        name = op_name(n.target)
        kinds = [self.L(a) for a in n.all_input_nodes]
        if not any(k is not None for k in kinds) and name not in WEIGHT:
            return None
        if n.target is operator.getitem:
            src = self.L(n.args[0])
            if isinstance(src, tuple):
                return src[n.args[1]]
            if src is None or src is STAT or src is OPAQUE:
                return src
            return self._move(n, out)
        if not (_is_tensor(out) or (isinstance(out, (list, tuple)) and out and
                                    all(_is_tensor(o) for o in out))):
            return None
        if name in WEIGHT:
            return self._weight(n, name, out)
        if any(k is OPAQUE for k in kinds):
            return OPAQUE
        for table, rule in self._RULES:
            if name in table:
                return rule(self, n, name, out)
        return self._opaque(n)

    def _placeholder(self, n, out):
        """A float input: channel ids along dim 1, the last dim, or one per element
        (``input_mode``)."""
        if not _is_tensor(out) or not out.is_floating_point():
            return None
        mode = self.input_mode.get(n.name, "dim1")
        shape = tuple(out.shape)
        if mode == "element" or out.dim() <= 2:
            per = shape[1:]
            ids = torch.arange(int(math.prod(per))).view(per) if per else \
                torch.zeros((), dtype=torch.long)
            ids = ids.unsqueeze(0).expand(shape)
        else:
            ids = channel_ids(shape, 1 if mode == "dim1" else -1)
        return self.hooks.input(n, ids, out)

    def _shape_only(self, n, name, out):
        return self._where(n, name, out) if name in ("where", "masked_fill",
                                                      "masked_fill_") else None

    def _identity(self, n, name, out):
        x = self.L(n.args[0])
        if isinstance(out, tuple):               # native_dropout -> (out, mask)
            return (x, None)
        return x

    def _unary(self, n, name, out):
        return self.L(n.args[0])

    def _spatial(self, n, name, out):
        o = out[0] if isinstance(out, tuple) else out
        x = self.L(n.args[0])
        if not _terms(x):
            return x
        res = self._collapse(x, tuple(o.shape))
        if res is None:
            return self._opaque(n)
        return (res, None) if isinstance(out, tuple) else res

    def _pad(self, n, name, out):
        x = self.L(n.args[0])
        if not _terms(x):
            return x
        pad = list(self.val(n.args[1]))
        res = []
        for t in x:
            ids = torch.nn.functional.pad(t.ids, pad, value=-1)
            sc = None if t.scale is None else torch.nn.functional.pad(
                t.scale.expand(t.ids.shape), pad, value=1.0)
            res.append(Term(t.kind, t.src, ids, sc))
        return res

    def _add(self, n, name, out):
        ls = [self.L(a) for a in n.args[:2]]
        terms = [t for l in ls if _terms(l) for t in self._expand(l, tuple(out.shape))]
        if terms:
            return terms
        return STAT if any(l is STAT for l in ls) else None

    def _where(self, n, name, out):
        # masked_fill(x, mask, v) keeps x's channels; where(c, a, b) unions a and b
        if name.startswith("masked_fill"):
            return self.L(n.args[0])
        ls = [self.L(a) for a in n.args[1:3]]
        terms = [t for l in ls if _terms(l) for t in self._expand(l, tuple(out.shape))]
        return terms or (STAT if any(l is STAT for l in ls) else None)

    def _weight(self, n, name, out):
        args = n.args
        if name == "embedding":
            w, x = args[0], args[1]
            wname, value = self._weight_name(n, w)
            if wname is None:
                return self._opaque(n)
            return self.hooks.weight(n, "embedding", wname, None, None, out, value=value)
        x, w = args[0], args[1]
        kind = "linear" if name == "linear" else "conv"
        if "transpose" in name:
            kind = "conv_transpose"
        elif name in ("convolution", "_convolution") and bool(self.val(args[6])):
            kind = "conv_transpose"
        groups = 1
        if kind != "linear":
            if name in ("convolution", "_convolution"):
                groups = int(self.val(args[8]))
            else:
                gi = 6 if kind == "conv" else 7
                groups = int(self.val(args[gi])) if len(args) > gi else \
                    int(n.kwargs.get("groups", 1))
        wname, value = self._weight_name(n, w)
        if wname is None:                     # a weight computed from the input
            return self._opaque(n)
        return self.hooks.weight(n, kind, wname, self.L(x), self.val(x), out, groups=groups,
                                 value=value)

    def _weight_name(self, n, w) -> tuple:
        """``(get_attr target, None)`` of a weight op's parameter, or, for a weight computed
        from parameters and buffers only (a ``torch.nn.utils.prune`` mask, a
        ``torch.nn.utils.parametrize`` parametrization, ``weight_norm``),
        ``("model.<module>.weight", value)``: the module the op runs in owns it and
        ``value`` is the weight the program computed; ``(None, None)`` otherwise."""
        if not isinstance(w, fx.Node):
            return None, None
        if w in self.attr_names:
            return self.attr_names[w], None
        value = self.val(w)
        if self.L(w) is not None or not _is_tensor(value):
            return None, None
        model = getattr(self.hooks, "model", None)
        stack = n.meta.get("nn_module_stack") or {}
        for path, _ in reversed(list(stack.values())):
            if model is None or not path.startswith(PREFIX):
                continue
            try:
                module = model.get_submodule(path[len(PREFIX):])
            except AttributeError:
                continue
            own = getattr(module, "weight", None)
            if _is_tensor(own) and tuple(own.shape) == tuple(value.shape):
                return f"{path}.weight", value.detach()
        return None, None

    def _norm(self, n, name, out):
        a = n.args
        x = self.L(a[0])
        o = out[0] if isinstance(out, tuple) else out
        res = x
        if _terms(x):
            nd = o.dim()
            if "batch_norm" in name:
                w, rv = self.val(a[1]), self.val(a[4]) if name != "_native_batch_norm_legit" \
                    else None
                training = bool(self.val(a[5])) if name == "batch_norm" else False
                eps = float(self.val(a[7])) if name == "batch_norm" else float(self.val(a[-1]))
                f = torch.ones(o.shape[1], dtype=torch.float64)
                if rv is not None and not training:
                    f = 1.0 / torch.sqrt(rv.detach().double().cpu() + eps)
                if w is not None:
                    f = f * w.detach().double().cpu()
                res = self._scaled(x, f.view([-1] + [1] * (nd - 2)))
            elif name in ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"):
                w = self.val(a[2])
                if w is not None:
                    res = self._scaled(x, w)
            elif name in ("group_norm", "native_group_norm", "instance_norm"):
                w = self.val(a[2]) if name == "group_norm" else self.val(a[1])
                if w is not None:
                    res = self._scaled(x, w.view([-1] + [1] * (nd - 2)))
        if isinstance(out, tuple):
            return (res,) + (STAT if _terms(x) else None,) * (len(out) - 1)
        return res

    def _reduce(self, n, name, out):
        """A reduction over ``dims``. Per term: a reduced dim along which the ids are constant
        (spatial positions, tokens) keeps the channel (one index kept). A reduced dim along
        which they vary is either the channel dim itself (``x.pow(2).mean(-1)`` of an RMSNorm:
        a :data:`STAT`), or, when each slice along it still carries channels on another dim,
        a *merge of channel maps* (ResNeSt's radix split-and-sum ``x.view(B, r, C, H,
        W).sum(1)``): each slice becomes a term, with factor 1 (``sum``, ``amax``, ...) or
        ``1/r`` (``mean``), as ``x_1 + ... + x_r`` (or ``/ r``) would give."""
        x = self.L(n.args[0])
        if not _terms(x):
            return x
        o = out[0] if isinstance(out, tuple) else out
        src = self.val(n.args[0])
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if name in ("norm", "linalg_vector_norm"):
            dims = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
        if isinstance(dims, int):
            dims = [dims]
        if not isinstance(dims, (list, tuple)) or not dims:
            res = STAT
        else:
            dims = sorted({int(d) % src.dim() for d in dims})
            keep = o.dim() == src.dim()
            res = []
            for t in x:
                terms = self._reduce_term(t, dims, name)
                if terms is None:
                    res = STAT
                    break
                if not keep:
                    terms = [Term(u.kind, u.src, _squeeze(u.ids, dims),
                                  None if u.scale is None else _squeeze(u.scale, dims))
                             for u in terms]
                res.extend(terms)
        if isinstance(out, tuple):
            return (res,) + (None,) * (len(out) - 1)
        return res

    @staticmethod
    def _reduce_term(t: Term, dims: list, name: str) -> Optional[list]:
        """The terms ``t`` becomes when ``dims`` are reduced (kept as size-1 dims), or None
        when the result has no channel identity (a statistic)."""
        ids = t.ids
        sc = None if t.scale is None else _broadcast_scale(t.scale, ids.shape)
        merge = []
        for d in dims:
            if ids.shape[d] > 1 and not constant_along(ids, d):
                merge.append(d)
                continue
            ids = ids.narrow(d, 0, 1)
            if sc is not None:
                sc = sc.narrow(d, 0, 1)
        if not merge:
            return [Term(t.kind, t.src, ids, sc)]
        rest = [d for d in range(ids.dim()) if d not in dims]
        slices = int(math.prod(ids.shape[d] for d in merge))
        if name not in MERGE_REDUCE or slices > MAX_MERGE or not rest:
            return None
        # every slice along the merged dims must still carry channels on another dim
        flat = ids.movedim(merge, list(range(len(merge)))).reshape(slices, *[ids.shape[d]
                                                                               for d in rest])
        if not all(any(flat.shape[1 + i] > 1 and not constant_along(flat[k], i)
                       for i in range(len(rest))) for k in range(slices)):
            return None
        factor = 1.0 / slices if name == "mean" else 1.0
        out = []
        for pos in itertools.product(*[range(ids.shape[d]) for d in merge]):
            i_k, s_k = ids, sc
            for d, k in zip(merge, pos):
                i_k = i_k.narrow(d, k, 1)
                s_k = None if s_k is None else s_k.narrow(d, k, 1)
            if factor != 1.0:
                s_k = torch.full(i_k.shape, factor, dtype=torch.float64) if s_k is None \
                    else s_k * factor
            out.append(Term(t.kind, t.src, i_k, s_k))
        return out

    def _mul(self, n, name, out):
        return self._product(n.args[0], n.args[1], name.startswith("div"), tuple(out.shape))

    def _product(self, a, b, div: bool, shape: tuple):
        """The lineage of ``a * b`` (``a / b`` with ``div``) of shape ``shape``."""
        la, lb = self.L(a), self.L(b)
        if _terms(la) and _terms(lb):
            # a multiplicative gate (SE x*gate, SwiGLU silu(g)*u): both operands' channels
            # reach the product, each with factor 1 (structure only)
            return self._expand(la, shape) + self._expand(lb, shape)
        traced, other, lt = (a, b, la) if _terms(la) else (b, a, lb)
        if not _terms(lt):
            return STAT if STAT in (la, lb) else None
        lo = self.L(other)
        res = self._expand(lt, shape)
        if lo is STAT:
            return res
        v = self.val(other)
        if isinstance(v, (int, float)) or _is_tensor(v):
            f = torch.as_tensor(v).detach().double().cpu().abs()
            if div and traced is a:
                f = torch.where(f > 0, 1.0 / f, torch.full_like(f, math.inf))
            res = self._scaled(res, f)
        return res

    def _affine(self, n, name, out):
        """``addcmul(input, t1, t2, value=v) = input + v * t1 * t2`` (``addcdiv``: ``t1 /
        t2``): the sum of ``input``'s lineage and the product's, scaled by ``|v|``."""
        shape = tuple(out.shape)
        inp, t1, t2 = n.args[:3]
        value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else 1)
        prod = self._product(t1, t2, name.startswith("addcdiv"), shape)
        if _terms(prod) and self.val(value) != 1:
            prod = self._scaled(prod, self.val(value))
        li = self.L(inp)
        terms = (self._expand(li, shape) if _terms(li) else []) + \
            (prod if _terms(prod) else [])
        if terms:
            return terms
        return STAT if STAT in (li, prod) else None

    def _cat(self, n, name, out):
        parts = list(n.args[0])
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        ls = [self.L(p) for p in parts]
        if any(l is OPAQUE for l in ls):
            return OPAQUE
        res = []
        for i, l in enumerate(ls):
            if not _terms(l):
                continue
            for t in l:
                ids = [t.ids if j == i else _full(self.val(q).shape) for j, q in enumerate(parts)]
                r = n.target(ids, dim)
                sc = None
                if t.scale is not None:
                    scs = [t.scale.expand(t.ids.shape) if j == i else
                           torch.ones(self.val(q).shape, dtype=torch.float64)
                           for j, q in enumerate(parts)]
                    sc = n.target(scs, dim)
                res.append(Term(t.kind, t.src, r, sc))
        if res:
            return res
        return STAT if any(l is STAT for l in ls) else None

    def _sdpa(self, n, name, out):
        q, k, v = n.args[:3]
        lq, lk, lv = self.L(q), self.L(k), self.L(v)
        for a, l in ((q, lq), (k, lk)):
            if _terms(l):
                self.hooks.sink(a, l, self.val(a))
        o = out[0] if isinstance(out, tuple) else out
        shape = tuple(o.shape)
        res = lv
        if _terms(lv):
            res = []
            for t in lv:
                ids, sc = t.ids, t.scale
                tok = ids.dim() - 2
                if ids.shape[tok] > 1 and not bool((ids.amax(tok, keepdim=True) ==
                                                    ids.amin(tok, keepdim=True)).all()):
                    return self._opaque(n)
                ids = ids.narrow(tok, 0, 1)
                if sc is not None:
                    sc = sc.expand(t.ids.shape).narrow(tok, 0, 1)
                if ids.dim() >= 3 and ids.shape[-3] != shape[-3]:       # GQA (enable_gqa)
                    r = shape[-3] // ids.shape[-3]
                    ids = ids.repeat_interleave(r, dim=-3)
                    sc = None if sc is None else sc.repeat_interleave(r, dim=-3)
                res.append(Term(t.kind, t.src, ids.expand(shape),
                                None if sc is None else sc.expand(shape)))
        if isinstance(out, tuple):
            return (res,) + (None,) * (len(out) - 1)
        return res

    def _matmul(self, n, name, out):
        a, b = n.args[0], n.args[1]
        la, lb = self.L(a), self.L(b)
        shape = tuple(out.shape)
        if _terms(la) and _terms(lb):            # q @ k^T: attention scores
            self.hooks.sink(a, la, self.val(a))
            self.hooks.sink(b, lb, self.val(b))
            return STAT
        if la is STAT and _terms(lb):            # attn @ v: the values' channels flow on
            res = []
            for t in lb:
                ids = t.ids
                tok = ids.dim() - 2
                if ids.shape[tok] > 1 and not bool((ids.amax(tok, keepdim=True) ==
                                                    ids.amin(tok, keepdim=True)).all()):
                    return self._opaque(n)
                sc = t.scale
                if sc is not None:
                    sc = sc.expand(ids.shape).narrow(tok, 0, 1).expand(shape)
                res.append(Term(t.kind, t.src, ids.narrow(tok, 0, 1).expand(shape), sc))
            return res
        if la is STAT or lb is STAT:
            return STAT
        return self._opaque(n)

    def _moved(self, n, name, out):
        return self._move(n, out)


    #: op tables and the rule that gives their lineage, in the order they are tried
    _RULES = (
        (SHAPE_ONLY, _shape_only), (MOVE, _moved), (IDENTITY, _identity), (UNARY, _unary),
        (NORMS, _norm), (SPATIAL, _spatial), (PAD, _pad), (REDUCE, _reduce), (ADD, _add),
        (MUL, _mul), (AFFINE, _affine), (CAT, _cat), (SDPA, _sdpa), (MATMUL, _matmul),
    )
