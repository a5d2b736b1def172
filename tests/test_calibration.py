"""Calibration (tp_curvature.calibration): the data forms, one streaming pass, node values
(mean |a| and the spread) against independent computations."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from _reference import PAPER
from _reference import mlp_curvature as reference_mlp_curvature
from _models import small_mlp

from tp_curvature import CalibrationError, connection_curvature


# ---------------------------------------------------------------- calibration data forms
def _kap(res):
    return {k: v.kappa for k, v in res.items()}


def test_calibration_data_forms_and_one_streaming_pass():
    from tp_curvature.calibration import CalibrationData

    m = small_mlp()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 12, generator=g)
    ref = _kap(connection_curvature(m, x, topk=4))
    # a list of same-shaped tensors is several batches; a list of (x, y) lists too
    for data in ([x[:8], x[8:]], [[x[:8], torch.zeros(8)], [x[8:], torch.zeros(8)]],
                 (x, torch.zeros(16, 3))):
        got = _kap(connection_curvature(m, data, topk=4))
        for k in ref:   # each batch is reduced in float32: the same values up to its rounding
            np.testing.assert_allclose(got[k], ref[k], atol=1e-5)
    # max_batches caps every form, a tensor included (one batch)
    assert len(CalibrationData([x[:4]] * 5, max_batches=2)) == 2
    assert len(CalibrationData(x, max_batches=3)) == 1
    # a one-shot iterator is read once, at most max_batches items, then replayed
    reads = []

    def gen():
        for i in range(10):
            reads.append(i)
            yield x[i:i + 1]
    data = CalibrationData(gen(), max_batches=3)
    assert reads == []                                   # nothing read at construction
    assert len(list(data)) == 3 and reads == [0, 1, 2]
    assert len(list(data)) == 3 and reads == [0, 1, 2]   # replayed, not read again
    with pytest.raises(CalibrationError, match="max_batches"):
        CalibrationData(iter([x]))
    with pytest.raises(CalibrationError, match="cannot use"):
        connection_curvature(m, 3.0)

    class SameIterator:                                  # iter() returns one shared iterator
        def __init__(self):
            self.it = iter([x[:8], x[8:]])

        def __iter__(self):
            return self.it
    data = CalibrationData(SameIterator())
    assert len(list(data)) == 2
    with pytest.raises(CalibrationError, match="second pass"):
        list(data)


@pytest.mark.parametrize("variant", ["paper", "flow"])
def test_node_value_std_matches_reference(variant):
    """``node_value="std"``: node values are each neuron's spread over the batch."""
    model = small_mlp(4)
    x = torch.randn(48, 12, generator=torch.Generator().manual_seed(4)) * 2 + 1
    ref = reference_mlp_curvature(model, x, flow=(variant == "flow"), node_value="std")
    got = connection_curvature(model, x, variant=variant, topk=None, backend="exact",
                               node_value="std")
    for K_ref, lc in zip(ref, got.values()):
        np.testing.assert_allclose(lc.kappa, K_ref, atol=1e-6)
    # differs from the default's mean |a| on this data
    base = connection_curvature(model, x, variant=variant, node_value="mean_abs", topk=None, backend="exact")
    assert max(np.abs(a.kappa - b.kappa).max()
               for a, b in zip(got.values(), base.values())) > 1e-3


def test_node_value_std_conv_over_images_and_positions():
    """For a conv feature map the spread is over images and positions; a channel that is
    constant on the data (removable by bias compensation) is silent: its connections get
    kappa 1, while with mean |a| the same channel is the most active one and bears load."""
    from tp_curvature import CurvatureConfig
    from tp_curvature.calibration import CalibrationData, calibrate
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3)
    with torch.no_grad():
        conv1.weight[2].zero_()
        conv1.bias[2] = 5.0                     # channel 2: constant 5 after ReLU
    model = nn.Sequential(conv1, nn.ReLU(), conv2).eval()
    x = torch.randn(10, 3, 8, 8)
    with torch.no_grad():
        h = torch.relu(conv1(x))
    want = h.double().permute(1, 0, 2, 3).reshape(6, -1).std(1, unbiased=False).numpy()
    cal = calibrate(model, CalibrationData(x), CurvatureConfig(normalize="max", node_value="std"))
    j = next(j for j in cal.graph.junctions if j.n_nodes == 6)
    np.testing.assert_allclose(cal.acts[j.index], want / want.max(), rtol=1e-6, atol=1e-12)
    assert cal.acts[j.index][2] == 0.0
    lc = connection_curvature(model, x, topk=None, backend="exact", node_value="std")["2"]
    np.testing.assert_array_equal(lc.kappa[2], 1.0)
    lc_abs = connection_curvature(model, x, **PAPER, topk=None, backend="exact")["2"]
    assert np.any(lc_abs.kappa[2] < 1.0)      # (an output at the minmax floor is dead: 1)


def test_node_value_std_keeps_a_spread_far_below_the_mean():
    """Batches are reduced in float32 but a spread 1e-4 of the mean keeps its digits (a
    float32 sum of squares would not), over batches whose means differ (the per-node shift)."""
    from tp_curvature import CurvatureConfig
    from tp_curvature.calibration import CalibrationData, calibrate
    g = torch.Generator().manual_seed(1)
    spread = torch.tensor([0.1, 0.2, 0.05, 0.3])
    batches = [1000.0 + 0.4 * b + spread * torch.randn(64, 4, generator=g) for b in range(3)]
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    want = torch.cat(batches).double().std(0, unbiased=False).numpy()
    cal = calibrate(model, CalibrationData(batches),
                    CurvatureConfig(normalize="max", node_value="std"))
    j = next(j for j in cal.graph.junctions if j.n_nodes == 4)
    np.testing.assert_allclose(cal.acts[j.index], want / want.max(), rtol=1e-4)
    naive = torch.cat(batches)          # what float32 E[x^2] - E[x]^2 would give
    var32 = (naive * naive).mean(0) - naive.mean(0) ** 2
    assert not np.allclose(var32.clamp_min(0).sqrt().numpy() / want.max(), want / want.max(),
                           rtol=1e-2)


@pytest.mark.parametrize("statistic", ["std", "mean_abs"])
def test_node_statistics_leave_out_masked_positions(statistic):
    """A junction whose rows without a node are masked (a class-token row): both statistics
    are taken over the valid positions only, over batches of different sizes, equal to a
    float64 reference; masked positions holding huge values change nothing."""
    from types import SimpleNamespace
    from tp_curvature.calibration import NodeStatistics
    from tp_curvature.graph import Junction
    valid = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0]).reshape(5, 1)       # (tokens, 1)
    j = Junction(index=0, name="tokens", n_nodes=3, channel_dims=(2,),
                 node_ids=torch.tensor([0, 1, 2, 0]), valid=valid)   # features 0, 3: node 0
    stats = NodeStatistics(SimpleNamespace(junctions=[j]), statistic)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 5, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 0.7
               for n in (6, 3)]
    for b in batches:
        b[:, 0] = 1e6                                   # the masked row
        stats.observe(0, b)
    x = torch.cat(batches)[:, 1:].double()              # valid rows: (9, 4, 4)
    per_node = [torch.cat([x[..., 0].reshape(-1), x[..., 3].reshape(-1)]),
                x[..., 1].reshape(-1), x[..., 2].reshape(-1)]
    want = [v.std(unbiased=False) if statistic == "std" else v.abs().mean() for v in per_node]
    np.testing.assert_allclose(stats.values()[0], torch.stack(want).numpy(), rtol=1e-5)


@pytest.mark.parametrize("statistic", ["std", "mean_abs"])
def test_node_statistics_of_a_tensor_that_is_all_channels(statistic):
    """A junction whose every dim is a channel dim (nothing to reduce over): each value is
    its node's only sample, so the spread is 0 and the mean |x| is |x| (negative values
    included)."""
    from types import SimpleNamespace
    from tp_curvature.calibration import NodeStatistics
    from tp_curvature.graph import Junction
    j = Junction(index=0, name="vector", n_nodes=3, channel_dims=(0,),
                 node_ids=torch.tensor([0, 1, 2]))
    stats = NodeStatistics(SimpleNamespace(junctions=[j]), statistic)
    x = torch.tensor([-2.0, 0.5, -0.25])
    stats.observe(0, x)
    want = np.zeros(3) if statistic == "std" else np.abs(x.numpy())
    np.testing.assert_allclose(stats.values()[0], want, atol=1e-12)


def test_node_value_is_validated():
    with pytest.raises(ValueError, match="node_value"):
        connection_curvature(small_mlp(), torch.randn(4, 12), node_value="median")
