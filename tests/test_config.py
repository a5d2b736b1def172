"""CurvatureConfig: every option checked by name, the extremes valid, the presets."""
import numpy as np
import pytest
import torch
from _models import small_mlp

from tp_curvature import CurvatureConfig, connection_curvature


@pytest.mark.parametrize("option, value", [
    ("p", float("inf")), ("p", True), ("topk", True), ("alpha", "0.5"), ("normalize", None),
    ("length", "cost"), ("measure", "uniform"), ("backend_options", {"not_a_solver_kw": 1}),
    ("backend_options", [("eps", 0.1)]),
])
def test_config_rejects_bad_values_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        CurvatureConfig(**{option: value})


def test_config_extremes_are_valid():
    cfg = CurvatureConfig(alpha=0, topk=np.int64(1), p=0.5, backend_options={"eps": 0.05})
    assert (cfg.alpha, cfg.topk, type(cfg.topk)) == (0.0, 1, int)
    m = small_mlp()
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    for kw in (dict(alpha=0.0, topk=1), dict(alpha=0.0, topk=None), dict(p=0.5, topk=4)):
        res = connection_curvature(m, x, **kw)
        kappa_max = 1.0 / (1.0 - kw.get("alpha", 0.5))
        for lc in res.values():
            assert np.isfinite(lc.kappa).all()
            assert np.all(lc.kappa <= kappa_max + 1e-9)



def test_presets_and_replace():
    """The presets are the documented definitions; keyword overrides and replace() re-derive
    length / measure from a new variant."""
    assert (CurvatureConfig().variant, CurvatureConfig().node_value) == ("flow", "std")
    paper = CurvatureConfig.paper()
    assert (paper.length, paper.measure, paper.node_value, paper.alpha, paper.topk) == \
        ("weight", "activation", "mean_abs", 0.9, None)
    assert CurvatureConfig.element().topk == 32 and CurvatureConfig.element(sparse=True).topk == 8
    assert CurvatureConfig.element(alpha=0.5).alpha == 0.5
    flow = paper.replace(variant="flow")
    assert (flow.length, flow.measure, flow.alpha) == ("flow", "flow", 0.9)
    assert CurvatureConfig.paper(topk=16).describe() == (
        "CurvatureConfig(alpha=0.9, variant='paper', length='weight', measure='activation', "
        "node_value='mean_abs', topk=16)")
    with pytest.raises(ValueError, match="alpha"):
        CurvatureConfig.paper(alpha=1.5)
