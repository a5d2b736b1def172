"""Model zoo: forward shapes on each input config, fx-traceability, Torch-Pruning graphs."""
from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import fx, nn

from engine.models import build_model, count_parameters, lenet5, mlp, paper_lenet, vgg9


pytestmark = pytest.mark.usefixtures("one_thread")

# (in_channels, image_size): Fashion-MNIST / MNIST, scikit-learn digits, CIFAR
CONFIGS = [(1, 28), (1, 8), (3, 32)]
MODELS = [
    ("mlp", {}),
    ("lenet5", {}),
    ("paper_lenet", {}),
    ("vgg9", {"width": 0.25}),
    ("resnet20", {}),
    ("resnet56", {}),
]
CASES = [
    pytest.param(name, kw, c, s, id=f"{name}-{c}x{s}x{s}") for name, kw in MODELS for c, s in CONFIGS
]


@pytest.mark.parametrize("name,kw,c,s", CASES)
def test_forward_fx_and_dependency_graph(name, kw, c, s):
    torch.manual_seed(0)
    num_classes = 7
    model = build_model(name, num_classes=num_classes, in_channels=c, image_size=s, **kw).eval()
    x = torch.randn(3, c, s, s)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, num_classes)
    assert torch.isfinite(y).all()

    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y)

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    groups = list(dg.get_all_groups(ignored_layers=[], root_module_types=[nn.Conv2d, nn.Linear]))
    assert len(groups) > 0


@pytest.mark.parametrize("name,kw", [("lenet5", {}), ("vgg9", {"width": 0.25}), ("resnet20", {})])
def test_prunable_with_torch_pruning(name, kw):
    """One magnitude pruning step removes channels and the model still runs."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=32, **kw)
    x = torch.randn(2, 3, 32, 32)
    before = count_parameters(model)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5, ignored_layers=[last],
    )
    pruner.step()
    assert count_parameters(model) < before
    assert model(x).shape == (2, 10)


def test_paper_shapes_and_documented_sizes():
    # fc input sizes documented in the builders
    assert lenet5(1, 10, 28).classifier[0].in_features == 16 * 5 * 5
    assert lenet5(1, 10, 8).classifier[0].in_features == 16 * 2 * 2
    assert lenet5(3, 10, 32).classifier[0].in_features == 16 * 6 * 6
    pl = paper_lenet(1, 10, 28)
    assert pl.classifier[0].in_features == 16 * 4 * 4
    convs = [m for m in pl.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size, m.stride) for m in convs] == [(6, (6, 6), (2, 2)), (16, (6, 6), (2, 2))]
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in pl.modules())
    v = vgg9(3, 10, 32)
    convs = [m for m in v.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 64, 128, 128, 256, 256]
    assert [m.out_features for m in v.modules() if isinstance(m, nn.Linear)] == [512, 512, 10]
    assert v.classifier[0].in_features == 256 * 4 * 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in v.modules()) == 6
    assert not any(isinstance(m, nn.BatchNorm2d) for m in vgg9(batch_norm=False).modules())
    assert [m.out_channels for m in vgg9(width=0.25).modules() if isinstance(m, nn.Conv2d)] == [16, 16, 32, 32, 64, 64]
    m = mlp()
    assert [l.out_features for l in m if isinstance(l, nn.Linear)] == [256, 128, 10]
    # parameter counts of the CIFAR ResNets (He et al. 2016: 0.27M and 0.85M; option-B
    # projection shortcuts add a few thousand)
    assert 0.26e6 < count_parameters(build_model("resnet20", 10, 3, 32)) < 0.29e6
    assert 0.84e6 < count_parameters(build_model("resnet56", 10, 3, 32)) < 0.88e6
    # ReLUs are separate, non-inplace modules (hooks on conv/BN see pre-activations)
    for name in ("lenet5", "vgg9", "resnet20"):
        relus = [m for m in build_model(name, 10, 3, 32).modules() if isinstance(m, nn.ReLU)]
        assert relus and not any(r.inplace for r in relus)


def test_timm_wrapper():
    model = build_model("timm:resnet10t", num_classes=5, in_channels=1, image_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    assert len(list(dg.get_all_groups())) > 0


def test_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("alexnet")
    with pytest.raises(ValueError, match="too small"):
        paper_lenet(1, 10, 8, padding=0)
