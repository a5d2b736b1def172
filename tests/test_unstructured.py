"""Unstructured (per-weight) curvature against an independent element-level computation.

The reference (``tests/_reference.py``) shares no code with the library: it unrolls
convolutions with explicit Python loops over output positions and kernel taps, builds the
element graph as a scipy sparse matrix, takes forward shortest paths with Dijkstra, builds each
edge's measures from the definition and solves W1 with POT ``ot.emd2``.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
from _reference import ALPHA
from _reference import element_curvature as reference

from tp_curvature.graph import UnsupportedModelError
from tp_curvature.unstructured import (
    UnknownWeightError, apply_masks, edge_curvature, element_graph, magnitude_scores,
    masks_from_scores, node_values, prune_by_curvature, prune_by_magnitude, prune_by_scores,
    prune_random, remove_pruning, weight_curvature, weight_sparsity,
)


def tiny_model(seed=0, bn=False):
    """6x6 input -> conv 2@3x3 s2 p1 (2x3x3) -> conv 3@2x2 (3x2x2) -> fc 5 -> fc 3."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(),
              nn.Conv2d(2, 3, 2)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers)
    if bn:
        with torch.no_grad():
            model[3].running_var.uniform_(0.5, 2.0)
            model[3].running_mean.uniform_(-0.2, 0.2)
            model[3].weight.uniform_(0.5, 1.5)
    return model.eval()


def _ref_scores(model, images, **kw):
    per_layer = None
    for x in images:
        ref = reference(model, x, **kw)
        if per_layer is None:
            per_layer = [np.full(int(WI.max()) + 1, np.inf) for _, WI in ref]
        for acc, (K, WI) in zip(per_layer, ref):
            ok = WI >= 0
            np.minimum.at(acc, WI[ok], K[ok])
    return per_layer


@pytest.mark.parametrize("variant,bn,output,seed", [
    ("paper", False, "softmax", 0), ("flow", False, "logits", 1), ("paper", True, "logits", 2)])
def test_edge_kappa_matches_independent_reference(variant, bn, output, seed):
    model = tiny_model(seed, bn=bn)
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(seed))[None]
    ref = reference(model, x, flow=(variant == "flow"), output=output)
    got = edge_curvature(model, x[None], output=output, variant=variant, alpha=ALPHA, topk=None,
                         backend="exact")
    assert len(got) == len(ref) == 4
    for (K, WI), ek in zip(ref, got):
        assert ek.kappa.shape == K.shape
        np.testing.assert_array_equal(ek.weight_index, WI)
        np.testing.assert_array_equal(np.isnan(ek.kappa), np.isnan(K))
        np.testing.assert_allclose(ek.kappa, K, atol=1e-6, equal_nan=True)
        assert ek.solved.sum() > 0


def test_weight_scores_shapes_and_min_over_images():
    model = tiny_model(3)
    imgs = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    scores, info = weight_curvature(model, imgs, topk=None, backend="exact", alpha=ALPHA,
                                    progress=False, return_info=True)
    params = dict(model.named_parameters())
    assert list(scores) == ["0.weight", "2.weight", "5.weight", "7.weight"]
    for k, s in scores.items():
        assert s.shape == params[k].shape
        assert torch.isfinite(s).all()
    ref = _ref_scores(model, imgs)
    for s, r in zip(scores.values(), ref):
        np.testing.assert_allclose(s.reshape(-1).numpy(), r, atol=1e-6)
    # min over images = elementwise min of the single-image scores
    singles = [weight_curvature(model, imgs[i:i + 1], topk=None, backend="exact", alpha=ALPHA,
                                progress=False) for i in range(3)]
    for k in scores:
        np.testing.assert_allclose(
            scores[k], torch.stack([s[k] for s in singles]).amin(0),
            atol=1e-6)  # fp32 forward of a batch vs single images
    assert info["n_images"] == 3 and len(info["per_image_s"]) == 3
    mean = weight_curvature(model, imgs, topk=None, backend="exact", alpha=ALPHA,
                            progress=False, reduction="mean")
    assert all((mean[k] >= scores[k] - 1e-12).all() for k in scores)


def test_default_sinkhorn_backend_close_to_exact():
    """The default (Numba Sinkhorn) scores: small error, same ranking; without the trimming
    of tiny masses (``mass_tol=0``) a one-sided bias (feasible plans, and exact values where
    the bypass plan is optimal). Trimmed, the bypassed values are exact for the trimmed
    measures and may sit above the exact kappa by the certificate's trimming term."""
    from scipy.stats import spearmanr
    model = tiny_model(6)
    imgs = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(6))
    ex = weight_curvature(model, imgs, topk=None, backend="exact", progress=False)
    b = torch.cat([v.reshape(-1) for v in ex.values()]).numpy()
    for opts in (dict(), dict(mass_tol=0.0)):
        sk = weight_curvature(model, imgs, topk=None, progress=False, backend_options=opts)
        a = torch.cat([v.reshape(-1) for v in sk.values()]).numpy()
        assert np.abs(a - b).max() < 0.05
        assert spearmanr(a, b).statistic > 0.99
    assert np.all(a <= b + 1e-6)


def test_padding_only_taps_and_zero_weights_score_one():
    """A kernel tap that never meets a real input (only padding) and a zero weight score 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 5, padding=2, stride=4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2, 3)).eval()
    with torch.no_grad():
        model[3].weight[0, 0] = 0.0
    g = element_graph(model, torch.zeros(1, 1, 2, 2))
    # 2x2 input, pad 2, 5x5 kernel -> one output; taps with row or column 0, 1 or 4 read padding
    used = np.unique(g.layers[0].weight_index[g.layers[0].weight_index >= 0])
    assert used.tolist() == [12, 13, 17, 18, 37, 38, 42, 43]  # rows/cols 2, 3 of each kernel
    s = weight_curvature(model, torch.randn(3, 1, 2, 2), topk=None, backend="exact",
                         progress=False)
    assert s["0.weight"][0, 0, 0, 0] == 1.0 and s["0.weight"][1, 0, 0, 0] == 1.0
    assert s["3.weight"][0, 0] == 1.0


def test_pruning_masks_exact_and_model_runs():
    model = tiny_model(4)
    imgs = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    scores = weight_curvature(model, imgs, backend="exact", progress=False)
    n_total = sum(s.numel() for s in scores.values())
    before = model(imgs)
    masks = prune_by_curvature(model, scores, 0.3, order="highest")
    n_rm = sum(int((~m).sum()) for m in masks.values())
    assert n_rm == round(0.3 * n_total)
    # the removed weights are the highest-scoring ones
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    removed = torch.cat([(~m).reshape(-1) for m in masks.values()])
    assert flat[removed].min() >= flat[~removed].max()
    for k, m in masks.items():
        mod = model.get_submodule(k.rsplit(".", 1)[0])
        assert hasattr(mod, "weight_mask")
        assert torch.equal(mod.weight_mask.bool(), m)
        assert (mod.weight[~m] == 0).all()
    out = model(imgs)
    assert out.shape == before.shape and torch.isfinite(out).all()
    assert abs(weight_sparsity(model) - n_rm / n_total) < 1e-12
    remove_pruning(model)
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    assert abs(weight_sparsity(model) - n_rm / n_total) < 1e-12


def test_layer_scope_lowest_order_and_baselines():
    model = tiny_model(5)
    scores = magnitude_scores(model)
    masks = masks_from_scores(scores, 0.5, order="lowest", scope="layer")
    for k, m in masks.items():
        assert int((~m).sum()) == round(0.5 * m.numel())
        assert scores[k][~m].max() <= scores[k][m].min()
    m1 = prune_by_magnitude(tiny_model(5), 0.4)
    assert sum(int((~m).sum()) for m in m1.values()) == round(0.4 * sum(
        m.numel() for m in m1.values()))
    r1 = prune_random(tiny_model(5), 0.4, seed=1)
    r2 = prune_random(tiny_model(5), 0.4, seed=1)
    assert all(torch.equal(r1[k], r2[k]) for k in r1)
    with pytest.raises(ValueError):
        masks_from_scores(scores, 1.5)
    # ties broken by |w| when asked: all scores equal -> exactly magnitude pruning
    ones = {k: torch.ones_like(v) for k, v in scores.items()}
    mt = prune_by_curvature(tiny_model(5), ones, 0.4, tie_break="magnitude")
    mm = masks_from_scores(scores, 0.4, order="lowest")
    assert all(torch.equal(mt[k], mm[k]) for k in mm)


def test_paper_lenet_graph_sizes():
    from engine.models import paper_lenet
    g = element_graph(paper_lenet(), torch.zeros(1, 1, 28, 28))
    assert g.layer_sizes == [784, 864, 256, 120, 84, 10]
    # conv1: 6 x 12 x 12 outputs, 36 taps each, no padding
    assert [l.n_edges for l in g.layers] == [6 * 144 * 36, 16 * 16 * 6 * 36, 256 * 120,
                                             120 * 84, 84 * 10]


@pytest.mark.parametrize("model,needle", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                   nn.Linear(2, 3)), "MaxPool2d"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 3)), "groups"),
    (nn.Sequential(nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 3)), "LayerNorm"),
])
def test_unsupported_models_raise_naming_the_module(model, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        element_graph(model, torch.zeros(1, 2 if needle == "groups" else 1, 4, 4))
    assert issubclass(UnsupportedModelError, ValueError)


def test_residual_raises():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x) + x)

    with pytest.raises(UnsupportedModelError, match="previous chain tensor"):
        element_graph(Res(), torch.zeros(1, 4))


def test_submodule_modes_restored(mixed_modes):
    """The per-weight path gives every submodule its own train/eval flag back, also when a
    forward pass raises midway."""
    model = tiny_model(2, bn=True)
    check = mixed_modes(model, "3")                 # train mode, the BatchNorm in eval mode
    imgs = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    weight_curvature(model, imgs, topk=None, backend="exact", progress=False)
    check()
    with pytest.raises(RuntimeError):               # wrong channel count: the shape pass fails
        weight_curvature(model, torch.randn(2, 2, 6, 6), progress=False)
    check()
    g = element_graph(model, imgs)
    check()
    with pytest.raises(ValueError, match="do not fit the element graph"):   # images vs graph
        edge_curvature(model, torch.randn(1, 2, 6, 6), graph=g)
    check()


# ---------------------------------------------------------------- input checks (issue 10, defect 7)
FAST = dict(topk=4, progress=False)


def _imgs(n=2, seed=7):
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def _no_masks(model):
    return not any(hasattr(m, "weight_mask") for m in model.modules())


def test_non_finite_image_is_named_by_index():
    x = _imgs(4)
    x[2, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite.*image\(s\) 2"):
        weight_curvature(tiny_model(), x, **FAST)


@pytest.mark.parametrize("call", ["edge_curvature", "node_values", "element_graph"])
def test_empty_images_refused_by_every_entry_point(call):
    model, x = tiny_model(), _imgs(1)[:0]
    with pytest.raises(ValueError, match="empty"):
        if call == "edge_curvature":
            edge_curvature(model, x)
        elif call == "node_values":
            node_values(element_graph(model, _imgs(1)), x)
        else:
            element_graph(model, x)


@pytest.mark.parametrize("target", [
    torch.tensor([0, 2]), torch.tensor([0.5, 1.5]), torch.tensor([[1, 0], [0, 1]]).bool(),
    torch.tensor([1, 2], dtype=torch.uint8)])
def test_images_target_pair_of_any_dtype(target):
    model, x = tiny_model(1), _imgs(2)
    ref = weight_curvature(model, x, **FAST)
    got = weight_curvature(model, (x, target), **FAST)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("images,exc,needle", [
    (np.zeros((2, 1, 6, 6), np.float32), TypeError, "ndarray"),
    ([torch.zeros(1, 1, 6, 6)] * 3, TypeError, "pair"),
    ((torch.zeros(2, 1, 6, 6), torch.zeros(3)), ValueError, "3 targets"),
    (torch.zeros(2, 1, 6, 6, dtype=torch.long), TypeError, "floating"),
    (torch.zeros(6), ValueError, "batch"),
])
def test_bad_image_types_refused(images, exc, needle):
    with pytest.raises(exc, match=needle):
        weight_curvature(tiny_model(), images, **FAST)


@pytest.mark.parametrize("layer,attr,needle", [
    ("6", "bias", r"layer '6' \(Linear\).*bias"),
    ("3", "running_var", r"BatchNorm '3' after layer '2'.*running_var"),
    ("3", "weight", r"BatchNorm '3'.*weight"),
])
def test_non_finite_parameters_name_the_layer(layer, attr, needle):
    model = tiny_model(2, bn=True)
    with torch.no_grad():
        getattr(model.get_submodule(layer), attr)[0] = float("nan")
    with pytest.raises(ValueError, match=needle):
        weight_curvature(model, _imgs(), **FAST)
    with pytest.raises(ValueError, match=needle):
        edge_curvature(model, _imgs(1))


def test_negative_bn_variance_names_the_batchnorm():
    model = tiny_model(2, bn=True)
    with torch.no_grad():
        model[3].running_var[1] = -1.0
    with pytest.raises(ValueError, match=r"BatchNorm '3'.*running_var \+ eps <= 0"):
        weight_curvature(model, _imgs(), **FAST)


def test_non_finite_activations_name_the_layer_and_leave_state(mixed_modes):
    model = tiny_model(3)
    with torch.no_grad():
        model[0].weight.fill_(3e38)                     # finite weights, overflowing forward
    check = mixed_modes(model, "1")
    model[2].register_forward_hook(lambda *a: None)
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"non-finite.*input of layer '2'"):
        weight_curvature(model, _imgs(), **FAST)
    check()
    assert hooks == {n: (len(m._forward_hooks), len(m._forward_pre_hooks))
                     for n, m in model.named_modules()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("kw,exc,needle", [
    (dict(output="probs"), ValueError, "output"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(normalize="zscore"), ValueError, "normalize"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=1.0), ValueError, "alpha"),
    (dict(topk=2.5), ValueError, "topk"),
    (dict(topk=0), ValueError, "topk"),
    (dict(backend="magic"), ValueError, "backend"),
    (dict(variant="other"), ValueError, "variant"),
    (dict(tokp=4), TypeError, "tokp"),
])
def test_options_checked_up_front_naming_the_option(kw, exc, needle):
    unsupported = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2))   # would fail in tracing
    with pytest.raises(exc, match=needle):
        weight_curvature(unsupported, _imgs(), progress=False, **kw)
    if "reduction" not in kw:
        with pytest.raises(exc, match=needle):
            edge_curvature(unsupported, _imgs(1), **kw)


@pytest.mark.parametrize("kw,needle", [
    (dict(sparsity=1.5), "sparsity"), (dict(sparsity=float("nan")), "sparsity"),
    (dict(order="middle"), "order"), (dict(scope="model"), "scope"),
    (dict(tie_break="size"), "tie_break"), (dict(seed=0.5), "seed"),
])
def test_prune_options_checked_before_masking(kw, needle):
    model = tiny_model(4)
    scores = magnitude_scores(model)
    kw = {"sparsity": 0.5, **kw}
    with pytest.raises((ValueError, TypeError), match=needle):
        prune_by_curvature(model, scores, **kw)
    assert _no_masks(model)


def _bad_key(s):
    s["9.weight"] = torch.zeros(3)


def _bad_shape(s):
    s["5.weight"] = s["5.weight"][:, :-1]


def _not_tensor(s):
    s["7.weight"] = s["7.weight"].numpy()


def _inf(s):
    s["7.weight"][1, 1] = float("-inf")


@pytest.mark.parametrize("spoil,exc,needle", [
    (_bad_key, KeyError, "'9.weight'"), (_bad_shape, ValueError, r"'5.weight'.*shape"),
    (_not_tensor, TypeError, "'7.weight'"), (_inf, ValueError, r"'7.weight'.*non-finite"),
])
@pytest.mark.parametrize("call", ["prune_by_curvature", "prune_by_scores", "magnitude_tie"])
def test_bad_scores_refused_before_any_mask(spoil, exc, needle, call):
    model = tiny_model(4)
    scores = magnitude_scores(model)
    spoil(scores)
    with pytest.raises(exc, match=needle):
        if call == "prune_by_scores":
            prune_by_scores(model, scores, 0.5, scope="layer")
        else:
            prune_by_curvature(model, scores, 0.5,
                               tie_break="magnitude" if call == "magnitude_tie" else "random")
    assert _no_masks(model)
    assert issubclass(UnknownWeightError, ValueError)


def test_masks_from_scores_and_apply_masks_check_everything_first():
    model = tiny_model(4)
    scores = magnitude_scores(model)
    with pytest.raises(ValueError, match="empty"):
        masks_from_scores({}, 0.5)
    bad = dict(scores)
    bad["5.weight"] = bad["5.weight"].clone()
    bad["5.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'5.weight'.*non-finite"):
        masks_from_scores(bad, 0.5)
    sec = dict(scores)
    del sec["7.weight"]
    with pytest.raises(ValueError, match=r"secondary.*'7.weight'"):
        masks_from_scores(scores, 0.5, secondary=sec)
    masks = masks_from_scores(scores, 0.5)
    masks["7.weight"] = masks["7.weight"].float() * 2           # the last mask is not 0/1
    with pytest.raises(ValueError, match=r"masks\['7.weight'\].*0/1"):
        apply_masks(model, masks)
    assert _no_masks(model)
    masks["7.weight"] = masks["7.weight"][:1]
    with pytest.raises(ValueError, match=r"masks\['7.weight'\].*shape"):
        apply_masks(model, masks)
    assert _no_masks(model)


def test_per_weight_mode_keeps_the_paper_definition_and_refuses_spread():
    """The per-weight mode defaults to the paper's definition whatever CurvatureConfig's default
    is (an explicit variant="paper" gives the same kappa), and node_value="std" -- one image's
    element has no spread -- is refused by name in both the dense and the sparse mode."""
    from tp_curvature.unstructured import sparse_weight_curvature
    model, x = tiny_model(), _imgs(2)
    default = weight_curvature(model, x, backend="exact")
    paper = weight_curvature(model, x, backend="exact", variant="paper")
    flow = weight_curvature(model, x, backend="exact", variant="flow")
    for k in default:
        torch.testing.assert_close(default[k], paper[k])
    assert any(not torch.allclose(default[k], flow[k]) for k in default)
    for fn in (weight_curvature, sparse_weight_curvature):
        with pytest.raises(ValueError, match="node_value"):
            fn(model, x, node_value="std")


def test_renamed_keywords_are_deprecated_aliases():
    """One name per idea: ``reduction`` everywhere; the old keywords still work, with a
    DeprecationWarning, and give the same result."""
    from tp_curvature import ElementCurvatureImportance
    from tp_curvature.unstructured import sparse_weight_curvature
    model, x = tiny_model(), _imgs(2)
    for fn in (weight_curvature, sparse_weight_curvature):
        want = fn(model, x, reduction="mean", **FAST)
        with pytest.warns(DeprecationWarning, match="reduce="):
            got = fn(model, x, reduce="mean", **FAST)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    with pytest.warns(DeprecationWarning) as rec:
        imp = ElementCurvatureImportance(channel_reduction="min", weight_reduce="mean")
    assert sorted(str(w.message).split("=")[0] for w in rec) == [
        "the keyword channel_reduction", "the keyword weight_reduce"]
    assert (imp.reduction, imp.weight_reduction) == ("min", "mean")
