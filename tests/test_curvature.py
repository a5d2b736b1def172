"""Curvature of real (small) networks against an independent exact computation.

The reference (``tests/_reference.py``) shares no code with the library: it expands an MLP into
its explicit neuron graph, takes forward shortest paths with scipy's Dijkstra, builds each
connection's two measures from the definition, and solves W1 with POT ``ot.emd2``.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
from _reference import ALPHA, PAPER
from _reference import mlp_curvature as reference_mlp_curvature
from scipy.stats import spearmanr

from tp_curvature import CalibrationError, UnsupportedModelError, connection_curvature
from tp_curvature.calibration import normalise

from _models import small_mlp


@pytest.mark.parametrize("variant", ["paper", "flow"])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_backend_matches_independent_reference(variant, seed):
    model = small_mlp(seed)
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(seed))
    ref = reference_mlp_curvature(model, x, flow=(variant == "flow"))
    got = connection_curvature(model, x, variant=variant, node_value="mean_abs", topk=None, backend="exact")
    for K_ref, lc in zip(ref, got.values()):
        assert lc.kappa.shape == K_ref.shape
        np.testing.assert_allclose(lc.kappa, K_ref, atol=1e-6)  # float32 activations


@pytest.mark.parametrize("variant", ["paper", "flow"])
def test_sinkhorn_backend_close_to_reference(variant):
    model = small_mlp(3, sizes=(16, 12, 10, 8))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    ref = reference_mlp_curvature(model, x, flow=(variant == "flow"))
    got = connection_curvature(model, x, variant=variant, node_value="mean_abs", topk=None, backend="sinkhorn")
    for K_ref, lc in zip(ref, got.values()):
        # entropic bias is one-sided (kappa_eps <= kappa) and small at the default eps
        assert np.max(np.abs(lc.kappa - K_ref)) < 0.03
        assert np.all(lc.kappa <= K_ref + 1e-5)  # up to float32 rounding in the kernel
        assert spearmanr(lc.kappa.ravel(), K_ref.ravel()).statistic > 0.99


def test_single_layer_closed_form_kappa_zero():
    """Input -> output only: both measures are deltas, W1 = d(x, y), kappa = 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 4))
    x = torch.rand(16, 5) + 0.1
    lc = next(iter(connection_curvature(model, x, **PAPER, topk=None, backend="exact",
                                        normalize="max").values()))
    assert np.allclose(lc.kappa, 0.0)


@pytest.mark.parametrize("backend", ["exact", "sinkhorn"])
def test_two_layer_closed_form(backend):
    """X (input) -> Y -> W (output): m_x = delta_x, so all mass leaves x and
    W1 = alpha d(x,y) + (1-alpha) sum_w r_y(w) c(x,w), i.e.
    kappa = 1 - sum_w r_y(w) c(x, w) / d(x, y) with c(x, w) = min_y' d(x,y') + d(y',w)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).eval()
    x = torch.rand(64, 6) + 0.05
    with torch.no_grad():
        h = torch.relu(model[1](x))
        out = model[3](h)
    a_y = normalise(h.abs().mean(0).double().numpy(), "max")
    a_w = normalise(out.abs().mean(0).double().numpy(), "max")
    d1 = 1 / model[1].weight.detach().double().abs().numpy().T          # (6, 5)
    d2 = 1 / model[3].weight.detach().double().abs().numpy().T          # (5, 4)
    c_xw = (d1[:, :, None] + d2[None, :, :]).min(1)                       # (6, 4)
    r = np.exp(-1 / a_w ** 2) * (a_w > 0)
    r /= r.sum()
    expected = 1 - (c_xw @ r)[:, None] / d1
    expected[:, a_y == 0] = 1.0
    lc = list(connection_curvature(model, x, **PAPER, topk=None, backend=backend, normalize="max",
                                   alpha=ALPHA).values())[0]
    tol = 1e-6 if backend == "exact" else 0.03
    np.testing.assert_allclose(lc.kappa, expected, atol=tol)


def test_dead_channel_and_zero_weight_give_documented_kappa():
    model = small_mlp(5)
    with torch.no_grad():
        model[1].weight[3].zero_()          # hidden neuron 3 of layer 1 is dead (and has no input)
        model[1].bias[3] = -1.0
        model[3].weight[2, 4] = 0.0         # one zero-weight connection
    x = torch.randn(32, 12)
    res = list(connection_curvature(model, x, **PAPER, topk=None, backend="exact").values())
    assert np.all(res[0].kappa[:, 3] == 1.0)       # dead endpoint
    assert np.all(res[1].kappa[3, :] == 1.0)
    assert res[1].kappa[4, 2] == 1.0               # zero weight
    for lc in res:
        assert np.all(np.isfinite(lc.kappa))


def test_conv_graph_groups_and_bn_fold():
    """Depthwise conv: only diagonal connections exist; BN scale enters the lengths."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 2.0)
    x = torch.randn(8, 3, 8, 8)
    res = connection_curvature(model, x, **PAPER, topk=None, backend="exact")
    dw = res["3"]
    # what a scored model holds per connection: float32 kappa and length, a bool solved
    assert dw.kappa.dtype == dw.length.dtype == np.float32 and dw.solved.dtype == bool
    assert np.array_equal(dw.exists, np.eye(4, dtype=bool))
    assert np.isinf(dw.length[~dw.exists]).all() and not dw.solved[~dw.exists].any()
    assert np.all(np.isnan(dw.kappa[~np.eye(4, dtype=bool)]))
    first = res["0"]
    bn = model[1]
    scale = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).abs()
    w = model[0].weight.detach().double().flatten(2).norm(dim=2)       # (4 out, 3 in)
    np.testing.assert_allclose(first.length, (1 / (w * scale[:, None])).T.numpy(), rtol=1e-6)


def test_flatten_maps_features_to_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    res = connection_curvature(model, torch.randn(4, 1, 6, 6), **PAPER, topk=None,
                               backend="exact")
    fc = res["3"]
    assert fc.kappa.shape == (3, 5)
    assert np.array_equal(fc.in_group, np.repeat(np.arange(3), 16))
    w = model[3].weight.detach().double().reshape(5, 3, 16).norm(dim=2)
    np.testing.assert_allclose(fc.length, (1 / w).T.numpy(), rtol=1e-6)


def test_bad_input_errors():
    model = small_mlp(0)
    with pytest.raises(CalibrationError, match="empty"):
        connection_curvature(model, [])
    with pytest.raises(CalibrationError, match="no calibration data"):
        connection_curvature(model, None)
    x = torch.randn(4, 12)
    x[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="non-finite.*layer '1'"):
        connection_curvature(model, x)
    with pytest.raises(UnsupportedModelError, match="no Linear or Conv"):
        connection_curvature(nn.Sequential(nn.ReLU()), torch.randn(2, 3))

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * torch.sigmoid(x)

    # a multiplicative gate is part of the channel graph since issue 9 (tests/test_coverage.py)
    assert set(connection_curvature(Gate(), torch.randn(2, 4))) == {"fc"}


def test_conv1d_residual_and_concat_graph():
    """Conv1d, a residual add and a channel concatenation: the graph and kappa stay consistent."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 4, 3, padding=1)
            self.b1 = nn.BatchNorm1d(4)
            self.c2 = nn.Conv1d(4, 4, 3, padding=1)
            self.c3 = nn.Conv1d(4, 3, 1)
            self.fc = nn.Linear(7 * 8, 5)

        def forward(self, x):
            h = torch.relu(self.b1(self.c1(x)))
            r = torch.relu(self.c2(h) + h)                  # residual add
            cat = torch.cat([r, self.c3(r)], dim=1)         # 4 + 3 channels
            return self.fc(torch.flatten(cat, 1))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(16, 2, 8)
    res = connection_curvature(model, x, **PAPER, topk=None, backend="exact")
    assert set(res) == {"c1", "c2", "c3", "fc"}
    assert res["fc"].kappa.shape == (7, 5)                 # flatten groups 8 positions per channel
    assert res["c3"].kappa.shape == (4, 3)
    for lc in res.values():
        assert np.all(np.isfinite(lc.kappa))
    approx = connection_curvature(model, x, **PAPER, topk=None, backend="sinkhorn")
    for k, lc in res.items():
        assert np.max(np.abs(approx[k].kappa - lc.kappa)) < 0.03


def test_submodule_modes_restored(mixed_modes):
    """Calibration runs in eval mode and gives every submodule its own flag back (a model in
    train mode with one BatchNorm in eval mode stays so), also when it raises midway."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    check = mixed_modes(model, "1")
    x = torch.randn(4, 1, 6, 6)
    connection_curvature(model, x, topk=None, backend="exact")
    check()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="non-finite"):      # raised by the calibration pass
        connection_curvature(model, bad)
    check()

    def failing(mod, batch):
        raise RuntimeError("forward failed")
    with pytest.raises(RuntimeError, match="forward failed"):       # raised by the shape pass
        connection_curvature(model, x, forward_fn=failing)
    check()


def test_skip_edges_only_where_there_are_some():
    """The skip-edge blocks of a layer pair are None when no edge bypasses X or Y, and
    otherwise the dense stack of every junction pair's edges."""
    from tp_curvature.calibration import CalibrationData, calibrate
    from tp_curvature.config import CurvatureConfig
    from tp_curvature.curvature import _skip_edges

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
            self.d = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(h)) + h) + self.d(h)

    torch.manual_seed(0)
    cal = calibrate(Res(), CalibrationData(torch.randn(8, 5)), CurvatureConfig())
    g = cal.graph
    found = 0
    for l in g.layers:
        X, Y = l.in_junction, l.out_junctions[0]
        for srcs, dsts in ((g.predecessors(X), g.successors(Y)), (g.predecessors(X), [Y]),
                           ([X], g.successors(Y))):
            if not srcs or not dsts:
                continue
            dense = np.vstack([np.hstack([g.junction_edges(a, b) for b in dsts]) for a in srcs])
            got = _skip_edges(g, srcs, dsts, 2.0)
            if got is None:
                assert not (dense > 0).any()
            else:
                found += 1
                np.testing.assert_array_equal(got, dense)
    assert found >= 1                       # d: an edge from h to the output skips c's X


def test_node_weight_cache_is_bounded(monkeypatch):
    """The graph keeps the most recently used strength matrices up to the byte bound, and an
    evicted one is recomputed equal."""
    import tp_curvature.graph as graph_mod
    from tp_curvature.calibration import CalibrationData, calibrate
    from tp_curvature.config import CurvatureConfig

    model = small_mlp()
    g = calibrate(model, CalibrationData(torch.randn(8, 12)), CurvatureConfig()).graph
    first = [tuple(a.copy() for a in g.node_weights(l)) for l in g.layers]
    g._node_weight_cache.clear()
    one = max(sum(a.nbytes for a in v) for v in first)
    monkeypatch.setattr(graph_mod, "NODE_WEIGHT_CACHE_BYTES", one)
    for l, want in zip(g.layers, first):
        got = g.node_weights(l)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert sum(a.nbytes for v in g._node_weight_cache.values() for a in v) <= one
    assert len(g._node_weight_cache) < len(g.layers)


def test_lineage_pass_keeps_only_what_is_read_after_it():
    """The channel graph's lineage pass frees every node's value and id tensors after its
    last user: what is left are the output's inputs (read by the graph builder) and nodes
    nobody reads; the graph is the same as with nothing freed."""
    from tp_curvature._export import export_program
    from tp_curvature._lineage import _last_uses
    from tp_curvature.graph import ChannelGraph, _Builder, _lineage_pass

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(h)) + h)

    model = Res().eval()
    program = export_program(model, torch.randn(4, 5), lambda m, b: m(b))
    p = _lineage_pass(program, _Builder(model, set()), {})
    out = next(n for n in program.gm.graph.nodes if n.op == "output")
    left = {n for n in p.env if n.users and n is not out}
    assert left == set(out.all_input_nodes)
    freed = [a for v in _last_uses(program.gm.graph).values() for a in v]
    assert len(freed) == len(set(freed)) and len(freed) > 5
    assert all(p.lin[a] == [] or not isinstance(p.lin[a], list) for a in freed)
    # nothing freed: the same channel graph
    import tp_curvature._lineage as lineage_mod
    g1 = ChannelGraph.from_program(model, program)
    orig = lineage_mod._last_uses
    lineage_mod._last_uses = lambda graph: {}
    try:
        g2 = ChannelGraph.from_program(model, program)
    finally:
        lineage_mod._last_uses = orig
    assert [(j.name, j.n_nodes, j.channel_dims) for j in g1.junctions] == \
        [(j.name, j.n_nodes, j.channel_dims) for j in g2.junctions]
    assert [(l.name, l.in_junction, l.out_junctions) for l in g1.layers] == \
        [(l.name, l.in_junction, l.out_junctions) for l in g2.layers]
    for l1, l2 in zip(g1.layers, g2.layers):
        np.testing.assert_array_equal(g1.node_weights(l1)[0], g2.node_weights(l2)[0])


def test_cap_costs_caps_in_place_with_the_copy_s_values():
    """The graph caps its own cost matrices in place (no wide-layer temporaries): the same
    values as the copying form, which leaves its inputs alone; lengths outside ``where`` do
    not enter the cap."""
    from tp_curvature.problem import cap_costs

    rng = np.random.default_rng(0)
    costs = [rng.uniform(1, 5, (4, 6)) for _ in range(3)]
    costs[0][1, 2] = costs[2][3, 0] = np.inf
    d = rng.uniform(1, 8, (5, 6))
    where = d < 7.0
    d[~where] = 1e6                               # not solved: must not set the cap
    ref = cap_costs(tuple(c.copy() for c in costs), d[where])
    before = [c.copy() for c in costs]
    got = cap_costs(tuple(costs), d, where=where, copy=True)
    for c, b, r, g in zip(costs, before, ref, got):
        np.testing.assert_array_equal(c, b)      # copy=True: inputs untouched
        np.testing.assert_array_equal(g, r)
    top = max(max(c[np.isfinite(c)].max() for c in costs), d[where].max())
    assert got[0][1, 2] == got[2][3, 0] == 2 * top
    inplace = cap_costs(tuple(costs), d, where=where, copy=False)
    assert all(a is b for a, b in zip(inplace, costs))
    for c, r in zip(costs, ref):
        np.testing.assert_array_equal(c, r)


def test_layer_problem_lengths_where_solved_and_where_existing():
    """``length`` is d(x, y) of every existing connection, ``d_xy`` the same where solved and
    inf elsewhere (a dead endpoint is not solved); one array when the two agree."""
    from tp_curvature import CurvatureImportance

    model = small_mlp(5)
    with torch.no_grad():
        model[1].weight[3].zero_()          # hidden neuron 3 of layer 1 is dead
        model[1].bias[3] = -1.0
    x = torch.randn(32, 12)
    probs = list(CurvatureImportance(topk=None).calibrate(model, x).layer_problems().values())
    for P in probs:
        agree = bool((P.solve == np.isfinite(P.length)).all())
        assert (P.d_xy is P.length) == agree
        np.testing.assert_array_equal(np.isfinite(P.d_xy), P.solve)
        np.testing.assert_array_equal(P.d_xy[P.solve], P.length[P.solve])
        assert not np.isfinite(P.length[~P.exists]).any()
    P = probs[1]                            # its input junction holds the dead neuron
    assert P.d_xy is not P.length
    assert not P.solve[3].any()


def test_node_weights_leave_the_model_s_weights_as_they_were():
    """The strengths are |W| per (input node, output channel), computed in place on a copy:
    a float64 model's own weights (which a plain ``.to(float64)`` would alias) are unchanged."""
    from tp_curvature.calibration import CalibrationData, calibrate
    from tp_curvature.config import CurvatureConfig

    model = small_mlp(2).double()
    before = [p.detach().clone() for p in model.parameters()]
    g = calibrate(model, CalibrationData(torch.randn(8, 12, dtype=torch.float64)),
                  CurvatureConfig()).graph
    for layer in g.layers:
        s, mask = g.node_weights(layer)
        np.testing.assert_allclose(s, layer.module.weight.detach().abs().numpy().T,
                                   rtol=1e-15, atol=0)
        assert mask.all()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


class _PreNormNet(nn.Module):
    """Convs with a BatchNorm after them, a residual sum read through a pre-norm (its scale
    becomes the next conv's ``in_scale``), a grouped conv and a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.pre = nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 4, 1)
        self.c4 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = h + torch.relu(self.c2(h))
        h = torch.relu(self.c3(self.pre(h)))
        return self.fc(torch.relu(self.c4(h)).mean((2, 3)))


def test_conv_strengths_of_the_usual_layer_equal_the_general_scatter(monkeypatch):
    """A conv whose input nodes are its channels, without groups, takes a shortcut (the
    kernel-slice norms transposed, every pair an edge): the same strengths and mask as the
    general scatter, also with a pre-norm's scale folded in."""
    import tp_curvature.graph as graph_mod
    from tp_curvature.calibration import CalibrationData, calibrate
    from tp_curvature.config import CurvatureConfig

    torch.manual_seed(0)
    model = _PreNormNet().eval()
    with torch.no_grad():
        for bn in (model.b1, model.pre):
            bn.weight.uniform_(0.5, 2.0)
            bn.running_var.uniform_(0.5, 2.0)
    g = calibrate(model, CalibrationData(torch.randn(4, 3, 8, 8)), CurvatureConfig()).graph
    convs = [l for l in g.layers if l.kind == "conv"]
    short = [l for l in convs if l.groups == 1 and
             graph_mod.selects_all(l.in_group, g.junctions[l.in_junction].n_nodes)]
    assert len(short) == 3 and any(l.in_scale is not None for l in short)
    fast = [g._node_weights(l, p) for l in g.layers for p in (2.0, 1.0)]
    pre = next(l for l in short if l.in_scale is not None)
    w = pre.module.weight.detach().double().flatten(2).norm(dim=2)       # (out, in)
    want = (w * torch.as_tensor(pre.in_scale)[None, :]).T.numpy()
    np.testing.assert_allclose(g._node_weights(pre, 2.0)[0], want, rtol=1e-12)
    monkeypatch.setattr(graph_mod, "selects_all", lambda idx, n: False)
    slow = [g._node_weights(l, p) for l in g.layers for p in (2.0, 1.0)]
    for (s1, m1), (s2, m2) in zip(fast, slow):
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(m1, m2)


def test_edge_maps_with_few_temporaries_equal_the_formula():
    """``out[:, c] = max(out[:, c], s[:, idx] * scale)`` by the helpers of ``junction_edges``,
    for every column in order and for a scattered subset."""
    from tp_curvature.graph import _max_into, _scaled_columns

    rng = np.random.default_rng(0)
    s = rng.random((5, 7))
    for idx, c in [(np.arange(7), np.arange(7)), (np.array([6, 0, 3]), np.array([1, 4, 2]))]:
        scale = rng.random(idx.size)
        out = rng.random((5, 7))                     # earlier inflows: max, not overwrite
        want = out.copy()
        want[:, c] = np.maximum(want[:, c], s[:, idx] * scale[None, :])
        _max_into(out, c, _scaled_columns(s, idx, scale))
        np.testing.assert_array_equal(out, want)


def test_measures_built_by_blocks_of_rows_equal_the_whole(monkeypatch):
    """The supports are built a block of rows at a time (``SUPPORT_BLOCK`` entries): with
    blocks of one or two rows the problems are identical to those built at once."""
    import tp_curvature.curvature as curv_mod
    from tp_curvature import CurvatureImportance

    model = small_mlp(4, sizes=(12, 16, 10, 6))
    x = torch.randn(32, 12)
    whole = CurvatureImportance(topk=5).calibrate(model, x).layer_problems()
    monkeypatch.setattr(curv_mod, "SUPPORT_BLOCK", 20)
    blocks = CurvatureImportance(topk=5).calibrate(model, x).layer_problems()
    for name, P in whole.items():
        Q = blocks[name]
        for f in ("pred_idx", "pred_mass", "succ_idx", "succ_mass", "c_zw", "c_zy", "c_xw"):
            np.testing.assert_array_equal(getattr(P, f), getattr(Q, f))
    assert sum(P.pred_idx.shape[0] for P in whole.values()) > 3    # several blocks were built


def test_kappa_in_place_equals_the_kappa_of_a_copy():
    """``LayerPairProblem.kappa(w1, overwrite=True)`` writes into ``w1`` exactly the values the
    copying form returns: solved connections from W1, unsolved ones 1, absent pairs NaN."""
    from tp_curvature.testing import random_layer_pair

    P = random_layer_pair(9, seed=1, alpha=0.7)
    rng = np.random.default_rng(1)
    P.exists = P.solve | (rng.random(P.solve.shape) < 0.5)
    P.solve = P.solve & (rng.random(P.solve.shape) < 0.7)
    w1 = np.where(P.solve, rng.random(P.solve.shape), np.nan)
    want = P.kappa(w1)
    buf = w1.copy()
    got = P.kappa(buf, overwrite=True)
    assert got is buf
    np.testing.assert_array_equal(got, want)
    assert (got[P.exists & ~P.solve] == 1).all() and np.isnan(got[~P.exists]).all()


@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_minplus_on_either_path_equals_the_numpy_product(threshold, monkeypatch):
    """The library's min-plus product, run on the worker threads (threshold 0) or on the
    calling thread (products below ``MINPLUS_PARALLEL``), equals the NumPy reference, with
    infinite entries (no edge) in both factors."""
    import tp_curvature.shortest_paths as sp
    from tp_curvature.testing import minplus as reference

    monkeypatch.setattr(sp, "MINPLUS_PARALLEL", threshold)
    rng = np.random.default_rng(3)
    a = np.where(rng.random((13, 9)) < 0.3, np.inf, rng.random((13, 9)))
    b = np.where(rng.random((9, 11)) < 0.3, np.inf, rng.random((9, 11)))
    a[2] = np.inf                                   # a row with no edge: all inf
    np.testing.assert_array_equal(sp.minplus(a, b), reference(a, b))
    assert np.isinf(sp.minplus(a, b)[2]).all()
    # across the tiles, with remainders of every loop: rows, inner (four-term passes and
    # TILE_K) and columns (TILE_J); a sparse (depthwise-like) factor, whose four-term groups
    # mix finite and infinite entries, and groups that are all infinite
    n, m, p = 13, 2 * sp.TILE_K + 7, sp.TILE_J + 5
    a = np.where(rng.random((n, m)) < 0.3, np.inf, rng.random((n, m)) * 5)
    a[:, 8:16] = np.inf
    b = np.where(rng.random((m, p)) < 0.3, np.inf, rng.random((m, p)) * 5)
    np.testing.assert_array_equal(sp.minplus(a, b), reference(a, b))
    sparse = np.full((n, m), np.inf)
    sparse[np.arange(n), rng.integers(0, m, n)] = rng.random(n)
    np.testing.assert_array_equal(sp.minplus(sparse, b), reference(sparse, b))
    last = np.full((n, m), np.inf)                  # only the inner remainder has edges
    last[:, -1] = 1.0
    np.testing.assert_array_equal(sp.minplus(last, b), reference(last, b))


@pytest.mark.parametrize("skip_zy,skip_xw", [(False, False), (True, False), (False, True),
                                             (True, True)])
@pytest.mark.parametrize("wide", ["x", "y"])
def test_paths_z_to_w_equal_both_products_with_only_the_needed_one(skip_zy, skip_xw, wide,
                                                                    monkeypatch):
    """``c_zw`` from the one product it needs equals ``min(d_zx . c_xw, c_zy . d_yw)`` (the
    definition) up to the rounding of the sums' grouping, with skip edges Z -> Y and X -> W
    or without; without either, the product over the narrower of X and Y is computed."""
    import tp_curvature.curvature as cv
    from tp_curvature.testing import minplus as mp

    rng = np.random.default_rng(5)
    n_x, n_y = (9, 4) if wide == "x" else (4, 9)

    def lengths(n, m):
        return np.where(rng.random((n, m)) < 0.3, np.inf, rng.uniform(0.5, 2.0, (n, m)))

    d_zx, d_xy, d_yw = lengths(6, n_x), lengths(n_x, n_y), lengths(n_y, 7)
    c_zy, c_xw = mp(d_zx, d_xy), mp(d_xy, d_yw)
    if skip_zy:
        c_zy = np.minimum(c_zy, lengths(6, n_y) * 0.5)
    if skip_xw:
        c_xw = np.minimum(c_xw, lengths(n_x, 7) * 0.5)
    want = np.minimum(mp(d_zx, c_xw), mp(c_zy, d_yw))
    inner = []
    monkeypatch.setattr(cv, "minplus", lambda a, b: inner.append(a.shape[1]) or mp(a, b))
    got = cv._paths_zw(d_zx, c_zy, c_xw, d_yw, skip_zy, skip_xw)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    if skip_zy and skip_xw:
        assert sorted(inner) == sorted([n_x, n_y])
    elif skip_zy or skip_xw:
        assert inner == [n_y if skip_zy else n_x]
    else:
        assert inner == [min(n_x, n_y)]
