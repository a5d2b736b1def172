"""engine.peers (activation / Wanda-sp / FLAP importances, FLAP bias compensation),
engine.stats (paired statistics) and engine.report's best-other table against hand
computations; engine.criteria's curvature-element criterion."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from engine import criteria, peers, stats
from scipy.stats import ttest_rel, wilcoxon


def _group(model, layer, fn, n, example):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    return DG.get_pruning_group(layer, fn, idxs=list(range(n)))


def _flap_hand(x_chan, w2):
    """FLAP by hand: population variance of each channel's values times ||W[:, c]||^2,
    standardised over the layer (sample std)."""
    v = x_chan.var(dim=1, unbiased=False) * w2
    return (v - v.mean()) / v.std()


# ------------------------------------------------------------------------------------------
# tiny MLP
# ------------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def test_peers_mlp_match_hand_computation():
    model = _mlp()
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    g = _group(model, model[0], tp.prune_linear_out_channels, 5, x[:1])
    X = torch.relu(model[0](x)).detach()                # (N, 5): what the consumer reads
    W = model[2].weight.detach()                        # (3, 5)
    want = {"activation": X.abs().mean(0),
            "wanda": X.norm(dim=0) * W.abs().sum(0),
            "flap": _flap_hand(X.T, (W ** 2).sum(0))}
    for kind, cls in peers.PEERS.items():
        raw = cls(normalizer=None).calibrate(model, x)(g)
        torch.testing.assert_close(raw, want[kind].float(), rtol=1e-5, atol=1e-6)
        default = cls().calibrate(model, x)(g)
        if kind == "flap":                             # standardised: no normaliser
            torch.testing.assert_close(default, raw)
            assert abs(float(raw.mean())) < 1e-5 and abs(float(raw.std()) - 1) < 1e-5
        else:                                          # mean normaliser, same ranking
            torch.testing.assert_close(default, raw / raw.mean())
            assert torch.equal(torch.argsort(default), torch.argsort(want[kind]))


def test_group_without_consumer_scored_at_its_output():
    """The root of this group is the output layer: nobody reads it, so the producer's output
    statistics are used (every group gets a score)."""
    model = _mlp()
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    g = _group(model, model[2], tp.prune_linear_out_channels, 3, x[:1])
    Y = model(x).detach()
    torch.testing.assert_close(peers.ActivationImportance(normalizer=None).calibrate(model, x)(g),
                               Y.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(peers.WandaImportance(normalizer=None).calibrate(model, x)(g),
                               Y.norm(dim=0), rtol=1e-5, atol=1e-6)
    s = peers.FLAPImportance().calibrate(model, x)(g)
    assert s.shape == (3,) and torch.isfinite(s).all()


def test_calibrate_removes_hooks_and_restores_mode():
    model = _mlp().train()
    model[0].eval()                     # a submodule in its own mode keeps it

    class Boom(Exception):
        pass

    def bad(mod, args):
        raise Boom
    h = model[2].register_forward_pre_hook(bad)
    with pytest.raises(Boom):
        peers.WandaImportance().calibrate(model, torch.randn(3, 4))
    h.remove()
    assert model.training and not model[0].training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    peers.WandaImportance().calibrate(model, torch.randn(3, 4))
    assert model.training and not model[0].training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------
# tiny conv net: a conv consumer (kernel slices) and a flattened Linear consumer
# ------------------------------------------------------------------------------------------
def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()


def test_peers_conv_match_hand_computation():
    model = _convnet()
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    X1 = torch.relu(model[0](x)).detach()                          # (N, 4, 4, 4)
    X2 = torch.relu(model[2](X1)).detach()                         # (N, 3, 4, 4)
    W2, W3 = model[2].weight.detach(), model[5].weight.detach()    # (3, 4, 3, 3), (2, 48)
    C1 = X1.transpose(0, 1).reshape(4, -1)                         # channel x (samples*pos)
    C2 = X2.transpose(0, 1).reshape(3, -1)
    W3c = W3.reshape(2, 3, 16)                                     # feature c*16+p -> (c, p)
    want = {
        0: {"activation": C1.abs().mean(1),
            "wanda": C1.norm(dim=1) * W2.abs().sum((0, 2, 3)),
            "flap": _flap_hand(C1, (W2 ** 2).sum((0, 2, 3)))},
        2: {"activation": C2.abs().mean(1),                        # pooled over the features
            "wanda": C2.norm(dim=1) * W3c.abs().sum((0, 2)),
            "flap": _flap_hand(C2, (W3c ** 2).sum((0, 2)))},
    }
    for layer, n in ((0, 4), (2, 3)):
        g = _group(model, model[layer], tp.prune_conv_out_channels, n, x[:1])
        for kind, cls in peers.PEERS.items():
            got = cls(normalizer=None).calibrate(model, x)(g)
            torch.testing.assert_close(got, want[layer][kind].float(), rtol=1e-5, atol=1e-6,
                                       msg=f"layer {layer} {kind}")
            if kind == "flap":
                assert abs(float(got.mean())) < 1e-5 and abs(float(got.std()) - 1) < 1e-5


def test_peers_score_every_group_of_a_bn_resnet_block():
    """BatchNorm / residual groups: every group gets one finite score per channel."""
    from engine.models import build_model
    model = build_model("resnet20", in_channels=1, num_classes=3, image_size=8).eval()
    x = torch.randn(4, 1, 8, 8)
    for kind, cls in peers.PEERS.items():
        imp = cls()
        scores, _ = criteria.score_all_groups(model, x[:1], imp,
                                              prepare=lambda: imp.calibrate(model, x), name=kind)
        assert scores and all(s is not None for s in scores.values()), kind


# ------------------------------------------------------------------------------------------
# bias compensation
# ------------------------------------------------------------------------------------------
class FixedImportance(tp.importance.Importance):
    """Scores one group (the first conv / linear) as given; other groups are not pruned."""

    def __init__(self, root, scores):
        self.root, self.scores = root, torch.as_tensor(scores, dtype=torch.float32)

    def __call__(self, group):
        if group[0].dep.target.module is self.root:
            return self.scores.clone()
        return None


def _prune(model, example, imp, ratio, means=None):
    pruner = criteria.make_pruner(model, example, imp, ratio)
    if means is None:
        pruner.step()
        return None
    return peers.prune_with_bias_compensation(model, pruner, means)


def test_bias_compensation_mlp_constant_channels_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].weight[:2] = 0
        model[0].bias[0], model[0].bias[1] = 0.7, -1.3     # constant 0.7 and dead (0) channels
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    ref = model(x).detach()
    means = peers.input_means(model, x)
    scores = [0.0, 0.1, 5, 6, 7, 8]                          # the two constant channels go
    plain, comp = copy.deepcopy(model), copy.deepcopy(model)
    _prune(plain, x[:1], FixedImportance(plain[0], scores), 2 / 6)
    done = _prune(comp, x[:1], FixedImportance(comp[0], scores), 2 / 6, means)
    assert plain[0].out_features == comp[0].out_features == 4
    assert done == {"2": 2}
    assert not torch.allclose(plain(x), ref, atol=1e-3)     # without compensation: changed
    torch.testing.assert_close(comp(x), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp[0].weight, plain[0].weight)


def test_bias_compensation_conv_constant_channel_exact_and_bias_created():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3, bias=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 0.4                               # channel 1 constant 0.4
    x = torch.randn(8, 2, 7, 7, generator=torch.Generator().manual_seed(4))
    ref = model(x).detach()
    means = peers.input_means(model, x)
    scores = [5, 0.0, 6, 7]
    plain, comp = copy.deepcopy(model), copy.deepcopy(model)
    _prune(plain, x[:1], FixedImportance(plain[0], scores), 0.25)
    _prune(comp, x[:1], FixedImportance(comp[0], scores), 0.25, means)
    assert comp[0].out_channels == 3 and comp[2].in_channels == 3
    assert plain[2].bias is None and comp[2].bias is not None
    assert not torch.allclose(plain(x), ref, atol=1e-3)
    torch.testing.assert_close(comp(x), ref, rtol=1e-5, atol=1e-5)


def test_bias_compensation_is_mean_contribution():
    """A non-constant channel: the added bias is mean(X_J) @ W[:, J]^T of the unpruned model."""
    model = _mlp()
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(5))
    X = torch.relu(model[0](x)).detach()
    W, b = model[2].weight.detach().clone(), model[2].bias.detach().clone()
    comp = copy.deepcopy(model)
    _prune(comp, x[:1], FixedImportance(comp[0], [3, 0.0, 4, 0.1, 5]), 0.4,
           peers.input_means(model, x))
    J = [1, 3]
    torch.testing.assert_close(comp[2].bias.detach(), b + W[:, J] @ X[:, J].mean(0))


# ------------------------------------------------------------------------------------------
# paired statistics
# ------------------------------------------------------------------------------------------
def test_paired_comparison_against_scipy():
    a = [0.90, 0.80, 0.85, 0.70, 0.95]
    b = [0.85, 0.80, 0.80, 0.75, 0.90]
    st = stats.paired_comparison(a, b)
    assert (st["wins"], st["ties"], st["losses"], st["n"]) == (3, 1, 1, 5)
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    assert math.isclose(st["mean"], float(d.mean()), abs_tol=1e-12)
    assert math.isclose(st["std"], float(d.std()), abs_tol=1e-12)
    assert math.isclose(st["p_t"], ttest_rel(a, b).pvalue, rel_tol=1e-9)
    assert math.isclose(st["p_wilcoxon"], wilcoxon(a, b).pvalue, rel_tol=1e-9)
    # 5 seeds, all won: Wilcoxon's floor is 2 / 2**5 while the t-test can go lower
    a2 = [0.9, 0.91, 0.92, 0.93, 0.94]
    b2 = [0.8, 0.815, 0.81, 0.82, 0.835]
    st2 = stats.paired_comparison(a2, b2)
    assert st2["wins"] == 5 and math.isclose(st2["p_wilcoxon"], 0.0625)
    assert st2["p_t"] < 0.001 and math.isclose(st2["p_t"], ttest_rel(a2, b2).pvalue)
    # NaN / None pairs are dropped; degenerate cases give NaN p-values
    st3 = stats.paired_comparison([0.5, float("nan"), None, 0.6], [0.4, 0.3, 0.2, 0.6])
    assert st3["n"] == 2 and (st3["wins"], st3["ties"]) == (1, 1)
    assert math.isnan(stats.paired_comparison([0.5], [0.4])["p_t"])
    same = stats.paired_comparison([0.5, 0.6], [0.5, 0.6])
    assert math.isnan(same["p_t"]) and math.isnan(same["p_wilcoxon"]) and same["ties"] == 2


def test_best_other_table_picks_best_mean_per_cell():
    from engine.report import best_other_table
    rows = []
    acc = {"curvature": [0.80, 0.82, 0.81], "l2": [0.70, 0.71, 0.72],
           "wanda": [0.79, 0.80, 0.83]}
    for c, v in acc.items():
        for s, a in enumerate(v):
            rows.append({"criterion": c, "mode": "uniform", "ratio": 0.5, "seed": s,
                         "acc_pruned": a, "acc_bias": float("nan")})
    lines = best_other_table(rows, ["curvature"], ["l2", "wanda"], ["uniform"],
                             ["pruned"], [0.5], [0, 1, 2])
    row = [ln for ln in lines if ln.startswith("| curvature | uniform")]
    assert len(row) == 1
    cells = [t.strip() for t in row[0].strip("|").split("|")]
    assert cells[4] == "wanda" and cells[6] == "2/0/1"
    p = ttest_rel(acc["curvature"], acc["wanda"]).pvalue
    assert cells[7] == stats.format_p(p)


def test_one_per_class_picks_first_image_of_each_class():
    x = torch.arange(8.0)[:, None]
    y = torch.tensor([3, 3, 1, 0, 1, 2, 0, 3])
    assert criteria.one_per_class(x, y, 4).flatten().tolist() == [0.0, 2.0, 3.0, 5.0]
    assert criteria.one_per_class(x, y, 6).flatten().tolist() == [0.0, 2.0, 3.0, 5.0, 1.0, 4.0]


def test_curvature_element_criterion_scores_a_small_cnn():
    """``curvature-element`` (engine.criteria): calibrated on one image per class, it scores every
    group of a Conv/BN/pool/Linear net, and the channel scores are ``kmax - mean`` per-weight
    kappa of the channel's weights (checked on the first conv's output channels)."""
    import argparse
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6, 3)).eval()
    x, y = torch.randn(12, 1, 8, 8), torch.arange(12) % 3
    args = argparse.Namespace(alpha=0.5, backend="exact", backend_options=None)
    crit = criteria.make_criterion("curvature-element", 0, args)
    crit.prepare(model, x, y)
    assert crit.importance.images.shape[0] == 10
    scores, _ = criteria.score_all_groups(model, x[:1], crit.importance)
    got = [s for s in scores.values() if s is not None]
    assert len(got) == 2 and all(torch.isfinite(s).all() for s in got)
    k = crit.importance.weight_curvatures()[id(model[0])]
    kmax = 1 / (1 - 0.5)
    want = kmax - k.flatten(1).mean(1)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    g = DG.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(4)))
    imp = criteria.make_criterion("curvature-element", 0, args).importance
    imp.normalizer = None
    imp.calibrate(model, criteria.one_per_class(x, y))
    got0 = imp(g)
    # group = conv0 out (kmax - mean kappa of W[o]) and conv1 in (kmax - mean of W[:, c]),
    # averaged (BN adds nothing)
    k1 = imp.weight_curvatures()[id(model[4])]
    want = (want + (kmax - k1.transpose(0, 1).flatten(1).mean(1))) / 2
    torch.testing.assert_close(got0, want.float(), rtol=1e-5, atol=1e-6)


def test_library_bias_only_repair_equals_the_flap_stage():
    """``tp_curvature.LeastSquaresRepair(bias_only=True)`` is the benchmarks' FLAP bias
    compensation (``engine.peers``) on fully connected layers, where both are exact."""
    from tp_curvature import LeastSquaresRepair
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(),
                         nn.Linear(10, 3)).eval()
    x = torch.randn(128, 12)
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    flap = copy.deepcopy(base)
    pruner = tp.pruner.BasePruner(flap, x[:1], importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[flap[4]])
    peers.prune_with_bias_compensation(flap, pruner, peers.input_means(base, x))
    lib = copy.deepcopy(base)
    repair = LeastSquaresRepair(bias_only=True).calibrate(lib, x)
    pruner = tp.pruner.BasePruner(lib, x[:1], importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[lib[4]])
    pruner.step()
    repair.apply(lib, pruner)
    for a, b in zip(flap.parameters(), lib.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
