"""Training, evaluation, fine-tuning and BN repair, with a checkpoint cache.

``train_or_load(TrainConfig(dataset="fashion-mnist", model="lenet5", epochs=3))`` trains a
baseline (or reloads it) and returns ``(model, info)``; the checkpoint lives in
``<checkpoint_dir>/<dataset>-<model>-<hash>.pt`` where ``hash`` covers every field of the config
that changes the trained weights (see :data:`HASHED_FIELDS`). The file holds the state dict, the
config, the dataset meta, the test accuracy and the training history, so a cached model is
rebuilt without loading its dataset.

Accuracies are fractions in [0, 1].

Determinism: :func:`set_seed` seeds Python, NumPy and torch before the model is built and the
training loader shuffles with its own seeded generator (``num_workers=0``), so a run on the same
machine, torch version and thread count is repeatable.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import DatasetMeta, load_dataset
from .models import build_model, count_parameters

__all__ = [
    "TrainConfig",
    "HASHED_FIELDS",
    "set_seed",
    "config_hash",
    "checkpoint_path",
    "make_loader",
    "make_loaders",
    "build_model_for",
    "train_epochs",
    "train_or_load",
    "load_checkpoint",
    "evaluate",
    "finetune",
    "recalibrate_bn",
]

_DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}
_DEFAULT_WD = {"adam": 0.0, "sgd": 5e-4}
_DEFAULT_EPOCHS = {"digits": 30}  # 1,437 images = 12 steps per epoch; 5 for the others


def default_epochs(dataset: str) -> int:
    """The training epochs of a dataset when none are given (30 for digits, else 5)."""
    return _DEFAULT_EPOCHS.get(dataset.lower(), 5)


@dataclass
class TrainConfig:
    """Everything that defines a baseline run.

    ``epochs`` defaults to 30 for ``digits`` (12 steps an epoch) and 5 otherwise.
    ``lr`` / ``weight_decay`` default by optimizer (Adam: 1e-3 / 0; SGD with Nesterov momentum
    0.9: 0.05 / 5e-4). ``scheduler`` is ``cosine`` (per step, to 0) or ``none``.
    ``model_kwargs`` go to :func:`engine.models.build_model` (e.g. ``{"width": 0.25}``).
    The last block of fields (data location, device, threads, cache dir) does not enter the hash.
    """

    dataset: str = "digits"
    model: str = "mlp"
    epochs: int | None = None
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    scheduler: str = "cosine"
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    augment: bool = False
    model_kwargs: dict = field(default_factory=dict)
    pad_to: int | None = None      # zero-pad the images to pad_to x pad_to (hashed when set)
    # -- not hashed --
    data_root: str | None = None
    download: bool = False
    device: str = "cpu"
    num_threads: int | None = None
    checkpoint_dir: str = "checkpoints"

    def __post_init__(self) -> None:
        self.optimizer = self.optimizer.lower()
        if self.optimizer not in _DEFAULT_LR:
            raise ValueError(f"optimizer must be one of {sorted(_DEFAULT_LR)}")
        if self.scheduler not in ("cosine", "none"):
            raise ValueError("scheduler must be 'cosine' or 'none'")
        if self.epochs is None:
            self.epochs = default_epochs(self.dataset)
        if self.lr is None:
            self.lr = _DEFAULT_LR[self.optimizer]
        if self.weight_decay is None:
            self.weight_decay = _DEFAULT_WD[self.optimizer]
        self.model_kwargs = dict(self.model_kwargs or {})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


HASHED_FIELDS = (
    "dataset", "model", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum",
    "scheduler", "seed", "train_subset", "test_subset", "augment", "model_kwargs",
)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def config_hash(config: TrainConfig, length: int = 10) -> str:
    """Short SHA-256 of the hashed fields (JSON, sorted keys)."""
    d = {k: _jsonable(getattr(config, k)) for k in HASHED_FIELDS}
    if config.pad_to is not None:   # only when set, so earlier checkpoints keep their hash
        d["pad_to"] = int(config.pad_to)
    d["dataset"] = d["dataset"].lower()
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-")


def checkpoint_path(config: TrainConfig) -> Path:
    return Path(config.checkpoint_dir) / (
        f"{_slug(config.dataset.lower())}-{_slug(config.model)}-{config_hash(config)}.pt"
    )


def make_loader(
    dataset: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """Single-process DataLoader; shuffling uses its own generator seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)


def make_loaders(config: TrainConfig) -> tuple[DataLoader, DataLoader, DatasetMeta]:
    """``(train_loader, test_loader, meta)`` for a config (test batches of 512)."""
    train, test, meta = load_dataset(
        config.dataset, config.data_root, config.download, config.train_subset,
        config.test_subset, seed=config.seed, augment=config.augment, pad_to=config.pad_to,
    )
    return (
        make_loader(train, config.batch_size, shuffle=True, seed=config.seed),
        make_loader(test, 512, shuffle=False),
        meta,
    )


def build_model_for(config: TrainConfig, meta: DatasetMeta | dict) -> nn.Module:
    m = meta if isinstance(meta, dict) else meta.as_dict()
    return build_model(
        config.model, m["num_classes"], m["in_channels"], m["image_size"], **config.model_kwargs
    )


def _device_of(model: nn.Module, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _as_loader(data, batch_size: int = 512) -> Iterable:
    if isinstance(data, Dataset):
        return make_loader(data, batch_size)
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        return [tuple(data)]
    if torch.is_tensor(data):
        return [(data, None)]
    return data


@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None) -> float:
    """Top-1 accuracy in [0, 1] over ``loader`` (a DataLoader, a Dataset or an ``(x, y)`` pair).

    Runs in eval mode and restores the model's training flag.
    """
    device = _device_of(model, device)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in _as_loader(loader):
            pred = model(x.to(device)).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def train_epochs(
    model: nn.Module,
    loader,
    epochs: int,
    lr: float,
    *,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    scheduler: str = "cosine",
    device=None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict]:
    """Cross-entropy training; returns one dict per epoch (loss, accuracy, lr, seconds)."""
    from tqdm.auto import tqdm

    device = _device_of(model, device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0
        )
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    steps = max(1, epochs * len(loader))
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        if scheduler == "cosine"
        else None
    )
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        tot_loss = 0.0
        correct = seen = 0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            tot_loss += float(loss.detach()) * y.numel()
            correct += int((out.argmax(1) == y).sum())
            seen += int(y.numel())
            bar.set_postfix(loss=f"{tot_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": tot_loss / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "lr": opt.param_groups[0]["lr"],
                "time_s": time.perf_counter() - t0,
            }
        )
    model.eval()
    return history


def finetune(
    model: nn.Module,
    loader,
    epochs: int = 1,
    lr: float = 1e-3,
    *,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    scheduler: str = "cosine",
    device=None,
    progress: bool = False,
) -> nn.Module:
    """Short fine-tune (e.g. after pruning): ``epochs`` of cross-entropy with a cosine schedule.

    Returns the same model object, left in eval mode.
    """
    train_epochs(
        model, loader, epochs, lr, optimizer=optimizer, weight_decay=weight_decay,
        scheduler=scheduler, device=device, progress=progress, desc="finetune",
    )
    return model


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, device=None, max_batches: int | None = None) -> nn.Module:
    """Re-estimate BatchNorm running statistics on ``data`` (cumulative average), then eval mode.

    ``data`` is a calibration tensor ``x``, an ``(x, y)`` pair, a Dataset or a DataLoader
    (batches of 256). The library's :func:`tp_curvature.recalibrate_batchnorm` (only the
    BatchNorm layers in train mode); weights are not changed. A model without BatchNorm is
    returned unchanged (in eval mode).
    """
    from tp_curvature import recalibrate_batchnorm
    device = _device_of(model, device)
    batches = ([b if not isinstance(b, (tuple, list)) else b[0] for b in _as_loader(data, 256)])
    recalibrate_batchnorm(model, [b.to(device) for b in batches], max_batches=max_batches)
    return model.eval()


def load_checkpoint(path: str | os.PathLike, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored by :func:`train_or_load` -> ``(model, info)``."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    config = TrainConfig.from_dict(ckpt["config"])
    model = build_model_for(config, ckpt["meta"])
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    info["checkpoint"] = str(path)
    return model, info


def train_or_load(
    config: TrainConfig, force: bool = False, progress: bool = True, verbose: bool = True
) -> tuple[nn.Module, dict]:
    """Train the baseline described by ``config``, or reload its cached checkpoint.

    Returns ``(model, info)``; the model is in eval mode on ``config.device``. ``info`` holds
    ``config`` (dict), ``hash``, ``checkpoint`` (path), ``meta`` (dict), ``test_acc`` (in
    [0, 1]), ``train_time_s``, ``history`` (per epoch), ``num_params`` and ``cached`` (True when
    loaded from disk). ``force=True`` retrains and overwrites the checkpoint.
    """
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    path = checkpoint_path(config)
    if path.is_file() and not force:
        model, info = load_checkpoint(path, config.device)
        info["cached"] = True
        if verbose:
            print(f"loaded {path} (test acc {info['test_acc']:.4f})")
        return model, info

    train_loader, test_loader, meta = make_loaders(config)
    set_seed(config.seed)
    model = build_model_for(config, meta).to(config.device)
    t0 = time.perf_counter()
    history = train_epochs(
        model, train_loader, config.epochs, config.lr, optimizer=config.optimizer,
        weight_decay=config.weight_decay, momentum=config.momentum, scheduler=config.scheduler,
        device=config.device, progress=progress, desc=f"{config.dataset}/{config.model}",
    )
    train_time = time.perf_counter() - t0
    test_acc = evaluate(model, test_loader, config.device)
    info = {
        "config": config.to_dict(),
        "hash": config_hash(config),
        "meta": meta.as_dict(),
        "test_acc": test_acc,
        "train_time_s": train_time,
        "history": history,
        "num_params": count_parameters(model),
        "n_train": len(train_loader.dataset),
        "n_test": len(test_loader.dataset),
        "torch_version": str(torch.__version__),
        "format": 1,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict(), **info}, tmp)
    os.replace(tmp, path)
    info["checkpoint"] = str(path)
    info["cached"] = False
    if verbose:
        print(
            f"trained {config.dataset}/{config.model} in {train_time:.1f}s: "
            f"test acc {test_acc:.4f} -> {path}"
        )
    return model, info
