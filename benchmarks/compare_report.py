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
* the goal table of issue 11: for each model, repair stage and ratio, the best curvature
  variant (highest mean in that cell) against the best other criterion (highest mean among the
  non-curvature criteria), paired over seeds: difference, wins / ties / losses and the paired
  t-test's p-value (:func:`engine.stats.paired_comparison`). Picking the best of several
  curvature variants per cell favours curvature; the per-variant tables in each run's
  ``summary.md`` do not.

Usage::

    python benchmarks/compare_report.py results/compare/fashion-mnist-{mlp,lenet5,vgg9,resnet20} \\
        --out results/compare/report.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from compare import STAGES
from compare import stage_col as col
from engine.stats import format_p, paired_comparison


def load(run: Path):
    """``(rows, meta)`` of a run; ``meta["label"]``: the run folder's name without its
    dataset prefix (``vgg9``, ``vgg9-low``), so two runs of one model stay apart."""
    rows = json.loads((run / "rows.json").read_text())
    meta = json.loads((run / "meta.json").read_text())
    prefix = f"{meta['args']['dataset'].lower()}-"
    meta["label"] = run.name[len(prefix):] if run.name.startswith(prefix) else run.name
    return rows, meta


def per_seed(rows, criterion, stage, ratio=None, mode="uniform") -> dict:
    """seed -> accuracy (%) of ``criterion`` at ``stage`` (averaged over ratios if None)."""
    acc: dict = {}
    for r in rows:
        if r["criterion"] != criterion or r["mode"] != mode:
            continue
        if ratio is not None and abs(r["ratio"] - ratio) > 1e-9:
            continue
        v = r.get(col(stage))
        if v is None:
            continue
        acc.setdefault(r["seed"], []).append(100.0 * v)
    return {s: float(np.mean(v)) for s, v in acc.items()}


def present_stages(rows):
    return [s for s in STAGES if any(r.get(col(s)) is not None for r in rows)]


def fmt(m, s):
    return f"{m:.1f} ± {s:.1f}"


def baseline_line(meta) -> str:
    a = meta["args"]
    acc = [100 * s["test_acc_full"] for s in meta["seeds"] if s.get("test_acc_full") is not None]
    t = [s["train_time_s"] for s in meta["seeds"] if s.get("train_time_s") is not None]
    width = f", width {a['width']}" if a.get("width") else ""
    sub = f", {a['train_subset']} training images" if a.get("train_subset") else \
        ", full training set"
    return (f"| {meta['label']}{width} | {a['epochs']}{sub} | {fmt(np.mean(acc), np.std(acc, ddof=1))} "
            f"| {np.mean(t):.0f} s |")


def stage_table(rows, meta) -> list:
    crits = list(dict.fromkeys(r["criterion"] for r in rows))
    stages = present_stages(rows)
    ratios = sorted({r["ratio"] for r in rows})
    cells = {}
    for c in crits:
        for st in stages:
            v = list(per_seed(rows, c, st).values())
            cells[c, st] = (np.mean(v), np.std(v, ddof=1) if len(v) > 1 else 0.0)
    best = {st: max(cells[c, st][0] for c in crits) for st in stages}
    out = [f"**{meta['label']}**: accuracy (%) averaged over ratios "
           f"{' / '.join(f'{r:g}' for r in ratios)}, mean ± std over {len(meta['seeds'])} seeds",
           "", "| criterion | " + " | ".join(stages) + " |",
           "|---|" + "---|" * len(stages)]
    for c in crits:
        vals = []
        for st in stages:
            m, s = cells[c, st]
            txt = fmt(m, s)
            vals.append(f"**{txt}**" if abs(m - best[st]) < 1e-9 else txt)
        out.append(f"| {c} | " + " | ".join(vals) + " |")
    return out + [""]


def goal_rows(rows, meta, stages, variant=None) -> list:
    crits = list(dict.fromkeys(r["criterion"] for r in rows))
    curv = [c for c in crits if c.startswith("curvature") and variant in (None, c)]
    if not curv:
        return []
    other = [c for c in crits if not c.startswith("curvature") and c != "random"]
    ratios = sorted({r["ratio"] for r in rows})
    out = []
    for st in stages:
        for ratio in ratios:
            def mean_of(c):
                v = per_seed(rows, c, st, ratio)
                return np.mean(list(v.values())) if v else -np.inf
            bc = max(curv, key=mean_of)
            bo = max(other, key=mean_of)
            a, b = per_seed(rows, bc, st, ratio), per_seed(rows, bo, st, ratio)
            seeds = sorted(set(a) & set(b))
            pc = paired_comparison([a[s] for s in seeds], [b[s] for s in seeds])
            verdict = ("at or above" if pc["mean"] >= 0 else
                       "below (p<0.05)" if pc["p_t"] < 0.05 else "below, n.s.")
            out.append(f"| {meta['label']} | {st} | {ratio:g} | {bc} {mean_of(bc):.1f} | "
                       f"{bo} {mean_of(bo):.1f} | {pc['mean']:+.2f} ± {pc['std']:.2f} | "
                       f"{pc['wins']}/{pc['ties']}/{pc['losses']} | {format_p(pc['p_t'])} | "
                       f"{verdict} |")
    return out


def mean_ranks(loaded) -> list:
    """Markdown lines: each criterion's mean rank (1 = best mean accuracy of its cell) over
    every (model, stage, ratio) cell of a stage group, criteria common to every run."""
    common = None
    for rows, _ in loaded:
        c = list(dict.fromkeys(r["criterion"] for r in rows))
        common = c if common is None else [x for x in common if x in c]
    groups = {"pruned": ("pruned",), "repaired (bias, bn, bias+bn)": ("bias", "bn", "bias+bn"),
              "fine-tuned": ("ft",)}
    ranks = {g: {c: [] for c in common} for g in groups}
    for rows, _ in loaded:
        ratios = sorted({r["ratio"] for r in rows})
        for g, stages in groups.items():
            for st in (s for s in stages if s in present_stages(rows)):
                for ratio in ratios:
                    m = {c: np.mean(list(per_seed(rows, c, st, ratio).values())) for c in common}
                    order = sorted(common, key=lambda c: -m[c])
                    for c in common:        # ties share the best rank
                        ranks[g][c].append(1 + sum(m[o] > m[c] for o in order))
    used = [g for g in groups if any(ranks[g][c] for c in common)]
    out = ["| criterion | " + " | ".join(f"{g} ({len(ranks[g][common[0]])} cells)"
                                         for g in used) + " |",
           "|---|" + "---|" * len(used)]
    key = next((g for g in used if g.startswith("repaired")), used[-1] if used else None)
    for c in sorted(common, key=lambda c: np.mean(ranks[key][c]) if key else 0):
        out.append(f"| {c} | " + " | ".join(f"{np.mean(ranks[g][c]):.1f}" for g in used) + " |")
    return out


def goal_table(loaded, variant=None) -> list:
    """Markdown lines: the goal table (``variant``: one fixed curvature criterion instead of
    the best of each cell)."""
    who = f"`{variant}`" if variant else "the best curvature variant of each cell"
    lines = [f"## {who} against the best other criterion (paired over seeds)", "",
             "Best other: the non-curvature, non-random criterion with the highest mean in the "
             "cell. Difference = curvature - best other (percentage points, mean ± std over "
             "seeds); W/T/L over seeds; p: paired t-test." +
             ("" if variant else " Picking the best of several variants per cell favours "
              "curvature."), "",
             "| model | stage | ratio | curvature (%) | best other (%) | difference | "
             "W/T/L | p | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for rows, meta in loaded:
        st = [s for s in present_stages(rows) if s in ("bias", "bn", "bias+bn")]
        lines += goal_rows(rows, meta, st, variant)
    return lines + [""]


def report(runs, variants=()) -> str:
    loaded = [load(Path(r)) for r in runs]
    lines = ["## Baselines", "", "| model | epochs | test accuracy (%) | training time per seed |",
             "|---|---|---|---|"]
    lines += [baseline_line(m) for _, m in loaded]
    lines += ["", "## Accuracy by stage", ""]
    for rows, meta in loaded:
        lines += stage_table(rows, meta)
    lines += ["## Mean rank over models, ratios and stages", "",
              f"Rank 1 = the best mean accuracy of a cell, among the {len(mean_ranks(loaded)) - 2} "
              "criteria run on every model.", ""]
    lines += mean_ranks(loaded) + [""]
    lines += goal_table(loaded)
    for v in variants:
        lines += goal_table(loaded, v)
    lines += ["Generated by `python benchmarks/compare_report.py " + " ".join(map(str, runs))
              + "".join(f" --variant {v}" for v in variants) + "`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="compare.py output directories")
    p.add_argument("--variant", action="append", default=[],
                   help="also a goal table for this one curvature criterion (repeatable)")
    p.add_argument("--out", default=None, help="write the Markdown here (default: stdout)")
    a = p.parse_args(argv)
    text = report(a.runs, a.variant)
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
