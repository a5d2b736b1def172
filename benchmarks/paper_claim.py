"""The curvature paper's claim over baselines: weights removable before a 1-point drop.

The paper (Tan, Sia, Bogdan, Ivanov, TMLR 2026) claims that per-weight curvature "identifies
a larger number of unimportant edges" than existing pruning methods. This script measures it
over several trained baselines (training seeds) per model, with the paper's protocol: global
unstructured pruning, no retraining, no BN recalibration, the number of weights removed
before test accuracy drops by more than one point (the search of ``benchmarks/unstructured.py``:
a grid of sparsities, then bisection on the number of weights).

Per ``dataset:model`` pair and baseline seed, for each calibration setting (``--per-class``
correctly classified training images per class, drawn with the baseline's seed; the 1-per-class
images are the first of the 10-per-class ones), the criteria are

* ``curvature-library`` / ``curvature-authors``: per-weight curvature (the preset
  ``CurvatureConfig.element``: the paper's definition, alpha 0.9, ``topk`` 32 on dense and 8 on
  sparse element graphs unless ``--topk``) under the library's and under the paper authors'
  conventions (:mod:`tp_curvature.unstructured._conventions`), highest kappa removed first;
* ``curvature-authors-first-untruncated`` (sparse pairs, i.e. the paper's VGG-9): the same with
  the first weight layer scored with untruncated measures (``--first-layer-topk``; the authors
  truncate nothing, and ``topk=8`` moves the first conv's kappa by up to 2.6);
* ``...-neg-first``: the paper's control, most negative kappa removed first;
* ``wanda-calib``: unstructured Wanda, ``|W_ij| * ||X_j||_2`` with ``X`` the layer's input on the
  same calibration images (a conv: ``X_j`` per input channel and kernel tap, from the unfolded
  input), lowest removed first; ``wanda-256``: the same on 256 random training images;
* ``magnitude`` (``|w|``) and ``random`` (``--random-draws`` draws; their mean per seed).

Criteria that do not depend on the calibration images (magnitude, wanda-256, random) are swept
once per seed and enter every calibration setting's table.

Reported per pair and calibration setting: mean +- std over seeds of the weights removable
before the drop (% of all Conv2d / Linear weights), paired comparisons over seeds
(``engine.stats.paired_comparison``: mean difference, wins / ties / losses, paired t-test and
Wilcoxon p-values) of each curvature criterion against magnitude, each Wanda and the best of
them (the baseline with the highest mean), and a verdict per cell and overall.

Writes ``<out>/rows.csv`` (every sweep point), ``rows.json`` (per seed and criterion: removable
weights, base accuracy, scoring time; the comparisons; the settings), ``summary.md`` and
``plot.png``. Each finished (pair, seed) is kept in ``<out>/parts/`` so ``--resume`` skips it and
``--report-only`` rebuilds the report from the parts.

Usage::

    python benchmarks/paper_claim.py --quick          # 1 seed, LeNet only, 2,000 test images
    # the full experiment: two processes (one per core) into results/paper_claim, then the
    # report over both (cost: docs/paper.md, "The claim over baselines")
    python benchmarks/paper_claim.py --pairs fashion-mnist:paper_lenet digits:mlp \\
        fashion-mnist:mlp --seeds 0 1 2 3 4 --per-class 1 10 --resume
    python benchmarks/paper_claim.py --pairs fashion-mnist:paper_vgg9 --vgg-seeds 0 1 2 --resume
    python benchmarks/paper_claim.py --report-only
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import unstructured as U
from engine.data import calibration_batch
from engine.presets import add_curvature_arguments
from engine.stats import format_p, paired_comparison
from engine.utils import forward_with_hooks, write_csv
from tp_curvature.unstructured import magnitude_scores, random_scores

DEFAULT_PAIRS = ["fashion-mnist:paper_lenet", "digits:mlp", "fashion-mnist:mlp",
                 "fashion-mnist:paper_vgg9"]
#: models whose baselines use ``--vgg-seeds`` and ``--vgg-per-class`` (the sparse element graph)
VGG_MODELS = ("paper_vgg9",)
#: test images per model (an evenly spaced subset; None: the whole test set)
TEST_IMAGES = {"paper_vgg9": 2000}
CONVENTIONS = ("library", "authors")
#: the baselines a curvature criterion is compared with (the best of them too)
BASELINES = ("magnitude", "wanda-calib", "wanda-256")
WANDA_IMAGES = 256
#: a paired difference with p below this counts as a win / loss in the verdicts
ALPHA_TEST = 0.05


def parse_args(argv=None):
    p = U.pairs_parser(__doc__, DEFAULT_PAIRS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="training seeds of the baselines (default 0-4)")
    p.add_argument("--vgg-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds of the paper's VGG-9 (default 0-2)")
    p.add_argument("--per-class", type=int, nargs="+", default=[1, 10],
                   help="calibration images per class (default 1 10)")
    p.add_argument("--vgg-per-class", type=int, nargs="+", default=[1],
                   help="calibration images per class on the paper's VGG-9 (default 1)")
    add_curvature_arguments(p.add_argument_group("curvature"), preset="element",
                            presets=("element", "paper"))
    p.add_argument("--first-layer-topk", default="none",
                   help="sparse pairs: also score the authors' conventions with this topk on "
                        "the first weight layer ('none': untruncated, an integer, or 'off': "
                        "no such criterion)")
    p.add_argument("--first-layer-conventions", nargs="+", default=["authors"],
                   choices=CONVENTIONS, help="conventions of that criterion (default authors)")
    U.add_sweep_arguments(p)
    p.add_argument("--random-draws", type=int, default=3)
    p.add_argument("--full-curves", action="store_true",
                   help="sweep the whole grid (default: stop at the first point below the "
                        "threshold, all the search needs)")
    p.add_argument("--test-images", type=int, default=None,
                   help="evenly spaced test subset for every pair (default: per model, "
                        f"{TEST_IMAGES}; else the whole test set)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: per pair, benchmarks/unstructured.py PAIRS)")
    p.add_argument("--train-subset", type=int, default=None,
                   help="train the baselines on this many training images (quick: 6000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 seed, LeNet only, 1 image per class, 2,000 test images, "
                        "a coarse grid, 1 random draw, baselines trained 1 epoch on 6,000 "
                        "images; out results/_scratch/paper_claim_quick")
    p.add_argument("--out", default=None, help="output folder (default results/paper_claim)")
    p.add_argument("--resume", action="store_true",
                   help="skip the (pair, seed) runs already in <out>/parts")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild rows / summary / plot from <out>/parts without running")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs = [q for q in args.pairs if q.endswith(":paper_lenet")][:1] or \
            ["fashion-mnist:paper_lenet"]
        args.seeds, args.per_class = args.seeds[:1], [1]
        args.random_draws = min(args.random_draws, 1)
        args.sparsities = args.sparsities or [0.0, 0.2, 0.4, 0.6, 0.8]
        args.test_images = args.test_images or 2000
        args.epochs = args.epochs or 1
        args.train_subset = args.train_subset or 6000
    args.sparsities = args.sparsities or [round(float(s), 2) for s in np.arange(0, 0.96, 0.05)]
    args.images = None          # read by benchmarks/unstructured.py's helpers
    return args


def is_vgg(pair: str) -> bool:
    return pair.split(":")[1] in VGG_MODELS


def seeds_of(pair, args) -> list:
    return list(args.vgg_seeds if is_vgg(pair) else args.seeds)


def per_class_of(pair, args) -> list:
    return list(args.vgg_per_class if is_vgg(pair) else args.per_class)


def first_layer_topk(args):
    """``--first-layer-topk``: 'off' -> False, 'none' -> None, else the integer."""
    v = str(args.first_layer_topk).lower()
    return False if v == "off" else None if v == "none" else int(v)


# ------------------------------------------------------------------------------- Wanda
def _weight_layers(model: nn.Module) -> dict:
    """Parameter name -> module of every Conv2d / Linear (the keys of ``magnitude_scores``)."""
    return {f"{n}.weight" if n else "weight": m for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def input_feature_norms(model: nn.Module, images: torch.Tensor, batch: int = 64) -> dict:
    """``||X_j||_2`` of every Conv2d / Linear input feature over ``images``: a Linear's input
    features (over the images and any leading dimensions), a conv's (input channel, kernel
    tap) columns of its unfolded input (over the images and the output positions; padding
    counts as zeros), shaped ``(in_features,)`` / ``(C_in, kh, kw)``. Eval mode, no grad;
    the model's mode is restored."""
    layers = _weight_layers(model)
    sq = {k: None for k in layers}

    def hook(key):
        def fn(mod, inp):
            x = inp[0].detach().double()
            if isinstance(mod, nn.Conv2d):
                if mod.groups != 1 or isinstance(mod.padding, str):
                    raise ValueError(f"{key}: Wanda here needs groups=1 and numeric padding")
                cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
                s = cols.pow(2).sum(dim=(0, 2))
            else:
                s = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sq[key] = s if sq[key] is None else sq[key] + s
        return fn

    forward_with_hooks(model, images, batch, {m: hook(k) for k, m in layers.items()})
    return {k: sq[k].sqrt().reshape(layers[k].weight.shape[1:]) for k in layers}


def wanda_scores(model: nn.Module, images: torch.Tensor) -> dict:
    """Unstructured Wanda: ``|W_ij| * ||X_j||_2`` per weight (:func:`input_feature_norms`),
    float64, keyed like ``magnitude_scores``; prune lowest first."""
    norms = input_feature_norms(model, images)
    return {k: m.weight.detach().abs().double() * norms[k][None]
            for k, m in _weight_layers(model).items()}


# ----------------------------------------------------------------------------- running
@dataclasses.dataclass
class Criterion:
    """One criterion of one (pair, seed): its name, the calibration setting it depends on
    (None: none), how it removes weights and how long its scores took."""
    name: str
    per_class: object
    ranking: U.Ranking
    score_s: float = 0.0
    note: str = ""


def curvature_criteria(pd, x, per_class, args, first_k) -> list:
    """The curvature criteria of one calibration set ``x``: each conventions, highest and
    lowest first, and on sparse pairs the first layer re-scored at ``first_k``."""
    out = []
    for conv in CONVENTIONS:
        t0 = time.perf_counter()
        scores, info = U.score_weights(pd.model, x, pd.pair, args, conventions=conv,
                                       progress=False)
        sec = time.perf_counter() - t0
        note = f"{info['mode']}, {info['curvature']}, conventions={conv!r}"
        print(f"[{pd.pair}] curvature ({conv}, {len(x)} images): {sec:.1f}s", flush=True)
        out.append(Criterion(f"curvature-{conv}", per_class,
                             U.Ranking(scores, "highest", 0, args.scope), sec, note))
        out.append(Criterion(f"curvature-{conv}-neg-first", per_class,
                             U.Ranking(scores, "lowest", 0, args.scope), sec, note))
        if first_k is not False and info["mode"] == "sparse" and \
                conv in args.first_layer_conventions:
            first = next(iter(scores)).rsplit(".weight", 1)[0]
            t0 = time.perf_counter()
            sub, _ = U.score_weights(pd.model, x, pd.pair, args, conventions=conv,
                                     topk=first_k, layers=[first], progress=False)
            sec1 = time.perf_counter() - t0
            print(f"[{pd.pair}] curvature ({conv}, {first!r} at topk={first_k}): {sec1:.1f}s",
                  flush=True)
            tag = "untruncated" if first_k is None else f"topk{first_k}"
            out.append(Criterion(
                f"curvature-{conv}-first-{tag}", per_class,
                U.Ranking({**scores, **sub}, "highest", 0, args.scope), sec + sec1,
                note + f"; {first!r} re-scored with topk={first_k}"))
    return out


def seed_criteria(pd, seed, args) -> list:
    """Every criterion of one baseline: per calibration setting the curvature criteria and
    Wanda on those images, then magnitude, Wanda on 256 training images and random."""
    crits = []
    first_k = first_layer_topk(args)
    for pc in per_class_of(pd.pair, args):
        x, _ = calibration_batch(pd.train, pc, seed=seed, per_class=True, model=pd.model)
        crits += curvature_criteria(pd, x, pc, args, first_k)
        t0 = time.perf_counter()
        crits.append(Criterion("wanda-calib", pc, U.Ranking(wanda_scores(pd.model, x), "lowest",
                                                            0, args.scope),
                               time.perf_counter() - t0, f"{len(x)} calibration images"))
    x256, _ = calibration_batch(pd.train, WANDA_IMAGES, seed=seed)
    t0 = time.perf_counter()
    crits.append(Criterion("wanda-256", None, U.Ranking(wanda_scores(pd.model, x256), "lowest",
                                                        0, args.scope),
                           time.perf_counter() - t0, f"{WANDA_IMAGES} random training images"))
    crits.append(Criterion("magnitude", None,
                           U.Ranking(magnitude_scores(pd.model), "lowest", 0, args.scope)))
    for r in range(args.random_draws):
        crits.append(Criterion(f"random#{r}", None, U.Ranking(
            random_scores(pd.model, 1000 * seed + r), "lowest", r, args.scope)))
    return crits


def run_seed(pair, seed, args) -> dict:
    """Train / reload baseline ``seed`` of ``pair``, score and sweep every criterion; returns
    the part (JSON-ready) with the sweep curves and the removable weights."""
    n_test = args.test_images or TEST_IMAGES.get(pair.split(":")[1])
    pd = U.load_test_pair(pair, args, seed=seed, n_test=n_test)
    print(f"[{pair}] seed {seed}: base accuracy {pd.base:.4f} on {len(pd.test_xy[1])} test "
          "images", flush=True)
    results = []
    for c in seed_criteria(pd, seed, args):
        t0 = time.perf_counter()
        curve = U.sweep(pd.model, c.ranking, args.sparsities, pd.test_xy,
                        stop_below=None if args.full_curves else pd.base - args.drop + 1e-12)
        n_ok, crossed = U.removed_before_drop(pd.model, c.ranking, curve, pd.base, args.drop,
                                              pd.test_xy)
        results.append(dict(criterion=c.name, per_class=c.per_class, removed=int(n_ok),
                            n_total=int(curve[0][2]), crossed=bool(crossed),
                            score_s=round(c.score_s, 2), note=c.note,
                            curve=[[sp, int(n), float(acc)] for sp, n, _, acc in curve]))
        print(f"[{pair}] seed {seed} {c.name} ({c.per_class or '-'}/class): {n_ok:,} of "
              f"{curve[0][2]:,} before a {args.drop:.0%} drop "
              f"({time.perf_counter() - t0:.1f}s sweep)", flush=True)
    return dict(pair=pair, seed=seed, base=pd.base, n_test=len(pd.test_xy[1]),
                per_class=per_class_of(pair, args), results=results)


# ----------------------------------------------------------------------------- report
def cells(parts: list) -> dict:
    """(pair, per_class) -> criterion -> {seed: removable fraction}; random draws averaged
    per seed; criteria without a calibration setting enter every setting of their pair."""
    out = {}
    for part in parts:
        for pc in part["per_class"]:
            cell = out.setdefault((part["pair"], pc), {})
            rnd = []
            for r in part["results"]:
                if r["per_class"] not in (None, pc):
                    continue
                v = r["removed"] / r["n_total"]
                if r["criterion"].startswith("random#"):
                    rnd.append(v)
                else:
                    cell.setdefault(r["criterion"], {})[part["seed"]] = v
            if rnd:
                cell.setdefault("random", {})[part["seed"]] = float(np.mean(rnd))
    return out


def curvature_names(cell: dict) -> list:
    return [c for c in cell if c.startswith("curvature") and not c.endswith("neg-first")]


def comparisons(cell: dict) -> list:
    """Paired comparisons over seeds of every curvature criterion with each baseline and the
    best of them (highest mean); differences in percentage points of all weights."""
    present = [b for b in BASELINES if b in cell]
    if not present:
        return []
    best = max(present, key=lambda b: np.mean(list(cell[b].values())))
    out = []
    for c in curvature_names(cell):
        for b in present + ["best"]:
            bb = best if b == "best" else b
            seeds = sorted(set(cell[c]) & set(cell[bb]))
            cmp = paired_comparison([100 * cell[c][s] for s in seeds],
                                    [100 * cell[bb][s] for s in seeds])
            out.append(dict(curvature=c, baseline=b, against=bb, **cmp))
    return out


def verdict_of(cmp: dict) -> str:
    if cmp["n"] >= 2 and np.isfinite(cmp["p_t"]) and cmp["p_t"] < ALPHA_TEST:
        return "more" if cmp["mean"] > 0 else "fewer"
    if cmp["n"] >= 2 and cmp["std"] == 0 and cmp["mean"] != 0:
        return "more" if cmp["mean"] > 0 else "fewer"
    return "level"


def _ms(vals) -> str:
    v = 100 * np.asarray(list(vals))
    return f"{v.mean():.1f}" + (f" ± {v.std(ddof=1):.1f}" if v.size > 1 else "")


def markdown(parts: list, args, command: str, elapsed: float) -> str:
    cs = cells(parts)
    lines = ["# The paper's claim over baselines: weights removable before a "
             f"{args.drop * 100:g}-point drop", "",
             "Global unstructured pruning, no retraining, no BN recalibration; the number of "
             "weights removed before test accuracy drops by more than "
             f"{args.drop * 100:g} point (grid {args.sparsities[0]:g}..{args.sparsities[-1]:g}"
             f"{'' if args.full_curves else ' up to the first point below'}, then bisection "
             "on the number of weights), in % of all Conv2d / Linear "
             "weights, mean ± std over the baselines (training seeds). Curvature: "
             f"{U.preset_settings(args)}, highest kappa removed first (`-neg-first`: the "
             "paper's control), under the library's and the paper authors' conventions; "
             "calibration: correctly classified training images per class, drawn with the "
             "baseline's seed. Wanda: |W| * ||X_j||_2 on the same calibration images "
             f"(`wanda-calib`) or on {WANDA_IMAGES} random training images (`wanda-256`). "
             f"Random: mean of {args.random_draws} draws per seed.", ""]
    by_pair = {}
    for part in parts:
        by_pair.setdefault(part["pair"], []).append(part)
    verdicts = []
    for (pair, pc), cell in cs.items():
        ps = by_pair[pair]
        base = np.array([p["base"] for p in ps]) * 100
        n_tot = next(r["n_total"] for r in ps[0]["results"])
        seeds = sorted(p["seed"] for p in ps)
        lines += [f"## {pair}, {pc} calibration image(s) per class", "",
                  f"Baselines: seeds {seeds}, test accuracy {base.mean():.2f} ± "
                  f"{base.std(ddof=1) if base.size > 1 else 0:.2f}% on {ps[0]['n_test']:,} "
                  f"test images; {n_tot:,} weights.", "",
                  "| criterion | removable (% of weights) | per seed |", "|---|---|---|"]
        for crit, vals in sorted(cell.items(), key=lambda kv: -np.mean(list(kv[1].values()))):
            per = ", ".join(f"{100 * vals[s]:.1f}" for s in sorted(vals))
            lines.append(f"| {crit} | {_ms(vals.values())} | {per} |")
        cmps = comparisons(cell)
        if cmps:
            lines += ["", "Paired over seeds (curvature minus baseline, percentage points):", "",
                      "| curvature | baseline | mean ± std | wins / ties / losses | p (t) | "
                      "p (Wilcoxon) | verdict |", "|---|---|---|---|---|---|---|"]
            for c in cmps:
                v = verdict_of(c)
                against = c["baseline"] + (f" ({c['against']})" if c["baseline"] == "best"
                                           else "")
                lines.append(f"| {c['curvature']} | {against} | {c['mean']:+.2f} ± "
                             f"{c['std']:.2f} | {c['wins']} / {c['ties']} / {c['losses']} | "
                             f"{format_p(c['p_t'])} | {format_p(c['p_wilcoxon'])} | {v} |")
                if c["baseline"] == "best":
                    verdicts.append((pair, pc, c["curvature"], c["against"], v, c))
        lines.append("")
    lines += ["## Verdict", ""]
    for crit in dict.fromkeys(v[2] for v in verdicts):
        sub = [v for v in verdicts if v[2] == crit]
        counts = {k: sum(v[4] == k for v in sub) for k in ("more", "level", "fewer")}
        lines.append(
            f"- `{crit}` against the best of magnitude and Wanda (paired t-test, p < "
            f"{ALPHA_TEST:g}): more removable weights in {counts['more']}, level in "
            f"{counts['level']}, fewer in {counts['fewer']} of {len(sub)} cells ("
            + "; ".join(f"{v[0]} {v[1]}/class vs {v[3]}: {v[5]['mean']:+.1f} pt, {v[4]}"
                        for v in sub) + ").")
    if verdicts:
        paper = [v for v in verdicts if v[2] == "curvature-authors"] or verdicts
        more = sum(v[4] == "more" for v in paper)
        fewer = sum(v[4] == "fewer" for v in paper)
        claim = ("supported" if more == len(paper) else "not supported" if more == 0 else
                 "partly supported")
        lines += ["", f"**Verdict on the claim** (the paper's method as its authors run it, "
                  f"`{paper[0][2]}`, against the best baseline per cell): {claim} -- "
                  f"significantly more removable weights in {more} of {len(paper)} cells, "
                  f"significantly fewer in {fewer}."]
    trunc = [v for v in verdicts if "-first-" in v[2]]
    if trunc:
        lines += ["", "Truncation (sparse pairs): "
                  + "; ".join(f"{v[0]} {v[1]}/class: `{v[2]}` {v[5]['mean']:+.1f} pt vs "
                              f"{v[3]} ({v[4]})" for v in trunc)
                  + " -- compare with the `curvature-authors` row of the same cell."]
    neg = [(k, c) for k, cell in cs.items() for c in cell if c.endswith("neg-first")]
    if neg:
        lines += ["", "The paper's control (negative first): " + "; ".join(
            f"{k[0]} {k[1]}/class `{c}` {_ms(cs[k][c].values())}%" for k, c in neg) + "."]
    lines += ["", "## Scoring time", "", "| pair | criterion | per class | seconds (mean over "
              "seeds) |", "|---|---|---|---|"]
    seen = {}
    for part in parts:
        for r in part["results"]:
            if r["score_s"] and not r["criterion"].endswith("neg-first"):
                seen.setdefault((part["pair"], r["criterion"], r["per_class"]), []).append(
                    r["score_s"])
    for (pair, crit, pc), v in seen.items():
        lines.append(f"| {pair} | {crit} | {pc or '-'} | {np.mean(v):.1f} |")
    notes = {}
    for p in parts:
        for r in p["results"]:
            if r["note"] and r["criterion"] not in notes.setdefault(r["note"], []):
                notes[r["note"]].append(r["criterion"])
    runs = list(dict.fromkeys(p.get("command", command) for p in parts))
    lines += ["", "Criteria: " + "; ".join(
        f"{', '.join(f'`{c}`' for c in cs_)}: {note}" for note, cs_ in notes.items()) + ".", "",
              "Runs: " + "; ".join(f"`{r}`" for r in runs) + ".", "",
              f"Report: `{command}` ({elapsed:.0f} s in this run; torch {args.threads} "
              f"thread(s), Numba {numba.get_num_threads()} thread(s)).", ""]
    return "\n".join(lines)


def plot(parts: list, path: Path, drop: float = 0.01) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cs = cells(parts)
    fig, axes = plt.subplots(1, len(cs), figsize=(max(4.5, 0.55 * 12) * len(cs), 5.2),
                             squeeze=False)
    for ax, ((pair, pc), cell) in zip(axes[0], cs.items()):
        names = sorted(cell, key=lambda c: -np.mean(list(cell[c].values())))
        for i, c in enumerate(names):
            v = 100 * np.array(list(cell[c].values()))
            col = "C0" if c.startswith("curvature") else "C2" if c in BASELINES else "C7"
            ax.bar(i, v.mean(), color=col, alpha=0.35 if c.endswith("neg-first") else 0.7)
            ax.plot(np.full(v.size, i), v, "k.", ms=4)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{pair}, {pc}/class", fontsize=9)
        ax.set_ylabel(f"weights removable before a {100 * drop:g}-pt drop (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(parts: list, args, out: Path, command: str, elapsed: float) -> str:
    rows = [dict(dataset=p["pair"].split(":")[0], model=p["pair"].split(":")[1], seed=p["seed"],
                 base=p["base"], criterion=r["criterion"], per_class=r["per_class"] or "",
                 sparsity=sp, n_removed=n, n_total=r["n_total"], accuracy=acc)
            for p in parts for r in p["results"] for sp, n, acc in r["curve"]]
    write_csv(out / "rows.csv", rows)
    summary = [dict(pair=p["pair"], seed=p["seed"], base=p["base"], n_test=p["n_test"],
                    **{k: v for k, v in r.items() if k != "curve"})
               for p in parts for r in p["results"]]
    cmps = {f"{pair} {pc}/class": comparisons(cell) for (pair, pc), cell in cells(parts).items()}
    with open(out / "rows.json", "w") as f:
        json.dump({"summary": summary, "comparisons": cmps, "command": command,
                   "args": vars(args)}, f, indent=1, default=str)
    md = markdown(parts, args, command, elapsed)
    (out / "summary.md").write_text(md)
    plot(parts, out / "plot.png", args.drop)
    return md


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("results/_scratch/paper_claim_quick" if args.quick
                            else "results/paper_claim"))
    (out / "parts").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    command = "python benchmarks/paper_claim.py " + " ".join(argv)
    parts = []
    for pair in args.pairs:
        for seed in seeds_of(pair, args):
            f = out / "parts" / f"{pair.replace(':', '-')}-seed{seed}.json"
            if (args.resume or args.report_only) and f.is_file():
                parts.append(json.loads(f.read_text()))
                continue
            if args.report_only:
                continue
            part = run_seed(pair, seed, args)
            part["command"] = command
            f.write_text(json.dumps(part, default=str))
            parts.append(part)
    if not parts:
        raise SystemExit(f"nothing to report in {out / 'parts'}")
    md = write_report(parts, args, out, command, time.perf_counter() - t0)
    print(md)
    print(f"wrote {out}/rows.csv, rows.json, summary.md, plot.png")


if __name__ == "__main__":
    main()
