#!/usr/bin/env python
"""How much ridge, and independent or sequential? The sweep behind the repair's defaults.

For each seed of one ``compare.py`` experiment (same options, same cached baselines and
calibration batches), each criterion scores the baseline once; then for each ratio the
baseline is pruned (uniform, one shot) and repaired by ``tp_curvature.LeastSquaresRepair``
with every ``--ridges`` value, independent and (``--sequential``) sequential, and evaluated
after the repair and after BN recalibration (models with BN). Writes ``sweep.csv`` and
``sweep.md`` (mean ± std over seeds) to ``--out``.

Example (the sweep quoted in docs/repair.md)::

    python benchmarks/repair_sweep.py --dataset fashion-mnist --model vgg9 --width 0.25 \\
        --epochs 5 --eval-subset 2000 --seeds 0 1 --ratios 0.3 0.5 --criteria l2 wanda \\
        --ridges 0 1e-6 1e-4 1e-3 1e-2 1e-1 --sequential --out results/repair_sweep/vgg9
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

import compare
from engine.criteria import CachedImportance
from engine.experiment import PruneRun, load_data, prepare_seed, score_criterion
from engine.report import mean_std
from engine.training import evaluate, recalibrate_bn
from engine.utils import write_csv
from tp_curvature import LeastSquaresRepair

FIELDS = ("seed", "criterion", "ratio", "ridge", "sequential", "acc_pruned", "acc_lsq",
          "acc_lsq_bn", "repair_s", "base_acc")


def parse(argv=None):
    own = {"--ridges": None, "--sequential": False}
    rest, i = [], 0
    argv = list(sys.argv[1:] if argv is None else argv)
    while i < len(argv):
        if argv[i] == "--ridges":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            own["--ridges"] = [float(v) for v in argv[i + 1:j]]
            i = j
        elif argv[i] == "--sequential":
            own["--sequential"] = True
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    args = compare.parse_args(rest)
    args.ridges = own["--ridges"] or [0.0, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1]
    args.sequential_too = own["--sequential"]
    return args


def run(args) -> list:
    data = load_data(args)
    rows = []
    for seed in args.seeds:
        sd = prepare_seed(args, seed, data)
        stats = LeastSquaresRepair(sequential=False).calibrate(sd.base, sd.x)   # shared moments
        for name in args.criteria:
            scores, _, _ = score_criterion(sd, name)
            cached = CachedImportance(scores, name)
            for ratio in args.ratios:
                pruned = PruneRun(sd, name, cached, "uniform", ratio).prune()
                acc_pruned = evaluate(pruned, sd.test, sd.device)
                for seq in ([False, True] if args.sequential_too else [False]):
                    for ridge in args.ridges:
                        stats.ridge, stats.sequential = ridge, seq
                        t0 = time.perf_counter()
                        m = PruneRun(sd, name, cached, "uniform", ratio).prune(repair=stats)
                        secs = time.perf_counter() - t0
                        acc = evaluate(m, sd.test, sd.device)
                        acc_bn = float("nan")
                        if sd.has_bn:
                            acc_bn = evaluate(recalibrate_bn(m, sd.x, sd.device), sd.test,
                                              sd.device)
                        rows.append(dict(seed=seed, criterion=name, ratio=ratio, ridge=ridge,
                                         sequential=seq, acc_pruned=acc_pruned, acc_lsq=acc,
                                         acc_lsq_bn=acc_bn, repair_s=secs,
                                         base_acc=sd.base_acc))
                        print(f"seed {seed} {name} {ratio:g} ridge {ridge:g} seq {seq}: "
                              f"pruned {100 * acc_pruned:.1f} lsq {100 * acc:.1f} "
                              f"lsq+bn {100 * acc_bn:.1f} ({secs:.1f} s)", flush=True)
    return rows


def markdown(rows: list, args) -> str:
    lines = [f"# Repair sweep: {args.dataset} / {args.model}", "",
             f"Command: `python benchmarks/repair_sweep.py {' '.join(sys.argv[1:])}`", "",
             "Test accuracy (%), mean ± std over seeds; uniform pruning, one shot.", "",
             "| criterion | ratio | refit | ridge | pruned | lsq | lsq+bn |", "|---" * 7 + "|"]
    keys = sorted({(r["criterion"], r["ratio"], r["sequential"], r["ridge"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], k[3]))
    for c, ratio, seq, ridge in keys:
        sel = [r for r in rows if (r["criterion"], r["ratio"], r["sequential"], r["ridge"])
               == (c, ratio, seq, ridge)]
        cells = []
        for col in ("acc_pruned", "acc_lsq", "acc_lsq_bn"):
            m, s, n = mean_std([r[col] for r in sel])
            cells.append("-" if not np.isfinite(m) else f"{100 * m:.1f} ± {100 * s:.1f}")
        lines.append(f"| {c} | {ratio:g} | {'sequential' if seq else 'independent'} | "
                     f"{ridge:g} | " + " | ".join(cells) + " |")
    base = mean_std(list({r["seed"]: r["base_acc"] for r in rows}.values()))
    lines += ["", f"Baseline: {100 * base[0]:.1f} ± {100 * base[1]:.1f}%."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"results/repair_sweep/{args.dataset}-{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    write_csv(out / "sweep.csv", rows, FIELDS)
    md = markdown(rows, args)
    (out / "sweep.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
