"""tp_curvature.repair: exactness on constructed cases, the bias-only special case, pruned and
repaired models that still run and are closer to the unpruned one, and bad input."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from tp_curvature import (CurvatureImportance, LeastSquaresRepair, RepairError,
                          recalibrate_batchnorm)
from tp_curvature.repair._statistics import LayerSpec


def _prune(model, example, layer, idxs, fn=tp.prune_linear_out_channels):
    """Prune ``idxs`` of ``layer`` (and every coupled layer) through a dependency graph, whose
    pruning history the repair reads like a pruner's."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    dg.get_pruning_group(layer, fn, idxs=idxs).prune()
    return dg


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------ exactness
# The producer maps a low-dimensional z linearly to more channels, so every removed channel is
# an exact linear combination of the kept ones: the repaired consumer must reproduce the
# unpruned output on fresh data from the same subspace.

def _exact_case(model, make_input, layer, idxs, fn, n_cal=256):
    """(output error after pruning, worst output error after the repair, sequential and
    independent) on fresh data."""
    torch.manual_seed(1)
    model.eval()
    x_cal, x_new = make_input(n_cal), make_input(64)
    with torch.no_grad():
        y_new = model(x_new)
    name = next(n for n, m in model.named_modules() if m is layer)
    errs = []
    for sequential in (True, False):
        work = copy.deepcopy(model)
        repair = LeastSquaresRepair(ridge=0.0, sequential=sequential).calibrate(work, x_cal)
        dg = _prune(work, x_cal[:1], work.get_submodule(name), idxs, fn)
        with torch.no_grad():
            pruned_err = _rel(work(x_new), y_new)
        repair.apply(work, dg)
        with torch.no_grad():
            errs.append(_rel(work(x_new), y_new))
    return pruned_err, max(errs), work


def test_linear_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.Linear(8, 4))
    before, after, model = _exact_case(model, lambda n: torch.randn(n, 5), model[0], [1, 5, 6],
                                tp.prune_linear_out_channels)
    assert before > 0.05 and after < 1e-6


def test_linear_on_tokens_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Linear(8, 4))
    before, after, model = _exact_case(model, lambda n: torch.randn(n, 5, 6), model[0], [0, 7],
                                tp.prune_linear_out_channels)
    assert before > 0.05 and after < 1e-6


def test_conv_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(5, 8, 1, bias=False), nn.Conv2d(8, 5, 3, padding=1,
                                                                     stride=2))
    before, after, model = _exact_case(model, lambda n: torch.randn(n, 5, 6, 6), model[0],
                                [2, 3, 7], tp.prune_conv_out_channels)
    assert before > 0.05 and after < 1e-6


def test_grouped_conv_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 6, 3, groups=2))
    before, after, model = _exact_case(model, lambda n: torch.randn(n, 3, 5, 5), model[0], [3, 7],
                                tp.prune_conv_out_channels)
    assert model[1].weight.shape == (6, 3, 3, 3)
    assert before > 0.05 and after < 1e-6


def test_linear_after_flatten_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.Flatten(), nn.Linear(6 * 16, 5))
    before, after, model = _exact_case(model, lambda n: torch.randn(n, 4, 4, 4), model[0], [1, 4],
                                tp.prune_conv_out_channels, n_cal=512)
    assert model[2].weight.shape == (5, 4 * 16)
    assert before > 0.05 and after < 1e-6


def test_unfolded_features_equal_a_direct_computation():
    """Conv features: input channel x kernel tap, with stride, padding and dilation, in the
    order of ``W.view(O, -1)``: ``features(x) @ W.view(O, -1).T`` is the convolution."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
    x = torch.randn(3, 4, 7, 7)
    spec = LayerSpec("c", "x", "conv", 2, 6, 2, (3, 3), (2, 2), (2, 2), (2, 2))
    cols = spec.features(x).float()                             # (groups, 2 * 9, rows)
    w = conv.weight.view(2, 3, -1)                              # (groups, out per group, F)
    y = torch.einsum("gfr,gof->rgo", cols, w).reshape(3, 4 * 4, 6).transpose(1, 2)
    torch.testing.assert_close(y.reshape(3, 6, 4, 4), conv(x), atol=1e-5, rtol=1e-5)
    # a direct loop over output positions and taps for one (image, out, position)
    ref = sum(x[1, c, 2 * 1 - 2 + 2 * i, 2 * 2 - 2 + 2 * j] * conv.weight[0, c, i, j]
              for c in range(2) for i in range(3) for j in range(3)
              if 0 <= 2 * 1 - 2 + 2 * i < 7 and 0 <= 2 * 2 - 2 + 2 * j < 7)
    torch.testing.assert_close(conv(x)[1, 0, 1, 2], ref, atol=1e-5, rtol=1e-5)


def test_bias_only_is_flaps_compensation():
    """``bias_only=True``: the weights are the pruned ones and the bias gains the removed
    features' mean contribution, b' = b + W_R mean(x_R) (FLAP's compensation); for a conv the
    features are the unfolded (channel, tap) pairs, so the mean is per tap (FLAP's channel
    mean is its approximation, equal for a channel constant on the data)."""
    torch.manual_seed(0)
    for model, x, fn, idxs in (
            (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(64, 4),
             tp.prune_linear_out_channels, [0, 4]),
            (nn.Sequential(nn.Conv2d(2, 6, 1), nn.ReLU(), nn.Conv2d(6, 3, 3)),
             torch.randn(32, 2, 5, 5), tp.prune_conv_out_channels, [1, 2])):
        model.eval()
        with torch.no_grad():
            h = model[1](model[0](x))
        consumer = model[2]
        w, b = consumer.weight.detach().clone(), consumer.bias.detach().clone()
        if h.dim() == 2:
            want_b = b + w[:, idxs] @ h[:, idxs].mean(0)
        else:                                            # per-tap means of the unfolded input
            taps = F.unfold(h[:, idxs], 3).mean((0, 2))  # (len(idxs) * 9,)
            want_b = b + w[:, idxs].reshape(w.shape[0], -1) @ taps
        keep = [c for c in range(6) if c not in idxs]
        repair = LeastSquaresRepair(bias_only=True).calibrate(model, x)
        dg = _prune(model, x[:1], model[0], idxs, fn)
        repair.apply(model, dg)
        torch.testing.assert_close(consumer.bias.detach(), want_b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(consumer.weight.detach(), w[:, keep])


# ------------------------------------------------------------------------ on real pruners
class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                                   nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                   nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        h = self.stem(x)
        return self.head(F.relu(h + self.block(h)))


def _trained_like(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _importance(criterion, model, x):
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if criterion == "curvature":
        return CurvatureImportance(topk=8).calibrate(model, x)
    from engine.peers import PEERS                       # the benchmarks' Wanda-sp
    imp = PEERS["wanda"]()
    imp.calibrate(model, x)
    return imp


@pytest.mark.parametrize("criterion", ["l2", "curvature", "wanda"])
@pytest.mark.parametrize("sequential", [False, True])
def test_repaired_residual_cnn_runs_and_is_closer(criterion, sequential, mixed_modes):
    torch.manual_seed(0)
    model = _trained_like(_Res())
    x_cal, x_new = torch.randn(128, 3, 8, 8), torch.randn(64, 3, 8, 8)
    recalibrate_batchnorm(model, x_cal)          # statistics consistent with the data
    with torch.no_grad():
        y_new = model(x_new)
    check = mixed_modes(model, "stem")
    hook = model.block[0].register_forward_hook(lambda *a: None)
    repair = LeastSquaresRepair(sequential=sequential).calibrate(model, x_cal)
    imp = _importance(criterion, model, x_cal)
    pruner = tp.pruner.BasePruner(model, x_cal[:1], importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.head[2]])
    pruner.step()
    model.eval()
    with torch.no_grad():
        pruned_err = _rel(model(x_new), y_new)
    check_modes = mixed_modes(model, "stem")
    model.head[2].weight.requires_grad_(False)       # (Torch-Pruning's new parameters have True)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    repair.apply(model, pruner)
    check_modes()
    model.eval()
    with torch.no_grad():
        repaired_err = _rel(model(x_new), y_new)
    recalibrate_batchnorm(model, x_cal)
    with torch.no_grad():
        out = model(x_new)
    assert out.shape == y_new.shape
    assert repaired_err < 0.6 * pruned_err, (repaired_err, pruned_err)
    assert _rel(out, y_new) < 0.6 * pruned_err, (_rel(out, y_new), pruned_err)
    assert model.block[0]._forward_hooks and hook is not None
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in grads} == grads
    assert not model.head[2].weight.requires_grad
    del check


def test_iterative_pruning_and_interactive_steps():
    """Repairs after every step of an iterative, interactive pruner follow its history."""
    torch.manual_seed(0)
    model = _trained_like(_Res())
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    repair = LeastSquaresRepair().calibrate(model, x)
    pruner = tp.pruner.BasePruner(model, x[:1], tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=0.5, iterative_steps=2,
                                  ignored_layers=[model.head[2]])
    errs = []
    for _ in range(2):
        for group in pruner.step(interactive=True):
            group.prune()
        repair.apply(model, pruner)
        with torch.no_grad():
            errs.append(_rel(model(x), y))
    assert model.block[0].out_channels == 8
    assert all(e < 1.0 for e in errs)


# ------------------------------------------------------------------------ bad input
def test_duplicate_and_constant_channels_give_finite_weights_and_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].weight[1] = model[0].weight[0]          # channel 1 duplicates channel 0
        model[0].bias[1] = model[0].bias[0]
        model[0].weight[2] = 0.0                         # channel 2 is constant
        model[0].bias[2] = 1.0
    x = torch.randn(64, 4)
    repair = LeastSquaresRepair(ridge=0.0).calibrate(model, x)
    dg = _prune(model, x[:1], model[0], [5])
    with pytest.warns(UserWarning, match="'2'.*singular.*ridge"):
        repair.apply(model, dg)
    assert torch.isfinite(model[2].weight).all() and torch.isfinite(model[2].bias).all()


def test_fewer_samples_than_features_is_handled_by_the_ridge():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    x_cal, x_new = torch.randn(12, 8), torch.randn(256, 8)
    with torch.no_grad():
        y = model(x_new)
    repair = LeastSquaresRepair().calibrate(model, x_cal)
    dg = _prune(model, x_cal[:1], model[0], list(range(0, 64, 2)))
    with torch.no_grad():
        before = _rel(model(x_new), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # the default ridge needs no fallback
        repair.apply(model, dg)
    with torch.no_grad():
        after = _rel(model(x_new), y)
    assert torch.isfinite(model[2].weight).all() and after < before


def test_model_changed_between_calibration_and_repair_is_refused_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(),
                          nn.Linear(3, 2)).eval()
    x = torch.randn(32, 4)
    repair = LeastSquaresRepair().calibrate(model, x)
    dg = _prune(model, x[:1], model[0], [0, 1])
    with torch.no_grad():
        model[4].weight.add_(0.1)                        # not the pruner's doing
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RepairError, match="'4.weight'.*changed other than by this pruner"):
        repair.apply(model, dg)
    for k, v in model.state_dict().items():              # nothing half-applied
        assert torch.equal(v, state[k]), k
    with pytest.raises(RepairError, match="calibrate"):
        LeastSquaresRepair().apply(model, dg)


@pytest.mark.parametrize("kw,needle", [(dict(ridge=-1.0), "ridge"),
                                       (dict(bias_only=1), "bias_only"),
                                       (dict(bias_only=True, sequential=True), "sequential"),
                                       (dict(max_gram_bytes=-2), "max_gram_bytes"),
                                       (dict(max_batches=0), "max_batches")])
def test_options_checked_by_name(kw, needle):
    with pytest.raises(ValueError, match=needle):
        LeastSquaresRepair(**kw)


def test_layer_over_the_gram_budget_gets_the_bias_repair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(32, 4)
    repair = LeastSquaresRepair(max_gram_bytes=8, sequential=False).calibrate(model, x)
    dg = _prune(model, x[:1], model[0], [0])
    with pytest.warns(UserWarning, match="'2'.*max_gram_bytes.*bias-only"):
        _, log = repair.apply(model, dg, log=True)
    assert log["layers"]["2"]["method"] == "bias"


def test_batchnorm_recalibration_restores_modes_and_matches_batch_statistics(mixed_modes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    check = mixed_modes(model, "1")
    x = torch.randn(64, 3, 6, 6) * 2 + 1
    recalibrate_batchnorm(model, [x[:32], x[32:]])
    check()
    with torch.no_grad():
        y = model[0](x)
    torch.testing.assert_close(model[1].running_mean, y.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)


def test_one_repair_serves_many_pruned_copies():
    """A calibrated repair is reused for many pruned copies of its model (a new pruner each:
    a pruner's history is followed per pruner object, never by its id, which Python reuses,
    and what it keeps for a pruner goes with the pruner)."""
    import gc
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                         nn.Linear(8, 3)).eval()
    x = torch.randn(64, 6)
    repair = LeastSquaresRepair().calibrate(base, x)
    for ratio in (0.25, 0.5, 0.25, 0.5, 0.25):
        model = copy.deepcopy(base)
        pruner = tp.pruner.BasePruner(model, x[:1], tp.importance.GroupMagnitudeImportance(),
                                      pruning_ratio=ratio, ignored_layers=[model[4]])
        pruner.step()
        repair.apply(model, pruner)
        assert len(repair._tracks) == 1
        del pruner
        gc.collect()
        assert len(repair._tracks) == 0


def test_sequential_one_pass_equals_one_pass_per_depth():
    """With one calibration batch the sequential refit runs in one pass (each layer refit at
    its tap); with the same data in two batches, one pass per depth: the same refit."""
    torch.manual_seed(0)
    base = _trained_like(_Res())
    x = torch.randn(96, 3, 8, 8)
    out = []
    for data in (x, [x[:48], x[48:]]):
        model = copy.deepcopy(base)
        repair = LeastSquaresRepair(sequential=True).calibrate(model, data)
        pruner = tp.pruner.BasePruner(model, x[:1], tp.importance.GroupMagnitudeImportance(),
                                      pruning_ratio=0.5, ignored_layers=[model.head[2]])
        pruner.step()
        repair.apply(model, pruner)
        out.append(model)
    for (n, a), b in zip(out[0].named_parameters(), out[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=n)


def test_sampled_positions_keep_exactness_and_determinism():
    """Beyond ``max_rows`` a convolution's positions are sampled (the same ones for the
    unpruned and the pruned input): exact linear relations stay exact, and the sample is
    fixed by the layer and the batch."""
    from tp_curvature.repair._statistics import row_seed, sampled_positions
    spec = LayerSpec("c", "x", "conv", 8, 5, 1, (3, 3), (1, 1), (1, 1), (1, 1))
    x = torch.randn(16, 8, 6, 6)
    a = sampled_positions(spec, x, 64, row_seed("c", 0))
    assert a.numel() == 4 and torch.equal(a, sampled_positions(spec, x, 64, row_seed("c", 0)))
    assert not torch.equal(a, sampled_positions(spec, x, 64, row_seed("c", 1)))
    assert sampled_positions(spec, x, 16 * 36, 0) is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(5, 8, 1, bias=False), nn.Conv2d(8, 5, 3, padding=1))
    x_cal, x_new = torch.randn(64, 5, 6, 6), torch.randn(32, 5, 6, 6)
    with torch.no_grad():
        y = model(x_new)
    for sequential in (True, False):
        work = copy.deepcopy(model).eval()
        repair = LeastSquaresRepair(ridge=0.0, sequential=sequential, max_rows=256)
        repair.calibrate(work, x_cal)
        dg = _prune(work, x_cal[:1], work[0], [2, 3, 7], tp.prune_conv_out_channels)
        repair.apply(work, dg)
        with torch.no_grad():
            assert _rel(work(x_new), y) < 1e-6


def test_grouped_query_attention_through_repair_step():
    """Torch-Pruning edits a grouped-query attention head group after building it (the key /
    value heads are kept), which its pruning history does not say: pruned through
    ``repair.step(pruner)`` the groups are recorded as pruned and the repair is exact about
    them; a replay of the history is refused with a message saying so."""
    from engine.models import llama_decoder
    from engine.text import fix_attention, llm_pruner
    torch.manual_seed(0)
    base = llama_decoder(vocab=50, dim=64, n_heads=8, n_kv_heads=2, n_layers=2,
                         hidden=96).eval()
    ids = torch.randint(0, 50, (16, 12))
    with torch.no_grad():
        logits = base(ids)
    model = copy.deepcopy(base)
    repair = LeastSquaresRepair().calibrate(model, ids)
    pruner = llm_pruner(model, ids[:2], tp.importance.GroupMagnitudeImportance(p=2), 0.25)
    repair.step(pruner)
    fix_attention(model, pruner)
    assert model.layers[0].self_attn.k_proj.out_features == 16      # kv heads kept
    with torch.no_grad():
        pruned = _rel(model(ids), logits)
    repair.apply(model, pruner)
    with torch.no_grad():
        assert _rel(model(ids), logits) < 0.7 * pruned
    other = copy.deepcopy(base)
    repair = LeastSquaresRepair().calibrate(other, ids)
    pruner = llm_pruner(other, ids[:2], tp.importance.GroupMagnitudeImportance(p=2), 0.25)
    pruner.step()
    with pytest.raises(RepairError, match="repair.step"):
        repair.apply(other, pruner)
