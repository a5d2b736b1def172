"""Reports of ``benchmarks/compare.py`` runs: one run's ``summary.md`` and ``accuracy.png``,
and the condensed tables over several runs that ``benchmarks/compare_report.py`` writes.

A run is its rows (one per seed x criterion x mode x ratio, accuracies in ``acc_<stage>``
columns, see :func:`engine.experiment.row_fields`) and its ``meta.json`` dict.

One run (:func:`summary_markdown`, :func:`plot`, :func:`write_reports`): mean +- std over seeds
per mode, stage and ratio, best mean per column in bold; the compression reached; paired
differences of every curvature criterion against every other one; every curvature criterion
against the *best other* criterion of each mode x stage x ratio cell (:func:`best_other_table`:
wins / ties / losses over seeds, the paired t-test p-value, ``scipy.stats.ttest_rel``, the one
the summary relies on, and the Wilcoxon signed-rank p-value for reference -- at 5 seeds
Wilcoxon cannot go below 0.0625); scoring times and notes.

Several runs (:func:`condensed_report`): the baselines; per run every criterion's accuracy at
each stage averaged over the ratios; the mean rank of every criterion per stage group
(:func:`stage_groups`); the goal table: per run, repair stage and ratio, the best curvature
variant (or one fixed ``variant``) against the best other non-random criterion, paired over
seeds (:func:`engine.stats.paired_comparison`). Picking the best of several curvature variants
per cell favours curvature; the per-variant tables of each run's ``summary.md`` do not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .experiment import STAGES, stage_col
from .stats import format_p, paired_comparison

#: the report's stage groups (a stage's ``group``, see :class:`engine.experiment.Stage`)
GROUP_ORDER = ("pruned", "repaired", "fine-tuned")


def is_curvature(criterion: str) -> bool:
    return criterion.startswith("curvature")


def stage_groups() -> dict:
    """``{label: stages}`` of every stage group, e.g. ``"repaired (bias, bn, bias+bn)"``."""
    out = {}
    for g in GROUP_ORDER:
        names = tuple(n for n, st in STAGES.items() if st.group == g)
        if names:
            out[f"{g} ({', '.join(names)})" if g == "repaired" else g] = names
    return out


def repair_stages() -> tuple:
    return tuple(n for n, st in STAGES.items() if st.group == "repaired")


# ============================================================================================
# reading rows
# ============================================================================================
def acc(row: dict, stage: str) -> float:
    """The row's accuracy at ``stage`` (NaN where missing)."""
    v = row.get(stage_col(stage))
    return float("nan") if v is None else v


def stages_present(rows) -> list:
    """The stages with at least one accuracy in ``rows``, in stage order."""
    return [s for s in STAGES if any(np.isfinite(acc(r, s)) for r in rows)]


def mean_std(vals) -> tuple[float, float, int]:
    """Mean, sample std and count of the finite values (NaN, NaN, 0 if none)."""
    v = np.asarray([x for x in vals if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0), int(v.size)


def seed_means(rows, criterion: str, stage: str, mode: str = "uniform", ratio=None,
               scale: float = 1.0) -> dict:
    """seed -> mean over the ratios (or at ``ratio``) of ``scale`` x the accuracy of
    ``criterion`` at ``stage``; missing accuracies are skipped."""
    by_seed: dict = {}
    for r in rows:
        if r["criterion"] != criterion or r["mode"] != mode:
            continue
        if ratio is not None and abs(r["ratio"] - ratio) > 1e-9:
            continue
        v = acc(r, stage)
        if np.isfinite(v):
            by_seed.setdefault(r["seed"], []).append(scale * v)
    return {s: float(np.mean(v)) for s, v in by_seed.items()}


def _per_seed(rows, c, mode, ratio, stage, seeds) -> list:
    """Accuracy of criterion ``c`` per seed (NaN where missing), aligned with ``seeds``."""
    by_seed = {x["seed"]: acc(x, stage) for x in rows
               if x["criterion"] == c and x["mode"] == mode and x["ratio"] == ratio}
    return [by_seed.get(s, float("nan")) for s in seeds]


@dataclass(frozen=True)
class Axes:
    """The criteria, modes, ratios, seeds and stages of a run's rows (in report order)."""
    criteria: list
    modes: list
    ratios: list
    seeds: list
    stages: list

    @classmethod
    def of(cls, rows) -> "Axes":
        return cls(list(dict.fromkeys(r["criterion"] for r in rows)),
                   list(dict.fromkeys(r["mode"] for r in rows)),
                   sorted(set(r["ratio"] for r in rows)), sorted(set(r["seed"] for r in rows)),
                   stages_present(rows))

    @property
    def curvature(self) -> list:
        return [c for c in self.criteria if is_curvature(c)]

    @property
    def others(self) -> list:
        return [c for c in self.criteria if not is_curvature(c)]


# ============================================================================================
# one run: summary.md
# ============================================================================================
def _fmt(m, s, n, scale=100.0, digits=1):
    if not np.isfinite(m):
        return "-"
    if n > 1:
        return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"
    return f"{scale * m:.{digits}f}"


def _header(rows, meta, ax: Axes) -> list:
    a = meta["args"]
    bm, bs, bn = mean_std([s["base_acc"] for s in meta["seeds"]])
    first = meta["seeds"][0]
    return [
        f"# Pruning criteria compared: {a['dataset']} / {a['model']}", "",
        f"Seeds {ax.seeds} (each: its own baseline, calibration batch and random criterion); "
        f"mean ± std over seeds (sample std, n={len(ax.seeds)}), test accuracy in % on "
        f"{meta.get('n_eval', '?')} test images. Baseline: {_fmt(bm, bs, bn, digits=2)}%. "
        f"Params {first['base_params']:,}, MACs {first['base_macs']:,}.",
        "",
        f"Pruner: `tp.pruner.BasePruner`, one shot, final classifier ignored; ratio = fraction "
        f"of channels removed from every group (`uniform`) or overall (`global`, each group "
        f"keeps at least one channel). Calibration: {first['calib_n']} training "
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


def _accuracy_cells(rows, ax: Axes, mode: str, stage: str) -> dict:
    """criterion -> [(mean, std, n) per ratio..., (mean, std, n) of the per-seed means over
    the ratios]."""
    cells = {}
    for c in ax.criteria:
        per_ratio = [mean_std([acc(x, stage) for x in rows if x["criterion"] == c
                               and x["mode"] == mode and x["ratio"] == r]) for r in ax.ratios]
        # mean over ratios, per seed, then over seeds
        by_seed = seed_means(rows, c, stage, mode)
        per_ratio.append(mean_std([by_seed[s] for s in ax.seeds if s in by_seed]))
        cells[c] = per_ratio
    return cells


def _accuracy_table(rows, ax: Axes, mode: str, stage: str) -> list:
    """One mode x stage table: criteria x ratios, best mean of each column in bold."""
    lines = [f"## {mode} pruning, accuracy {STAGES[stage].title}", "",
             "| criterion | " + " | ".join(f"{r:g}" for r in ax.ratios) + " | mean |",
             "|---" * (len(ax.ratios) + 2) + "|"]
    cells = _accuracy_cells(rows, ax, mode, stage)
    best = []
    for j in range(len(ax.ratios) + 1):
        col = [cells[c][j][0] for c in ax.criteria if np.isfinite(cells[c][j][0])]
        best.append(max(col) if col else None)
    for c in ax.criteria:
        out = []
        for j, (m, s, n) in enumerate(cells[c]):
            t = _fmt(m, s, n)
            if best[j] is not None and np.isfinite(m) and m >= best[j] - 1e-12:
                t = f"**{t}**"
            out.append(t)
        lines.append(f"| {c} | " + " | ".join(out) + " |")
    return lines + [""]


def _compression_lines(rows, ax: Axes, mode: str) -> list:
    """Global mode: MACs / params kept per criterion; uniform mode: one line (the same for
    every criterion)."""
    if mode == "global":
        lines = ["Compression in global mode (it depends on the criterion): MACs / params "
                 "kept, % of the baseline, mean over seeds.", "",
                 "| criterion | " + " | ".join(f"{r:g}" for r in ax.ratios) + " |",
                 "|---" * (len(ax.ratios) + 1) + "|"]
        for c in ax.criteria:
            out = []
            for r in ax.ratios:
                v = [(x["macs_kept"], x["params_kept"]) for x in rows
                     if x["criterion"] == c and x["mode"] == mode and x["ratio"] == r]
                out.append(f"{100 * np.mean([t[0] for t in v]):.1f} / "
                           f"{100 * np.mean([t[1] for t in v]):.1f}" if v else "-")
            lines.append(f"| {c} | " + " | ".join(out) + " |")
        return lines + [""]
    if mode == "uniform":
        def kept(key, r):
            return 100 * np.mean([x[key] for x in rows if x["mode"] == mode and x["ratio"] == r])
        return ["Compression in uniform mode (the same for every criterion): "
                + ", ".join(f"ratio {r:g}: params {kept('params_kept', r):.1f}%, MACs "
                            f"{kept('macs_kept', r):.1f}%" for r in ax.ratios)
                + " of the baseline.", ""]
    return []


def _paired_cell(rows, c, o, mode, stage, r, seeds) -> str:
    """``mean ± std (wins/n)`` of (c - o) over the seeds, percentage points."""
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
    return f"{100 * m:+.1f} ± {100 * sd:.1f} ({wins}/{n})" if n else "-"


def paired_differences(rows, ax: Axes) -> list:
    """Markdown lines: every curvature criterion minus every other one, per seed."""
    curv, others = ax.curvature, ax.others
    if not (curv and others and len(ax.seeds) > 1):
        return []
    lines = ["## Paired differences (percentage points, same seed), curvature minus "
             "baseline criterion", "",
             "Mean ± std over seeds of (curvature - other) at each ratio; `w/n` = seeds "
             "where curvature was strictly better.", ""]
    for mode in ax.modes:
        for stage in ax.stages:
            lines += [f"### {mode}, {stage}", "",
                      "| curvature | vs | " + " | ".join(f"{r:g}" for r in ax.ratios) + " |",
                      "|---" * (len(ax.ratios) + 2) + "|"]
            for c in curv:
                for o in others:
                    cells = [_paired_cell(rows, c, o, mode, stage, r, ax.seeds)
                             for r in ax.ratios]
                    lines.append(f"| {c} | {o} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def _best_other_line(rows, c, others, mode, stage, r, seeds):
    """The table line of curvature criterion ``c`` in one cell, or None (no data)."""
    means = {o: np.nanmean(v) for o in others
             if np.isfinite(v := _per_seed(rows, o, mode, r, stage, seeds)).any()}
    a = _per_seed(rows, c, mode, r, stage, seeds)
    if not means or not np.isfinite(a).any():
        return None
    best = max(means, key=means.get)
    st = paired_comparison(a, _per_seed(rows, best, mode, r, stage, seeds))
    if not st["n"]:
        return None
    return (f"| {c} | {mode} | {stage} | {r:g} | {best} | "
            f"{100 * st['mean']:+.2f} ± {100 * st['std']:.2f} | "
            f"{st['wins']}/{st['ties']}/{st['losses']} | {format_p(st['p_t'])} | "
            f"{format_p(st['p_wilcoxon'])} |")


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
                    line = _best_other_line(rows, c, others, mode, stage, r, seeds)
                    if line is not None:
                        lines.append(line)
    return lines + [""]


def _timings_and_notes(ax: Axes, meta: dict) -> list:
    lines = ["## Importance computation time (s, per seed: scores computed once and reused "
             "for every mode and ratio)", "",
             "| criterion | time (s) | Spearman with L2 scores (mean over groups) |",
             "|---|---|---|"]
    for c in ax.criteria:
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
    return lines + [f"Total wall time {meta.get('wall_s', 0):.0f} s on {meta['platform']} "
                    f"({meta['threads']} torch threads)."]


def summary_markdown(rows: list, meta: dict) -> str:
    """``summary.md`` of one run (see the module docstring)."""
    ax = Axes.of(rows)
    lines = _header(rows, meta, ax)
    for mode in ax.modes:
        for stage in ax.stages:
            lines += _accuracy_table(rows, ax, mode, stage)
        lines += _compression_lines(rows, ax, mode)
    lines += paired_differences(rows, ax)
    lines += best_other_table(rows, ax.curvature, ax.others, ax.modes, ax.stages, ax.ratios,
                              ax.seeds)
    lines += _timings_and_notes(ax, meta)
    return "\n".join(lines) + "\n"


# ============================================================================================
# one run: accuracy.png
# ============================================================================================
def _plot_panel(ax, rows, criteria, mode, stage, ratios, cmap, colour=None) -> None:
    """One line per criterion; ``colour``: criterion -> colour index (default: its position)."""
    for k, c in enumerate(criteria):
        k = colour[c] if colour else k
        ms = [mean_std([acc(x, stage) for x in rows if x["criterion"] == c
                        and x["mode"] == mode and x["ratio"] == r]) for r in ratios]
        m = np.array([t[0] for t in ms]) * 100
        s = np.array([t[1] for t in ms]) * 100
        curv = is_curvature(c)
        ax.errorbar(ratios, m, yerr=s, label=c, marker="o", ms=3.5, capsize=3,
                    linestyle="-" if curv else "--", lw=2.2 if curv else 1.3,
                    color=cmap(k % cmap.N))


def plot(rows: list, out_png: Path, title: str) -> None:
    """Accuracy against ratio, one panel per mode x stage, one line per criterion."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_ = Axes.of(rows)
    stages = axes_.stages
    base_m = float(np.mean(list({r["seed"]: r["base_acc"] for r in rows}.values())))
    fig, axes = plt.subplots(len(axes_.modes), len(stages), squeeze=False,
                             figsize=(4.2 * len(stages), 3.4 * len(axes_.modes)), sharey=True)
    cmap = plt.get_cmap("tab10")
    for i, mode in enumerate(axes_.modes):
        for j, stage in enumerate(stages):
            ax = axes[i][j]
            _plot_panel(ax, rows, axes_.criteria, mode, stage, axes_.ratios, cmap)
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


def write_reports(rows: list, meta: dict, out: Path, no_plot: bool = False) -> str:
    """Write ``summary.md`` (and ``accuracy.png`` unless ``no_plot``) to ``out``; returns the
    summary."""
    md = summary_markdown(rows, meta)
    (out / "summary.md").write_text(md)
    if not no_plot:
        a = meta["args"]
        plot(rows, out / "accuracy.png", f"{a['dataset']} / {a['model']}: accuracy vs pruning "
             f"ratio (mean ± std over {len(meta['seeds'])} seed(s))")
    return md


# ============================================================================================
# several runs: the condensed tables
# ============================================================================================
def read_run(folder: Path) -> tuple:
    """``(rows, meta)`` as saved in ``folder`` (``rows.json``, ``meta.json``; missing values
    are None)."""
    rows = json.loads((folder / "rows.json").read_text())
    meta = json.loads((folder / "meta.json").read_text())
    return rows, meta


def load_labelled(run: Path) -> tuple:
    """``(rows, meta)`` of a run; ``meta["label"]``: the run folder's name without its
    dataset prefix (``vgg9``, ``vgg9-low``), so two runs of one model stay apart."""
    rows, meta = read_run(run)
    prefix = f"{meta['args']['dataset'].lower()}-"
    meta["label"] = run.name[len(prefix):] if run.name.startswith(prefix) else run.name
    return rows, meta


def fmt(m, s):
    return f"{m:.1f} ± {s:.1f}"


def baseline_line(meta) -> str:
    a = meta["args"]
    acc_ = [100 * s["test_acc_full"] for s in meta["seeds"] if s.get("test_acc_full") is not None]
    t = [s["train_time_s"] for s in meta["seeds"] if s.get("train_time_s") is not None]
    width = f", width {a['width']}" if a.get("width") else ""
    sub = f", {a['train_subset']} training images" if a.get("train_subset") else \
        ", full training set"
    from .training import default_epochs
    epochs = a["epochs"] if a.get("epochs") is not None else default_epochs(a["dataset"])
    return (f"| {meta['label']}{width} | {epochs}{sub} | "
            f"{fmt(np.mean(acc_), np.std(acc_, ddof=1))} | {np.mean(t):.0f} s |")


def stage_table(rows, meta) -> list:
    """Markdown lines: every criterion's accuracy (%) at each stage, averaged over the ratios
    (uniform mode), mean ± std over seeds, best in bold."""
    crits = list(dict.fromkeys(r["criterion"] for r in rows))
    stages = stages_present(rows)
    ratios = sorted({r["ratio"] for r in rows})
    cells = {}
    for c in crits:
        for st in stages:
            v = list(seed_means(rows, c, st, scale=100.0).values())
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


def repair_ratio_table(rows, meta, ratios=(0.1, 0.3, 0.5)) -> list:
    """Markdown lines: every criterion's accuracy (%) at a few ratios (uniform mode, mean over
    seeds) right after pruning, after the earlier repair (``bias``, or ``bias+bn`` on models
    with BatchNorm) and after the least-squares repair (``lsq``, or ``lsq+bn``); best in bold."""
    present = stages_present(rows)
    early = "bias+bn" if "bias+bn" in present else "bias"
    late = "lsq+bn" if "lsq+bn" in present else "lsq"
    stages = [st for st in ("pruned", early, late) if st in present]
    have = {r["ratio"] for r in rows if r["mode"] == "uniform"}
    ratios = [x for x in ratios if any(abs(x - h) < 1e-9 for h in have)]
    if not ratios or late not in present:
        return []
    crits = list(dict.fromkeys(r["criterion"] for r in rows))
    mean = {(c, st, x): np.mean(list(seed_means(rows, c, st, ratio=x, scale=100.0).values()))
            for c in crits for st in stages for x in ratios}
    best = {(st, x): max(mean[c, st, x] for c in crits) for st in stages for x in ratios}
    out = [f"**{meta['label']}**: accuracy (%) at ratio {' / '.join(f'{x:g}' for x in ratios)}, "
           f"uniform pruning, mean over {len(meta['seeds'])} seeds", "",
           "| criterion | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for c in crits:
        cells = [" / ".join(f"**{mean[c, st, x]:.1f}**" if mean[c, st, x] == best[st, x]
                            else f"{mean[c, st, x]:.1f}" for x in ratios) for st in stages]
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    return out + [""]


#: a cell is *usable* when some criterion keeps its mean accuracy within this many points of
#: the baseline: only such cells enter the verdict
USABLE_POINTS = 10.0


def _cell_means(rows, crits, stage, mode, ratio) -> dict:
    out = {}
    for c in crits:
        v = seed_means(rows, c, stage, mode=mode, ratio=ratio, scale=100.0)
        if v:
            out[c] = float(np.mean(list(v.values())))
    return out


def usable(rows, meta, stage, mode, ratio) -> bool:
    """Whether some criterion of the cell keeps accuracy within :data:`USABLE_POINTS` of the
    baseline (mean over seeds)."""
    crits = list(dict.fromkeys(r["criterion"] for r in rows))
    means = _cell_means(rows, crits, stage, mode, ratio)
    base = 100 * float(np.mean([s["base_acc"] for s in meta["seeds"]]))
    return bool(means) and max(means.values()) >= base - USABLE_POINTS


def goal_rows(rows, meta, stages, variant=None, mode="uniform") -> list:
    """One run's goal-table cells (``mode``): dicts with the markdown line, whether the cell is
    usable (:func:`usable`) and the verdict."""
    crits = list(dict.fromkeys(r["criterion"] for r in rows))
    curv = [c for c in crits if is_curvature(c) and variant in (None, c)]
    other = [c for c in crits if not is_curvature(c) and c != "random"]
    if not curv or not other:
        return []
    out = []
    for st in stages:
        for ratio in sorted({r["ratio"] for r in rows if r["mode"] == mode}):
            means = _cell_means(rows, curv + other, st, mode, ratio)
            if not any(c in means for c in curv) or not any(c in means for c in other):
                continue
            bc = max((c for c in curv if c in means), key=means.get)
            bo = max((c for c in other if c in means), key=means.get)
            a = seed_means(rows, bc, st, mode=mode, ratio=ratio, scale=100.0)
            b = seed_means(rows, bo, st, mode=mode, ratio=ratio, scale=100.0)
            seeds = sorted(set(a) & set(b))
            pc = paired_comparison([a[s] for s in seeds], [b[s] for s in seeds])
            verdict = ("at or above" if pc["mean"] >= 0 else
                       "below (p<0.05)" if pc["p_t"] < 0.05 else "below, n.s.")
            ok = usable(rows, meta, st, mode, ratio)
            out.append(dict(usable=ok, verdict=verdict, line=(
                f"| {meta['label']} | {mode} | {st} | {ratio:g} | {'yes' if ok else 'no'} | "
                f"{bc} {means[bc]:.1f} | {bo} {means[bo]:.1f} | "
                f"{pc['mean']:+.2f} ± {pc['std']:.2f} | {pc['wins']}/{pc['ties']}/"
                f"{pc['losses']} | {format_p(pc['p_t'])} | {verdict} |")))
    return out


def _common_criteria(loaded) -> list:
    common = None
    for rows, _ in loaded:
        c = list(dict.fromkeys(r["criterion"] for r in rows))
        common = c if common is None else [x for x in common if x in c]
    return common


def _ranks(loaded, common, groups) -> dict:
    """group -> criterion -> its rank in every (run, stage, ratio) cell of the group."""
    ranks = {g: {c: [] for c in common} for g in groups}
    for rows, _ in loaded:
        for mode in dict.fromkeys(r["mode"] for r in rows):
            ratios = sorted({r["ratio"] for r in rows if r["mode"] == mode})
            for g, stages in groups.items():
                for st in (s for s in stages if s in stages_present(rows)):
                    for ratio in ratios:
                        m = {c: np.mean(list(seed_means(rows, c, st, mode=mode, ratio=ratio,
                                                        scale=100.0).values()))
                             for c in common}
                        for c in common:        # ties share the best rank
                            ranks[g][c].append(1 + sum(m[o] > m[c] for o in common))
    return ranks


#: the mean-rank column of the least-squares repair stages (the table is sorted by it)
LSQ_GROUP = "least-squares repair (lsq, lsq+bn)"


def mean_ranks(loaded) -> list:
    """Markdown lines: each criterion's mean rank (1 = best mean accuracy of its cell) over
    every (model, stage, ratio) cell of a stage group, criteria common to every run."""
    common = _common_criteria(loaded)
    groups = stage_groups()
    groups[LSQ_GROUP] = ("lsq", "lsq+bn")         # a subgroup of the repaired stages
    ranks = _ranks(loaded, common, groups)
    used = [g for g in groups if any(ranks[g][c] for c in common)]
    out = ["| criterion | " + " | ".join(f"{g} ({len(ranks[g][common[0]])} cells)"
                                         for g in used) + " |",
           "|---|" + "---|" * len(used)]
    key = LSQ_GROUP if LSQ_GROUP in used else \
        next((g for g in used if g.startswith("repaired")), used[-1] if used else None)
    for c in sorted(common, key=lambda c: np.mean(ranks[key][c]) if key else 0):
        out.append(f"| {c} | " + " | ".join(f"{np.mean(ranks[g][c]):.1f}" for g in used) + " |")
    return out


def goal_table(loaded, variant=None, stages=None) -> list:
    """Markdown lines: the goal table (``variant``: one fixed curvature criterion instead of
    the best of each cell; ``stages``: the repair stages to include), every cell listed, then
    the verdict counted over the usable cells only."""
    who = f"`{variant}`" if variant else "The best curvature variant of each cell"
    lines = [f"## {who} against the best other criterion (paired over seeds)", "",
             "Best other: the non-curvature, non-random criterion with the highest mean in the "
             "cell. Difference = curvature - best other (percentage points, mean ± std over "
             "seeds); W/T/L over seeds; p: paired t-test; usable: some criterion within "
             f"{USABLE_POINTS:g} points of the baseline." +
             ("" if variant else " Picking the best of several variants per cell favours "
              "curvature."), "",
             "| model | mode | stage | ratio | usable | curvature (%) | best other (%) | "
             "difference | W/T/L | p | verdict |", "|" + "---|" * 11]
    cells = []
    for rows, meta in loaded:
        st = [s for s in stages_present(rows) if s in (stages or repair_stages())]
        for mode in dict.fromkeys(r["mode"] for r in rows):
            cells += goal_rows(rows, meta, st, variant, mode)
    lines += [c["line"] for c in cells]
    used = [c for c in cells if c["usable"]]
    counts = {v: sum(c["verdict"] == v for c in used)
              for v in ("at or above", "below, n.s.", "below (p<0.05)")}
    lines += ["", f"Verdict over the {len(used)} usable cells (of {len(cells)}): " +
              ", ".join(f"{v} {n}" for v, n in counts.items()) + ".", ""]
    return lines


def condensed_plot(loaded, out_png: Path, stages: tuple, mode: str = "uniform") -> None:
    """Accuracy against ratio: one row of panels per model, one panel per stage group (right
    after pruning, the earlier repair ``bias`` / ``bias+bn``, the least-squares repair ``lsq``
    / ``lsq+bn``: the BN variant where the model has BatchNorm), one line per criterion in
    the same colour on every model (mean ± std over seeds), the baseline dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("pruned", ("pruned",)), ("earlier repair", ("bias+bn", "bias")),
               ("least-squares repair", ("lsq+bn", "lsq"))]
    columns = [(t, c) for t, c in columns if any(s in stages for s in c)]
    every = list(dict.fromkeys(r["criterion"] for rows, _ in loaded for r in rows))
    # tab20's dark shades first (one per criterion up to ten), then the light ones
    colour = {c: 2 * k if k < 10 else 2 * (k - 10) + 1 for k, c in enumerate(every)}
    fig, axes = plt.subplots(len(loaded), len(columns), squeeze=False, sharey="row",
                             figsize=(3.8 * len(columns), 2.9 * len(loaded)))
    cmap = plt.get_cmap("tab20")
    for i, (rows, meta) in enumerate(loaded):
        crits = list(dict.fromkeys(r["criterion"] for r in rows))
        ratios = sorted({r["ratio"] for r in rows if r["mode"] == mode})
        base = 100 * float(np.mean([s["base_acc"] for s in meta["seeds"]]))
        present = stages_present(rows)
        for j, (title, options) in enumerate(columns):
            ax = axes[i][j]
            st = next((s for s in options if s in present and s in stages), None)
            if st is not None:
                _plot_panel(ax, rows, crits, mode, st, ratios, cmap, colour)
            ax.axhline(base, color="k", lw=0.8, ls=":", label="baseline")
            ax.set_title(f"{meta['label']}: {st or title + ' (not run)'}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(loaded) - 1:
                ax.set_xlabel(f"pruning ratio ({mode})")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
    by_label = {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                by_label.setdefault(lab, h)
    order = [c for c in every if c in by_label] + ["baseline"]
    fig.legend([by_label[k] for k in order], order, fontsize=8, loc="center right",
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def condensed_report(runs, variants=(), stages=None, plot_to=None) -> str:
    """The Markdown of ``compare_report.py`` over the run folders ``runs`` (``stages``: the
    repair stages of the goal tables, default all; ``plot_to``: also write the accuracy plot
    of every model by stage there, one PNG per mode, ``<stem>-<mode>.png``)."""
    loaded = [load_labelled(Path(r)) for r in runs]
    lines = ["## Baselines", "", "| model | epochs | test accuracy (%) | training time per seed |",
             "|---|---|---|---|"]
    lines += [baseline_line(m) for _, m in loaded]
    lines += ["", "## Accuracy by stage", ""]
    for rows, meta in loaded:
        lines += stage_table(rows, meta)
    lines += ["## Right after pruning, after the earlier repair, after the least-squares repair",
              ""]
    for rows, meta in loaded:
        lines += repair_ratio_table(rows, meta)
    ranks = mean_ranks(loaded)
    lines += ["## Mean rank over models, modes, ratios and stages", "",
              f"Rank 1 = the best mean accuracy of a cell, among the {len(ranks) - 2} "
              "criteria run on every model.", ""]
    lines += ranks + [""]
    lines += goal_table(loaded, stages=stages)
    for v in variants:
        lines += goal_table(loaded, v, stages=stages)
    if plot_to is not None:
        plot_stages = tuple(s for s in ("pruned", "bias", "bias+bn", "lsq", "lsq+bn")
                            if any(s in stages_present(r) for r, _ in loaded))
        for mode in dict.fromkeys(r["mode"] for rows, _ in loaded for r in rows):
            png = Path(plot_to).with_name(f"{Path(plot_to).stem}-{mode}.png")
            condensed_plot(loaded, png, plot_stages, mode)
            lines += [f"![accuracy by stage, {mode} pruning]({png.name})", ""]
    cmd = " ".join(map(str, runs)) + "".join(f" --variant {v}" for v in variants)
    if stages:
        cmd += " --stages " + " ".join(stages)
    if plot_to is not None:
        cmd += f" --plot {plot_to}"
    lines += [f"Generated by `python benchmarks/compare_report.py {cmd}`."]
    return "\n".join(lines) + "\n"
