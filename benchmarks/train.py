#!/usr/bin/env python
"""Train (or reload) a baseline model: a thin CLI over :func:`engine.training.train_or_load`.

Examples::

    python benchmarks/train.py                                   # digits MLP, 30 epochs, Adam
    python benchmarks/train.py --dataset fashion-mnist --model lenet5 --epochs 3 --seed 0
    python benchmarks/train.py --dataset fashion-mnist --model vgg9 --width 0.25 --train-subset 10000
    python benchmarks/train.py --dataset cifar10 --model resnet20 --optimizer sgd --augment \\
        --data-root /path/with/cifar-10-batches-py/parent

The checkpoint goes to ``checkpoints/<dataset>-<model>-<hash>.pt`` and is reused unless
``--force``. Prints the test accuracy and, with ``--json``, the info dict as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

from engine.data import DATASETS
from engine.models import MODELS
from engine.training import TrainConfig, train_or_load


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="models (engine.models.MODELS):\n" + MODELS.help())
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--model", default="mlp", help="a model listed below (default: mlp)")
    p.add_argument("--epochs", type=int, default=None, help="default: 30 for digits, else 5")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (adam), 0.05 (sgd)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 0 (adam), 5e-4 (sgd)")
    p.add_argument("--scheduler", choices=["cosine", "none"], default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="cap the training set (stratified)")
    p.add_argument("--test-subset", type=int, default=None, help="cap the test set (stratified)")
    p.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR)")
    p.add_argument("--width", type=float, default=None, help="vgg9 width multiplier")
    p.add_argument("--model-kwargs", default="{}", help='JSON, e.g. \'{"hidden": [64]}\'')
    p.add_argument("--data-root", default=None, help="default: $TP_CURVATURE_DATA or ./data")
    p.add_argument("--download", action="store_true", help="let torchvision download")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--checkpoint-dir", default="checkpoints")
    p.add_argument("--force", action="store_true", help="retrain even if a checkpoint exists")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the info dict as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    model_kwargs = json.loads(a.model_kwargs)
    if a.width is not None:
        model_kwargs["width"] = a.width
    config = TrainConfig(
        dataset=a.dataset, model=a.model, epochs=a.epochs, batch_size=a.batch_size,
        optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay, scheduler=a.scheduler,
        seed=a.seed, train_subset=a.train_subset, test_subset=a.test_subset, augment=a.augment,
        model_kwargs=model_kwargs, data_root=a.data_root, download=a.download, device=a.device,
        num_threads=a.threads, checkpoint_dir=a.checkpoint_dir,
    )
    try:
        _, info = train_or_load(config, force=a.force, progress=not a.no_progress)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(
            f"{config.dataset}/{config.model} seed {config.seed}: test acc {100 * info['test_acc']:.2f}% "
            f"({info['num_params']:,} params, trained {info['train_time_s']:.1f}s"
            f"{', cached' if info['cached'] else ''}) {info['checkpoint']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
