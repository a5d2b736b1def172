"""training.py: cached baseline training, evaluation, fine-tuning and BN recalibration."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.data import calibration_batch, load_dataset
from engine.models import build_model
from engine.training import (
    TrainConfig,
    checkpoint_path,
    config_hash,
    evaluate,
    finetune,
    make_loader,
    recalibrate_bn,
    train_or_load,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_train_or_load_caches_and_is_deterministic(tmp_path):
    cfg = TrainConfig(dataset="digits", model="mlp", epochs=3, seed=0, lr=1e-2,
                      model_kwargs={"hidden": [32]}, checkpoint_dir=str(tmp_path))
    model, info = train_or_load(cfg, progress=False, verbose=False)
    path = checkpoint_path(cfg)
    assert path.is_file() and path.name.startswith("digits-mlp-") and not info["cached"]
    assert info["test_acc"] > 0.8 and len(info["history"]) == 3
    _, test, _ = load_dataset("digits")
    assert abs(evaluate(model, make_loader(test, 100)) - info["test_acc"]) < 1e-12

    again, info2 = train_or_load(cfg, progress=False, verbose=False)
    assert info2["cached"] and info2["test_acc"] == info["test_acc"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)

    retrained, info3 = train_or_load(cfg, force=True, progress=False, verbose=False)
    assert not info3["cached"] and info3["test_acc"] == info["test_acc"]  # same seed, same run
    for a, b in zip(model.state_dict().values(), retrained.state_dict().values()):
        assert torch.equal(a, b)


def test_config_hash():
    a = TrainConfig(dataset="digits", model="mlp")
    assert config_hash(a) == config_hash(TrainConfig(dataset="digits", model="mlp", data_root="/x",
                                                     num_threads=2, checkpoint_dir="y"))
    assert config_hash(a) != config_hash(TrainConfig(dataset="digits", model="mlp", seed=1))
    assert config_hash(a) != config_hash(TrainConfig(dataset="digits", model="mlp", epochs=6))
    assert a.epochs == 30 and TrainConfig(dataset="mnist").epochs == 5
    assert a.lr == 1e-3 and TrainConfig(optimizer="sgd").lr == 0.05
    assert "timm-resnet10t" in checkpoint_path(TrainConfig(model="timm:resnet10t")).name


@pytest.mark.slow
def test_finetune_and_recalibrate_bn():
    torch.manual_seed(0)
    train, test, meta = load_dataset("digits", train_subset=300)
    model = build_model("vgg9", meta.num_classes, meta.in_channels, meta.image_size, width=0.125)
    before = [p.detach().clone() for p in model.parameters()]
    finetune(model, make_loader(train, 64, shuffle=True), epochs=1, lr=1e-3)
    assert not model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_mean.fill_(100.0)
    weights = [p.detach().clone() for p in model.parameters()]
    x, _ = calibration_batch(train, 64, seed=0)
    recalibrate_bn(model, x)
    assert not model.training and bn.momentum == 0.1
    assert bn.running_mean.abs().max() < 50
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    # running stats equal the batch statistics of the calibration data at the first BN
    feats = model.features[0](x)
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert 0.0 <= evaluate(model, test) <= 1.0
