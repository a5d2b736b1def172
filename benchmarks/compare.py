#!/usr/bin/env python
"""At the same compression, does CurvatureImportance keep more accuracy than the built-in criteria?

For every seed a baseline is trained (or reloaded from ``checkpoints/`` by
:func:`engine.training.train_or_load`, the cache ``benchmarks/train.py`` fills), a calibration
batch is drawn from its training set, and every criterion scores the channels of that same
network on that same batch. Then, for every pruning mode and ratio, a fresh copy of the baseline
is pruned by ``tp.pruner.BasePruner`` (one shot, final classifier ignored) with those scores, and
its test accuracy is measured at up to five stages (``--stages``; default all that apply):

``pruned``   right after pruning (the paper's post-training setting: no repair at all);
``bias``     after FLAP's bias compensation (An et al., AAAI 2024), available to every
             criterion: a second copy is pruned identically and every consumer layer whose input
             channels ``J`` were removed gets ``mean(X_J) @ W[:, J]^T`` added to its bias (convs:
             mean over samples and positions times the kernel slice summed over the kernel; the
             bias is created where absent), with ``mean(X_J)`` measured on the *unpruned*
             baseline over the calibration batch (:mod:`engine.peers`). Exact for a channel
             that is constant on that batch, except at the borders of a zero-padded conv (the
             padding contributed zero there but the full kernel sum is added: approximation);
``bn``       after re-estimating BatchNorm statistics on the calibration batch (models with BN);
``bias+bn``  bias compensation first, then BN recalibration (models with BN). For a consumer
             conv followed by BatchNorm the recalibrated mean absorbs the added bias, so there
             ``bias+bn`` equals ``bn``; it differs where a consumer has no BN after it (the
             fully connected layers);
``ft``       after a short fine-tune (``--finetune-epochs`` on ``--finetune-subset`` images),
             starting from the ``bn`` state (the ``pruned`` one without BN).

A criterion's scores depend only on the baseline weights and the calibration batch, so each
criterion scores each seed once (the time of that one computation is ``importance_s``) and the
scores are reused for every mode and ratio (keyed by the root layer's qualified name and the
pruning handler; valid for deep copies of that baseline).

Criteria
--------
``random``           Torch-Pruning's ``RandomImportance`` (seeded per seed).
``l1``, ``l2``       ``GroupMagnitudeImportance(p=1 / 2)`` (group mean, mean-normalised).
``lamp``             ``LAMPImportance`` (p=2).
``fpgm``             ``FPGMImportance`` (optional, not in the default list).
``taylor``           ``GroupTaylorImportance`` after ``loss.backward()`` on the calibration batch
                     (mean cross-entropy, model in eval mode). Torch-Pruning 1.6.1 never scores
                     BatchNorm layers in it (its BN branch tests the GroupNorm handler); kept as is.
``hessian``          ``GroupHessianImportance`` (OBD, diagonal empirical Fisher) with a *fixed*
                     ``accumulate_grad``: Torch-Pruning 1.6.1 tests ``name not in self._accu_grad``
                     but stores by parameter, so every sample overwrites the buffer and only the
                     last sample's squared gradient is used. :class:`FixedHessianImportance`
                     averages the per-sample squared gradients over the whole calibration batch.
``hessian-tp``       Torch-Pruning's original (last sample only), for reference; not default.
``activation``       mean |activation| of the channel where its consumers read it, over the
                     calibration batch and all positions (forward pre-hooks on the consumers).
``wanda``            Wanda-sp (Sun et al., ICLR 2024, structured as in An et al., AAAI 2024):
                     ``||X_c||_2 * sum_i |W[i, c]|`` summed over the channel's consumers (conv
                     consumer: ``|W[i, c]|`` = L1 sum of the kernel slice).
``flap``             FLAP's weighted input-feature variance (An et al., AAAI 2024):
                     ``Var(X_c) * ||W[:, c]||_2^2``, standardised per consumer layer (minus the
                     layer mean, over the layer std) so one global ranking is meaningful.
                     These three are :mod:`engine.peers` importances: scored at the consumers
                     (input-channel deps) of each Torch-Pruning group, out-channel deps
                     contribute nothing; group mean, then ``mean`` normaliser (FLAP: none).
``curvature``        ``CurvatureImportance(variant="paper")``: calibrate + score.
``curvature-flow``   ``CurvatureImportance(variant="flow")``.
``curvature[-flow]-min`` / ``-negsum``: the ``min`` / ``neg_sum`` channel reductions.
``curvature[-flow]-spread``  node values from the activation's spread (std over images and
                     positions, ``node_value="std"``) instead of its mean |a|: a channel that is
                     constant on the data is removable by bias compensation / BN recalibration.
``curvature-element`` channel scores aggregated from element-level (per-weight) curvature, the
                     paper's own granularity (``ElementCurvatureImportance``), on 10 images of
                     the calibration batch (one per class); sequential models only.

Modes: ``uniform`` (local pruning, every group loses ``ratio`` of its channels) and ``global``
(one ranking over all groups; every group keeps at least its best-scored channel so that no
layer is emptied -- Torch-Pruning would otherwise silently skip such a group -- the same rule
for every criterion). In global mode the *channel* ratio is shared but the MACs / parameters
removed depend on where a criterion cuts (LAMP, for instance, mostly cuts cheap fully connected
neurons), so the summary lists the compression each criterion actually reached. In uniform mode
``lamp`` ranks like ``l2`` (its normalisation is monotone within a group).

Outputs in ``results/compare/<dataset>-<model>/`` (or ``--out``): ``rows.csv`` / ``rows.json``
(one row per seed x criterion x mode x ratio; columns ``acc_pruned``, ``acc_bias``, ``acc_bn``,
``acc_bias_bn``, ``acc_ft``), ``summary.md`` (mean +- std over seeds, best mean per column in
bold; paired differences; and a table of every curvature variant against the *best other*
criterion of each mode x stage x ratio cell: wins / ties / losses over seeds, the paired t-test
p-value (``scipy.stats.ttest_rel``, the one the summary relies on) and the Wilcoxon signed-rank
p-value for reference -- at 5 seeds Wilcoxon cannot go below 0.0625), ``accuracy.png`` and
``meta.json`` (arguments, baselines, timings).

``--report-only`` rewrites ``summary.md`` / ``accuracy.png`` from ``rows.json`` + ``meta.json``.
``--add`` runs only ``--criteria`` and adds their rows to the run already in the output folder
(its rows for those criteria are replaced): every option that defines the experiment must equal
the saved run's (checked, the mismatched option is named), and each seed's baseline accuracy
must come out identical (checked: baselines, calibration batches, test sets and the pruning
are deterministic on CPU), so the added criteria are paired with the saved ones seed by seed.

Examples (the CPU-sized Fashion-MNIST runs behind ``results/compare/``; Fashion-MNIST uses 5
seeds, the ``--seeds`` default stays 0 1 2 for digits)::

    python benchmarks/compare.py                       # digits + MLP, 3 seeds
    python benchmarks/compare.py --quick               # smoke run (1 seed, 2 ratios, uniform)
    FM="--dataset fashion-mnist --seeds 0 1 2 3 4 --ratios 0.3 0.5 0.7 --finetune-epochs 1"
    python benchmarks/compare.py $FM --model lenet5 --epochs 3 --modes uniform global \\
        --finetune-subset 5000 --eval-subset 5000 --backend exact --threads 2
    python benchmarks/compare.py $FM --model vgg9 --width 0.25 --epochs 3 --train-subset 20000 \\
        --modes uniform --finetune-subset 5000 --eval-subset 5000 --backend exact --threads 2
    python benchmarks/compare.py $FM --model resnet20 --epochs 2 --train-subset 20000 \\
        --modes uniform --finetune-subset 1000 --eval-subset 2000 --backend exact --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from engine.criteria import CachedImportance, compute_scores, make_criterion, make_pruner
from engine.data import calibration_batch, load_dataset, stratified_subset
from engine.peers import input_means, prune_with_bias_compensation
from engine.stats import format_p, paired_comparison
from engine.training import (TrainConfig, evaluate, finetune, make_loader, recalibrate_bn,
                             set_seed, train_or_load)
from engine.utils import write_csv

DEFAULT_CRITERIA = ("random", "l1", "l2", "lamp", "taylor", "hessian", "activation", "wanda",
                    "flap", "curvature", "curvature-flow")
STAGES = ("pruned", "bias", "bn", "bias+bn", "ft")
STAGE_TITLES = {"pruned": "right after pruning (no repair)",
                "bias": "after FLAP's bias compensation (no other repair)",
                "bn": "after BN recalibration on the calibration batch",
                "bias+bn": "after bias compensation, then BN recalibration",
                "ft": "after a short fine-tune"}


def stage_col(stage: str) -> str:
    """Row column of a stage: ``acc_pruned``, ``acc_bias``, ``acc_bn``, ``acc_bias_bn``, ..."""
    return "acc_" + stage.replace("+", "_")


def acc(row: dict, stage: str) -> float:
    v = row.get(stage_col(stage))
    return float("nan") if v is None else v
MODES = ("uniform", "global")


# ============================================================================================
# helpers
# ============================================================================================
def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def count_ops(model, example_inputs) -> tuple[int, int]:
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if len(a) < 3:
        return float("nan")
    from scipy.stats import spearmanr
    r = spearmanr(a.numpy(), b.numpy()).statistic
    return float(r) if np.isfinite(r) else float("nan")


def mean_group_spearman(sa: dict, sb: dict) -> float:
    vals = [spearman(sa[k], sb[k]) for k in sa
            if sa[k] is not None and sb.get(k) is not None]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def mean_std(vals) -> tuple[float, float, int]:
    v = np.asarray([x for x in vals if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0), int(v.size)


# ============================================================================================
# the experiment
# ============================================================================================
def build_train_config(args, seed: int):
    mk = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if args.width is not None:
        mk["width"] = args.width
    return TrainConfig(
        dataset=args.dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, seed=seed,
        train_subset=args.train_subset, augment=args.augment, model_kwargs=mk,
        data_root=args.data_root, download=args.download, device=args.device,
        checkpoint_dir=args.checkpoint_dir)


def load_data(args):
    """``(train, test, meta)`` of the full dataset, and the fixed evaluation set."""
    train, test, meta = load_dataset(args.dataset, args.data_root, args.download)
    if args.eval_subset is not None and args.eval_subset < len(test):
        test = test.subset(stratified_subset(test.targets.numpy(), args.eval_subset, 0))
    return train, test, meta


def run_seed(args, seed: int, data, rows: list, meta: dict, bar) -> None:
    """Everything for one seed: baseline, calibration batch, scores, pruning sweep."""
    cfg = build_train_config(args, seed)
    bar.set_description(f"seed {seed}: baseline")
    base, info = train_or_load(cfg, progress=args.progress, verbose=False)
    base.eval()
    train_ds, test_ds, _ = data
    # the training subset this seed's baseline saw (as engine.data.load_dataset draws it)
    if cfg.train_subset is not None and cfg.train_subset < len(train_ds):
        train_ds = train_ds.subset(stratified_subset(train_ds.targets.numpy(), cfg.train_subset,
                                                     seed))
    train_ds.augment = bool(cfg.augment)
    dev = torch.device(args.device)
    base_acc = evaluate(base, test_ds, dev)
    meta["n_eval"] = len(test_ds)

    x, y = calibration_batch(train_ds, args.calib_size, seed=seed,
                             per_class=args.calib_per_class,
                             model=base if args.calib_correct else None)
    x, y = x.to(dev), y.to(dev)
    example = x[:1]
    base_macs, base_params = count_ops(base, example)
    bn = has_batchnorm(base)

    ft_ds = None
    if args.finetune_epochs > 0:
        ft_ds = train_ds
        if args.finetune_subset is not None and args.finetune_subset < len(train_ds):
            ft_ds = train_ds.subset(stratified_subset(train_ds.targets.numpy(),
                                                      args.finetune_subset, seed))

    seed_meta = {"seed": seed, "checkpoint": info.get("checkpoint"), "cached": info.get("cached"),
                 "train_time_s": info.get("train_time_s"), "test_acc_full": info.get("test_acc"),
                 "base_acc": base_acc, "base_params": base_params, "base_macs": base_macs,
                 "calib_n": int(len(x)), "importance_s": {}, "spearman_vs_l2": {},
                 "notes": {}}
    meta["seeds"].append(seed_meta)
    tqdm_write(f"seed {seed}: baseline {100 * base_acc:.2f}% on {len(test_ds)} test images "
               f"({'cached' if info.get('cached') else 'trained'} {info.get('checkpoint')}), "
               f"{base_params:,} params, {base_macs:,} MACs, calibration {len(x)} images")

    want = set(args.stages)
    do_bias = bool(want & {"bias", "bias+bn"})
    # FLAP's bias compensation uses the unpruned baseline's mean inputs (one pass per seed)
    means = input_means(base, x) if do_bias else None

    all_scores = {}
    for cname in args.criteria:
        bar.set_description(f"seed {seed}: score {cname}")
        crit = make_criterion(cname, seed, args)
        work = copy.deepcopy(base)
        scores, secs = compute_scores(work, example, crit, x, y)
        del work
        all_scores[cname] = scores
        seed_meta["importance_s"][cname] = secs
        if crit.note:
            seed_meta["notes"][cname] = crit.note
        cached = CachedImportance(scores, cname)

        for mode in args.modes:
            for ratio in args.ratios:
                bar.set_description(f"seed {seed}: {cname} {mode} {ratio:g}")
                m = copy.deepcopy(base).to(dev)
                t0 = time.perf_counter()
                pruner = make_pruner(m, example, cached.bind(m, keep_best=(mode == "global")),
                                     ratio, mode)
                pruner.step()
                prune_s = time.perf_counter() - t0
                macs, params = count_ops(m, example)
                acc_pruned = evaluate(m, test_ds, dev)
                acc_bias = acc_bias_bn = float("nan")
                if do_bias:
                    # the same pruning (cached scores) on a second copy, compensating biases
                    # group by group as the pruner removes input channels
                    mb = copy.deepcopy(base).to(dev)
                    pb = make_pruner(mb, example, cached.bind(mb, keep_best=(mode == "global")),
                                     ratio, mode)
                    prune_with_bias_compensation(mb, pb, means)
                    if _weight_shapes(mb) != _weight_shapes(m):
                        raise RuntimeError(f"{cname}: bias-compensated copy pruned differently")
                    if "bias" in want:
                        acc_bias = evaluate(mb, test_ds, dev)
                    if bn and "bias+bn" in want:
                        recalibrate_bn(mb, x, dev)
                        acc_bias_bn = evaluate(mb, test_ds, dev)
                    del mb, pb
                acc_bn = float("nan")
                if bn and "bn" in want:
                    recalibrate_bn(m, x, dev)
                    acc_bn = evaluate(m, test_ds, dev)
                acc_ft = float("nan")
                if ft_ds is not None and "ft" in want:
                    # the same batches in the same order (and augmentation) for every run
                    set_seed(seed)
                    loader = make_loader(ft_ds, args.batch_size, shuffle=True, seed=seed)
                    finetune(m, loader, epochs=args.finetune_epochs, lr=args.finetune_lr,
                             device=dev)
                    acc_ft = evaluate(m, test_ds, dev)
                rows.append({
                    "dataset": cfg.dataset, "model": cfg.model, "seed": seed,
                    "criterion": cname, "mode": mode, "ratio": ratio,
                    "acc_pruned": acc_pruned, "acc_bias": acc_bias, "acc_bn": acc_bn,
                    "acc_bias_bn": acc_bias_bn, "acc_ft": acc_ft,
                    "params": params, "macs": macs,
                    "params_kept": params / base_params, "macs_kept": macs / base_macs,
                    "importance_s": secs, "prune_s": prune_s, "base_acc": base_acc,
                    "base_params": base_params, "base_macs": base_macs,
                })
                bar.update(1)
                del m, pruner

    if "l2" in all_scores:
        for cname, sc in all_scores.items():
            if cname != "l2":
                seed_meta["spearman_vs_l2"][cname] = mean_group_spearman(sc, all_scores["l2"])


def _weight_shapes(model: nn.Module) -> list:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if n.endswith("weight")]


def warm_up_kernels(args) -> None:
    """Run the curvature solver once on a tiny network (compiles the Numba kernels)."""
    from tp_curvature import CurvatureImportance
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                          nn.Linear(4, 3)).eval()
    imp = CurvatureImportance(alpha=args.alpha, topk=args.topk, backend=args.backend)
    imp.calibrate(model, torch.randn(8, 6, generator=g))
    imp.curvatures()


def tqdm_write(msg: str) -> None:
    from tqdm.auto import tqdm
    tqdm.write(msg)


# ============================================================================================
# reports
# ============================================================================================
FIELDS = ("dataset", "model", "seed", "criterion", "mode", "ratio", "acc_pruned", "acc_bias",
          "acc_bn", "acc_bias_bn", "acc_ft", "params", "macs", "params_kept", "macs_kept", "importance_s", "prune_s",
          "base_acc", "base_params", "base_macs")


def write_rows(rows: list, out: Path) -> None:
    """``rows.csv`` (NaN as an empty cell) and ``rows.json`` (NaN as null)."""
    rows = [{k: (None if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k))
             for k in FIELDS} for r in rows]
    write_csv(out / "rows.csv", rows, FIELDS)   # None is written as an empty cell
    with open(out / "rows.json", "w") as f:
        json.dump(rows, f, indent=1)


def _stages_present(rows) -> list:
    return [s for s in STAGES if any(np.isfinite(acc(r, s)) for r in rows)]


def _fmt(m, s, n, scale=100.0, digits=1):
    if not np.isfinite(m):
        return "-"
    if n > 1:
        return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"
    return f"{scale * m:.{digits}f}"


def _per_seed(rows, c, mode, ratio, stage, seeds) -> list:
    """Accuracy of criterion ``c`` per seed (NaN where missing), aligned with ``seeds``."""
    by_seed = {x["seed"]: acc(x, stage) for x in rows
               if x["criterion"] == c and x["mode"] == mode and x["ratio"] == ratio}
    return [by_seed.get(s, float("nan")) for s in seeds]


def best_other_table(rows, curv, others, modes, stages, ratios, seeds) -> list:
    """Markdown lines: every curvature variant against the best other (non-curvature) criterion
    of each cell (mode x stage x ratio; best = highest mean over seeds), paired by seed."""
    if not curv or not others or len(seeds) < 2:
        return []
    lines = ["## Curvature vs the best other criterion of each cell (paired over seeds)", "",
             "For each mode, stage and ratio the best other criterion is the non-curvature "
             "criterion with the highest mean accuracy in that cell. Difference = curvature - "
             "best other, percentage points, mean ± std over seeds; W/T/L = seeds where "
             "curvature won / tied / lost; p = two-sided paired t-test (`scipy.stats.ttest_rel`, "
             "the test this summary uses); Wilcoxon signed-rank p for reference (with 5 seeds "
             "it cannot go below 0.0625).", "",
             "| curvature | mode | stage | ratio | best other | difference (pp) | W/T/L | "
             "t-test p | Wilcoxon p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in curv:
        for mode in modes:
            for stage in stages:
                for r in ratios:
                    means = {o: np.nanmean(v) for o in others
                             if np.isfinite(v := _per_seed(rows, o, mode, r, stage, seeds)).any()}
                    a = _per_seed(rows, c, mode, r, stage, seeds)
                    if not means or not np.isfinite(a).any():
                        continue
                    best = max(means, key=means.get)
                    st = paired_comparison(a, _per_seed(rows, best, mode, r, stage, seeds))
                    if not st["n"]:
                        continue
                    lines.append(
                        f"| {c} | {mode} | {stage} | {r:g} | {best} | "
                        f"{100 * st['mean']:+.2f} ± {100 * st['std']:.2f} | "
                        f"{st['wins']}/{st['ties']}/{st['losses']} | {format_p(st['p_t'])} | "
                        f"{format_p(st['p_wilcoxon'])} |")
    return lines + [""]


def summary_markdown(rows: list, meta: dict) -> str:
    criteria = list(dict.fromkeys(r["criterion"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    ratios = sorted(set(r["ratio"] for r in rows))
    seeds = sorted(set(r["seed"] for r in rows))
    stages = _stages_present(rows)
    a = meta["args"]
    lines = [f"# Pruning criteria compared: {a['dataset']} / {a['model']}", ""]
    base = [s["base_acc"] for s in meta["seeds"]]
    bm, bs, bn = mean_std(base)
    lines += [
        f"Seeds {seeds} (each: its own baseline, calibration batch and random criterion); "
        f"mean ± std over seeds (sample std, n={len(seeds)}), test accuracy in % on "
        f"{meta.get('n_eval', '?')} test images. Baseline: {_fmt(bm, bs, bn, digits=2)}%. "
        f"Params {meta['seeds'][0]['base_params']:,}, MACs {meta['seeds'][0]['base_macs']:,}.",
        "",
        f"Pruner: `tp.pruner.BasePruner`, one shot, final classifier ignored; ratio = fraction "
        f"of channels removed from every group (`uniform`) or overall (`global`, each group "
        f"keeps at least one channel). Calibration: {meta['seeds'][0]['calib_n']} training "
        f"images per seed, the same for every criterion and used for BN recalibration. "
        f"Fine-tune: {a['finetune_epochs']} epoch(s) on "
        f"{a['finetune_subset'] or 'all'} training images, Adam lr {a['finetune_lr']}.",
        "",
        f"Baseline training: {a['epochs'] or 'default'} epochs, train subset "
        f"{a['train_subset'] or 'all'}, optimizer {a['optimizer']}"
        + (f", width {a['width']}" if a.get("width") is not None else "")
        + (f", model kwargs {a['model_kwargs']}" if a.get("model_kwargs") not in (None, "{}")
           else "") + ".",
        "",
    ]
    for mode in modes:
        for stage in stages:
            lines += [f"## {mode} pruning, accuracy {STAGE_TITLES[stage]}", ""]
            head = "| criterion | " + " | ".join(f"{r:g}" for r in ratios) + " | mean |"
            lines += [head, "|---" * (len(ratios) + 2) + "|"]
            cells = {}
            for c in criteria:
                per_ratio = []
                for r in ratios:
                    v = [acc(x, stage) for x in rows
                         if x["criterion"] == c and x["mode"] == mode and x["ratio"] == r]
                    per_ratio.append(mean_std(v))
                # mean over ratios, per seed, then over seeds
                per_seed = []
                for s in seeds:
                    v = [acc(x, stage) for x in rows if x["criterion"] == c
                         and x["mode"] == mode and x["seed"] == s]
                    v = [t for t in v if t is not None and np.isfinite(t)]
                    if v:
                        per_seed.append(float(np.mean(v)))
                per_ratio.append(mean_std(per_seed))
                cells[c] = per_ratio
            ncol = len(ratios) + 1
            best = []
            for j in range(ncol):
                col = [cells[c][j][0] for c in criteria if np.isfinite(cells[c][j][0])]
                best.append(max(col) if col else None)
            for c in criteria:
                out = []
                for j in range(ncol):
                    m, s, n = cells[c][j]
                    t = _fmt(m, s, n)
                    if best[j] is not None and np.isfinite(m) and m >= best[j] - 1e-12:
                        t = f"**{t}**"
                    out.append(t)
                lines.append(f"| {c} | " + " | ".join(out) + " |")
            lines.append("")
        if mode == "global":
            lines += ["Compression in global mode (it depends on the criterion): MACs / params "
                      "kept, % of the baseline, mean over seeds.", "",
                      "| criterion | " + " | ".join(f"{r:g}" for r in ratios) + " |",
                      "|---" * (len(ratios) + 1) + "|"]
            for c in criteria:
                out = []
                for r in ratios:
                    v = [(x["macs_kept"], x["params_kept"]) for x in rows
                         if x["criterion"] == c and x["mode"] == mode and x["ratio"] == r]
                    out.append(f"{100 * np.mean([t[0] for t in v]):.1f} / "
                               f"{100 * np.mean([t[1] for t in v]):.1f}" if v else "-")
                lines.append(f"| {c} | " + " | ".join(out) + " |")
            lines.append("")
        if mode == "uniform":
            lines += ["Compression in uniform mode (the same for every criterion): "
                      + ", ".join(
                          f"ratio {r:g}: params "
                          f"{100 * np.mean([x['params_kept'] for x in rows if x['mode'] == mode and x['ratio'] == r]):.1f}%"
                          f", MACs "
                          f"{100 * np.mean([x['macs_kept'] for x in rows if x['mode'] == mode and x['ratio'] == r]):.1f}%"
                          for r in ratios) + " of the baseline.", ""]

    # paired differences: curvature criteria minus every other criterion, per seed
    curv = [c for c in criteria if c.startswith("curvature")]
    others = [c for c in criteria if not c.startswith("curvature")]
    if curv and others and len(seeds) > 1:
        lines += ["## Paired differences (percentage points, same seed), curvature minus "
                  "baseline criterion", "",
                  "Mean ± std over seeds of (curvature - other) at each ratio; `w/n` = seeds "
                  "where curvature was strictly better.", ""]
        for mode in modes:
            for stage in stages:
                lines += [f"### {mode}, {stage}", "",
                          "| curvature | vs | " + " | ".join(f"{r:g}" for r in ratios) + " |",
                          "|---" * (len(ratios) + 2) + "|"]
                for c in curv:
                    for o in others:
                        out = []
                        for r in ratios:
                            d = []
                            for s in seeds:
                                a1 = [acc(x, stage) for x in rows if x["criterion"] == c
                                      and x["mode"] == mode and x["ratio"] == r and x["seed"] == s]
                                a2 = [acc(x, stage) for x in rows if x["criterion"] == o
                                      and x["mode"] == mode and x["ratio"] == r and x["seed"] == s]
                                if a1 and a2 and np.isfinite(a1[0]) and np.isfinite(a2[0]):
                                    d.append(a1[0] - a2[0])
                            m, sd, n = mean_std(d)
                            wins = sum(1 for t in d if t > 0)
                            out.append(f"{100 * m:+.1f} ± {100 * sd:.1f} ({wins}/{n})"
                                       if n else "-")
                        lines.append(f"| {c} | {o} | " + " | ".join(out) + " |")
                lines.append("")

    lines += best_other_table(rows, curv, others, modes, stages, ratios, seeds)

    # timings and diagnostics
    lines += ["## Importance computation time (s, per seed: scores computed once and reused "
              "for every mode and ratio)", "",
              "| criterion | time (s) | Spearman with L2 scores (mean over groups) |",
              "|---|---|---|"]
    for c in criteria:
        m, s, n = mean_std([sd["importance_s"].get(c) for sd in meta["seeds"]])
        rho = mean_std([sd["spearman_vs_l2"].get(c) for sd in meta["seeds"]])
        rt = f"{rho[0]:+.2f}" + (f" ± {rho[1]:.2f}" if rho[2] > 1 else "") if rho[2] else "-"
        lines.append(f"| {c} | {_fmt(m, s, n, scale=1.0, digits=2)} | {rt} |")
    lines.append("")
    notes = {}
    for sd in meta["seeds"]:
        notes.update(sd["notes"])
    if notes:
        lines += ["Notes:", ""] + [f"- `{c}`: {t}" for c, t in notes.items()] + [""]
    lines += [f"Total wall time {meta.get('wall_s', 0):.0f} s on {meta['platform']} "
              f"({meta['threads']} torch threads)."]
    return "\n".join(lines) + "\n"


def plot(rows: list, out_png: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    criteria = list(dict.fromkeys(r["criterion"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    ratios = sorted(set(r["ratio"] for r in rows))
    stages = _stages_present(rows)
    base_m = float(np.mean(list({r["seed"]: r["base_acc"] for r in rows}.values())))
    fig, axes = plt.subplots(len(modes), len(stages), squeeze=False,
                             figsize=(4.2 * len(stages), 3.4 * len(modes)), sharey=True)
    cmap = plt.get_cmap("tab10")
    for i, mode in enumerate(modes):
        for j, stage in enumerate(stages):
            ax = axes[i][j]
            for k, c in enumerate(criteria):
                ms = [mean_std([acc(x, stage) for x in rows if x["criterion"] == c
                                and x["mode"] == mode and x["ratio"] == r]) for r in ratios]
                m = np.array([t[0] for t in ms]) * 100
                s = np.array([t[1] for t in ms]) * 100
                style = "-" if c.startswith("curvature") else "--"
                lw = 2.2 if c.startswith("curvature") else 1.3
                ax.errorbar(ratios, m, yerr=s, label=c, marker="o", ms=3.5, capsize=3,
                            linestyle=style, lw=lw, color=cmap(k % 10))
            ax.axhline(100 * base_m, color="k", lw=0.8, ls=":", label="baseline")
            ax.set_title(f"{mode}: {stage}", fontsize=10)
            ax.set_xlabel("pruning ratio")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right", frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


# ============================================================================================
# CLI
# ============================================================================================
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    g = p.add_argument_group("baseline (the same options as benchmarks/train.py; cached)")
    g.add_argument("--dataset", default="digits",
                   help="digits (default, offline), fashion-mnist, mnist, cifar10, cifar100")
    g.add_argument("--model", default="mlp",
                   help="mlp, lenet5, paper_lenet, vgg9, resnet20, resnet56 or timm:<name>")
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
    g = p.add_argument_group("comparison")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    g.add_argument("--criteria", nargs="+", default=list(DEFAULT_CRITERIA),
                   help=f"default: {' '.join(DEFAULT_CRITERIA)}; also fpgm, hessian-tp, "
                        "curvature[-flow][-spread][-min|-negsum], curvature-element "
                        "(activation, wanda, flap: the calibration-data peers of "
                        "engine/peers.py)")
    g.add_argument("--ratios", type=float, nargs="+", default=None, help="default: 0.3 0.5 0.7")
    g.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="default: uniform global")
    g.add_argument("--calib-size", type=int, default=256,
                   help="calibration images (per class with --calib-per-class)")
    g.add_argument("--calib-per-class", action="store_true")
    g.add_argument("--calib-correct", action="store_true",
                   help="only correctly classified images (as in the curvature paper)")
    g.add_argument("--eval-subset", type=int, default=None,
                   help="evaluate on a fixed stratified subset of the test set")
    g.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="stages to evaluate (default: all; bn and bias+bn only on models with "
                        "BatchNorm, ft only with --finetune-epochs > 0; pruned always)")
    g.add_argument("--finetune-epochs", type=int, default=1, help="0: no fine-tune stage")
    g.add_argument("--finetune-subset", type=int, default=None,
                   help="fine-tune on this many training images (stratified, per seed)")
    g.add_argument("--finetune-lr", type=float, default=1e-3)
    g = p.add_argument_group("curvature")
    g.add_argument("--alpha", type=float, default=0.5)
    g.add_argument("--topk", type=int, default=32, help="0: full measures")
    g.add_argument("--backend", default="sinkhorn", choices=["sinkhorn", "exact", "pot-sinkhorn"])
    g.add_argument("--backend-options", default=None, help='JSON, e.g. \'{"eps": 0.02}\'')
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
    a = p.parse_args(argv)
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
    a.ratios = a.ratios if a.ratios is not None else [0.3, 0.5, 0.7]
    a.modes = a.modes if a.modes is not None else list(MODES)
    if any(not 0.0 < r < 1.0 for r in a.ratios):
        p.error("--ratios must lie in (0, 1)")
    if a.topk == 0:
        a.topk = None
    return a


def write_reports(rows: list, meta: dict, out: Path, no_plot: bool = False) -> str:
    md = summary_markdown(rows, meta)
    (out / "summary.md").write_text(md)
    if not no_plot:
        a = meta["args"]
        plot(rows, out / "accuracy.png", f"{a['dataset']} / {a['model']}: accuracy vs pruning "
             f"ratio (mean ± std over {len(meta['seeds'])} seed(s))")
    return md


def report_only(out: Path, no_plot: bool = False) -> int:
    try:
        rows = json.loads((out / "rows.json").read_text())
        meta = json.loads((out / "meta.json").read_text())
    except FileNotFoundError as e:
        print(f"error: --report-only needs rows.json and meta.json in {out}: {e}", file=sys.stderr)
        return 1
    for r in rows:
        for k, v in r.items():
            if v is None:
                r[k] = float("nan")
    write_reports(rows, meta, out, no_plot)
    print(f"rewrote {out}/summary.md" + ("" if no_plot else " and accuracy.png"))
    return 0


#: options that define an experiment: ``--add`` requires them equal to the saved run's
EXPERIMENT_OPTIONS = ("dataset", "model", "epochs", "batch_size", "optimizer", "lr",
                      "weight_decay", "train_subset", "augment", "width", "model_kwargs", "seeds",
                      "ratios", "modes", "calib_size", "calib_per_class", "calib_correct",
                      "eval_subset", "stages", "finetune_epochs", "finetune_subset",
                      "finetune_lr")


def load_for_add(out: Path, a) -> tuple:
    """``(rows, meta)`` of the saved run that ``--add`` extends; raises ``SystemExit`` naming
    the first option that differs."""
    try:
        rows = json.loads((out / "rows.json").read_text())
        meta = json.loads((out / "meta.json").read_text())
    except FileNotFoundError as e:
        raise SystemExit(f"error: --add needs rows.json and meta.json in {out}: {e}")
    now = vars(a)
    for k in EXPERIMENT_OPTIONS:
        if k in meta["args"] and json.dumps(meta["args"][k]) != json.dumps(now.get(k)):
            raise SystemExit(f"error: --add: option {k!r} is {now.get(k)!r} here but "
                             f"{meta['args'][k]!r} in the saved run {out}")
    return rows, meta


def merge_added(old_rows, old_meta, rows, meta, a) -> tuple:
    """The saved run with the new criteria's rows (replacing any saved rows of them)."""
    for old, new in zip(old_meta["seeds"], meta["seeds"]):
        if old["seed"] != new["seed"] or abs(old["base_acc"] - new["base_acc"]) > 0:
            raise SystemExit(f"error: --add: seed {new['seed']}'s baseline accuracy "
                             f"{new['base_acc']} differs from the saved {old['base_acc']}: "
                             "the runs would not be paired")
        for key in ("importance_s", "spearman_vs_l2", "notes"):
            old.setdefault(key, {}).update(new.get(key, {}))
    added = set(a.criteria)
    kept = [{k: (float("nan") if v is None else v) for k, v in r.items()}
            for r in old_rows if r["criterion"] not in added]
    merged = kept + rows
    crit = [c for c in old_meta["args"]["criteria"] if c not in added] + list(a.criteria)
    old_meta["args"]["criteria"] = crit
    old_meta.setdefault("added", []).append({"argv": meta["argv"], "wall_s": meta["wall_s"]})
    return merged, old_meta


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from tqdm.auto import tqdm

    slug = f"{a.dataset.lower()}-{a.model.replace(':', '_').replace('/', '_')}"
    out = Path(a.out) if a.out else Path("results") / "compare" / slug
    if a.report_only:
        return report_only(out, a.no_plot)
    out.mkdir(parents=True, exist_ok=True)
    saved = load_for_add(out, a) if a.add else None
    # fail early on a bad criterion name
    for c in a.criteria:
        make_criterion(c, 0, a)
    meta = {"args": vars(a), "argv": sys.argv if argv is None else ["compare.py", *argv],
            "seeds": [], "torch": torch.__version__, "torch_pruning": tp.__version__,
            "platform": f"{platform.machine()} {platform.processor() or platform.system()}",
            "threads": torch.get_num_threads()}
    rows: list = []
    total = len(a.seeds) * len(a.criteria) * len(a.modes) * len(a.ratios)
    t0 = time.perf_counter()
    if a.backend == "sinkhorn" and any(c.startswith("curvature") for c in a.criteria):
        warm_up_kernels(a)   # Numba's one-time compilation is not charged to the first seed
    try:
        data = load_data(a)
    except (FileNotFoundError, RuntimeError) as e:   # missing files / failed download
        print(f"error: {e}", file=sys.stderr)
        return 1
    with tqdm(total=total, desc="compare", unit="run", dynamic_ncols=True) as bar:
        for seed in a.seeds:
            run_seed(a, seed, data, rows, meta, bar)
    meta["wall_s"] = time.perf_counter() - t0
    if saved is not None:
        rows, meta = merge_added(*saved, rows, meta, a)
    write_rows(rows, out)
    with open(out / "meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=str)
    md = write_reports(rows, meta, out, a.no_plot)
    print(md)
    print(f"wrote {out}/rows.csv, rows.json, summary.md, meta.json"
          + ("" if a.no_plot else ", accuracy.png") + f" in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
