"""Sparse element graphs (issue 12): the same kappa as the dense per-weight mode and as an
independent POT reference, pooling semantics, O(edges) memory on the paper's VGG-9, and channel
scores from element curvature."""
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from _reference import ALPHA, graph_curvature, minmax
from _reference import element_curvature as reference
from test_unstructured import tiny_model

from tp_curvature import ElementCurvatureImportance
from tp_curvature.unstructured import (edge_curvature, sparse_edge_curvature,
                                       sparse_element_graph, sparse_weight_curvature,
                                       weight_curvature)


def small_lenet(seed=0, bn=True):
    """12x12 -> conv 4@3x3 (10x10) [BN] -> conv 6@3x3 s2 (4x4) -> fc 96 -> 10 -> 3."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), nn.Flatten(),
               nn.Linear(96, 10), nn.ReLU(), nn.Linear(10, 3)]
    model = nn.Sequential(*layers)
    if bn:
        with torch.no_grad():
            model[1].running_var.uniform_(0.5, 2.0)
            model[1].weight.uniform_(0.5, 1.5)
    return model.eval()


def _dense_vs_sparse(model, x, **kw):
    dense = edge_curvature(model, x, **kw)
    sparse = sparse_edge_curvature(model, x, **kw)
    assert [e.name for e in dense] == list(sparse)
    worst = 0.0
    for ek in dense:
        xs, ys, wi, k = sparse[ek.name]
        # the same edge set (every unrolled (input, output) pair exactly once) ...
        assert len(k) == int((ek.weight_index >= 0).sum())
        assert len(set(zip(xs.tolist(), ys.tolist()))) == len(k)
        assert (ek.weight_index[xs, ys] == wi).all()
        # ... and the same kappa
        worst = max(worst, float(np.max(np.abs(ek.kappa[xs, ys] - k))))
    return worst


@pytest.mark.parametrize("variant,bn,output,seed,topk", [
    ("paper", False, "softmax", 0, None), ("flow", False, "logits", 1, None),
    ("paper", True, "logits", 2, None), ("paper", True, "logits", 3, 3),
    ("flow", True, "softmax", 4, 2)])
def test_sparse_equals_dense_exact(variant, bn, output, seed, topk):
    """tiny_model has stride 2 and padding 1: border taps and padding handled identically."""
    model = tiny_model(seed, bn=bn)
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    worst = _dense_vs_sparse(model, x, output=output, variant=variant, alpha=ALPHA, topk=topk,
                             backend="exact")
    assert worst < 1e-9


def test_sparse_equals_independent_pot_reference():
    """Against tests/_reference.py (explicit loops, scipy Dijkstra, ot.emd2; no shared code)."""
    model = tiny_model(5, bn=True)
    x = torch.randn(1, 6, 6, generator=torch.Generator().manual_seed(5))
    ref = reference(model, x, output="logits")
    got = sparse_edge_curvature(model, x[None], output="logits", alpha=ALPHA, topk=None,
                                backend="exact")
    assert len(ref) == len(got)
    for (K, WI), (xs, ys, wi, k) in zip(ref, got.values()):
        assert np.isfinite(K).sum() == len(k)
        assert (WI[xs, ys] == wi).all()
        np.testing.assert_allclose(k, K[xs, ys], atol=1e-9)


def test_sparse_weight_scores_equal_dense_on_small_lenet():
    """Per-weight scores (min over positions and two images), exact backend, topk 4, and the
    default certified Sinkhorn within its kappa_tol (0.02) of exact."""
    model = small_lenet(0)
    imgs = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    kw = dict(output="logits", alpha=0.9, topk=4)
    dense = weight_curvature(model, imgs, progress=False, backend="exact", **kw)
    sparse, info = sparse_weight_curvature(model, imgs, progress=False, backend="exact",
                                           return_info=True, **kw)
    assert dense.keys() == sparse.keys()
    for k in dense:
        # same problems, atoms in another order: ot.emd2's rounding, times 1/(1-alpha) = 10
        torch.testing.assert_close(sparse[k], dense[k], atol=1e-6, rtol=0)
    assert info["n_edges_per_image"] == 4 * 9 * 100 + 6 * 4 * 9 * 16 + 96 * 10 + 30
    sink = sparse_weight_curvature(model, imgs, progress=False, **kw)
    for k in dense:
        assert float((sink[k] - dense[k]).abs().max()) <= 0.02 + 1e-9


def test_topk_default_is_small_and_agrees_in_rank():
    model = small_lenet(2)
    imgs = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    from tp_curvature.unstructured import SPARSE_DEFAULT_TOPK
    from scipy.stats import spearmanr
    assert SPARSE_DEFAULT_TOPK <= 16
    full = sparse_weight_curvature(model, imgs, progress=False, topk=None, backend="exact")
    k = sparse_weight_curvature(model, imgs, progress=False, backend="exact")
    a = torch.cat([v.flatten() for v in full.values()]).numpy()
    b = torch.cat([v.flatten() for v in k.values()]).numpy()
    assert spearmanr(a, b)[0] > 0.9


# ---------------------------------------------------------------------------------- pooling
def pool_model(kind):
    torch.manual_seed(0)
    pool = nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), pool, nn.Flatten(),
                         nn.Linear(8, 3)).eval()


def test_maxpool_edges_go_to_the_winner_avgpool_uniform():
    x = torch.zeros(1, 1, 4, 4)
    model = pool_model("max")
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[:, 0, 1, 1] = 1.0               # conv = identity on both channels
        model[0].bias.zero_()
        model[0].bias[1] = 0.0
    x[0, 0] = torch.tensor([[1., 2., 0., 0.], [3., 0., 0., 9.], [0., 0., 5., 0.],
                            [0., 7., 0., 0.]])
    g = sparse_element_graph(model, x)
    from tp_curvature.unstructured._sparse import set_strengths
    pool = g.ops[1]
    assert pool.kind == "maxpool" and pool.pos_tab.shape == (4, 4)
    set_strengths(pool, x[0].repeat(2, 1, 1))
    S = pool.S.reshape(2, 4, 4)                           # (channel, window, tap)
    for c in range(2):
        winners = [int(pool.pos_tab[l, np.flatnonzero(S[c, l])[0]]) for l in range(4)]
        assert (S[c].sum(1) == 1).all()                   # one in-edge per window output
        assert winners == [4, 7, 13, 10]                  # flat positions of 3, 9, 7, 5
    assert pool.n_edges == 2 * 4
    avg = sparse_element_graph(pool_model("avg"), x).ops[1]
    assert avg.kind == "avgpool" and np.allclose(avg.S, 0.25) and avg.n_edges == 2 * 16


def _explicit_pool_reference(model, x, kind, alpha):
    """Independent element graph with the pool as an explicit layer (tests/_reference's
    Dijkstra + ot.emd2): conv (4x4, pad 1) -> relu -> pool 2 -> fc."""
    conv, fc = model[0], model[4]
    with torch.no_grad():
        h0 = x[0]
        h1 = torch.relu(conv(x))[0]                      # (2, 4, 4)
        h2 = model[2](h1[None])[0]                       # (2, 2, 2)
        out = model(x)[0]
    acts = [minmax(t.flatten().double().abs().numpy()) for t in (h0, h1, h2, out)]
    offs = np.cumsum([0, 16, 32, 8, 3])
    edges = {}
    w = conv.weight.detach().double()
    for o in range(2):
        for i in range(4):
            for j in range(4):
                for di in range(3):
                    for dj in range(3):
                        ii, jj = i + di - 1, j + dj - 1
                        if 0 <= ii < 4 and 0 <= jj < 4:
                            edges[(offs[0] + ii * 4 + jj, offs[1] + o * 16 + i * 4 + j)] = (
                                abs(w[o, 0, di, dj].item()), 0, (o * 3 + di) * 3 + dj)
    for c in range(2):
        for pi in range(2):
            for pj in range(2):
                win = [(2 * pi + a) * 4 + 2 * pj + b for a in range(2) for b in range(2)]
                vals = [h1[c].flatten()[q].item() for q in win]
                keep = [int(np.argmax(vals))] if kind == "max" else range(4)
                for t in keep:
                    edges[(offs[1] + c * 16 + win[t], offs[2] + c * 4 + pi * 2 + pj)] = (
                        1.0 if kind == "max" else 0.25, 1, -1)
    wf = fc.weight.detach().double()
    for o in range(3):
        for i in range(8):
            edges[(offs[2] + i, offs[3] + o)] = (abs(wf[o, i].item()), 2, o * 8 + i)
    return graph_curvature(acts, edges, alpha)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_kappa_matches_explicit_reference(kind):
    model = pool_model(kind)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(11))
    ref = _explicit_pool_reference(model, x, kind, ALPHA)
    got = sparse_edge_curvature(model, x, output="logits", alpha=ALPHA, topk=None,
                                backend="exact")
    for (K, WI), (xs, ys, wi, k) in zip([ref[0], ref[2]], got.values()):
        assert np.isfinite(K).sum() == len(k)
        np.testing.assert_allclose(k, K[xs, ys], atol=1e-9)
        assert (WI[xs, ys] == wi).all()


# --------------------------------------------------------------------------- paper VGG-9
def test_paper_vgg9_layout_and_edge_count_closed_form_without_dense_matrices():
    from engine.models import build_model, count_parameters
    m = build_model("paper_vgg9", in_channels=3, image_size=32).eval()
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    fcs = [l for l in m.modules() if isinstance(l, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0])
            for c in convs] == [(3, 64, 2, 2, 0), (64, 128, 3, 1, 0), (128, 128, 3, 1, 0),
                                (128, 128, 3, 2, 0), (128, 256, 3, 1, 0), (256, 256, 3, 1, 0)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(256, 512), (512, 128), (128, 10)]
    x = torch.randn(1, 3, 32, 32)
    tracemalloc.start()
    try:
        g = sparse_element_graph(m, x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    maps = [16, 14, 12, 5, 3, 1]
    assert [op.out_shape[1] for op in g.ops[:6]] == maps
    closed = [c.out_channels * c.in_channels * c.kernel_size[0] ** 2 * s * s
              for c, s in zip(convs, maps)] + [f.in_features * f.out_features for f in fcs]
    assert [op.n_edges for op in g.ops] == closed
    assert g.n_edges == 43_009_280
    # the largest dense element matrix would be 16384 x 25088 float64 = 3.3 GB
    assert peak < 64 << 20, peak
    one = build_model("paper_vgg9", in_channels=1, image_size=32)
    assert one(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert count_parameters(one) > 1_000_000


def test_pad_to_32():
    from engine.data import TensorImageDataset, _pad_images
    ds = TensorImageDataset(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8),
                            torch.tensor([0, 1]), (0.5,), (0.5,))
    p = _pad_images(ds, 32)
    x, _ = p.get_batch([0])
    assert x.shape == (1, 1, 32, 32)
    assert float(x[0, 0, 2, 2]) == 1.0 and float(x[0, 0, 0, 0]) == -1.0
    assert float(x[0, 0, 29, 29]) == 1.0 and float(x[0, 0, 31, 31]) == -1.0


# ------------------------------------------------------------------------ channel scores
def test_element_importance_prunes_small_cnn_at_half():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    imp = ElementCurvatureImportance(alpha=0.5, topk=4)
    imp.calibrate(model, x)
    kap = imp.weight_curvatures()
    assert set(map(id, [model[0], model[4], model[8], model[10]])) == set(kap)
    # the scores of conv 0's output channels are kmax - mean of its weights' kappa
    pruner = tp.pruner.BasePruner(model, x[:1], importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model[10]])
    g0 = next(g for g in pruner.DG.get_all_groups(ignored_layers=[model[10]],
                                                  root_module_types=[nn.Conv2d, nn.Linear])
              if g[0].dep.target.module is model[0])
    s = imp(g0)
    assert s is not None and s.shape == (8,) and torch.isfinite(s).all()
    pruner.step()
    assert model[0].out_channels == 4 and model[4].out_channels == 4
    assert model[8].out_features == 8
    assert model(x).shape == (3, 4)
    # weights changed -> scores recomputed on the pruned model
    imp(next(iter(pruner.DG.get_all_groups(ignored_layers=[model[10]],
                                           root_module_types=[nn.Conv2d, nn.Linear]))))
    assert imp.weight_curvatures()[id(model[0])].shape == model[0].weight.shape


@pytest.mark.slow
def test_unstructured_benchmark_sparse_smoke(tmp_path, monkeypatch):
    """benchmarks/unstructured.py in sparse mode end to end (digits MLP, trained here)."""
    import unstructured
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "u"
    unstructured.main(["--pairs", "digits:mlp", "--mode", "sparse", "--quick", "--images", "2",
                       "--random-seeds", "1", "--sparsities", "0", "0.5", "--out", str(out),
                       "--edge-check", "2", "--epochs", "2"])
    for suf in (".csv", ".png", ".md", ".json"):
        assert out.with_suffix(suf).is_file()
    md = out.with_suffix(".md").read_text()
    assert "(sparse)" in md and "Sampled edges" in md


def test_element_importance_flattened_channel_counts_once():
    """A conv channel flattened into a Linear (36 features per channel): under the mean group
    reduction the channel's score is the mean of its conv score and the mean of its 36
    features' scores (one item each), as in CurvatureImportance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    imp = ElementCurvatureImportance(normalizer=None, backend="exact", alpha=0.5)
    imp.calibrate(model, x)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    g = DG.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(4)))
    k0 = imp.weight_curvatures()[id(model[0])]
    k3 = imp.weight_curvatures()[id(model[3])]
    out = 2.0 - k0.flatten(1).mean(1)
    feat = 2.0 - k3.transpose(0, 1).mean(1)              # per input feature of the Linear
    want = (out + feat.view(4, 36).mean(1)) / 2
    torch.testing.assert_close(imp(g), want.float(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ speed: cached paths etc.
def narrow_vgg9(seed=0):
    """The paper's VGG-9 layout (kernels 2, 3, 3, 3 s2, 3, 3, no padding, BN + ReLU, three fc
    layers) with 4-8 channels, random BatchNorm statistics; 1x32x32 input."""
    torch.manual_seed(seed)
    layers, c = [], 1
    for co, k, s in ((4, 2, 2), (6, 3, 1), (6, 3, 1), (6, 3, 2), (8, 3, 1), (8, 3, 1)):
        layers += [nn.Conv2d(c, co, k, stride=s, bias=False), nn.BatchNorm2d(co), nn.ReLU()]
        c = co
    layers += [nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
               nn.Linear(8, 10)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.0, 0.3)
    return model.eval()


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, float((a[k] - b[k]).abs().max()))


@pytest.mark.parametrize("net,conventions,topk", [("vgg", "library", 8), ("lenet", "authors", 8),
                                                  ("lenet", "library", None)])
def test_cached_paths_give_the_kappa_of_recomputing_them_per_image(net, conventions, topk,
                                                                  one_thread):
    """Shortest paths computed once per layer and reused for every tile and image give, bit
    for bit, the per-weight scores of recomputing them per tile (two images; the cache is
    actually reused: fewer rows computed than tiles asked for). One torch thread: with two,
    the first forward pass of a process may round node values differently."""
    gen = torch.Generator().manual_seed(4)
    model, imgs = ((narrow_vgg9(0), torch.randn(2, 1, 32, 32, generator=gen)) if net == "vgg"
                   else (small_lenet(1), torch.randn(2, 1, 12, 12, generator=gen)))
    kw = dict(output="logits", progress=False, conventions=conventions, topk=topk)
    cached, info = sparse_weight_curvature(model, imgs, return_info=True, **kw)
    fresh, info0 = sparse_weight_curvature(model, imgs, return_info=True, cache_paths=False,
                                           **kw)
    _assert_identical(cached, fresh)
    stats = [v["path_cache"] for v in info["layers"].values() if "path_cache" in v]
    assert len(stats) == len(info["layers"]) - 1           # every layer but the last
    assert sum(s["hits"] for s in stats) > sum(s["misses"] for s in stats) > 0
    assert all(s["rows"] == s["computed"] == s["misses"] for s in stats)
    assert not any("path_cache" in v for v in info0["layers"].values())
    # per edge too, one image
    a = sparse_edge_curvature(model, imgs[:1], output="logits", conventions=conventions,
                              topk=topk)
    b = sparse_edge_curvature(model, imgs[:1], output="logits", conventions=conventions,
                              topk=topk, cache_paths=False)
    for name in a:
        for u, v in zip(a[name], b[name]):
            assert np.array_equal(u, v)


def test_path_cache_rows_equal_two_hops_on_another_image(one_thread):
    """A row cached on one image's tiles is what _two_hops computes on another image's node
    values (the paper's lengths ignore them), whatever set of rows a tile asks for; flow
    lengths and a max pool after the layer get no cache."""
    from tp_curvature import CurvatureConfig
    from tp_curvature.unstructured._sparse import _two_hops, path_cache, PathBudget
    from tp_curvature.unstructured._sparse_scores import layer_context
    from tp_curvature.unstructured import sparse_node_values
    model = narrow_vgg9(1)
    imgs = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    g = sparse_element_graph(model, imgs[:1])
    cfg = CurvatureConfig.element(sparse=True)
    vals = [v[0] for v in sparse_node_values(g, imgs, output="logits")]
    rng = np.random.default_rng(0)
    for bi in g.weight_ops[:-1]:
        cache = path_cache(g.ops, bi, cfg)
        n_w = g.ops[bi + 1].n_out
        sets = [np.unique(rng.integers(0, n_w, size=min(n_w, 7))) for _ in range(3)]
        for a in vals:
            nb = layer_context(g, bi, a, cfg).nb
            for Wu in sets:
                want = _two_hops(Wu, nb.B, nb.C, nb.a_x, nb.a_y, nb.flow)
                assert np.array_equal(cache.two_hops(Wu, nb), want)
        assert cache.hits >= sum(w.size for w in sets) and cache.nbytes > 0
    # a spent budget: rows are computed per call and not kept, the values unchanged
    bi = g.weight_ops[1]
    nb = layer_context(g, bi, vals[0], cfg).nb
    tight = path_cache(g.ops, bi, cfg, PathBudget(0))
    Wu = np.arange(5)
    assert np.array_equal(tight.two_hops(Wu, nb), _two_hops(Wu, nb.B, nb.C, nb.a_x, nb.a_y,
                                                          nb.flow))
    assert tight.rows == {} and tight.computed == 5
    assert path_cache(g.ops, bi, CurvatureConfig.element(sparse=True, variant="flow")) is None
    pooled = sparse_element_graph(pool_model("max"), torch.randn(1, 1, 4, 4))
    assert path_cache(pooled.ops, 0, cfg) is None


def test_topk_by_selection_is_the_stable_sort_order():
    from tp_curvature.unstructured._sparse import _top_order
    rng = np.random.default_rng(1)
    for trial in range(500):
        n = int(rng.integers(0, 50))
        kk = int(rng.integers(0, n + 1))
        v = (rng.choice([-np.inf, -1.0, -2.0, 0.0, -0.0, -3.5], size=n) if trial % 2
             else -1.0 / rng.random(n) ** 2)
        v = np.where(rng.random(n) < 0.2, -np.inf, v)
        assert np.array_equal(_top_order(v, n, kk), np.argsort(-v, kind="mergesort")[:kk])


def test_tiles_per_call_same_costs_and_layers_option(one_thread):
    """Several output positions per solver call: the exact solver gives the kappa of one
    tile per call (same ground costs), edge for edge; Sinkhorn within its certified
    tolerance. ``layers`` scores a subset exactly as a full run; bad options are refused."""
    model = small_lenet(3)
    imgs = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(6))
    kw = dict(output="logits", alpha=0.9, topk=4)
    ex1 = sparse_edge_curvature(model, imgs[:1], backend="exact", **kw)
    ex4 = sparse_edge_curvature(model, imgs[:1], backend="exact", tiles_per_call=6, **kw)
    for name in ex1:
        x1, y1, w1, k1 = ex1[name]
        x4, y4, w4, k4 = ex4[name]
        o1, o4 = np.lexsort((y1, x1)), np.lexsort((y4, x4))
        assert np.array_equal(x1[o1], x4[o4]) and np.array_equal(y1[o1], y4[o4])
        assert np.array_equal(w1[o1], w4[o4])
        np.testing.assert_allclose(k4[o4], k1[o1], atol=1e-9)
    model, imgs = narrow_vgg9(2), torch.randn(1, 1, 32, 32,
                                              generator=torch.Generator().manual_seed(6))
    full = sparse_weight_curvature(model, imgs, progress=False, **kw)
    batched = sparse_weight_curvature(model, imgs, progress=False, tiles_per_call=5, **kw)
    for k in full:
        assert float((full[k] - batched[k]).abs().max()) <= 2 * 0.02 + 1e-9
    part = sparse_weight_curvature(model, imgs, progress=False, layers=["3", "19"], **kw)
    assert list(part) == ["3.weight", "19.weight"]
    for k in part:
        assert torch.equal(part[k], full[k])
    with pytest.raises(ValueError, match="layers"):
        sparse_weight_curvature(model, imgs, progress=False, layers=["4"], **kw)
    with pytest.raises(ValueError, match="tiles_per_call"):
        sparse_weight_curvature(model, imgs, progress=False, tiles_per_call=0, **kw)
    with pytest.raises(TypeError, match="cache_paths"):
        sparse_weight_curvature(model, imgs, progress=False, cache_paths="yes", **kw)
