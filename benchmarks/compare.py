#!/usr/bin/env python
"""At the same compression, does CurvatureImportance keep more accuracy than the built-in criteria?

The command line of the comparison. For every seed a baseline is trained (or reloaded from the
cache ``benchmarks/train.py`` fills), every criterion scores its channels once on one
calibration batch, and fresh copies are pruned at every mode and ratio and evaluated at every
stage (listed below). The experiment is :mod:`engine.experiment`, the reports
:mod:`engine.report`, saving / merging runs :mod:`engine.runs`; the criteria and models are
those of the registries :data:`engine.criteria.CRITERIA` and :data:`engine.models.MODELS`.

Modes: ``uniform`` (every group loses ``ratio`` of its channels) and ``global`` (one ranking
over all groups, each group keeps its best channel). In global mode the MACs / parameters
removed depend on where a criterion cuts (LAMP mostly cuts cheap fully connected neurons), so
the summary lists the compression each criterion reached; in uniform mode ``lamp`` ranks like
``l2``.

Curvature criteria start from a library preset (``curvature`` = ``CurvatureConfig()``,
``curvature-paper`` = ``CurvatureConfig.paper()``, modifiers below); ``--alpha``, ``--topk``,
``--backend`` and ``--backend-options`` override every curvature criterion when given (default:
the preset's). Each criterion's note in meta.json / summary.md says what it ran
(``CurvatureConfig.paper(alpha=0.5, topk=32) = CurvatureConfig(...)``).

Outputs in ``results/compare/<dataset>-<model>/`` (or ``--out``): ``rows.csv`` / ``rows.json``
(one row per seed x criterion x mode x ratio; one ``acc_<stage>`` column per stage, ``+`` as
``_``), ``summary.md`` (mean +- std over seeds, best mean per column in bold; paired
differences; every curvature variant against the best other criterion of each cell, paired
t-test), ``accuracy.png`` and ``meta.json`` (arguments, baselines, timings, notes).
``--report-only`` rewrites ``summary.md`` / ``accuracy.png`` from ``rows.json`` + ``meta.json``;
``--add`` runs only ``--criteria`` and adds them to the saved run (same experiment options and
baselines, checked).

Examples (``results/compare/`` comes from the Fashion-MNIST commands; ``--seeds`` defaults to
0 1 2)::

    python benchmarks/compare.py                       # digits + MLP, 3 seeds
    python benchmarks/compare.py --quick               # smoke run (1 seed, 2 ratios, uniform)
    C="random l1 l2 taylor hessian activation wanda flap curvature-paper curvature \\
       curvature-consumer"
    FM="--dataset fashion-mnist --modes uniform global --finetune-epochs 0 --threads 1"
    python benchmarks/compare.py $FM --seeds 0 1 2 3 4 --criteria $C --model mlp --epochs 30 \\
        --eval-subset 5000 --stages pruned bias bias+bn lsq lsq+bn
    python benchmarks/compare.py $FM --seeds 0 1 2 3 4 --criteria $C --model lenet5 --epochs 15 \\
        --eval-subset 5000 --stages pruned bias bias+bn lsq lsq+bn
    C8="random l2 taylor activation wanda flap curvature-paper curvature"
    python benchmarks/compare.py $FM --seeds 0 1 2 --criteria $C8 --model vgg9 --width 0.25 \\
        --epochs 5 --eval-subset 2000 --stages pruned bias+bn lsq lsq+bn
    python benchmarks/compare.py $FM --seeds 0 1 2 --criteria $C8 --model resnet20 --epochs 3 \\
        --eval-subset 2000 --stages pruned bias+bn lsq lsq+bn
    # the paper's definition as the first release ran it (then named "curvature")
    python benchmarks/compare.py --criteria l2 curvature-paper --alpha 0.5 --topk 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.criteria import CRITERIA, make_criterion
from engine.experiment import DEFAULT_CRITERIA, MODES, STAGES, load_data, run_comparison
from engine.models import MODELS
from engine.presets import add_repair_arguments, parse_comparison_args
from engine.report import write_reports
from engine.runs import load_for_add, merge_added, report_only, save_run


def epilog() -> str:
    """The docstring's body, then the registered stages, criteria and models."""
    stages = "\n".join(f"  {n:<18}  {st.title}" for n, st in STAGES.items())
    return (__doc__.split("\n", 1)[1] + "\nstages (engine.experiment.STAGES):\n" + stages
            + "\n\ncriteria (engine.criteria.CRITERIA):\n" + CRITERIA.help()
            + "\n\nmodels (engine.models.MODELS):\n" + MODELS.help())


def _baseline_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("baseline (the same options as benchmarks/train.py; cached)")
    g.add_argument("--dataset", default="digits",
                   help="digits (default, offline), fashion-mnist, mnist, cifar10, cifar100")
    g.add_argument("--model", default="mlp", help="a model listed below (default: mlp)")
    g.add_argument("--epochs", type=int, default=None, help="default: 30 for digits, else 5")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--train-subset", type=int, default=None, help="cap the training set")
    g.add_argument("--augment", action="store_true")
    g.add_argument("--width", type=float, default=None, help="vgg9 width multiplier")
    g.add_argument("--model-kwargs", default="{}", help="JSON for build_model")
    g.add_argument("--data-root", default=None)
    g.add_argument("--download", action="store_true")
    g.add_argument("--checkpoint-dir", default="checkpoints")


def _comparison_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("comparison")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    g.add_argument("--criteria", nargs="+", default=list(DEFAULT_CRITERIA),
                   help=f"criteria listed below (default: {' '.join(DEFAULT_CRITERIA)})")
    g.add_argument("--ratios", type=float, nargs="+", default=None,
                   help="default: 0.1 0.2 0.3 0.4 0.5 (where repaired models stay usable)")
    g.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="default: uniform global")
    g.add_argument("--calib-size", type=int, default=256,
                   help="calibration images (per class with --calib-per-class)")
    g.add_argument("--calib-per-class", action="store_true")
    g.add_argument("--calib-correct", action="store_true",
                   help="only correctly classified images (as in the curvature paper)")
    g.add_argument("--eval-subset", type=int, default=None,
                   help="evaluate on a fixed stratified subset of the test set")
    g.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES),
                   help="stages to evaluate (default: all; bn and bias+bn only on models with "
                        "BatchNorm, ft only with --finetune-epochs > 0; pruned always)")
    g.add_argument("--finetune-epochs", type=int, default=1, help="0: no fine-tune stage")
    g.add_argument("--finetune-subset", type=int, default=None,
                   help="fine-tune on this many training images (stratified, per seed)")
    g.add_argument("--finetune-lr", type=float, default=1e-3)
    add_repair_arguments(g, "the lsq stages")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="default: results/compare/<dataset>-<model>")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    g.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, ratios 0.3 0.6, uniform only, small fine-tune")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--report-only", action="store_true",
                   help="rewrite summary.md / accuracy.png from the rows.json and meta.json "
                        "already in the output folder (no computation)")
    g.add_argument("--add", action="store_true",
                   help="run only --criteria and add them to the run saved in the output "
                        "folder (same experiment options, checked)")
    g.add_argument("--progress", action="store_true", help="also show training progress bars")


def _apply_defaults(a: argparse.Namespace) -> None:
    """``--quick``'s smoke settings, then the defaults that depend on the dataset."""
    if a.quick:
        a.seeds = a.seeds or [0]
        a.ratios = a.ratios or [0.3, 0.6]
        a.modes = a.modes or ["uniform"]
        a.finetune_subset = a.finetune_subset or 1000
        a.eval_subset = a.eval_subset or 2000
        if a.epochs is None and a.dataset != "digits":
            a.epochs = 1
        if a.train_subset is None and a.dataset != "digits":
            a.train_subset = 10000
    a.seeds = a.seeds if a.seeds is not None else [0, 1, 2]
    a.ratios = a.ratios if a.ratios is not None else [0.1, 0.2, 0.3, 0.4, 0.5]
    a.modes = a.modes if a.modes is not None else list(MODES)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog())
    sections = (_baseline_arguments, _comparison_arguments, _run_arguments)
    return parse_comparison_args(p, sections, _apply_defaults, argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    slug = f"{a.dataset.lower()}-{a.model.replace(':', '_').replace('/', '_')}"
    out = Path(a.out) if a.out else Path("results") / "compare" / slug
    if a.report_only:
        return report_only(out, a.no_plot)
    out.mkdir(parents=True, exist_ok=True)
    # fail early on a bad criterion name or option
    notes = {c: make_criterion(c, 0, a).note for c in a.criteria}
    saved = load_for_add(out, a, notes) if a.add else None
    try:
        data = load_data(a)
    except (FileNotFoundError, RuntimeError) as e:   # missing files / failed download
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows, meta = run_comparison(a, data, argv)
    if saved is not None:
        rows, meta = merge_added(*saved, rows, meta, a)
    save_run(rows, meta, out)
    md = write_reports(rows, meta, out, a.no_plot)
    print(md)
    print(f"wrote {out}/rows.csv, rows.json, summary.md, meta.json"
          + ("" if a.no_plot else ", accuracy.png") + f" in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
