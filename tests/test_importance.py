"""CurvatureImportance inside Torch-Pruning pruners, end to end on real architectures."""
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision

from engine import models as zoo
from tp_curvature import (CalibrationError, CurvatureConfig, CurvatureImportance,
                          UnsupportedModelError)

FAST = dict(topk=8)


def _final_linear(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


MODELS = {
    "mlp": (lambda: zoo.mlp(64, hidden=(32, 16), num_classes=10), (1, 8, 8)),
    "lenet5": (lambda: zoo.lenet5(1, 10, 28), (1, 28, 28)),
    "vgg_bn": (lambda: zoo.vgg9(3, 10, 32, width=0.25), (3, 32, 32)),
    "resnet20": (lambda: zoo.resnet20(10, 3), (3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 32, 32)),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (3, 32, 32)),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=10), (3, 32, 32)),
}


def _calib(shape, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g)


def _randomise_bn(model, seed=0):
    """Fresh BN layers have unit statistics; give them a trained-like spread."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


# end-to-end runs over the model zoo that take seconds each: `pytest -m "not slow"` skips them
SLOW_MODELS = {"resnet20", "mobilenet_v2", "densenet121", "timm_resnet18"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS
                                  else n for n in MODELS])
def test_prune_half_lowest_scored_removed(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        _randomise_bn(model)
    x = _calib(shape)
    out_shape = model(x).shape
    imp = CurvatureImportance(**FAST).calibrate(model, x)
    pruner = tp.pruner.BasePruner(model, x[:2], importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[_final_linear(model)])
    seen = {}
    original = pruner.estimate_importance

    def record(group):
        s = original(group)
        if s is not None:
            dep = group[0].dep
            ch = pruner._get_channel_groups(group)
            seen[(id(dep.target.module), dep.handler)] = s.view(ch, -1).mean(0) if ch > 1 else s
        return s

    pruner.estimate_importance = record
    n_before = tp.utils.count_ops_and_params(model, x[:1])[1]
    checked = 0
    for group in pruner.step(interactive=True):
        dep = group[0].dep
        scores = seen[(id(dep.target.module), dep.handler)]
        pruned = torch.as_tensor(group[0].idxs)
        pruned = pruned[pruned < scores.numel()]
        kept = torch.ones(scores.numel(), dtype=torch.bool)
        kept[pruned] = False
        if kept.any() and pruned.numel():
            assert scores[pruned].max() <= scores[kept].min() + 1e-5, name
            checked += 1
        group.prune()
    assert checked > 0
    y = model(x)
    assert y.shape == out_shape
    assert torch.isfinite(y).all()
    assert tp.utils.count_ops_and_params(model, x[:1])[1] < n_before


def _lenet_conv2():
    """A calibrated LeNet-5, its calibration images, dependency graph and second conv."""
    torch.manual_seed(0)
    model = zoo.lenet5(1, 10, 28).eval()
    x = _calib((1, 28, 28))
    imp = CurvatureImportance(**FAST).calibrate(model, x)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    return model, x, imp, DG, [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]


def test_scores_shape_and_root_scatter():
    model, x, imp, DG, conv2 = _lenet_conv2()
    # Torch-Pruning scores full groups (root_idxs are channel indices of the root layer)
    group = DG.get_pruning_group(conv2, tp.prune_conv_out_channels, idxs=list(range(16)))
    s = imp(group)
    assert s.shape == (16,)
    assert torch.all(s > 0)
    torch.testing.assert_close(s.mean(), torch.tensor(1.0))     # normalizer="mean"
    # the flattened fc input features of a channel count once (Linear after flatten):
    # with group_reduction="first" / normalizer=None the channel score is the conv's alone
    imp_first = CurvatureImportance(group_reduction="first", normalizer=None, **FAST)
    imp_first.calibrate(model, x)
    full = DG.get_pruning_group(conv2, tp.prune_conv_out_channels, idxs=list(range(16)))
    _, out_scores = imp_first.channel_scores()[
        [n for n, m in model.named_modules() if m is conv2][0]]
    torch.testing.assert_close(imp_first(full), torch.as_tensor(out_scores, dtype=torch.float32))


def test_scoring_keeps_channel_reductions_not_the_connections():
    """Scoring streams each layer's kappa into per-channel reductions (ChannelCurvature) and
    holds no connection matrix; curvatures() computes them on request, and their reductions
    are what scoring used; changing imp.reduction recomputes."""
    from tp_curvature.importance import ChannelCurvature, reduce_kappa

    model, x, imp, DG, conv2 = _lenet_conv2()
    s = imp(DG.get_pruning_group(conv2, tp.prune_conv_out_channels, idxs=list(range(16))))
    held = imp.channel_curvatures()
    assert held and all(isinstance(cc, ChannelCurvature) for cc in held.values())
    assert imp._own.full is None                      # no kappa matrix held
    full = imp.curvatures()
    for name, lc in full.items():
        cc = held[name]
        np.testing.assert_array_equal(cc.rows, reduce_kappa(lc.kappa, 1, "mean", 0.5))
        np.testing.assert_array_equal(cc.cols, reduce_kappa(lc.kappa, 0, "mean", 0.5))
        assert cc.n_solved == lc.solved.sum() and cc.n_connections == lc.exists.sum()
    group = DG.get_pruning_group(conv2, tp.prune_conv_out_channels, idxs=list(range(16)))
    torch.testing.assert_close(imp(group), s)
    imp.reduction = "min"
    name = [n for n, m in model.named_modules() if m is conv2][0]
    np.testing.assert_array_equal(imp.channel_scores()[name][1],
                                  reduce_kappa(full[name].kappa, 0, "min", 0.5))


@pytest.mark.parametrize("mode", ["global", "iterative", "isomorphic", "round_to"])
def test_pruner_modes(mode):
    torch.manual_seed(0)
    model = zoo.resnet20(10, 3).eval()
    with torch.no_grad():
        _randomise_bn(model)
    x = _calib((3, 32, 32), n=8)
    imp = CurvatureImportance(**FAST).calibrate(model, x)
    kw = dict(pruning_ratio=0.5, ignored_layers=[model.fc if hasattr(model, "fc")
                                                 else _final_linear(model)])
    if mode == "global":
        kw.update(global_pruning=True)
    elif mode == "iterative":
        kw.update(iterative_steps=2)
    elif mode == "isomorphic":
        kw.update(global_pruning=True, isomorphic=True)
    elif mode == "round_to":
        kw.update(round_to=4)
    pruner = tp.pruner.BasePruner(model, x[:2], importance=imp, **kw)
    steps = kw.get("iterative_steps", 1)
    fps = []
    for _ in range(steps):
        pruner.step()
        assert model(x).shape == (8, 10)
        # scores follow the pruned model: every kappa matrix matches the current layers
        for name, lc in imp.curvatures().items():
            m = lc.module
            n_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            assert lc.kappa.shape[1] == n_out
        fps.append(imp._fingerprint)
    if mode == "round_to":
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m is not model.conv1:
                assert m.out_channels % 4 == 0 or m.out_channels == 16
    if mode == "iterative":
        assert fps[0] != fps[1]


def test_dead_channel_is_pruned_first():
    torch.manual_seed(0)
    model = zoo.mlp(64, hidden=(32, 16), num_classes=10).eval()
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        lin[0].weight[5].zero_()
        lin[0].bias[5] = -1.0           # hidden neuron 5: always 0 after ReLU
    x = _calib((1, 8, 8), n=32)
    imp = CurvatureImportance(**FAST).calibrate(model, x)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    g = DG.get_pruning_group(lin[0], tp.prune_linear_out_channels, idxs=list(range(32)))
    s = imp(g)
    assert torch.isfinite(s).all()
    assert int(torch.argmin(s)) == 5


def test_errors():
    model = zoo.mlp(64, hidden=(16,), num_classes=10)
    imp = CurvatureImportance()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 1, 8, 8))
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)][0]
    g = DG.get_pruning_group(lin, tp.prune_linear_out_channels, idxs=[0, 1])
    with pytest.raises(RuntimeError, match="calibrate"):
        imp(g)
    with pytest.raises(CalibrationError):
        imp.calibrate(model, [])
    with pytest.raises(UnsupportedModelError, match="no Linear or Conv"):
        CurvatureImportance().calibrate(nn.Sequential(nn.Flatten(), nn.ReLU()),
                                        torch.randn(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        CurvatureImportance(reduction="median")


def test_calibration_leaves_model_untouched():
    torch.manual_seed(0)
    model = zoo.lenet5(1, 10, 28)
    model.train()
    calls = []
    h = model.register_forward_hook(lambda m, i, o: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    x = _calib((1, 28, 28), n=8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(8).long()),
                                         batch_size=4)
    imp = CurvatureImportance(**FAST).calibrate(model, loader)
    imp.curvatures()
    assert model.training
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    n_calls = len(calls)                  # calibration runs the exported program (issue 9)
    model(x[:1])
    assert len(calls) == n_calls + 1      # the user's hook is left in place and still fires
    h.remove()
    # hooks are removed even when calibration fails
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(CalibrationError, match="non-finite"):
        CurvatureImportance().calibrate(model, bad)
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks - 1


def test_forward_fn_for_dict_batches():
    torch.manual_seed(0)
    model = zoo.mlp(64, hidden=(16,), num_classes=10).eval()
    batches = [{"pixels": torch.randn(8, 1, 8, 8)} for _ in range(2)]
    imp = CurvatureImportance(**FAST).calibrate(model, batches,
                                                forward_fn=lambda m, b: m(b["pixels"]))
    assert all(np.isfinite(lc.kappa).all() for lc in imp.curvatures().values())


def test_reduce_kappa_closed_values():
    from tp_curvature.importance import reduce_kappa

    nan = float("nan")
    K = np.array([[0.5, nan, nan], [-1.0, 1.0, nan]])       # column 2: no connection at all
    # alpha 0.5: kappa_max = 2, scores are kappa_max - reduced kappa (neg_sum: total negativity)
    np.testing.assert_allclose(reduce_kappa(K, 0, "mean", 0.5), [2.25, 1.0, 1.0])
    np.testing.assert_allclose(reduce_kappa(K, 0, "min", 0.5), [3.0, 1.0, 1.0])
    np.testing.assert_allclose(reduce_kappa(K, 0, "neg_sum", 0.5), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(reduce_kappa(K, 1, "mean", 0.5), [1.5, 2.0])
    assert np.all(reduce_kappa(K, 0, "mean", 0.9) >= 0)


def test_config_object_gives_the_same_scores_as_keywords():
    torch.manual_seed(0)
    model = zoo.lenet5(1, 10, 28).eval()
    x = _calib((1, 28, 28), n=8)
    kw = CurvatureImportance(alpha=0.6, topk=8, normalize="max", reduction="min")
    cfg = CurvatureImportance(config=CurvatureConfig(alpha=0.6, topk=8, normalize="max"),
                              reduction="min")
    assert cfg.config == kw.config
    assert cfg.p == kw.p == 2.0 and cfg.reduction == kw.reduction == "min"
    kw.calibrate(model, x)
    cfg.calibrate(model, x)
    a, b = kw.channel_scores(), cfg.channel_scores()
    assert list(a) == list(b)
    for name in a:
        for u, v in zip(a[name], b[name]):
            np.testing.assert_array_equal(u, v)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    conv2 = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]
    group = DG.get_pruning_group(conv2, tp.prune_conv_out_channels, idxs=list(range(16)))
    assert torch.equal(kw(group), cfg(group))
    # the Torch-Pruning base gets the config's kernel-slice norm
    assert CurvatureImportance(config=CurvatureConfig(p=1.0)).p == 1.0


def test_config_and_config_fields_conflict():
    with pytest.raises(TypeError, match="not both.*topk"):
        CurvatureImportance(config=CurvatureConfig(), topk=8)
    with pytest.raises(TypeError, match="CurvatureConfig"):
        CurvatureImportance({"topk": 8})
    with pytest.raises(TypeError):
        CurvatureImportance(not_a_field=1)
    # the Torch-Pruning arguments combine with either form
    imp = CurvatureImportance(config=CurvatureConfig(topk=4), group_reduction="max",
                              normalizer=None, max_batches=2)
    assert (imp.config.topk, imp.group_reduction, imp.normalizer, imp.max_batches) == (
        4, "max", None, 2)


def test_submodule_modes_restored(mixed_modes):
    """Calibration and scoring give every submodule its own train/eval flag back, also when
    calibration raises midway."""
    torch.manual_seed(0)
    model = zoo.vgg9(3, 10, 32, width=0.25)
    with torch.no_grad():
        _randomise_bn(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    check = mixed_modes(model, bns[0], bns[2])
    x = _calib((3, 32, 32), n=4)
    imp = CurvatureImportance(**FAST).calibrate(model, x)
    check()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    check = mixed_modes(model, bns[0], bns[2])       # the dependency graph's trace may change them
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]
    group = DG.get_pruning_group(conv, tp.prune_conv_out_channels,
                                 idxs=list(range(conv.out_channels)))
    with torch.no_grad():
        conv.weight.mul_(1.5)                        # a changed model: scoring recalibrates
    assert torch.isfinite(imp(group)).all()
    check()
    bad = x.clone()
    bad[1, 0, 0, 0] = float("inf")
    with pytest.raises(CalibrationError, match="non-finite"):
        CurvatureImportance(**FAST).calibrate(model, bad)
    check()


@pytest.mark.parametrize("kw", [dict(group_reduction="median"), dict(normalizer="sentinel_1"),
                                dict(normalizer="sentinel_x"), dict(progress="yes"),
                                dict(max_batches=True)])
def test_importance_options_refused_by_name(kw):
    (option,) = kw
    with pytest.raises(ValueError, match=option):
        CurvatureImportance(**kw)


def test_importance_options_accepted():
    """Every accepted option value is applied as Torch-Pruning applies it: the group's raw
    scores (normalizer=None) normalised by its ``_normalize`` give the option's scores."""
    torch.manual_seed(0)
    model = zoo.lenet5(1, 10, 28).eval()
    x = _calib((1, 28, 28))
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    conv2 = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]
    group = DG.get_pruning_group(conv2, tp.prune_conv_out_channels, idxs=list(range(16)))
    raw = CurvatureImportance(normalizer=None, **FAST).calibrate(model, x)(group)
    for norm in ("sentinel_0.5", "standarization", "lamp", lambda s: s * 0 + 7):
        imp = CurvatureImportance(normalizer=norm, **FAST).calibrate(model, x)
        want = imp._normalize(raw.clone(), norm)
        torch.testing.assert_close(imp(group), want)
    torch.testing.assert_close(
        CurvatureImportance(normalizer=lambda s: s * 0 + 7, **FAST).calibrate(model, x)(group),
        torch.full((16,), 7.0))
    gate = CurvatureImportance(group_reduction="gate", normalizer=None, **FAST)
    assert torch.isfinite(gate.calibrate(model, x)(group)).all()
    imp = CurvatureImportance(max_batches=np.int64(3), **FAST)
    assert imp.max_batches == 3 and type(imp.max_batches) is int


def test_failed_calibrate_keeps_previous_and_one_shot_is_replayed():
    torch.manual_seed(0)
    model = zoo.mlp(64, hidden=(16,), num_classes=10).eval()
    x = _calib((1, 8, 8), n=12)
    reads = []

    def gen():
        for i in range(12):
            reads.append(i)
            yield x[i:i + 4]
    imp = CurvatureImportance(max_batches=3, **FAST).calibrate(model, gen())
    assert reads == [0, 1, 2]
    before = {k: v[1].copy() for k, v in imp.channel_scores().items()}
    with pytest.raises(CalibrationError):
        imp.calibrate(model, [{"pixels": x}])           # no forward_fn: refused
    assert imp.model is model
    for k, v in imp.channel_scores().items():
        np.testing.assert_array_equal(v[1], before[k])
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)][0]
    lin.weight.data.mul_(0.5)                            # recomputation replays the kept batches
    imp.channel_scores()
    assert reads == [0, 1, 2]
    ref = CurvatureImportance(**FAST).calibrate(model, [x[i:i + 4] for i in range(3)])
    for k, v in imp.channel_scores().items():
        np.testing.assert_array_equal(v[1], ref.channel_scores()[k][1])


def test_sides_consumer_scores_channels_where_they_are_read():
    """``sides="consumer"``: a hidden channel's score is its outgoing connections' alone (the
    consumer's input-channel score); ``"both"`` averages it with its incoming connections'.
    The last hidden layer's group has a consumer too; a group with no scored consumer keeps
    its producer's score."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(32, 6)
    kw = dict(group_reduction="mean", normalizer=None, topk=None, backend="exact")
    both = CurvatureImportance(**kw).calibrate(model, x)
    cons = CurvatureImportance(sides="consumer", **kw).calibrate(model, x)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    per_layer = both.channel_scores()
    g = DG.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(5)))
    in2, _ = per_layer["2"]
    _, out0 = per_layer["0"]
    torch.testing.assert_close(cons(g), torch.as_tensor(in2, dtype=torch.float32))
    torch.testing.assert_close(both(g), torch.as_tensor((in2 + out0) / 2, dtype=torch.float32))
    assert not torch.allclose(cons(g), both(g))
    # the output layer's group (no consumer): the producer's score in both modes
    g4 = DG.get_pruning_group(model[4], tp.prune_linear_out_channels, idxs=list(range(3)))
    torch.testing.assert_close(cons(g4), both(g4))
    with pytest.raises(ValueError, match="sides"):
        CurvatureImportance(sides="producer")


@pytest.mark.parametrize("group_reduction", ["mean", "sum", "max", "prod", "first", "gate"])
def test_sides_consumer_after_flatten_is_root_sized(group_reduction):
    """A conv whose only consumer is a Linear after flatten (features = channels x positions):
    with ``sides="consumer"`` the group's score is root-sized, finite, and (mean) equals the
    per-channel mean of the Linear's input-feature scores."""
    torch.manual_seed(0)
    model = zoo.lenet5(1, 10, 28).eval()
    x = _calib((1, 28, 28))
    imp = CurvatureImportance(sides="consumer", group_reduction=group_reduction,
                              normalizer=None, **FAST).calibrate(model, x)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    conv2 = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]
    s = imp(DG.get_pruning_group(conv2, tp.prune_conv_out_channels, idxs=list(range(16))))
    assert s.shape == (16,) and torch.isfinite(s).all() and (s > 0).all()
    if group_reduction == "mean":
        fc = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][0]
        feat, _ = imp.channel_scores()[fc]
        want = torch.as_tensor(feat, dtype=torch.float32).view(16, -1).mean(1)
        torch.testing.assert_close(s, want)
