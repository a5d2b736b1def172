"""How much of curvature is just magnitude? Spearman(kappa, |w|) on trained models.

For every weight layer of a trained baseline, the rank correlation between each connection's
curvature and its strength ``|w|`` (kernel-slice norm with BN folded in, the same strength the
graph uses): close to -1 means the criterion is magnitude pruning in disguise (strong
connections are short, and short connections are negatively curved). Reported for each
library preset of ``--presets`` (default: the paper's definition ``CurvatureConfig.paper()`` and
the library default ``CurvatureConfig()``, each with the overrides ``--alpha``, ``--topk``,
``--backend``; every row records the preset call and ``describe()`` of what ran), with the
channel-level score correlation as well (Spearman between the curvature channel score and the
L2 norm of the channel's weights).

Usage::

    python benchmarks/correlation.py                      # digits MLP + LeNet-5
    python benchmarks/correlation.py --dataset fashion-mnist --models mlp lenet5 vgg9 resnet20
    # the README's table used alpha 0.5 and topk 32 (its flow rows also node_value="mean_abs",
    # which no preset has: its "default" rows are the spread, node_value="std")
    python benchmarks/correlation.py --dataset fashion-mnist --models mlp lenet5 --epochs 3 \
        --alpha 0.5 --topk 32

Writes ``results/correlation.csv``, ``results/correlation.md`` and ``results/correlation.png``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from engine.data import calibration_batch, load_dataset
from engine.presets import add_curvature_arguments, config_from_args, recipe
from engine.training import TrainConfig, train_or_load
from engine.utils import write_csv
from tp_curvature import CurvatureImportance

MODEL_KW = {"vgg9": {"width": 0.5}}


def layer_rows(imp: CurvatureImportance, label: str, preset: str) -> list:
    rows = []
    graph = imp.graph
    curv = imp.curvatures()
    scores = imp.channel_scores()
    for layer in graph.layers:
        if layer.name not in curv:
            continue
        lc = curv[layer.name]
        m = lc.solved
        if m.sum() < 10:
            continue
        strength = 1.0 / lc.length[m]
        rho = spearmanr(lc.kappa[m], strength).statistic
        w = layer.module.weight.detach().flatten(1).norm(dim=1).numpy()
        _, out_scores = scores[layer.name]
        rho_ch = (spearmanr(out_scores, w).statistic if out_scores.size > 3 else np.nan)
        rows.append(dict(model=label, layer=layer.name, preset=preset,
                         variant=imp.config.variant,
                         connections=int(m.sum()), spearman_kappa_w=float(rho),
                         spearman_channel_score_l2=float(rho_ch),
                         kappa_mean=float(np.mean(lc.kappa[m])),
                         kappa_min=float(np.min(lc.kappa[m])),
                         kappa_max=float(np.max(lc.kappa[m]))))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet5"])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--presets", nargs="+", choices=["paper", "default"],
                    default=["paper", "default"],
                    help="library presets compared (paper = CurvatureConfig.paper(), default = "
                         "CurvatureConfig(); default: %(default)s)")
    add_curvature_arguments(ap.add_argument_group("curvature overrides (every preset)"),
                            preset=None)
    ap.add_argument("--out", default="results/correlation")
    args = ap.parse_args(argv)
    recipes = {p: recipe(args, p) for p in args.presets}

    train, _, _ = load_dataset(args.dataset)
    x, _ = calibration_batch(train, args.calib, seed=0)
    rows = []
    for name in args.models:
        cfg = TrainConfig(dataset=args.dataset, model=name, epochs=args.epochs,
                          train_subset=args.train_subset, model_kwargs=MODEL_KW.get(name, {}))
        model, info = train_or_load(cfg, progress=False, verbose=False)
        model.eval()
        for preset in args.presets:
            t0 = time.perf_counter()
            imp = CurvatureImportance(config_from_args(args, preset))
            imp.calibrate(model, x)
            r = layer_rows(imp, f"{name} ({100 * info['test_acc']:.1f}%)", preset)
            for row in r:
                row["seconds"] = time.perf_counter() - t0
                row["curvature"] = recipes[preset]
            rows.extend(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out.with_suffix(".csv"), rows)
    lines = [f"Spearman rank correlation on trained {args.dataset} baselines "
             f"({args.calib} calibration images). Presets:", ""]
    lines += [f"- `{p}`: {how}" for p, how in recipes.items()]
    lines += ["", "| model | layer | preset | connections | rho(kappa, abs w) | "
              "rho(channel score, L2 norm) | kappa min / mean / max |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['preset']} | {r['connections']} | "
                     f"{r['spearman_kappa_w']:.3f} | {r['spearman_channel_score_l2']:.3f} | "
                     f"{r['kappa_min']:.2f} / {r['kappa_mean']:.2f} / {r['kappa_max']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for preset, marker in zip(args.presets, "os^v"):
        rs = [r for r in rows if r["preset"] == preset]
        ax.plot(range(len(rs)), [r["spearman_kappa_w"] for r in rs], marker, label=preset)
    labels = [f"{r['model'].split()[0]}:{r['layer']}" for r in rows
              if r["preset"] == args.presets[0]]
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.axhline(-1, color="grey", lw=0.5)
    ax.set_ylabel("Spearman(kappa, |w|)")
    ax.set_title("Curvature vs connection strength per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
