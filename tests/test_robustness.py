"""Issue 19: hostile-but-ordinary inputs. For each, the correct result or a clear error naming
the cause, with the model, its hooks and modes, the calibration data and the process's global
torch state unchanged; and no exception of the library's own graph building escapes a
Torch-Pruning workflow (it becomes the documented fallback with one warning)."""
import logging
import pickle
import random
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
import torch_pruning as tp

import tp_curvature.graph as graph_module
from tp_curvature import CalibrationError, CurvatureImportance, UnsupportedModelError
from test_coverage import PoolHead
from tp_curvature.importance import UninformativeCalibrationWarning

FAST = dict(topk=8)


def _mlp(seed=0, n=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(),
                         nn.Linear(n, 4)).eval()


def _cnn(seed=0, c_in=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(c_in, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3)).eval()


def _x(n=32, shape=(8,), seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _kappas(imp):
    return {k: v.kappa.copy() for k, v in imp.curvatures().items()}


def _same_kappas(a, b, atol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0)


def _prune(model, x, imp, ignored):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tp.pruner.BasePruner(model, x[:1], importance=imp, pruning_ratio=0.5,
                             ignored_layers=ignored).step()
    return [str(i.message) for i in w if "CurvatureImportance" in str(i.message)]


# ---------------------------------------------------------------- 1. x.mean([2, 3]) after BN
@pytest.mark.parametrize("red", ["mean", "sum", "amax"])
def test_1_reduction_over_spatial_dims_after_bn_prunes_with_curvature(red):
    torch.manual_seed(0)
    m = PoolHead(red, keep=None).eval()
    x = _x(8, (3, 8, 8))
    imp = CurvatureImportance(**FAST).calibrate(m, x)
    assert _prune(m, x, imp, [m.fc]) == []
    assert m.c1.out_channels == 4 and m(x).shape == (8, 4)
    assert imp.coverage() == {"curvature": ["c1", "fc"], "fallback": []}


# ---------------------------------------------------------------- 2. torch.nn.utils.prune masks
def test_2_masked_model_scores_the_masked_weights():
    """A model masked by torch.nn.utils.prune (what prune_by_curvature applies) is scored on
    its masked weights: the same curvature as the plain model holding weight * mask, every
    layer by curvature; the masks, the original weights and the pruning hooks are left as
    they were."""
    m = _mlp()
    for i, amount in ((0, 0.3), (2, 0.5), (4, 0.25)):
        torch.nn.utils.prune.l1_unstructured(m[i], "weight", amount)
    plain = _mlp()
    with torch.no_grad():
        for i in (0, 2, 4):
            plain[i].weight.copy_(m[i].weight_orig * m[i].weight_mask)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    hooks = [len(m[i]._forward_pre_hooks) for i in (0, 2, 4)]
    x = _x()
    imp = CurvatureImportance(**FAST).calibrate(m, x)
    _same_kappas(_kappas(imp), _kappas(CurvatureImportance(**FAST).calibrate(plain, x)))
    DG = tp.DependencyGraph().build_dependency(m, example_inputs=x[:1])
    for layer in (m[0], m[2]):
        group = DG.get_pruning_group(layer, tp.prune_linear_out_channels, idxs=list(range(16)))
        assert torch.isfinite(imp(group)).all()
    assert imp.coverage()["fallback"] == []
    assert [len(m[i]._forward_pre_hooks) for i in (0, 2, 4)] == hooks
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(m[2].weight, m[2].weight_orig * m[2].weight_mask)


# ---------------------------------------------------------------- 3. user hooks
def test_3_user_hooks_never_see_fake_tensors():
    """Forward hooks that read values (float(out.abs().mean())) or keep outputs, a forward
    pre-hook and a global module hook: calibration neither fails nor hands them the tracer's
    fake tensors; they are back in place (the same hook dicts) and fire on the next call,
    also after a calibration that raised."""
    m = _cnn()
    x = _x(4, (3, 8, 8))
    seen = []

    def log_mean(mod, inp, out):
        seen.append(float(out.abs().mean()))

    def keep(mod, inp, out):
        seen.append(out)

    m[0].register_forward_hook(log_mean)
    m[3].register_forward_hook(keep)
    m[3].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    glob = torch.nn.modules.module.register_module_forward_hook(keep)
    dicts = [(mm._forward_hooks, mm._forward_pre_hooks) for mm in m.modules()]
    try:
        imp = CurvatureImportance(**FAST).calibrate(m, x)
        imp.curvatures()
        assert all(type(t) in (float, torch.Tensor) for t in seen), {type(t) for t in seen}
        assert all(a is mm._forward_hooks and b is mm._forward_pre_hooks
                   for (a, b), mm in zip(dicts, m.modules()))
        n = len(seen)
        m(x)
        assert len(seen) > n                    # every hook still fires
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(CalibrationError, match="non-finite"):
            CurvatureImportance(**FAST).calibrate(m, bad)
        assert all(a is mm._forward_hooks and b is mm._forward_pre_hooks
                   for (a, b), mm in zip(dicts, m.modules()))
        assert len(torch.nn.modules.module._global_forward_hooks) == 1
    finally:
        glob.remove()
    assert all(type(t) in (float, torch.Tensor) for t in seen)


# ---------------------------------------------------------------- 4. the user's own errors
class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, a, b):
        return self.b(torch.relu(self.a(a) + b))


def test_4_two_input_model_given_a_tuple_is_refused_with_the_cause():
    """``calibrate(m, (a, b))`` of a two-input model: the tuple reads as (inputs, targets),
    so the default call cannot work: a CalibrationError says so and how to pass the batch;
    with that forward_fn every layer is scored. An error of the user's own model or
    forward_fn reaches the user unchanged, never a silent fallback."""
    torch.manual_seed(0)
    m = _TwoInputs().eval()
    a, b = _x(16), _x(16, seed=1)
    with pytest.raises(CalibrationError, match=r"_TwoInputs.forward\(a, b\).*model\(\*batch\)"):
        CurvatureImportance(**FAST).calibrate(m, (a, b))
    imp = CurvatureImportance(**FAST).calibrate(m, (a, b), forward_fn=lambda mod, bt: mod(*bt))
    assert set(imp.curvatures()) == {"a", "b"}

    class Buggy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            raise ValueError("the user's own bug")

    with pytest.raises(ValueError, match="the user's own bug"):
        CurvatureImportance(**FAST).calibrate(Buggy(), a)
    with pytest.raises(KeyError, match="pixels"):
        CurvatureImportance(**FAST).calibrate(_mlp(), [{"x": a}],
                                              forward_fn=lambda mod, bt: mod(bt["pixels"]))


# ---------------------------------------------------------------- 5. per-batch Python values
def test_5_per_batch_python_values_are_refused_with_the_cause():
    """forward_fn is traced once, on the first batch: a later dict batch whose Python value
    the trace depends on differs, and a CalibrationError names the batch and the value
    (not a raw guard AssertionError); batches that agree calibrate."""
    m = _mlp()
    x = _x()
    fwd = lambda mod, b: mod(-b["x"] if b["neg"] else b["x"])          # noqa: E731
    with pytest.raises(CalibrationError, match=r"batch 1 .*neg.*traced once"):
        CurvatureImportance(**FAST).calibrate(
            m, [{"x": x[:16], "neg": False}, {"x": x[16:], "neg": True}], forward_fn=fwd)
    imp = CurvatureImportance(**FAST).calibrate(
        m, [{"x": x[:16], "neg": True}, {"x": x[16:], "neg": True}], forward_fn=fwd)
    _same_kappas(_kappas(imp), _kappas(CurvatureImportance(**FAST).calibrate(m, -x)),
                 atol=1e-5)      # two batches against one: float32 reductions round apart


# ---------------------------------------------------------------- 6. pickling
def _forward_pixels(model, batch):
    return model(batch["pixels"])


def test_6_calibrated_importance_pickles_with_its_scores(monkeypatch):
    """A calibrated CurvatureImportance pickles (the exported program is left out and
    rebuilt when needed): the unpickled one gives the same scores without recomputing
    them, follows its unpickled model when that changes, and a lambda forward_fn is left
    out with a warning (a recomputation then asks for a new calibration)."""
    m = _cnn()
    x = _x(8, (3, 8, 8))
    imp = CurvatureImportance(**FAST).calibrate(m, [{"pixels": x}], forward_fn=_forward_pixels)
    DG = tp.DependencyGraph().build_dependency(m, example_inputs=x[:1])
    group = DG.get_pruning_group(m[0], tp.prune_conv_out_channels, idxs=list(range(8)))
    want, kappa = imp(group), _kappas(imp)
    blob = pickle.dumps(imp)
    imp2 = pickle.loads(blob)
    m2 = imp2.model
    import tp_curvature.importance as importance_module
    with monkeypatch.context() as mp:
        mp.setattr(importance_module, "calibrate", lambda *a, **k: pytest.fail("recomputed"))
        _same_kappas(_kappas(imp2), kappa, atol=0)
        DG2 = tp.DependencyGraph().build_dependency(m2, example_inputs=x[:1])
        g2 = DG2.get_pruning_group(m2[0], tp.prune_conv_out_channels, idxs=list(range(8)))
        assert torch.equal(imp2(g2), want)
    with torch.no_grad():
        m2[3].weight.mul_(0.5)                  # the unpickled model changes: recomputed
    assert not np.allclose(_kappas(imp2)["3"], kappa["3"])
    # a lambda forward_fn cannot be pickled: left out with a warning, scores kept
    imp3 = CurvatureImportance(**FAST).calibrate(m, [{"pixels": x}],
                                                 forward_fn=lambda mod, b: mod(b["pixels"]))
    with pytest.warns(UserWarning, match="forward_fn.*cannot be pickled"):
        blob = pickle.dumps(imp3)
    imp4 = pickle.loads(blob)
    _same_kappas(_kappas(imp4), kappa, atol=0)
    with torch.no_grad():
        imp4.model[3].weight.mul_(0.5)
    with pytest.raises(CalibrationError, match="unpickled without its forward_fn"):
        imp4.curvatures()


# ---------------------------------------------------------------- 7. Torch-Pruning's options
_REDUCTIONS = [None, "mean", "sum", "max", "prod", "first", "gate"]
_NORMALIZERS = [None, "mean", "sum", "max", "standarization", "gaussian", "lamp",
                "sentinel_0.5", lambda s: s / s.max()]


def test_7_every_builtin_option_combination_has_the_builtins_shape():
    """Every group_reduction x normalizer that Torch-Pruning's GroupMagnitudeImportance
    accepts (None: per-item scores stacked, unreduced) is accepted and gives an output of
    the built-in's shape, for every group of a conv net with BatchNorm."""
    m = _cnn()
    x = _x(8, (3, 8, 8))
    base = CurvatureImportance(**FAST).calibrate(m, x)
    DG = tp.DependencyGraph().build_dependency(m, example_inputs=x[:1])
    groups = list(DG.get_all_groups(ignored_layers=[m[7]]))
    assert len(groups) == 2
    checked = 0
    for gr in _REDUCTIONS:
        for nz in _NORMALIZERS:
            builtin = tp.importance.GroupMagnitudeImportance(group_reduction=gr, normalizer=nz)
            imp = CurvatureImportance(group_reduction=gr, normalizer=nz, **FAST)
            imp.model, imp._data, imp._own = base.model, base._data, base._own
            for g in groups:
                try:
                    ref = builtin(g)
                except Exception:  # noqa: BLE001 - not a combination the built-in accepts
                    continue
                got = imp(g)
                assert got.shape == ref.shape, (gr, nz, got.shape, ref.shape)
                assert torch.isfinite(got).all() or nz in ("standarization", "gaussian")
                checked += 1
    assert checked >= 2 * len(_REDUCTIONS) * (len(_NORMALIZERS) - 1)
    stacked = CurvatureImportance(group_reduction=None, normalizer=None, **FAST)
    stacked.model, stacked._data, stacked._own = base.model, base._data, base._own
    g0 = DG.get_pruning_group(m[0], tp.prune_conv_out_channels, idxs=list(range(8)))
    rows = stacked(g0)                                   # conv out, BN, next conv in
    assert rows.shape == (3, 8)
    torch.testing.assert_close(rows[1], (rows[0] + rows[2]) / 2)


# ---------------------------------------------------------------- 8. global torch state
def _global_state():
    return dict(
        dtype=torch.get_default_dtype(), grad=torch.is_grad_enabled(),
        inference=torch.is_inference_mode_enabled(), threads=torch.get_num_threads(),
        torch_rng=torch.get_rng_state(), np_rng=np.random.get_state()[1].copy(),
        py_rng=random.getstate(), deterministic=torch.are_deterministic_algorithms_enabled(),
        matmul=torch.get_float32_matmul_precision(), anomaly=torch.is_anomaly_enabled(),
        backends=(torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                  torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled),
        filters=list(warnings.filters), stderr=sys.stderr, log=logging.root.manager.disable,
        levels={n: logging.getLogger(n).level for n in (
            "torch", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
            "torch._dynamo")},
        hooks=(len(torch.nn.modules.module._global_forward_hooks),
               len(torch.nn.modules.module._global_forward_pre_hooks)),
        fx_stack_traces=torch.fx.config.do_not_emit_stack_traces)


def _assert_same_state(a, b):
    for k in a:
        if isinstance(a[k], (torch.Tensor, np.ndarray)):
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("grad, default64", [(True, False), (False, True)])
def test_8_global_torch_state_is_left_alone(grad, default64):
    """Calibration, scoring and pruning change no global state: default dtype, grad mode,
    threads, RNG states (torch, NumPy, Python), algorithm / backend flags, warning filters,
    log levels, stderr, global hooks; a float64 default dtype (and a float64 model) works."""
    old_dtype = torch.get_default_dtype()
    try:
        if default64:
            torch.set_default_dtype(torch.float64)
        m = _cnn()
        x = _x(8, (3, 8, 8)).to(torch.get_default_dtype())
        DG = tp.DependencyGraph().build_dependency(m, example_inputs=x[:1])
        group = DG.get_pruning_group(m[0], tp.prune_conv_out_channels, idxs=list(range(8)))
        with torch.set_grad_enabled(grad):
            before = _global_state()
            imp = CurvatureImportance(**FAST).calibrate(m, x)
            imp.curvatures()
            assert torch.isfinite(imp(group)).all()
            _assert_same_state(before, _global_state())
        before = _global_state()
        assert _prune(m, x, imp, [m[7]]) == []            # Torch-Pruning needs grad mode
        _assert_same_state(before, _global_state())
        assert m(x).shape == (8, 3) and m[0].weight.dtype == torch.get_default_dtype()
    finally:
        torch.set_default_dtype(old_dtype)


def test_8_first_import_of_pot_leaves_random_state_and_warning_filters():
    """POT draws from Python's ``random`` and adds warning filters when first imported; the
    solvers import it through ``pot()``, which restores both (a fresh process: POT is
    imported already in this one)."""
    import subprocess
    code = ("import random, sys, warnings\n"
            "from tp_curvature.transport._exact import pot\n"
            "assert 'ot' not in sys.modules\n"
            "random.seed(3); s, f = random.getstate(), list(warnings.filters)\n"
            "pot()\n"
            "assert 'ot' in sys.modules\n"
            "assert random.getstate() == s, 'random state changed'\n"
            "assert warnings.filters == f, 'warning filters changed'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


# ---------------------------------------------------------------- 9. parametrized modules
class _Orthogonal(nn.Module):
    def forward(self, w):
        q, r = torch.linalg.qr(w)
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def test_9_parametrized_modules_score_their_computed_weights():
    """torch.nn.utils.parametrize (weight norm, an orthogonal map) and the hook-based
    weight_norm: every layer scored on the weight the module computes (the same curvature
    as a plain copy holding those weights), parametrizations left in place."""
    m = _mlp()
    torch.nn.utils.parametrizations.weight_norm(m[0])
    parametrize.register_parametrization(m[2], "weight", _Orthogonal())
    torch.nn.utils.weight_norm(m[4])
    x = _x()
    plain = _mlp()
    with torch.no_grad():
        for i in (0, 2, 4):
            plain[i].weight.copy_(m[i].weight)
            plain[i].bias.copy_(m[i].bias)
    imp = CurvatureImportance(**FAST).calibrate(m, x)
    _same_kappas(_kappas(imp), _kappas(CurvatureImportance(**FAST).calibrate(plain, x)),
                 atol=1e-6)
    assert parametrize.is_parametrized(m[0]) and parametrize.is_parametrized(m[2])
    assert hasattr(m[4], "weight_g") and hasattr(m[4], "weight_v")
    DG = tp.DependencyGraph().build_dependency(plain, example_inputs=x[:1])
    g = DG.get_pruning_group(plain[2], tp.prune_linear_out_channels, idxs=list(range(16)))
    imp_plain = CurvatureImportance(**FAST).calibrate(plain, x)
    torch.testing.assert_close(imp_plain(g), imp_plain(g))


# ---------------------------------------------------------------- 10. data the change does not fit
def test_10_model_changed_so_the_data_no_longer_fits_names_the_change():
    """After calibration the input layer takes 1 channel instead of 3: the recomputation
    with the retained 3-channel data fails with a CalibrationError that names the change,
    not a raw shape error; the model is left as the user made it."""
    m = _cnn()
    x = _x(8, (3, 8, 8))
    imp = CurvatureImportance(**FAST).calibrate(m, x)
    imp.curvatures()
    torch.manual_seed(1)
    m[0] = nn.Conv2d(1, 8, 3)
    with pytest.raises(CalibrationError, match=r"'0.weight' has shape \(8, 1, 3, 3\), was "
                                               r"\(8, 3, 3, 3\).*imp.calibrate"):
        imp.curvatures()
    assert m[0].in_channels == 1
    imp.calibrate(m, x[:, :1])                        # new data that fits: scored again
    assert set(imp.curvatures()) == {"0", "3", "7"}


# ---------------------------------------------------------------- 11. uninformative data
def test_11_data_that_cannot_tell_channels_apart_is_announced():
    """One image whose channels are constant: every activation is constant on the data
    (spread 0), every connection gets the same curvature; the result says so with a warning
    naming the layers rather than returning ties that look like scores."""
    m = _cnn()
    x = torch.ones(1, 3, 8, 8) * torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    with pytest.warns(UninformativeCalibrationWarning, match=r"3 layer\(s\).*'0', '3', '7'"):
        CurvatureImportance(**FAST).calibrate(m, x).curvatures()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UninformativeCalibrationWarning)
        CurvatureImportance(**FAST).calibrate(m, _x(8, (3, 8, 8))).curvatures()


# ---------------------------------------------------------------- graph-building failures
def test_graph_building_failure_becomes_the_fallback_with_one_warning(monkeypatch):
    """An exception inside the library's graph building (here injected into the junction
    builder) does not escape calibrate in a Torch-Pruning workflow: every layer gets the
    documented fallback, announced once, naming where it happened; the pruning step runs."""
    m = _cnn()
    x = _x(8, (3, 8, 8))
    real = graph_module._Builder._new_junction

    def broken(self, name, lin, value, **kw):
        if name.startswith("relu"):
            raise IndexError("an internal bug")
        return real(self, name, lin, value, **kw)

    monkeypatch.setattr(graph_module._Builder, "_new_junction", broken)
    imp = CurvatureImportance(**FAST).calibrate(m, x)
    msgs = _prune(m, x, imp, [m[7]])
    assert len(msgs) == 1
    assert "building the channel graph of Sequential failed at conv2d" in msgs[0]
    assert "in module '3'" in msgs[0]
    assert "IndexError: an internal bug" in msgs[0]
    assert imp.coverage()["curvature"] == [] and "0" in imp.coverage()["fallback"]
    assert m[0].out_channels == 4 and m(x).shape == (8, 3)
    monkeypatch.undo()
    # a model without Linear/Conv layers is still refused
    with pytest.raises(UnsupportedModelError, match="no Linear or Conv"):
        CurvatureImportance().calibrate(nn.Sequential(nn.Flatten(), nn.ReLU()), _x(2, (4,)))
