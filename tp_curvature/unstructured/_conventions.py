"""The per-weight mode's two sets of conventions: the library's and the paper authors' code.

The curvature itself (lengths ``1/|w|``, measures ``[(1-alpha) p, alpha]`` with
``p ∝ exp(-1/a^2)``, forward shortest paths of at most 3 hops, ``kappa = (1 - W1/d)/(1 - alpha)``,
node values ``|post-activation|`` min-max normalised per layer and image, the per-weight min
over positions and images) is the same under both. They differ in six places, each a choice
the paper does not state; ``conventions="authors"`` follows the authors' public code
(github SH-Tan/Post-Training-NN-Pruning-using-Graph-Curvature, commit 1197381):

==  =================================  ===============================================
#   ``"library"`` (the default)        ``"authors"``
==  =================================  ===============================================
1   an edge with a dead end            only a dead *hidden* end skips: edges out of a
    (``a = 0``) is not solved,         zero input pixel and into a zero output are
    kappa 1                            solved
2   ``exp(-1/a^2)`` normalised in the  ``exp(-(1/a)^2)`` in float32 (an atom with ``a``
    log domain (every active           below ~0.098 underflows to 0); a float32 sum
    neighbour keeps its share)         ``<= 1e-7`` gives the uniform ``(1-alpha)/n``
                                       over the ``n`` active neighbours
3   a zero weight is no edge (kappa    ``|w|`` clamped to ``>= 1e-30``: a zero weight
    1, no path, carries no mass)       is an edge of length ``1e30``, solved, and
                                       neighbours reached through it carry mass
4   a BatchNorm right after a layer    lengths from the raw weight; node values still
    folds ``|gamma/sqrt(var+eps)|``    after BN
    into the strengths
5   a constant layer (max = min)       ``ValueError`` naming the layer and the image
    normalises to ones (zeros if       (their min-max gives 0/0 = NaN)
    silent)
6   the per-weight score is the min    an edge of a layer between two hidden layers
    kappa                              with ``|kappa - 1| < 1e-6`` counts 2.0 in the
                                       min (a weight whose every edge is dead scores
                                       2.0 and goes first when the highest is removed
                                       first)
==  =================================  ===============================================

Where in their repository (``file`` lines):

1. ``tools/graph_curvature_cnn_threshold_optimized.py`` 573-577.
2. The same file, 736 and 764 (the weights), 21 (``EPSILON``), 742-747 and 770-775 (the
   fallback marked), 617-619 and 638-640 (the uniform mass).
3. ``CNN/community_check_cifar_vgg9.py`` 318.
4. ``tools/vgg9_custom_relu.py`` 771 (lengths ``1/|w|`` of the raw weights), 379-392 (node
   values after BN and ReLU).
5. ``tools/vgg9_custom_relu.py`` 352.
6. ``CNN/remove_edge_cifar_union_w_small_combined.py`` 192-193 (``get_top_c``; LeNet:
   ``CNN/remove_edge_cnn_union_w_combined.py`` 202-204), then the min per conv weight in
   ``CNN/e2w_utils_new.py`` 65-67 and per fc edge at line 421 of the first script.

Notes on ``"authors"``:

* 1: a hidden endpoint is dead when its normalised value is 0; input and output nodes are never
  skipped (their measure is the delta ``m_x = delta_x`` / ``m_y = delta_y`` anyway).
* 2: the float32 arithmetic is theirs (``1/a`` with ``a`` the float32 min-max value, its
  square, ``exp``, the sum in neighbour order, ``(1-alpha) w / sum``); atoms that underflow are
  dropped. ``topk`` (None in their code) then keeps the ``k`` heaviest atoms, ties by neighbour
  index, renormalised. Dense and sparse mode share the one Numba kernel
  (:func:`float32_fill`), so they give the same masses bit for bit.
* 5: node values are min-max normalised in float32, as theirs (``(|x| - min) / (max - min)``;
  the output softmax, for ``output="softmax"``, in float32 too).
* 6: the relabel is per edge, before the min over positions and images, as in their pruning
  script; layers whose input is the network input or whose output is the network output are not
  relabelled (their ``0 < i_layer < 8`` for VGG-9, ``0 < i_layer < 4`` for LeNet). It applies to
  the per-weight scores (:func:`~tp_curvature.unstructured.weight_curvature`,
  :func:`~tp_curvature.unstructured.sparse_weight_curvature`,
  :class:`~tp_curvature.ElementCurvatureImportance`), not to the per-edge kappa of
  :func:`~tp_curvature.unstructured.edge_curvature` (their curvature routine does not relabel).
  A per-weight relabel after the min would differ from theirs for weights with some dead edges
  whose other edges all lie in ``(1, 2)``, and for the all-dead weights of the first and last
  layers, which they leave at 1; so the ranking needs nothing more: ``prune_by_curvature``
  on these scores removes what their script removes (ties aside: they break ties by list order).
* ``"authors"`` needs the paper's definition (``length="weight"``, ``measure="activation"``,
  ``normalize="minmax"``), the only one their code has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numba
import numpy as np

from ..calibration import normalise

#: the accepted values of ``conventions=``
CONVENTIONS = ("library", "authors")
#: a float32 sum of neighbour weights at most this switches to uniform mass (their ``EPSILON``)
AUTHORS_EPSILON = 1e-7
#: their clamp of ``|w|`` (a zero weight becomes an edge of length 1e30)
AUTHORS_MIN_WEIGHT = 1e-30
#: their relabel: an edge kappa within this of 1 counts ``RELABEL_VALUE``
RELABEL_TOL = 1e-6
RELABEL_VALUE = 2.0


@dataclass(frozen=True)
class Conventions:
    """One set of conventions (see the module docstring); :data:`LIBRARY` or :data:`AUTHORS`."""
    name: str
    solve_dead_boundary: bool     # 1: dead input / output nodes are solved
    float32_measure: bool         # 2: float32 exp(-(1/a)^2) with the uniform fallback
    min_weight: float             # 3: |w| of an edge is at least this (0: a zero weight is no edge)
    fold_batchnorm: bool          # 4: a following BatchNorm's scale enters the strengths
    constant_layer_error: bool    # 5: a constant layer is an error (else: ones / zeros)
    relabel_dead: bool            # 6: hidden-layer edges with kappa ~ 1 count 2.0 in the min

    # --------------------------------------------------------------------- graph
    def weight_strengths(self, abs_w: np.ndarray) -> np.ndarray:
        """Edge strengths from ``|w|`` of structural edges (3: clamped at ``min_weight``)."""
        return np.maximum(abs_w, self.min_weight) if self.min_weight > 0 else abs_w

    def live_endpoints(self, a_x: np.ndarray, a_y: np.ndarray, x_is_input: bool,
                       y_is_output: bool) -> tuple:
        """Which sources / targets may be solved (1): active ones, and under ``"authors"``
        every node of the network's input / output layer."""
        live_x, live_y = a_x > 0, a_y > 0
        if self.solve_dead_boundary:
            if x_is_input:
                live_x = np.ones_like(live_x)
            if y_is_output:
                live_y = np.ones_like(live_y)
        return live_x, live_y

    def supports(self, strength: np.ndarray, a_nb: np.ndarray, topk: Optional[int],
                 alpha: float) -> tuple:
        """Dense supports of the float32 measures (2): ``strength`` is ``(n_centres, m)`` (the
        centres' edges to their ``m`` neighbours, 0 = none), ``a_nb`` the neighbours' values.
        Returns ``(idx, mass)``, ``(n_centres, k)``, padded with -1 / 0."""
        n, m = strength.shape
        k = m if topk is None else min(topk, m)
        if k == 0 or n == 0:
            return np.zeros((n, 0), np.int64), np.zeros((n, 0))
        ok = np.ascontiguousarray((strength > 0) & (a_nb[None, :] > 0))
        return float32_supports(ok, np.ascontiguousarray(a_nb, dtype=np.float64), k,
                                1.0 - alpha)

    # ----------------------------------------------------------------- node values
    def normalise(self, a: np.ndarray, normalize: str, where: str, image: int) -> np.ndarray:
        """One image's node values of one layer (``|value|``, float64 holding the float32
        activations) normalised; under ``"authors"`` min-max in float32 and a constant layer
        is an error naming ``where`` and ``image`` (5)."""
        if not self.constant_layer_error:
            return normalise(a, normalize)
        a32 = np.asarray(a, dtype=np.float32)
        lo, hi = a32.min(), a32.max()
        if hi == lo:
            raise ValueError(
                f"conventions='authors': {where} is constant ({float(hi):g}) on image {image}; "
                "the authors' min-max normalisation gives 0/0 = NaN there "
                "(tools/vgg9_custom_relu.py line 352); use conventions='library' or drop the "
                "image")
        return ((a32 - lo) / (hi - lo)).astype(np.float64)

    def output_softmax(self, out: np.ndarray) -> np.ndarray:
        """Softmax of the raw outputs ``(N, K)`` (float32 under ``"authors"``, as theirs)."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(out))
        if self.constant_layer_error:
            return np.asarray(torch.softmax(t.float(), dim=1).double())
        return np.asarray(torch.softmax(t, dim=1))

    # -------------------------------------------------------------------- scores
    def relabel(self, kappa: np.ndarray, hidden: bool) -> np.ndarray:
        """Edge kappa as the per-weight score sees it (6): under ``"authors"``, in a layer
        between two hidden layers (``hidden``), ``|kappa - 1| < 1e-6`` counts 2.0."""
        if not (self.relabel_dead and hidden):
            return kappa
        return np.where(np.abs(kappa - 1.0) < RELABEL_TOL, RELABEL_VALUE, kappa)


LIBRARY = Conventions("library", solve_dead_boundary=False, float32_measure=False,
                      min_weight=0.0, fold_batchnorm=True, constant_layer_error=False,
                      relabel_dead=False)
AUTHORS = Conventions("authors", solve_dead_boundary=True, float32_measure=True,
                      min_weight=AUTHORS_MIN_WEIGHT, fold_batchnorm=False,
                      constant_layer_error=True, relabel_dead=True)
_BY_NAME = {c.name: c for c in (LIBRARY, AUTHORS)}


def resolve_conventions(conventions: Union[str, Conventions], cfg=None) -> Conventions:
    """The :class:`Conventions` named by ``conventions`` (``"library"`` or ``"authors"``),
    checked against the definition ``cfg`` (``"authors"`` needs the paper's)."""
    if isinstance(conventions, Conventions):
        conv = conventions
    elif isinstance(conventions, str) and conventions in _BY_NAME:
        conv = _BY_NAME[conventions]
    else:
        raise ValueError(f"conventions must be one of {', '.join(map(repr, CONVENTIONS))}, "
                         f"got {conventions!r}")
    if cfg is not None and conv.float32_measure:
        bad = [f"{name}={getattr(cfg, name)!r}" for name, want in
               (("length", "weight"), ("measure", "activation"), ("normalize", "minmax"))
               if getattr(cfg, name) != want]
        if bad:
            raise ValueError(f"conventions='authors' reproduces the authors' code, which has "
                             f"only the paper's definition (length='weight', "
                             f"measure='activation', normalize='minmax'); got {', '.join(bad)}")
    return conv


# ------------------------------------------------------------------------------ Numba kernels
@numba.njit(cache=True)
def float32_fill(nb, av, m, k, one_minus_alpha, out_idx, out_mass, row):
    """Row ``row`` of a support from the ``m`` active neighbours ``nb`` (values ``av``, all
    > 0), the authors' way: float32 weights ``exp(-(1/a)^2)`` summed in neighbour order, the
    uniform measure when that sum is at most :data:`AUTHORS_EPSILON`, else
    ``(1-alpha) w / sum`` in float32; zero atoms dropped; the ``k`` heaviest kept (ties by
    neighbour index) and renormalised in float64. Padding -1 / 0."""
    for i in range(out_idx.shape[1]):
        out_idx[row, i] = -1
        out_mass[row, i] = 0.0
    if m == 0 or k == 0:
        return
    order = np.argsort(nb[:m])
    w = np.empty(m, np.float32)
    tot = np.float32(0.0)
    for i in range(m):
        inv = np.float32(1.0) / np.float32(av[order[i]])
        w[i] = np.exp(-(inv * inv))
        tot += w[i]
    p = np.empty(m)
    if tot <= np.float32(AUTHORS_EPSILON):
        for i in range(m):
            p[i] = 1.0
    else:
        c = np.float32(one_minus_alpha)
        for i in range(m):
            p[i] = (c * w[i]) / tot
    sel = np.argsort(-p, kind="mergesort")
    kk = min(k, m)
    total = 0.0
    for i in range(kk):
        total += p[sel[i]]
    if not total > 0.0:
        return
    j = 0
    for i in range(kk):
        v = p[sel[i]]
        if v > 0.0:
            out_idx[row, j] = nb[order[sel[i]]]
            out_mass[row, j] = v / total
            j += 1


@numba.njit(cache=True)
def float32_supports(ok, a, k, one_minus_alpha):
    """:func:`float32_fill` for every row of the dense neighbour mask ``ok`` (centres x
    neighbours); (n, k) idx / mass."""
    n, m = ok.shape
    out_idx = np.full((n, k), -1, np.int64)
    out_mass = np.zeros((n, k))
    nb = np.empty(m, np.int64)
    av = np.empty(m)
    for r in range(n):
        c = 0
        for j in range(m):
            if ok[r, j]:
                nb[c] = j
                av[c] = a[j]
                c += 1
        float32_fill(nb, av, c, k, one_minus_alpha, out_idx, out_mass, r)
    return out_idx, out_mass
