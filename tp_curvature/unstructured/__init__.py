"""Unstructured (per-weight) curvature pruning: the curvature paper's own experiment.

Tan, Sia, Bogdan, Ivanov ("Post-Training Neural Network Pruning using Graph Curvature", TMLR
2026) score individual weights, not channels. This subpackage rebuilds that mode on top of the
library's tracer (:mod:`tp_curvature._export`: the element graph is read from the same
torch.export program as the channel graph, :mod:`._chain`), transport problems
(:func:`tp_curvature.curvature.problem_from_strengths`) and kernels
(:func:`tp_curvature.curvature.solve_problem`), so the two modes share one definition of
curvature and one solver.

Element graph
    Every scalar activation is a node. For a chain ``N_0 -W_1-> N_1 -W_2-> ... -W_n-> N_n``
    of weight layers, ``N_{l-1}`` is the (flattened) input tensor of weight layer ``l`` and
    ``N_n`` the model output. A ``Linear`` gives an edge ``i -> o`` for every ``W[o, i]``; a
    ``Conv2d`` is unrolled over its receptive fields: one edge per (input element, output
    element) pair, built by index arithmetic with :func:`torch.nn.functional.unfold` (padded
    positions are not nodes and give no edge). For a given (input element, output element) pair
    the kernel offset is unique, so each edge belongs to exactly one weight
    ``W[o, c, i, j]`` and each weight generates ``H_out * W_out`` edges (fewer at borders).
    Edge strength ``s = |w|`` (times ``|gamma / sqrt(var + eps)|`` of a BatchNorm that directly
    follows the layer, which the paper does not have); length ``d = 1/s`` (``"paper"`` variant)
    or ``1/(a_u s)`` (``"flow"``), exactly as in :mod:`tp_curvature.curvature`.

Node values (per calibration image, never averaged over images)
    ``a = |value|`` of the element in that image: the network input (the tensor fed to the
    model, i.e. normalised pixels) for ``N_0``, the post-activation input of each weight layer
    (after ReLU / BN / flatten) for the hidden layers, and for ``N_n`` either the softmax of
    the output (``output="softmax"``, default; the paper's LeNet) or the raw output
    (``output="logits"``, the paper's VGG). Each layer is min-max normalised to [0, 1] per image
    (``normalize="minmax"``, the paper), so the least active element of every layer counts as
    inactive.

Curvature
    For the edges of weight layer ``l`` the problem is the library's layer-pair problem with
    ``Z = N_{l-2}``, ``X = N_{l-1}``, ``Y = N_l``, ``W = N_{l+1}`` and dense strength matrices
    ``s_zx = S_{l-1}``, ``s_xy = S_l``, ``s_yw = S_{l+1}`` (input nodes have no predecessors:
    ``m_x = delta_x``; output nodes no successors: ``m_y = delta_y``). Conventions are the
    library's by default: a dead endpoint (``a = 0``) or a zero weight gives ``kappa = 1``
    without a solve. ``conventions="authors"`` (every entry point) follows the paper authors'
    code instead; the six places where the two differ (dead input / output nodes, float32
    measures with a uniform fallback, zero weights, BatchNorm, a constant layer, the relabel of
    dead edges in the score) are tabulated with the lines of their repository in
    :mod:`._conventions`.
    The definition is the preset :meth:`CurvatureConfig.element()
    <tp_curvature.CurvatureConfig.element>` (the paper's: lengths ``1/|w|``, measures
    ``exp(-1/a^2)``, ``alpha = 0.9``; ``topk`` :data:`DEFAULT_TOPK` dense,
    :data:`SPARSE_DEFAULT_TOPK` sparse); keyword options override its fields.

Per-weight score
    ``reduce="min"`` (the paper): the minimum kappa over every edge the weight generates and over
    every calibration image; ``"mean"`` averages instead. A weight that generates no edge at all
    (a kernel tap that only ever sees padding) gets 1. Scores come back as tensors shaped like the
    weights, keyed by parameter name (``"features.0.weight"``).

Pruning
    :func:`prune_by_curvature` removes the *highest*-kappa weights first (``order="lowest"`` is
    the paper's negative-first control), globally or per layer, with
    :func:`torch.nn.utils.prune.custom_from_mask`; :func:`remove_pruning` makes it permanent.
    :func:`prune_by_magnitude` and :func:`prune_random` are the baselines.

Supported models
    Sequential chains (any nesting, traced with :mod:`torch.fx`) of ``Conv2d`` (any stride,
    padding, dilation; ``groups=1``; zero padding), ``Linear`` (2-D input), ``Flatten`` /
    ``torch.flatten`` / ``view(N, -1)``, a ``BatchNorm1d/2d`` right after a weight layer, and
    elementwise activations (ReLU-like, sigmoid, tanh, GELU, dropout, identity). Anything else
    (pooling, residual branches, a module used twice) raises
    :class:`~tp_curvature.graph.UnsupportedModelError` (a ``ValueError``) naming the fx node.

Input checks
    Everything is checked before any work (and, for pruning, before any mask is applied, so a
    refused call never leaves a model half-masked): the options (``output``, ``reduce``, every
    ``CurvatureConfig`` field, ``conventions`` (``"authors"`` only with the paper's
    definition), ``sparsity``, ``order``, ``scope``, ``tie_break``), the images
    (a non-empty floating-point tensor ``(N, ...)`` or an ``(images, targets)`` pair, all
    finite), the weights, biases and BatchNorm statistics of every layer of the chain, the node
    values the forward pass produces, and every score / mask tensor (its key must be a Conv2d /
    Linear weight of the model, its shape the weight's, its values finite). Errors are
    ``ValueError`` (``TypeError`` for a wrong type) naming the option, image, layer or
    parameter. The model's train/eval flags, hooks and parameters are left as they were.

Sparse element graphs (:func:`sparse_weight_curvature`, :func:`sparse_element_graph`)
    The same definitions without any ``(n_in, n_out)`` matrix, for models like the paper's
    VGG-9 (43M edges per image). Each op is described by index tables built with ``unfold``
    (for every output position and kernel tap, the input position); in- and out-edges are
    enumerated from them inside Numba kernels, so memory grows with ``positions x taps`` and
    the weights, never with the square of a layer (:mod:`._sparse`). Edges are solved in
    tiles, one per output position (every edge into it), with Z / W and the ground costs
    restricted to what those edges can reach: predecessors = receptive fields, successors =
    outputs whose fields contain the node, shortest paths of at most 3 hops over every
    intermediate node (:mod:`._sparse_scores`). On small models it gives the dense mode's
    kappa (tested to 1e-9 with the exact solver). ``MaxPool2d`` / ``AvgPool2d`` are supported
    here only: a max pool's output has one edge, from the element that won the max on that
    image (strength 1); an average pool's output an edge from each element of its window
    (strength ``1/divisor``); pools are not scored. Residual adds are not supported.

Cost
    The strength matrices are dense ``(n_in_elements, n_out_elements)``: fine for the paper's
    LeNet (largest 784 x 864) and MLPs, refused above ``max_dense`` entries per layer. The work is
    one transport problem per edge with both endpoints active, per image, of size at most
    ``(topk + 1) x (topk + 1)``: it grows linearly with the number of calibration images.
    ``topk`` keeps the ``k`` heaviest atoms of every measure; with the paper's ``exp(-1/a^2)``
    weights almost all mass sits on the few most active neighbours. The shortest paths of the
    problems are recomputed per image. The first call in a fresh environment also compiles the
    Numba kernels (cached afterwards). Timings, and the agreement of topk 4..64 and of the
    exact backend with the default, are in docs/paper.md with the commands that produced them.
"""
from ..config import ELEMENT_TOPK
from ._conventions import CONVENTIONS, Conventions
from ._graph import ElementGraph, ElementLayer, element_graph, node_values
from ._masks import (UnknownWeightError, apply_masks, magnitude_scores, masks_from_scores,
                     prune_by_curvature, prune_by_magnitude, prune_by_scores, prune_random,
                     random_scores, remove_pruning, weight_sparsity)
from ._scores import EdgeCurvature, edge_curvature, weight_curvature
from ._sparse import SparseElementGraph, SparseOp, sparse_element_graph
from ._sparse_scores import sparse_edge_curvature, sparse_node_values, sparse_weight_curvature

#: ``topk`` of the per-weight mode's preset (:meth:`~tp_curvature.CurvatureConfig.element`):
#: dense element matrices / sparse element graphs
DEFAULT_TOPK, SPARSE_DEFAULT_TOPK = ELEMENT_TOPK[False], ELEMENT_TOPK[True]

__all__ = [
    "ElementLayer", "ElementGraph", "EdgeCurvature", "DEFAULT_TOPK", "element_graph",
    "node_values", "edge_curvature", "weight_curvature", "masks_from_scores", "apply_masks",
    "prune_by_scores", "prune_by_curvature", "prune_by_magnitude", "prune_random",
    "magnitude_scores", "random_scores", "remove_pruning", "weight_sparsity",
    "UnknownWeightError", "SparseElementGraph", "SparseOp", "sparse_element_graph",
    "sparse_edge_curvature", "sparse_node_values", "sparse_weight_curvature",
    "SPARSE_DEFAULT_TOPK", "CONVENTIONS", "Conventions",
]
