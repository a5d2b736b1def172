#!/usr/bin/env python
"""Condense several ``benchmarks/compare.py`` runs into the README's comparison tables.

Reads ``rows.json`` and ``meta.json`` of each run directory and writes one Markdown file:

* the baselines (test accuracy on the full test set, mean ± std over seeds; epochs; training
  time per seed);
* per model, every criterion's accuracy at each stage, averaged over the pruning ratios
  (mean ± std over seeds of the per-seed average), best mean in bold;
* the mean rank of every criterion over all (model, stage, ratio) cells, per stage group
  (right after pruning; after a repair: ``bias``, ``bn``, ``bias+bn``; after fine-tuning), over
  the criteria present in every run;
* the verdict table: for each model, mode, repair stage and ratio, the best curvature
  variant (highest mean in that cell) against the best other criterion (highest mean among the
  non-curvature criteria), paired over seeds: difference, wins / ties / losses and the paired
  t-test's p-value (:func:`engine.stats.paired_comparison`), whether the cell is *usable*
  (some criterion within 10 points of the baseline), and the verdict counted over the usable
  cells only. Picking the best of several curvature variants per cell favours curvature;
  ``--variant`` gives the table of one fixed criterion;
* with ``--plot``, accuracy against ratio for every model by stage (one PNG per mode).

The tables are built by :func:`engine.report.condensed_report` (shared with the per-run
reports); this script is its command line.

Usage::

    python benchmarks/compare_report.py results/compare/fashion-mnist-{mlp,lenet5,vgg9,resnet20} \\
        --out results/compare/report.md
"""
from __future__ import annotations

import argparse
from pathlib import Path

from engine.report import condensed_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="compare.py output directories")
    p.add_argument("--variant", action="append", default=[],
                   help="also a goal table for this one curvature criterion (repeatable)")
    p.add_argument("--stages", nargs="+", default=None,
                   help="the repair stages of the goal tables (default: every repair stage)")
    p.add_argument("--plot", default=None,
                   help="also write accuracy-by-stage plots, <stem>-<mode>.png beside this path")
    p.add_argument("--out", default=None, help="write the Markdown here (default: stdout)")
    a = p.parse_args(argv)
    text = condensed_report(a.runs, a.variant, a.stages, a.plot)
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
