"""Hostile-but-realistic inputs (issue 10): no silent wrong score, no state changed behind the
user's back, bounded memory, a solver that keeps its stated accuracy."""
import copy
import gc
import itertools
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tp_curvature import CalibrationError, CurvatureImportance, connection_curvature
from tp_curvature.unstructured import prune_by_curvature, weight_curvature

FAST = dict(topk=8)


def _mlp(seed=0, n=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(),
                         nn.Linear(n, 4)).eval()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).eval()


def _x(n=32, shape=(8,), seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _kappas(res):
    return {k: v.kappa for k, v in res.items()}


def _same(a, b):
    """Equal up to float32 summation order (each batch's statistics are reduced in float32,
    so batches split differently round differently)."""
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- 1. another model than calibrated
def test_pruning_a_copy_scores_the_pruners_model():
    a = _mlp()
    x = _x()
    imp = CurvatureImportance(**FAST).calibrate(a, x)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[2].weight.mul_(torch.linspace(0.1, 2.0, 16)[:, None])   # b differs from a
    tp.pruner.BasePruner(b, x[:1], importance=imp, pruning_ratio=0.5,
                         ignored_layers=[b[4]]).step()
    assert b[0].out_features == 8 and b[2].out_features == 8
    # the channels removed are those an importance calibrated on b itself removes
    ref = copy.deepcopy(a)
    with torch.no_grad():
        ref[2].weight.mul_(torch.linspace(0.1, 2.0, 16)[:, None])
    imp_ref = CurvatureImportance(**FAST).calibrate(ref, x)
    tp.pruner.BasePruner(ref, x[:1], importance=imp_ref, pruning_ratio=0.5,
                         ignored_layers=[ref[4]]).step()
    for m, r in zip(b, ref):
        if isinstance(m, nn.Linear):
            torch.testing.assert_close(m.weight, r.weight)


def test_group_of_an_unrelated_model_is_refused():
    a, other = _mlp(), _mlp(1)
    x = _x()
    imp = CurvatureImportance(**FAST).calibrate(a, x)
    DG = tp.DependencyGraph().build_dependency(other, example_inputs=x[:1])
    group = DG.get_pruning_group(other[0], tp.prune_linear_out_channels, idxs=list(range(16)))
    group._DG = None                                    # no way to know the pruner's model
    with pytest.raises(CalibrationError, match="calibrated on a different model"):
        imp(group)


# ---------------------------------------------------------------- 2. (inputs, targets) whatever the dtype
@pytest.mark.parametrize("kind", ["int", "float", "onehot"])
def test_targets_of_any_dtype_are_targets(kind):
    m, x = _mlp(), _x()
    y = {"int": torch.randint(0, 4, (32,)), "float": torch.rand(32),
         "onehot": nn.functional.one_hot(torch.randint(0, 4, (32,)), 4).float()}[kind]
    ref = _kappas(connection_curvature(m, x, **FAST))
    _same(_kappas(connection_curvature(m, (x, y), **FAST)), ref)
    _same(_kappas(connection_curvature(m, [(x[:16], y[:16]), (x[16:], y[16:])], **FAST)), ref)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    _same(_kappas(connection_curvature(m, loader, **FAST)), ref)


def test_ambiguous_list_of_two_tensors_is_refused():
    m, x = _mlp(), _x()
    with pytest.raises(CalibrationError, match=r"\(inputs, targets\)"):
        connection_curvature(m, [x, torch.rand(32)], **FAST)


# ---------------------------------------------------------------- 4. stale scores
def test_in_place_weight_change_refreshes_scores():
    m, x = _mlp(), _x()
    imp = CurvatureImportance(**FAST).calibrate(m, x)
    before = imp.channel_scores()["2"][1].copy()
    m[2].weight.data[:3] = 0
    after = imp.channel_scores()["2"][1]
    assert not np.allclose(before, after)
    fresh = CurvatureImportance(**FAST).calibrate(m, x).channel_scores()["2"][1]
    np.testing.assert_array_equal(after, fresh)


def test_swapped_module_refreshes_scores():
    m, x = _mlp(), _x()
    imp = CurvatureImportance(**FAST).calibrate(m, x)
    before = imp.channel_scores()["2"][1].copy()
    torch.manual_seed(5)
    m[2] = nn.Linear(16, 16)
    after = imp.channel_scores()["2"][1]
    fresh = CurvatureImportance(**FAST).calibrate(m, x).channel_scores()["2"][1]
    assert not np.allclose(before, after)
    np.testing.assert_array_equal(after, fresh)


# ---------------------------------------------------------------- 5. bounded, streaming calibration
def _endless(x, limit=200):
    """An iterator with no length that would go on forever (it stops the test at ``limit``)."""
    for i in itertools.count():
        if i == limit:
            raise AssertionError("calibration kept reading an endless iterator")
        yield x


def test_endless_iterator_without_cap_is_refused():
    m, x = _mlp(), _x()
    with pytest.raises(CalibrationError, match="max_batches"):
        CurvatureImportance(**FAST).calibrate(m, _endless(x))
    imp = CurvatureImportance(**FAST).calibrate(m, _endless(x), max_batches=3)
    assert np.isfinite(imp.channel_scores()["2"][1]).all()


class _Reiterable:
    """Yields fresh batches each pass and remembers weak references to them."""

    def __init__(self, n=20):
        self.n, self.refs, self.passes = n, [], 0

    def __len__(self):
        return self.n

    def __iter__(self):
        self.passes += 1
        for i in range(self.n):
            b = _x(8, seed=i)
            self.refs.append(weakref.ref(b))
            yield b


def test_reiterable_data_is_streamed_not_kept():
    m = _mlp()
    data = _Reiterable()
    imp = CurvatureImportance(**FAST).calibrate(m, data)
    gc.collect()
    assert all(r() is None for r in data.refs), "calibration kept the batches in memory"
    # a recomputation (weights changed) streams the data again
    passes = data.passes
    m[2].weight.data.mul_(0.5)
    imp.channel_scores()
    assert data.passes == passes + 1
    # the streamed statistics equal those of the same batches given as one tensor
    ref = CurvatureImportance(**FAST).calibrate(m, torch.cat([_x(8, seed=i) for i in range(20)]))
    np.testing.assert_allclose(imp.channel_scores()["2"][1], ref.channel_scores()["2"][1],
                               rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- 6. options and batch forms
def test_dict_batches_need_forward_fn():
    m, x = _mlp(), _x()
    with pytest.raises(CalibrationError, match="forward_fn"):
        CurvatureImportance(**FAST).calibrate(m, [{"x": x}])
    imp = CurvatureImportance(**FAST).calibrate(m, [{"x": x}], forward_fn=lambda mod, b: mod(b["x"]))
    assert np.isfinite(imp.channel_scores()["2"][1]).all()


@pytest.mark.parametrize("option, value", [
    ("max_batches", -1), ("max_batches", 0), ("max_batches", 2.5), ("topk", 2.5), ("topk", 0),
    ("p", 0), ("p", -1.0), ("alpha", 1.0), ("alpha", -0.1), ("alpha", float("nan")),
    ("group_reduction", "median"), ("normalizer", "zscore"), ("reduction", "max"),
    ("variant", "ricci"), ("backend", "gpu"), ("normalize", "l2"),
])
def test_bad_option_is_named_at_construction(option, value):
    with pytest.raises(ValueError, match=option):
        CurvatureImportance(**{option: value})


# ---------------------------------------------------------------- 7. per-weight mode validation
def test_unstructured_rejects_bad_inputs_before_masking():
    m = _cnn()
    imgs = _x(3, (1, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        weight_curvature(m, imgs[:0], progress=False, **FAST)
    bad = imgs.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        weight_curvature(m, bad, progress=False, **FAST)
    m2 = _cnn()
    with torch.no_grad():
        m2[3].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="3"):
        weight_curvature(m2, imgs, progress=False, **FAST)
    scores = weight_curvature(m, imgs, progress=False, **FAST)
    scores["6.weight"][0, 0] = float("nan")               # the last layer's scores are invalid
    with pytest.raises(ValueError, match="6.weight"):
        prune_by_curvature(m, scores, 0.5)
    assert not any(hasattr(mod, "weight_mask") for mod in m.modules()), "model left half-masked"


# ---------------------------------------------------------------- 8. stated solver accuracy
def _sparse_mlp(n=32, density=0.5, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n),
                      nn.ReLU(), nn.Linear(n, 10)).eval()
    with torch.no_grad():
        for layer in m:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_((torch.rand_like(layer.weight) < density).float())
    return m


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99])
def test_default_backend_keeps_stated_accuracy_on_sparse_layers(alpha):
    m, x = _sparse_mlp(), _x(64, (32,))
    exact = connection_curvature(m, x, alpha=alpha, backend="exact", topk=None)
    fast = connection_curvature(m, x, alpha=alpha, topk=None)
    for k in exact:
        err = np.nanmax(np.abs(exact[k].kappa - fast[k].kappa))
        assert err <= 0.02, (k, alpha, err)


# ---------------------------------------------------------------- properties
def _state(model):
    return ({n: p.detach().clone() for n, p in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()},
            {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in
             model.named_modules()})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), width=st.integers(2, 12), conv=st.booleans(),
       train=st.booleans(), alpha=st.sampled_from([0.0, 0.5, 0.9]),
       variant=st.sampled_from(["paper", "flow"]), topk=st.sampled_from([None, 1, 4]),
       n=st.integers(1, 6), dtype=st.sampled_from([torch.float32, torch.float64]),
       grad=st.booleans())
def test_property_finite_scores_state_untouched(seed, width, conv, train, alpha, variant, topk, n,
                                                dtype, grad):
    """Random small models in either mode and dtype, under grad mode or not, with user hooks
    (a forward hook that reads values, a pre-hook, a global module hook): finite scores, the
    model (weights, dtypes, modes, hooks) and the process's global torch state unchanged, and
    no hook ever handed a tracer's fake tensor (issue 19)."""
    from test_robustness import _assert_same_state, _global_state

    torch.manual_seed(seed)
    if conv:
        m = nn.Sequential(nn.Conv2d(2, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))
        x = torch.randn(n, 2, 6, 6)
    else:
        m = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 3))
        x = torch.randn(n, 5)
    m, x = m.to(dtype), x.to(dtype)
    m.train(train)
    if train and conv:
        m[1].eval()                                      # a frozen BN inside a training model
    seen = []
    m[0].register_forward_hook(lambda mod, i, o: seen.append(float(o.abs().mean())))
    m[2].register_forward_pre_hook(lambda mod, i: seen.append(i[0]))
    glob = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, i, o: seen.append(o))
    try:
        before, state = _state(m), _global_state()
        x_before = x.clone()
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = CurvatureImportance(alpha=alpha, variant=variant, topk=topk).calibrate(m, x)
            scores = imp.channel_scores()
        _assert_same_state(state, _global_state())
    finally:
        glob.remove()
    for name, (s_in, s_out) in scores.items():
        assert np.isfinite(s_in).all() and np.isfinite(s_out).all(), name
    assert all(type(t) in (float, torch.Tensor) for t in seen), {type(t) for t in seen}
    after = _state(m)
    assert before[1] == after[1] and before[2] == after[2]
    for k in before[0]:
        torch.testing.assert_close(before[0][k], after[0][k], rtol=0, atol=0)
        assert after[0][k].dtype == before[0][k].dtype
    assert torch.equal(x, x_before)
