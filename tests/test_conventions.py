"""``conventions="library"`` against ``conventions="authors"`` (the paper authors' code).

Each of the six conventions (tp_curvature/unstructured/_conventions.py) is pinned on a small
network whose kappa is computed by hand here, under both settings. The networks have
non-negative weights and inputs, so every ReLU passes its input and the node values are read off
the products; each test asserts the node values it relies on. alpha is 0.9, measures are
untruncated and W1 exact, so with a delta on one side the transport plan is forced:
``kappa = 1 - sum_w r_w c(x, w) / d(x, y)`` for an input-layer edge (``m_x = delta_x``, one or
more successors w of y) and ``kappa = 1 - sum_z p_z c(z, y) / d(x, y)`` for an output-layer
edge (``m_y = delta_y``). No network access; the authors' code itself is compared in
benchmarks/authors_check.py.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
from test_element_sparse import _dense_vs_sparse
from test_unstructured import tiny_model

from tp_curvature import ElementCurvatureImportance
from tp_curvature.unstructured import (edge_curvature, element_graph, node_values,
                                       prune_by_curvature, sparse_edge_curvature,
                                       sparse_weight_curvature, weight_curvature)

EXACT = dict(alpha=0.9, topk=None, backend="exact", output="logits")
BOTH = ("library", "authors")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def mlp(*weights, biases=None, bn_gamma=None):
    """Linear (no bias unless given) -> [BatchNorm1d] -> ReLU -> ... -> Linear, with the given
    weight matrices (rows = outputs)."""
    layers = []
    for i, w in enumerate(weights):
        w = torch.tensor(w, dtype=torch.float32)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=biases is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if biases is not None:
                lin.bias.copy_(torch.tensor(biases[i], dtype=torch.float32))
        layers.append(lin)
        if i == 0 and bn_gamma is not None:
            bn = nn.BatchNorm1d(w.shape[0])
            with torch.no_grad():
                bn.weight.copy_(torch.tensor(bn_gamma, dtype=torch.float32))
            layers.append(bn)
        if i + 1 < len(weights):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def kappa(model, x, conventions, **kw):
    return edge_curvature(model, x, conventions=conventions, **{**EXACT, **kw})


def values(model, x, conventions="library"):
    return node_values(element_graph(model, x, conventions=conventions), x, "logits")[0]


# ------------------------------------------------------------------ 1. dead endpoints
# N0 = [0, 1, 2] -> a0 = [0, .5, 1] (input 0 dead); N1 = W0 N0 = [3, 2, 1] -> a1 = [1, .5, 0]
# (hidden node 2 dead); N2 = W1 N1 = [4.5, 7] -> a2 = [0, 1] (output 0 dead).
DEAD_W0 = [[1, 1, 1], [1, 1, 0.5], [1, 0.5, 0.25]]
DEAD_W1 = [[0.5, 1, 1], [1, 1, 2]]
DEAD_X = torch.tensor([[0.0, 1.0, 2.0]])


def _dead_expected():
    """Authors' kappa of the edges with a dead input or output end (hand-computed)."""
    # in0 -> n1_0: m_x = delta (input), m_y = .9 delta_y + .1 delta_out1 (out0 dead):
    # kappa = 1 - c(in0, out1) / d(in0, n1_0), c = min over n1_j of 1/W0[j,0] + 1/W1[1,j]
    c = min(1 / DEAD_W0[j][0] + 1 / DEAD_W1[1][j] for j in range(3))           # 1.5
    k_in = 1 - c / (1 / DEAD_W0[0][0])                                           # -0.5
    # n1_0 -> out0: m_y = delta (output), p over the active inputs in1 (a .5), in2 (a 1)
    p = np.exp([-1 / 0.5 ** 2, -1 / 1.0 ** 2])
    p /= p.sum()
    c_z = [min(1 / DEAD_W0[j][i] + 1 / DEAD_W1[0][j] for j in range(3)) for i in (1, 2)]
    k_out = 1 - float(p @ c_z) / (1 / DEAD_W1[0][0])
    return k_in, k_out


def test_dead_input_and_output_endpoints_solved_by_the_authors_only():
    model = mlp(DEAD_W0, DEAD_W1)
    a = values(model, DEAD_X)
    np.testing.assert_allclose(a[0], [0, .5, 1])
    np.testing.assert_allclose(a[1], [1, .5, 0])
    np.testing.assert_allclose(a[2], [0, 1])
    lib, auth = kappa(model, DEAD_X, "library"), kappa(model, DEAD_X, "authors")
    k_in, k_out = _dead_expected()
    assert k_in == pytest.approx(-0.5)
    # library: a dead end of any kind is not solved, kappa 1
    assert lib[0].kappa[0, 0] == 1.0 and not lib[0].solved[0, 0]
    assert lib[1].kappa[0, 0] == 1.0 and not lib[1].solved[0, 0]
    # authors: a dead input pixel / output is solved ...
    assert auth[0].solved[0, 0] and auth[1].solved[0, 0]
    assert auth[0].kappa[0, 0] == pytest.approx(k_in, abs=1e-9)
    assert auth[1].kappa[0, 0] == pytest.approx(k_out, abs=1e-6)     # float32 measure
    # ... a dead hidden end is not, under both (n1_2 is dead)
    for ek in (lib, auth):
        assert (ek[0].kappa[:, 2] == 1).all() and not ek[0].solved[:, 2].any()
        assert (ek[1].kappa[2, :] == 1).all() and not ek[1].solved[2, :].any()


def test_the_two_conventions_differ_exactly_at_dead_boundary_edges():
    """No zero weight, no BatchNorm, no small activation: only rule 1 separates them (and the
    float32 rounding of the measures, below 1e-6)."""
    model = mlp(DEAD_W0, DEAD_W1)
    lib, auth = kappa(model, DEAD_X, "library"), kappa(model, DEAD_X, "authors")
    a = values(model, DEAD_X)
    for l, (el, ea) in enumerate(zip(lib, auth)):
        differ = np.abs(el.kappa - ea.kappa) > 1e-6
        boundary = ((a[l][:, None] == 0) if l == 0 else (a[l + 1][None, :] == 0)) if l in (
            0, len(lib) - 1) else np.zeros_like(differ)
        hidden_dead = (a[l + 1][None, :] == 0) if l == 0 else (a[l][:, None] == 0)
        np.testing.assert_array_equal(differ, boundary & ~hidden_dead)
        np.testing.assert_array_equal(ea.solved & ~el.solved, boundary & ~hidden_dead)


# --------------------------------------------------- 2. float32 measure, uniform fallback
def _fallback_model(a0, a1):
    """input [a0, a1, 0, 1, 0, 0] -> conv 1x2 stride 2 with taps [1, .5] (n1_0 sees only
    in0, in1) -> flatten -> fc [[1,1,1],[2,1,1]]; n1_0 -> out1 is an output-layer edge whose
    source's measure has the two atoms in0 (a0), in1 (a1)."""
    conv = nn.Conv2d(1, 1, (1, 2), stride=(1, 2), bias=False)
    fc = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 0.5]]]]))
        fc.weight.copy_(torch.tensor([[1.0, 1, 1], [2, 1, 1]]))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc).eval()
    x = torch.tensor([a0, a1, 0.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 6)
    return model, x


def _measure_kappa(p):
    """kappa of n1_0 -> out1 for the atom masses p = (p_in0, p_in1): d = 1/2,
    c(in0, out1) = 1/1 + 1/2, c(in1, out1) = 1/.5 + 1/2 (both only through n1_0)."""
    d = 0.5
    return 1 - (p[0] * 1.5 + p[1] * 2.5) / d


@pytest.mark.parametrize("a0,a1,fallback", [
    (0.05, 0.08, True),    # both weights underflow in float32: sum 0
    (0.2, 0.249, True),    # sum exp(-25) + exp(-16.13) = 9.9e-8 <= 1e-7
    (0.2, 0.26, False),    # sum 3.8e-7 > 1e-7: the ordinary normalised weights
])
def test_float32_measure_falls_back_to_uniform(a0, a1, fallback):
    model, x = _fallback_model(a0, a1)
    a = values(model, x)
    np.testing.assert_allclose(a[0][:2], [a0, a1], rtol=1e-6)
    assert a[1][0] > 0 and a[2][1] == 1
    w = np.exp(-1 / np.array([a0, a1], dtype=np.float64) ** 2)
    exact = w / w.sum()
    lib = kappa(model, x, "library")[1].kappa[0, 1]
    assert lib == pytest.approx(_measure_kappa(exact), abs=1e-9)
    auth = kappa(model, x, "authors")[1].kappa[0, 1]
    expected = _measure_kappa([0.5, 0.5]) if fallback else _measure_kappa(exact)
    assert auth == pytest.approx(expected, abs=1e-5)
    if fallback:
        assert abs(auth - lib) > 0.1
    sparse = sparse_edge_curvature(model, x, conventions="authors", **EXACT)["3"]
    assert sparse[3][(sparse[0] == 0) & (sparse[1] == 1)][0] == pytest.approx(auth, abs=1e-12)


def test_float32_fallback_topk_keeps_the_lowest_index_on_ties():
    model, x = _fallback_model(0.05, 0.08)
    auth = kappa(model, x, "authors", topk=1)[1].kappa[0, 1]
    assert auth == pytest.approx(_measure_kappa([1.0, 0.0]), abs=1e-9)        # in0 kept
    lib = kappa(model, x, "library", topk=1)[1].kappa[0, 1]
    assert lib == pytest.approx(_measure_kappa([0.0, 1.0]), abs=1e-9)         # the heavier
    sparse = sparse_edge_curvature(model, x, conventions="authors", **{**EXACT, "topk": 1})
    k = sparse["3"][3][(sparse["3"][0] == 0) & (sparse["3"][1] == 1)][0]
    assert k == pytest.approx(auth, abs=1e-12)


# ------------------------------------------------------------------- 3. zero weights
def test_zero_weight_is_a_1e30_edge_for_the_authors():
    """2 -> 2 -> 2 -> 2 with W1[0, 0] = 0: the hidden edge n1_0 -> n2_0 (one active
    predecessor in1, one active successor out1). Authors: the plan must send 0.8 of x's mass
    over the 1e30 edge, W1 = 0.8 d + O(1), kappa = (1 - 0.8) / 0.1 = 2."""
    model = mlp([[1, 1], [1, 0.5]], [[0, 4], [1, 1]], [[1, 1], [2, 1]])
    x = torch.tensor([[0.0, 1.0]])
    a = values(model, x)
    np.testing.assert_allclose(a[1], [1, 0])
    np.testing.assert_allclose(a[2], [1, 0])
    np.testing.assert_allclose(a[3], [0, 1])
    lib, auth = kappa(model, x, "library"), kappa(model, x, "authors")
    assert lib[1].kappa[0, 0] == 1.0 and not lib[1].solved[0, 0]
    assert auth[1].solved[0, 0] and auth[1].kappa[0, 0] == pytest.approx(2.0, abs=1e-9)
    assert element_graph(model, x, conventions="authors").layers[1].strength[0, 0] == 1e-30
    assert element_graph(model, x).layers[1].strength[0, 0] == 0.0


def test_neighbour_behind_a_zero_weight_carries_mass_for_the_authors():
    """raw input [1, 2] -> a0 = [0, 1]; n1_0 = 1 * in0 + 0 * in1: its only active predecessor
    in1 is joined by a zero weight. n1_0 -> out1 (d = 1/2, m_y = delta): library
    m_x = delta_x, kappa 0; authors m_x = .9 delta_x + .1 delta_in1 with
    c(in1, out1) = min(1e30 + .5, 1/1 + 1/1, 1/.1 + 1) = 2, kappa = 1 - 2 / .5 = -3."""
    model = mlp([[1, 0], [0.25, 1], [0.1, 0.1]], [[1, 1, 1], [2, 1, 1]])
    x = torch.tensor([[1.0, 2.0]])
    a = values(model, x)
    np.testing.assert_allclose(a[0], [0, 1])
    assert a[1][0] > 0 and a[1][2] == 0 and a[2][1] == 1
    assert kappa(model, x, "library")[1].kappa[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert kappa(model, x, "authors")[1].kappa[0, 1] == pytest.approx(-3.0, abs=1e-9)


# ----------------------------------------------------------------------- 4. BatchNorm
def test_batchnorm_scale_folded_by_the_library_only():
    """raw input [1, 3, 2] -> a0 = [0, 1, .5]; fc of ones -> BN (gamma [2, 1, .5], var 1,
    mean 0, beta 0) -> N1 = 6 s -> a1 = [1, 1/3, 0]; fc [[1,1,1],[2,1,1]] -> out1 active.
    Edge in1 -> n1_0 (m_x = delta, m_y = .9 delta_y + .1 delta_out1):
    authors d = 1, c(in1, out1) = min(1 + 1/2, 1 + 1, 1 + 1) -> kappa -0.5;
    library d = 1/s_0, c = min(1/s_0 + 1/2, 1/s_1 + 1, 1/s_2 + 1) = 1/s_0 + 1/2 -> kappa
    -s_0/2 = -1/sqrt(1 + eps)."""
    model = mlp([[1, 1, 1]] * 3, [[1, 1, 1], [2, 1, 1]], bn_gamma=[2.0, 1.0, 0.5])
    x = torch.tensor([[1.0, 3.0, 2.0]])
    bn = model[1]
    s = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).numpy()
    a = values(model, x)
    np.testing.assert_allclose(a[0], [0, 1, .5])
    np.testing.assert_allclose(a[1], [1, 1 / 3, 0], rtol=1e-6)
    assert a[2][1] == 1
    c_lib = min(1 / s[0] + 1 / 2, 1 / s[1] + 1, 1 / s[2] + 1)
    lib = kappa(model, x, "library")[0].kappa[1, 0]
    assert lib == pytest.approx(1 - c_lib * s[0], abs=1e-9)          # -1 / sqrt(1 + eps)
    auth = kappa(model, x, "authors")[0].kappa[1, 0]
    assert auth == pytest.approx(1 - min(1 + 1 / 2, 1 + 1, 1 + 1) / 1, abs=1e-9)   # -0.5
    # node values are after the BatchNorm under both
    np.testing.assert_allclose(values(model, x, "authors")[1], a[1], rtol=1e-6)


# ------------------------------------------------------------------- 5. constant layer
def test_constant_layer_is_an_error_naming_layer_and_image_for_the_authors():
    """Image 1 drives every hidden pre-activation negative: the hidden layer is all 0."""
    model = mlp([[1.0, 1.0], [1.0, 2.0]], [[1.0, 1.0], [2.0, 1.0]],
                biases=[[-1.0, -1.0], [0.0, 0.1]])
    imgs = torch.tensor([[1.0, 2.0], [0.1, 0.2]])
    for fn in (weight_curvature, sparse_weight_curvature):
        with pytest.raises(ValueError, match=r"input of (layer )?'2'.*constant.*image 1"):
            fn(model, imgs, conventions="authors", progress=False, **EXACT)
    with pytest.raises(ValueError, match="image 0"):
        edge_curvature(model, imgs[1:], conventions="authors", **EXACT)
    # library: a silent layer normalises to zeros, every edge touching it is dead
    scores = weight_curvature(model, imgs, progress=False, **EXACT)
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert values(model, imgs[1:])[1].tolist() == [0.0, 0.0]


# -------------------------------------------------------------------- 6. the relabel
def test_all_dead_hidden_weight_scores_two_for_the_authors():
    """2 -> 3 -> 3 -> 2: hidden node n1_2 is dead (min of its layer), so every edge of the
    middle layer out of it is dead: its three weights score 1 (library) and 2.0 (authors); the
    weights of the first and last layer into / out of dead nodes keep 1 under both."""
    model = mlp([[1, 1], [1, 0.5], [0.5, 0.25]], [[1, 1, 1], [1, 2, 1], [0.5, 0.5, 1]],
                [[1, 1, 1], [2, 1, 1]])
    x = torch.tensor([[1.0, 2.0]])
    a = values(model, x)
    assert a[1][2] == 0 and a[2].min() == 0 and a[3][0] == 0
    lib = weight_curvature(model, x, progress=False, **EXACT)
    auth = weight_curvature(model, x, conventions="authors", progress=False, **EXACT)
    dead_hidden = a[2] == 0                                  # the dead node of N2
    assert (lib["2.weight"][:, 2] == 1).all() and (auth["2.weight"][:, 2] == 2).all()
    assert (lib["2.weight"][dead_hidden] == 1).all()
    assert (auth["2.weight"][dead_hidden] == 2).all()
    # first layer: edges into the dead n1_2 stay 1 (authors do not relabel the first layer)
    assert (lib["0.weight"][2] == 1).all() and (auth["0.weight"][2] == 1).all()
    # last layer: edges out of dead n2_j stay 1
    assert (auth["4.weight"][:, dead_hidden] == 1).all()


def test_relabel_is_per_edge_before_the_min_in_hidden_layers_only():
    """Scores under the authors' conventions = min over positions of the edge kappa with
    |kappa - 1| < 1e-6 -> 2.0 in the layers between two hidden layers, plain elsewhere."""
    model = tiny_model(4, bn=True)
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    edges = kappa(model, x, "authors")
    scores = weight_curvature(model, x, conventions="authors", progress=False, **EXACT)
    n = len(edges)
    saw_relabel = False
    for l, (ek, (name, s)) in enumerate(zip(edges, scores.items())):
        k = ek.kappa.copy()
        if 0 < l < n - 1:
            dead = np.abs(k - 1) < 1e-6
            saw_relabel |= bool(dead.any())
            k = np.where(dead, 2.0, k)
        want = np.full(s.numel(), np.inf)
        ex = ek.weight_index >= 0
        np.minimum.at(want, ek.weight_index[ex], k[ex])
        want = np.where(np.isinf(want), 1.0, want)
        np.testing.assert_allclose(s.reshape(-1).numpy(), want, atol=1e-12)
    assert saw_relabel


def test_relabel_orders_all_dead_weights_first():
    """Removing the highest score first: under the authors' conventions every weight whose
    edges are all dead (2.0) goes before every live weight below 2 (library: they sit at 1,
    behind every live weight above 1)."""
    model = tiny_model(4, bn=True)
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    auth = weight_curvature(model, x, conventions="authors", progress=False, **EXACT)
    lib = weight_curvature(model, x, progress=False, **EXACT)
    flat_a = torch.cat([s.reshape(-1) for s in auth.values()])
    flat_l = torch.cat([s.reshape(-1) for s in lib.values()])
    dead = flat_a == 2.0
    above = flat_a > 2.0
    assert dead.sum() > 0 and (flat_l[dead] == 1).all()
    assert ((flat_l > 1) & ~dead).sum() > 0                 # library ranks those first
    n = int(dead.sum() + above.sum())
    sparsity = n / flat_a.numel()
    removed = {}
    for conv, scores in (("authors", auth), ("library", lib)):
        masks = prune_by_curvature(tiny_model(4, bn=True), scores, sparsity, order="highest")
        removed[conv] = ~torch.cat([mk.reshape(-1) for mk in masks.values()])
    assert torch.equal(removed["authors"], dead | above)
    assert not bool(removed["library"][dead].all())


# --------------------------------------------------------------- sparse equals dense
@pytest.mark.parametrize("conventions", BOTH)
@pytest.mark.parametrize("bn,output,seed,topk", [
    (False, "softmax", 0, None), (True, "logits", 2, None), (True, "logits", 3, 3),
    (True, "softmax", 5, 2)])
def test_sparse_equals_dense_under_both(conventions, bn, output, seed, topk):
    """tiny_model (stride 2, padding 1) with a zero weight in every layer and an input with
    zero pixels: every convention is exercised."""
    model = tiny_model(seed, bn=bn)
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.view(-1)[1] = 0.0
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(seed)).clamp_min(0)
    worst = _dense_vs_sparse(model, x, output=output, alpha=0.9, topk=topk, backend="exact",
                             conventions=conventions)
    assert worst < 1e-9


@pytest.mark.parametrize("conventions", BOTH)
def test_sparse_weight_scores_equal_dense_under_both(conventions):
    model = tiny_model(6, bn=True)
    imgs = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(6))
    kw = dict(EXACT, conventions=conventions, progress=False, topk=4)
    dense, sparse = weight_curvature(model, imgs, **kw), sparse_weight_curvature(model, imgs,
                                                                                 **kw)
    for k in dense:
        # same problems, atoms in another order: ot.emd2's rounding, times 1/(1-alpha)
        torch.testing.assert_close(sparse[k], dense[k], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- options
def test_conventions_option_checked_everywhere():
    model, x = tiny_model(0), torch.randn(1, 1, 6, 6)
    for call in (lambda: edge_curvature(model, x, conventions="paper"),
                 lambda: weight_curvature(model, x, conventions=None, progress=False),
                 lambda: sparse_weight_curvature(model, x, conventions="Authors",
                                                 progress=False),
                 lambda: ElementCurvatureImportance(conventions="theirs")):
        with pytest.raises(ValueError, match="conventions must be one of 'library', 'authors'"):
            call()
    with pytest.raises(ValueError, match="only the paper's definition.*length='flow'"):
        edge_curvature(model, x, conventions="authors", variant="flow")
    with pytest.raises(ValueError, match="normalize='max'"):
        weight_curvature(model, x, conventions="authors", normalize="max", progress=False)
    g = element_graph(model, x)
    with pytest.raises(ValueError, match="built with conventions='library'"):
        edge_curvature(model, x, graph=g, conventions="authors")


def test_element_importance_takes_the_authors_scores():
    model = tiny_model(4, bn=True)
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    imp = ElementCurvatureImportance(conventions="authors", alpha=0.9, topk=None,
                                     backend="exact", output="logits").calibrate(model, x)
    want = sparse_weight_curvature(model, x, conventions="authors", progress=False, **EXACT)
    got = {name: imp.weight_curvatures()[id(m)] for name, m in model.named_modules()
           if isinstance(m, (nn.Conv2d, nn.Linear))}
    for name, s in got.items():
        torch.testing.assert_close(s, want[f"{name}.weight"], atol=0, rtol=0)
    assert any((s == 2.0).any() for s in got.values())
