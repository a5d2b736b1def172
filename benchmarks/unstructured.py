"""The curvature paper's own experiment: unstructured per-weight pruning, no retraining.

For each (dataset, model) pair: train or reload a baseline with ``train_or_load``, draw the
calibration set the paper uses (``per_class`` correctly classified images of each class, one by
default), score every weight with :func:`tp_curvature.unstructured.weight_curvature` (min kappa
over the weight's unrolled positions and over the calibration images), then sweep the global
sparsity and measure test accuracy for

* ``curvature``: highest kappa removed first (the paper's method),
* ``curvature-neg-first``: lowest (most negative) kappa first (the paper's control),
* ``magnitude``: smallest ``|w|`` first,
* ``random``: uniformly at random (several seeds).

Also reported: the number of weights each criterion removes before test accuracy drops by more
than one point (first crossing of the grid, refined by bisection on the number of weights
between the last grid point above and the first below), the Spearman correlation of the
curvature score with ``|w|`` per layer, and the wall time of scoring (per image, and cumulative
over images, which shows the linear scaling).

The paper's VGG-9 (``paper_vgg9``, Fashion-MNIST padded to 32x32 with ``input_c=1``; CIFAR-10
when its files are present) has 43M element edges per image: it is scored on the sparse
element graph (:func:`tp_curvature.unstructured.sparse_weight_curvature`, chosen automatically
by ``--mode auto`` whenever the dense element matrices do not fit or the model pools), with the
node values of its logits as in the paper's VGG script.

The curvature definition is a library preset: ``--preset element`` (the default,
``CurvatureConfig.element(sparse=...)``: the paper's definition, alpha 0.9, topk 32 on dense
element matrices and 8 on sparse element graphs) or ``--preset paper``
(``CurvatureConfig.paper()``, untruncated), with the overrides ``--alpha``, ``--topk`` (0: all),
``--backend`` and ``--backend-options``. The preset call and ``describe()`` of what ran are
recorded with each pair's timing and in the Markdown.

Usage::

    python benchmarks/unstructured.py            # LeNet / Fashion-MNIST and MLP / digits
    python benchmarks/unstructured.py --quick    # classes 0-1 only, coarse grid, 1 random seed
    python benchmarks/unstructured.py --pairs digits:mlp --per-class 2 --alpha 0.5
    python benchmarks/unstructured.py --pairs fashion-mnist:paper_vgg9 --test-images 2000
    python benchmarks/unstructured.py --pairs fashion-mnist:paper_vgg9 --quick --images 2
    python benchmarks/unstructured.py --pairs fashion-mnist:paper_vgg9 --edge-check 20
    python benchmarks/unstructured.py --pairs fashion-mnist:paper_vgg9 --speed-check \
        --random-weights --images 2 --speed-fraction 0.25      # the element mode's speed steps

Writes ``results/unstructured.csv``, ``results/unstructured.png`` (one panel per dataset) and
``results/unstructured.md`` (``results/_scratch/unstructured_quick.*`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from scipy.stats import spearmanr

from engine.data import calibration_batch, load_dataset
from engine.presets import (CurvatureOverrides, add_curvature_arguments, config_from_args,
                            preset_call, recipe)
from engine.training import TrainConfig, evaluate, train_or_load
from engine.utils import write_csv
from tp_curvature.unstructured import (
    apply_masks, element_graph, magnitude_scores, masks_from_scores, random_scores,
    sparse_weight_curvature, weight_curvature,
)

# CPU-friendly baselines (epochs): LeNet 3 epochs of Fashion-MNIST, MLP 30 of digits (and 30
# of Fashion-MNIST, as benchmarks/compare.py), the paper's VGG-9 3 epochs of Fashion-MNIST
# padded to 32x32 (and CIFAR-10 when present)
PAIRS = {"fashion-mnist:paper_lenet": 3, "digits:mlp": 30, "fashion-mnist:paper_vgg9": 3,
         "cifar10:paper_vgg9": 10, "fashion-mnist:mlp": 30}
DEFAULT_PAIRS = ["fashion-mnist:paper_lenet", "digits:mlp"]
#: images padded to this size for a model (the paper's VGG-9 reads 32x32)
PAD_TO = {"paper_vgg9": 32}
#: node values of the output layer per model (the paper: softmax for LeNet, logits for VGG)
OUTPUT = {"paper_vgg9": "logits"}


def pairs_parser(doc: str, default_pairs) -> argparse.ArgumentParser:
    """A parser described by the script's docstring ``doc``, with ``--pairs``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc)
    p.add_argument("--pairs", nargs="+", default=list(default_pairs),
                   help="dataset:model pairs (default: %(default)s)")
    return p


def add_sweep_arguments(p) -> None:
    """The element graph (``--mode``), the scores (``--output``, ``--reduce``) and the sweep
    (``--scope``, ``--sparsities``, ``--drop``)."""
    p.add_argument("--mode", default="auto", choices=["auto", "dense", "sparse"],
                   help="element graph: dense matrices (small models), sparse (VGG-9, pooling) "
                        "or auto (dense when it fits)")
    p.add_argument("--output", default=None, choices=["softmax", "logits"],
                   help="node values of the output (default: logits for paper_vgg9, else "
                        "softmax)")
    p.add_argument("--reduce", default="min", choices=["min", "mean"])
    p.add_argument("--scope", default="global", choices=["global", "layer"])
    p.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help="default: 0, 0.05, ..., 0.95")
    p.add_argument("--drop", type=float, default=0.01, help="accuracy drop threshold (0.01)")


def parse_args(argv=None):
    p = pairs_parser(__doc__, DEFAULT_PAIRS)
    p.add_argument("--per-class", type=int, nargs="+", default=[1],
                   help="correctly classified calibration images per class (paper: 1); several "
                        "values score and sweep each")
    add_curvature_arguments(p.add_argument_group("curvature"), preset="element",
                            presets=("element", "paper"))
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs of the baselines (default: per pair, see PAIRS)")
    p.add_argument("--images", type=int, default=None,
                   help="use only the first N calibration images (after --quick's selection)")
    p.add_argument("--test-images", type=int, default=None,
                   help="evaluate on an evenly spaced subset of N test images (quick: 2000)")
    p.add_argument("--edge-check", type=int, default=0,
                   help="also compare, on N random edges per layer of one image of the first "
                        "pair, the default topk / backend with topk=all and the exact solver")
    add_sweep_arguments(p)
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="output prefix (default results/unstructured)")
    p.add_argument("--exact-check", action="store_true",
                   help="also score the first pair with backend='exact' (same images) and "
                        "compare the scores and the time")
    p.add_argument("--topk-scan", type=int, nargs="*", default=None,
                   help="also time one image of the first pair at these topk values and compare "
                        "the scores with the largest (e.g. 4 8 16 32)")
    sp = p.add_argument_group("speed check (sparse element graph; replaces the experiment)")
    sp.add_argument("--speed-check", action="store_true",
                    help="time the element mode's speed steps on the first pair (one after the "
                         "other: top-k by selection, shortest paths cached per layer, several "
                         "tiles per solver call) on --images images (default 2) and write "
                         "<out>.md / .json (default out: results/_scratch/element_speed)")
    sp.add_argument("--speed-fraction", type=float, default=0.25,
                    help="time this fraction of each layer's output positions (a contiguous "
                         "block in the middle) and extrapolate the tiles' time to the layer "
                         "(1: every position)")
    sp.add_argument("--speed-batch", type=int, nargs="*", default=[4, 16],
                    help="tiles per solver call of the batching steps (default 4 16)")
    sp.add_argument("--random-weights", action="store_true",
                    help="speed check on the untrained model (no training; real images)")
    sp.add_argument("--speed-from", type=int, default=0,
                    help="skip the first N steps (e.g. 2: from the cached paths on)")
    sp.add_argument("--speed-conventions", default="library", choices=["library", "authors"],
                    help="conventions of the speed check (default library)")
    return p.parse_args(argv)


def accuracy_with_masks(model, masks, test):
    m = copy.deepcopy(model)
    apply_masks(m, masks)
    return evaluate(m, test)


@dataclasses.dataclass(frozen=True)
class Ranking:
    """How a criterion removes weights: its per-weight ``scores``, which end goes first
    (``order``: ``"lowest"`` / ``"highest"``), ``scope`` (``global`` / ``layer``), the seed of
    its ties and the ``secondary`` scores that break them (see ``masks_from_scores``)."""
    scores: dict
    order: str
    seed: int = 0
    scope: str = "global"
    secondary: dict = None

    def masks(self, sparsity: float) -> dict:
        return masks_from_scores(self.scores, sparsity, order=self.order, scope=self.scope,
                                 seed=self.seed, secondary=self.secondary)


def sweep(model, ranking: Ranking, sparsities, test, stop_below=None):
    """``(sparsity, removed, total, accuracy)`` at every sparsity; with ``stop_below``, the
    sweep ends at the first accuracy below it (all :func:`removed_before_drop` reads)."""
    n_total = sum(s.numel() for s in ranking.scores.values())
    out = []
    for sp in sparsities:
        masks = ranking.masks(sp)
        n_rm = sum(int((~m).sum()) for m in masks.values())
        out.append((sp, n_rm, n_total, accuracy_with_masks(model, masks, test)))
        if stop_below is not None and out[-1][3] < stop_below:
            break
    return out


def removed_before_drop(model, ranking: Ranking, curve, base, drop, test, steps=12):
    """Largest number of removed weights with accuracy >= base - drop, refined by bisection
    between the last grid point above the threshold and the first one below."""
    thr = base - drop + 1e-12
    n_total = curve[0][2]
    first_bad = next((i for i, r in enumerate(curve) if r[3] < thr), None)
    if first_bad is None:
        return curve[-1][1], False
    lo = curve[first_bad - 1][1] if first_bad > 0 else 0
    hi = curve[first_bad][1]
    for _ in range(steps):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if accuracy_with_masks(model, ranking.masks(mid / n_total), test) >= thr:
            lo = mid
        else:
            hi = mid
    return lo, True


def load_pair(pair, args, verbose=True, seed: int = 0):
    """``(model, train, test)``: the baseline of ``dataset:model`` with training seed ``seed``
    (trained, or reloaded by ``train_or_load``), in eval mode, and its dataset. ``args``:
    ``epochs`` (default per pair, :data:`PAIRS`), ``threads`` and, if it has one,
    ``train_subset``."""
    dataset, model_name = pair.split(":")
    pad = PAD_TO.get(model_name)
    cfg = TrainConfig(dataset=dataset, model=model_name, epochs=args.epochs or PAIRS.get(pair),
                      num_threads=args.threads, pad_to=pad, seed=seed,
                      train_subset=getattr(args, "train_subset", None))
    model, _ = train_or_load(cfg, progress=False, verbose=verbose)
    train, test, _ = load_dataset(dataset, pad_to=pad)
    return model.eval(), train, test


def output_of(pair, args):
    return args.output or OUTPUT.get(pair.split(":")[1], "softmax")


def use_sparse(model, x, args) -> bool:
    """``--mode auto``: the sparse element graph when the dense one is refused (too large
    element matrices, pooling)."""
    if args.mode != "auto":
        return args.mode == "sparse"
    try:
        element_graph(model, x[:1])
    except ValueError:          # UnsupportedModelError is a ValueError too
        return True
    return False


def curvature_config(args, sparse: bool):
    """``(config, recipe)`` of the run's preset (``element``: for the sparse or the dense element
    graph) with the command line's overrides."""
    kw = {"sparse": sparse} if args.preset == "element" else {}
    return config_from_args(args, **kw), recipe(args, **kw)


def preset_settings(args) -> str:
    """The run's preset call (``element``: sparse or dense per model, see the timings)."""
    kw = {"sparse": "per model"} if args.preset == "element" else {}
    return preset_call(args.preset, CurvatureOverrides.from_args(args).changes(), **kw)


def config_fields(config) -> dict:
    """A ``CurvatureConfig`` as the keyword options of the per-weight functions."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def score_weights(model, x, pair, args, **over):
    """Per-weight curvature (dense or sparse element graph), with the run's options (``over``:
    config fields changed, and ``progress``); returns (scores, info)."""
    sparse = use_sparse(model, x, args)
    config, how = curvature_config(args, sparse)
    progress = over.pop("progress", True)
    ccfg = {**config_fields(config), **over}
    fn = sparse_weight_curvature if sparse else weight_curvature
    scores, info = fn(model, x, output=output_of(pair, args), reduction=args.reduce,
                      return_info=True, progress=progress, **ccfg)
    info["mode"] = "sparse" if sparse else "dense"
    info["curvature"] = how
    return scores, info


@dataclasses.dataclass
class Results:
    """What a run collects over its pairs."""
    rows: list = dataclasses.field(default_factory=list)      # accuracy per sparsity
    summary: list = dataclasses.field(default_factory=list)   # per criterion x seed: the curve
    timing: list = dataclasses.field(default_factory=list)    # per calibration set: scoring time
    diag: list = dataclasses.field(default_factory=list)      # how much of a score is magnitude
    layer_sp: list = dataclasses.field(default_factory=list)  # per-layer sparsity at 50%


@dataclasses.dataclass
class PairData:
    """One ``dataset:model`` pair: its baseline, training set, test tensors and test accuracy."""
    pair: str
    model: torch.nn.Module
    train: object
    test_xy: tuple
    base: float


def load_test_pair(pair, args, seed: int = 0, n_test=None) -> PairData:
    """The baseline of ``pair`` (training seed ``seed``) and its accuracy on the test set, or
    on an evenly spaced subset of ``n_test`` (default ``--test-images``; 2,000 with
    ``--quick``) test images."""
    torch.manual_seed(0)
    model, train, test = load_pair(pair, args, seed=seed)
    test_xy = test.tensors()
    n_test = n_test or args.test_images or (2000 if args.quick else None)
    if n_test and len(test_xy[1]) > n_test:
        idx = torch.arange(0, len(test_xy[1]), len(test_xy[1]) // n_test)[:n_test]
        test_xy = (test_xy[0][idx], test_xy[1][idx])
    return PairData(pair, model, train, test_xy, evaluate(model, test_xy))


def timing_entry(pair, n_img: int, sinfo: dict) -> dict:
    cum = np.cumsum(sinfo["per_image_s"])
    return dict(pair=pair, n_images=n_img, total_s=sinfo["total_s"],
                per_image_s=[round(t, 2) for t in sinfo["per_image_s"]],
                cumulative_s=[round(t, 2) for t in cum],
                layers={k: {kk: (round(vv, 2) if isinstance(vv, float) else vv)
                            for kk, vv in v.items()}
                        for k, v in sinfo["layers"].items()},
                backend=sinfo["config"]["backend"], topk=sinfo["config"]["topk"],
                mode=sinfo["mode"], curvature=sinfo["curvature"], edges_per_image=sum(
                    v["n_edges"] for v in sinfo["layers"].values()))


def magnitude_diagnostics(tag: str, scores: dict, mag: dict) -> list:
    """Per layer and over all layers: Spearman(score, |w|) and the score's range."""
    out = []
    for k, sc in list(scores.items()) + [("(all)", None)]:
        if sc is None:
            sv = torch.cat([v.reshape(-1) for v in scores.values()]).numpy()
            mv = torch.cat([v.reshape(-1) for v in mag.values()]).numpy()
        else:
            sv, mv = sc.reshape(-1).numpy(), mag[k].reshape(-1).numpy()
        out.append(dict(pair=tag, layer=k, n=sv.size,
                        spearman_score_absw=float(spearmanr(sv, mv).statistic),
                        frac_negative=float((sv < 0).mean()),
                        frac_one=float((sv == 1).mean()), score_min=float(sv.min()),
                        score_median=float(np.median(sv)), score_max=float(sv.max())))
    return out


def curvature_rankings(pd: PairData, args, mag: dict, res: Results) -> list:
    """Score the weights with each ``--per-class`` calibration set; ``(name, Ranking)`` of the
    curvature criteria (timings and diagnostics go to ``res``)."""
    rankings = []
    for ci, per_class in enumerate(args.per_class):
        calib_x, _ = calibration_batch(pd.train, per_class, per_class=True, model=pd.model)
        if args.quick:
            calib_x = calib_x[:2 * per_class]   # classes 0 and 1 only
        if args.images:
            calib_x = calib_x[:args.images]
        n_img = len(calib_x)
        print(f"[{pd.pair}] base acc {pd.base:.4f} on {len(pd.test_xy[1])} test images; "
              f"scoring with {n_img} calibration images")
        scores, sinfo = score_weights(pd.model, calib_x, pd.pair, args)
        res.timing.append(timing_entry(pd.pair, n_img, sinfo))
        print(f"[{pd.pair}] scoring took {sinfo['total_s']:.1f}s "
              f"({np.mean(sinfo['per_image_s']):.2f}s per image)")
        res.diag += magnitude_diagnostics(f"{pd.pair} ({n_img} img)", scores, mag)
        sfx = f" ({per_class}/class)" if len(args.per_class) > 1 else ""
        rankings.append(("curvature" + sfx, Ranking(scores, "highest", 0, args.scope)))
        if ci == 0:
            rankings.append(("curvature-ties-by-magnitude" + sfx,
                             Ranking(scores, "highest", 0, args.scope, mag)))
        rankings.append(("curvature-neg-first" + sfx, Ranking(scores, "lowest", 0, args.scope)))
    return rankings


def record_criterion(pd: PairData, name: str, ranking: Ranking, sparsities, args,
                     res: Results) -> None:
    """Sweep one criterion's sparsities and find the weights it removes before the drop."""
    dataset, model_name = pd.pair.split(":")
    if ranking.seed == 0:   # where does each criterion prune? per-layer sparsity at 50% global
        res.layer_sp.append(dict(pair=pd.pair, criterion=name, **{
            k: float((~m).float().mean()) for k, m in ranking.masks(0.5).items()}))
    t0 = time.perf_counter()
    curve = sweep(pd.model, ranking, sparsities, pd.test_xy)
    n_ok, crossed = removed_before_drop(pd.model, ranking, curve, pd.base, args.drop, pd.test_xy)
    for sp, n_rm, n_tot, acc in curve:
        res.rows.append(dict(dataset=dataset, model=model_name, criterion=name,
                             seed=ranking.seed, sparsity=sp, n_removed=n_rm, n_total=n_tot,
                             accuracy=acc))
    res.summary.append(dict(pair=pd.pair, criterion=name, seed=ranking.seed, base=pd.base,
                            n_total=curve[0][2], removed_before_drop=n_ok, crossed=crossed,
                            acc={sp: acc for sp, _, _, acc in curve}))
    print(f"[{pd.pair}] {name:20s} seed {ranking.seed}: {n_ok} weights before a "
          f"{args.drop:.0%} drop ({time.perf_counter() - t0:.1f}s)")


def run_pair(pair, args, sparsities, res: Results) -> float:
    """Score, sweep and record every criterion on one pair; returns the baseline accuracy."""
    pd = load_test_pair(pair, args)
    mag = magnitude_scores(pd.model)
    rankings = curvature_rankings(pd, args, mag, res)
    rankings.append(("magnitude", Ranking(mag, "lowest", 0, args.scope)))
    rankings += [("random", Ranking(random_scores(pd.model, s), "lowest", s, args.scope))
                 for s in range(args.random_seeds)]
    for name, ranking in rankings:
        record_criterion(pd, name, ranking, sparsities, args, res)
    return pd.base


def topk_scan(pair, args, ks):
    """Time one calibration image at several ``topk`` and compare the per-weight scores with
    those at the largest ``topk`` (Spearman over all weights; max abs difference)."""
    model, train, _ = load_pair(pair, args, verbose=False)
    x, _ = calibration_batch(train, 1, per_class=True, model=model)
    out = {}
    for k in sorted(ks, key=lambda k: (k == 0, k)):
        t0 = time.perf_counter()
        sc, _ = score_weights(model, x[:1], pair, args, topk=k or None, progress=False)
        out[k] = (time.perf_counter() - t0, torch.cat([v.reshape(-1) for v in sc.values()]))
        print(f"[topk scan {pair}] topk={k or 'all'}: {out[k][0]:.1f}s")
    ref_k = sorted(ks, key=lambda k: (k == 0, k))[-1]
    ref = out[ref_k][1].numpy()
    return [dict(pair=pair, topk=k or "all", seconds=t, ref=ref_k or "all",
                 spearman=float(spearmanr(v.numpy(), ref).statistic),
                 max_abs_diff=float(np.abs(v.numpy() - ref).max()))
            for k, (t, v) in out.items()]


def exact_check(pair, args):
    """Score the first pair with the default backend and with ``"exact"`` on the same images;
    compare per-weight scores (Spearman, max abs difference) and wall time."""
    model, train, _ = load_pair(pair, args, verbose=False)
    x, _ = calibration_batch(train, args.per_class[0], per_class=True, model=model)
    if args.quick:
        x = x[:2 * args.per_class[0]]
    if args.images:
        x = x[:args.images]
    res = {}
    for be in (curvature_config(args, True)[0].backend, "exact"):
        t0 = time.perf_counter()
        sc, _ = score_weights(model, x, pair, args, backend=be, progress=False)
        res[be] = (time.perf_counter() - t0, torch.cat([v.reshape(-1) for v in sc.values()]))
        print(f"[exact check {pair}] {be}: {res[be][0]:.1f}s")
    (ta, a), (tb, b) = res.values()
    a, b = a.numpy(), b.numpy()
    return dict(pair=pair, n_images=len(x), backend=list(res)[0], seconds=ta, exact_seconds=tb,
                spearman=float(spearmanr(a, b).statistic),
                max_abs_diff=float(np.abs(a - b).max()),
                mean_diff=float((a - b).mean()))


def edge_check(pair, args, n_edges, seed=0):
    """On one calibration image of ``pair`` (sparse element graph), for ``n_edges`` random
    solved edges of one random tile per weight layer: kappa at the run's topk / backend against
    the same topk solved exactly and against topk=all solved exactly (the definition)."""
    from tp_curvature.unstructured._sparse_scores import (
        set_image_strengths, layer_tiles, sparse_node_values)
    from tp_curvature.unstructured import sparse_element_graph
    model, train, _ = load_pair(pair, args, verbose=False)
    x, _ = calibration_batch(train, 1, per_class=True, model=model)
    x = x[:1]
    g = sparse_element_graph(model, x)
    run, _ = curvature_config(args, sparse=True)
    runs = {"run": run,
            "topk exact": run.replace(backend="exact", backend_options={}),
            "all exact": run.replace(topk=None, backend="exact", backend_options={})}
    a, raw = sparse_node_values(g, x, output_of(pair, args), "minmax")[0]
    set_image_strengths(g, raw)
    rows = []
    pick = np.random.default_rng(seed)
    for bi in g.weight_ops:
        op = g.ops[bi]
        tile = int(pick.integers(op.L))
        got, secs = {}, {}
        for name, cfg in runs.items():
            t0 = time.perf_counter()
            _, k, solved, _, _, _ = next(layer_tiles(g, bi, a, cfg, tiles=[tile],
                                                     max_solved=n_edges,
                                                     rng=np.random.default_rng(seed)))
            secs[name] = time.perf_counter() - t0
            got[name] = k[solved]
        d_topk = np.abs(got["run"] - got["topk exact"])
        d_all = np.abs(got["run"] - got["all exact"])
        rows.append(dict(pair=pair, layer=op.name, tile=tile, n=int(got["run"].size),
                         max_abs_solver=float(d_topk.max(initial=0)),
                         max_abs_vs_all=float(d_all.max(initial=0)),
                         mean_abs_vs_all=float(d_all.mean()) if d_all.size else 0.0,
                         seconds={k: round(v, 2) for k, v in secs.items()}))
        print(f"[edge check {pair}] {op.name} tile {tile}: {rows[-1]}")
    return rows


def speed_model(pair, args):
    """``(model, calibration images)`` of the speed check: the trained baseline and one
    correctly classified image per class, or with ``--random-weights`` the untrained model
    (seed 0) and one image per class (the same seeded draw, correct or not)."""
    if not args.random_weights:
        model, train, _ = load_pair(pair, args, verbose=False)
        x, _ = calibration_batch(train, 1, per_class=True, model=model)
        return model, x
    from engine.training import build_model_for, set_seed
    dataset, model_name = pair.split(":")
    train, _, meta = load_dataset(dataset, pad_to=PAD_TO.get(model_name))
    set_seed(0)
    model = build_model_for(TrainConfig(dataset=dataset, model=model_name,
                                        pad_to=PAD_TO.get(model_name)), meta).eval()
    x, _ = calibration_batch(train, 1, per_class=True)
    return model, x


#: the speed check's steps, cumulative: (name, top-k selection limit (0: full sort), paths
#: cached, tiles per solver call, solved at idleness 1/2)
SPEED_STEPS = [("before: full sort for top-k, paths per tile, one tile per call", 0, False, 1,
                False),
               ("+ top-k by selection", None, False, 1, False),
               ("+ shortest paths cached per layer", None, True, 1, False),
               ("+ solved at idleness 1/2 (the same kappa for alpha >= 1/2)", None, True, 1,
                True)]


def speed_check(pair, args) -> dict:
    """Time the element mode on ``pair`` (sparse element graph) step by step (see
    :data:`SPEED_STEPS`, then ``--speed-batch`` tiles per call): per image and layer, the
    measures' supports and the tiles (``--speed-fraction`` of each layer's positions, a
    contiguous block in the middle, extrapolated to the layer), the path caches' size, and the
    per-weight min kappa over the timed tiles compared with the first step (the first three
    steps must agree bit for bit)."""
    import functools
    import tp_curvature.unstructured._sparse as sparse_mod
    import tp_curvature.unstructured._sparse_scores as scores_mod
    from tp_curvature.unstructured import sparse_element_graph
    model, x = speed_model(pair, args)
    x = x[:args.images or 2]
    graph = sparse_element_graph(model, x[:1], conventions=args.speed_conventions)
    cfg, how = curvature_config(args, sparse=True)
    out_mode = output_of(pair, args)
    steps = SPEED_STEPS + [(f"+ {b} tiles per solver call", None, True, b, True)
                           for b in args.speed_batch]
    if args.speed_from:
        steps = steps[args.speed_from:]

    def with_half(half):
        opts = dict(cfg.backend_options, half_idleness=half)
        return dataclasses.replace(cfg, backend_options=opts)
    blocks = {}
    for bi in graph.weight_ops:
        L = graph.ops[bi].L
        n = max(1, int(np.ceil(L * args.speed_fraction)))
        blocks[bi] = list(range((L - n) // 2, (L - n) // 2 + n))
    vals = [scores_mod.sparse_node_values(graph, x[i:i + 1], out_mode, cfg.normalize)[0]
            for i in range(len(x))]
    orig = scores_mod.pred_supports, scores_mod.succ_supports

    def use(select):
        sel = sparse_mod.SELECT_TOPK if select is None else select
        scores_mod.pred_supports = functools.partial(orig[0], select=sel)
        scores_mod.succ_supports = functools.partial(orig[1], select=sel)
        return sel

    rows, first = [], None
    try:
        # warm-up (untimed): every kernel of every step compiled or loaded from Numba's cache
        for _, select, cache_on, per_call, half in steps:
            use(select)
            step_cfg = with_half(half)
            caches = scores_mod.path_caches(graph, graph.weight_ops, cfg, cache_on)
            scores_mod.set_image_strengths(graph, vals[0][1])
            for bi in graph.weight_ops:
                for _ in scores_mod.layer_tiles(graph, bi, vals[0][0], step_cfg,
                                                tiles=blocks[bi][:per_call], cache=caches[bi],
                                                tiles_per_call=per_call):
                    pass
        for name, select, cache_on, per_call, half in steps:
            sel = use(select)
            step_cfg = with_half(half)
            caches = scores_mod.path_caches(graph, graph.weight_ops, cfg, cache_on)
            accs = {bi: np.full(graph.ops[bi].module.weight.numel(), np.inf)
                    for bi in graph.weight_ops}
            per_image = []
            for a, raw in vals:
                scores_mod.set_image_strengths(graph, raw)
                layers = {}
                for bi in graph.weight_ops:
                    op = graph.ops[bi]
                    w0, c0 = time.perf_counter(), time.process_time()
                    ctx = scores_mod.layer_context(graph, bi, a, step_cfg)
                    w1, c1 = time.perf_counter(), time.process_time()
                    solved = 0
                    for wi, k, sv, _, _, _ in scores_mod.layer_tiles(
                            graph, bi, a, step_cfg, tiles=blocks[bi], cache=caches[bi],
                            tiles_per_call=per_call, context=ctx):
                        ok = ~np.isnan(k)
                        np.minimum.at(accs[bi], wi[ok], k[ok])
                        solved += int(sv.sum())
                    w2, c2 = time.perf_counter(), time.process_time()
                    frac = len(blocks[bi]) / op.L
                    layers[op.name] = dict(
                        supports_s=w1 - w0, tiles_s=w2 - w1,
                        estimate_s=w1 - w0 + (w2 - w1) / frac,
                        estimate_cpu_s=c1 - c0 + (c2 - c1) / frac,
                        tiles=len(blocks[bi]), of=op.L, solved=solved)
                per_image.append(dict(
                    estimate_s=sum(v["estimate_s"] for v in layers.values()),
                    estimate_cpu_s=sum(v["estimate_cpu_s"] for v in layers.values()),
                    layers=layers))
            kap = np.concatenate([np.where(np.isinf(v), 1.0, v) for v in accs.values()])
            if first is None:
                first = kap
            row = dict(step=name, select=sel, cache_paths=cache_on, tiles_per_call=per_call,
                       half_idleness=half,
                       per_image=per_image,
                       estimate_s=[round(p["estimate_s"], 1) for p in per_image],
                       estimate_cpu_s=[round(p["estimate_cpu_s"], 1) for p in per_image],
                       max_abs_diff_vs_first=float(np.abs(kap - first).max()),
                       bit_identical_to_first=bool(np.array_equal(kap, first)),
                       path_cache={graph.ops[bi].name: c.stats()
                                   for bi, c in caches.items() if c is not None})
            rows.append(row)
            print(f"[speed check] {name}: per image (estimated) "
                  f"{', '.join(f'{e:.1f}' for e in row['estimate_s'])} s wall, "
                  f"{', '.join(f'{e:.1f}' for e in row['estimate_cpu_s'])} s CPU; "
                  f"max |dk| vs first "
                  f"{row['max_abs_diff_vs_first']:.2g}", flush=True)
    finally:
        scores_mod.pred_supports, scores_mod.succ_supports = orig
    return dict(pair=pair, images=len(x), fraction=args.speed_fraction,
                random_weights=args.random_weights, curvature=how, output=out_mode,
                conventions=args.speed_conventions,
                numba_threads=numba.get_num_threads(), steps=rows)


def speed_markdown(res: dict, argv) -> str:
    steps = res["steps"]
    names = list(steps[0]["per_image"][0]["layers"])
    lines = [f"# Element-mode speed steps: {res['pair']}", "",
             f"{'Untrained' if res['random_weights'] else 'Trained'} model, {res['images']} "
             f"calibration image(s), curvature {res['curvature']}, conventions "
             f"{res['conventions']!r}, output {res['output']}; "
             f"{res['fraction']:g} of each layer's output positions timed (a contiguous block) "
             f"and the tiles' time extrapolated to the layer; Numba {res['numba_threads']} "
             "thread(s). Seconds per image (estimated for the whole image): wall time, and "
             "the process's CPU time (all threads; what an otherwise idle machine would take "
             "on one thread, since other jobs only stretch the wall time).", "",
             "| step | " + " | ".join(f"image {i + 1} wall / CPU" for i in range(res["images"]))
             + " | speed-up in CPU time (all images) vs previous / vs first | max abs diff of "
               "the scores vs first |", "|---|" + "---|" * (res["images"] + 2)]
    prev = None
    for r in steps:
        tot = sum(r["estimate_cpu_s"])
        gain = (f"{prev / tot:.2f}x / {sum(steps[0]['estimate_cpu_s']) / tot:.2f}x"
                if prev else "-")
        diff = ("0 (bit for bit)" if r["bit_identical_to_first"]
                else f"{r['max_abs_diff_vs_first']:.3g}")
        lines.append(f"| {r['step']} | " + " | ".join(
            f"{e:.1f} / {c:.1f}" for e, c in zip(r["estimate_s"], r["estimate_cpu_s"]))
                     + f" | {gain} | {diff} |")
        prev = tot
    lines += ["", "Per layer, last image: measures' supports s + timed tiles s -> estimate for "
              "the layer, wall s (CPU s):", "",
              "| step | " + " | ".join(f"`{n}`" for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for r in steps:
        lay = r["per_image"][-1]["layers"]
        lines.append(f"| {r['step']} | " + " | ".join(
            f"{lay[n]['supports_s']:.2f} + {lay[n]['tiles_s']:.2f} -> "
            f"{lay[n]['estimate_s']:.1f} ({lay[n]['estimate_cpu_s']:.1f})" for n in names)
                     + " |")
    cached = next((r for r in steps if r["path_cache"]), None)
    if cached:
        mb = sum(v["bytes"] for v in cached["path_cache"].values()) / 2 ** 20
        lines += ["", f"Path caches after {res['images']} image(s) ({cached['step']}): "
                  f"{mb:.1f} MB in all; per layer rows kept / rows asked for by tiles: "
                  + ", ".join(f"`{k}` {v['rows']:,} / {v['hits'] + v['misses']:,}"
                              for k, v in cached["path_cache"].items()) + "."]
    lines += ["", f"Command: `python benchmarks/unstructured.py {' '.join(argv)}`"]
    return "\n".join(lines) + "\n"


def plot(rows, summary, path, sparsities):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = list(dict.fromkeys((r["dataset"], r["model"]) for r in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.5 * len(pairs), 5.6), squeeze=False)
    colors = {"curvature": "C0", "curvature-ties-by-magnitude": "C9", "curvature-neg-first": "C3",
              "magnitude": "C2", "random": "C7"}
    styles = ["-o", "--s", ":^", "-.v"]
    for ax, (ds, mdl) in zip(axes[0], pairs):
        sub = [r for r in rows if r["dataset"] == ds and r["model"] == mdl]
        crits = list(dict.fromkeys(r["criterion"] for r in sub))
        n_seen = {}
        for crit in crits:
            base_c = crit.split(" (")[0]
            st = styles[n_seen.get(base_c, 0) % len(styles)]
            n_seen[base_c] = n_seen.get(base_c, 0) + 1
            rs = [r for r in sub if r["criterion"] == crit]
            if not rs:
                continue
            seeds = sorted({r["seed"] for r in rs})
            acc = np.array([[r["accuracy"] for r in rs if r["seed"] == s] for s in seeds]) * 100
            sp = [r["sparsity"] for r in rs if r["seed"] == seeds[0]]
            lab = crit + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
            ax.plot(sp, acc.mean(0), st, ms=3, color=colors[base_c], label=lab)
            if len(seeds) > 1:
                ax.fill_between(sp, acc.min(0), acc.max(0), color=colors[base_c], alpha=0.2)
        base = next(s["base"] for s in summary if s["pair"] == f"{ds}:{mdl}") * 100
        ax.axhline(base - 1, color="k", ls=":", lw=0.8, label="base - 1 pt")
        ax.set_title(f"{mdl} on {ds} (no retraining)")
        ax.set_xlabel("fraction of weights removed (global)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cum_txt(cum):
    n = len(cum)
    at = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500) if k < n] + [n]
    return ", ".join(f"{k}: {cum[k - 1]:.1f}" for k in at)


def markdown(summary, timing, diag, args, show_sp, layer_sp=()):
    lines = ["# Unstructured per-weight curvature pruning (the paper's experiment)", "",
             f"Settings: curvature {preset_settings(args)}, "
             f"output={args.output or 'per model'}, reduce={args.reduce} over positions and images, "
             f"scope={args.scope}, {'/'.join(map(str, args.per_class))} correctly classified "
             f"calibration image(s) per "
             f"class{' (quick: classes 0 and 1 only)' if args.quick else ''}, no retraining. "
             f"Accuracy in %, test set{' subset (2,000)' if args.quick else ''}.", ""]
    head = ("| model / dataset | criterion | base | " + " | ".join(f"{s:.0%}" for s in show_sp)
            + f" | weights removed before a {args.drop * 100:g}-pt drop |")
    lines += [head, "|" + "---|" * (4 + len(show_sp))]
    pairs = list(dict.fromkeys(s["pair"] for s in summary))
    for pair in pairs:
        sub = [s for s in summary if s["pair"] == pair]
        ds, mdl = pair.split(":")
        for crit in dict.fromkeys(s["criterion"] for s in sub):
            ss = [s for s in sub if s["criterion"] == crit]
            if not ss:
                continue
            accs = []
            for sp in show_sp:
                v = np.array([s["acc"][sp] for s in ss]) * 100
                accs.append(f"{v.mean():.1f}" + (f" ± {v.std():.1f}" if len(v) > 1 else ""))
            n = np.array([s["removed_before_drop"] for s in ss])
            tot = ss[0]["n_total"]
            ntxt = (f"{n.mean():,.0f} ({n.mean() / tot:.1%})" + (
                f" [{n.min():,}-{n.max():,}]" if len(n) > 1 else "")
                    + ("" if all(s["crossed"] for s in ss) else " (never dropped)"))
            lab = crit + (f" ({len(ss)} seeds)" if len(ss) > 1 else "")
            lines.append(f"| {mdl} / {ds} | {lab} | {ss[0]['base'] * 100:.1f} | "
                         + " | ".join(accs) + f" | {ntxt} of {tot:,} |")
    lines += ["", "## Scoring time", "",
              "| model / dataset | backend | topk | images | total (s) | per image (s) | "
              "cumulative (images: s) | solved problems per image |",
              "|---|---|---|---|---|---|---|---|"]
    for t in timing:
        solved = sum(v["solved"] for v in t["layers"].values()) / t["n_images"]
        lines.append(f"| {t['pair'].split(':')[1]} / {t['pair'].split(':')[0]} "
                     f"({t.get('mode', 'dense')}) | {t['backend']} "
                     f"| {t['topk']} | {t['n_images']} | {t['total_s']:.1f} | "
                     f"{np.mean(t['per_image_s']):.2f} | "
                     f"{cum_txt(t['cumulative_s'])} | {solved:,.0f} |")
    lines += ["", "Curvature: " + "; ".join(
        f"{t['pair']} ({t.get('mode', 'dense')}): {t['curvature']}" for t in timing
        if "curvature" in t) + "."]
    lines += ["", "Per layer (all images): edges, solved transport problems, problem build and "
              "solve time (s):", ""]
    for t in timing:
        for k, v in t["layers"].items():
            tm = (f"build {v['build_s']:.1f}, solve {v['solve_s']:.1f}" if "build_s" in v
                  else f"{v['tiles']} tiles, {v['seconds']:.1f} s")
            lines.append(f"- {t['pair']} `{k}`: {v['n_edges']:,} edges per image for "
                         f"{v['n_weights']:,} weights, {v['solved']:,} solved, {tm}")
    lines += ["", "## How much of the score is magnitude", "",
              "| model / dataset | layer | weights | Spearman(score, abs w) | negative | "
              "exactly 1 (no active edge) | min | median | max |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d in diag:
        lines.append(f"| {d['pair']} | {d['layer']} | {d['n']:,} | {d['spearman_score_absw']:.3f} "
                     f"| {d['frac_negative']:.1%} | {d['frac_one']:.1%} | {d['score_min']:.2f} | "
                     f"{d['score_median']:.2f} | {d['score_max']:.2f} |")
    lines += ["", "## Where each criterion prunes: per-layer fraction removed at 50% global "
              "sparsity", ""]
    for pair in dict.fromkeys(r["pair"] for r in layer_sp):
        sub = [r for r in layer_sp if r["pair"] == pair]
        keys = [k for k in sub[0] if k not in ("pair", "criterion")]
        lines += [f"{pair}:", "", "| criterion | " + " | ".join(f"`{k}`" for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for r in sub:
            lines.append(f"| {r['criterion']} | " + " | ".join(f"{r[k]:.0%}" for k in keys)
                         + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.speed_check:
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        out = Path(args.out or "results/_scratch/element_speed")
        out.parent.mkdir(parents=True, exist_ok=True)
        res = speed_check(args.pairs[0], args)
        md = speed_markdown(res, argv if argv is not None else sys.argv[1:])
        out.with_suffix(".md").write_text(md)
        with open(out.with_suffix(".json"), "w") as f:
            json.dump({**res, "args": vars(args)}, f, indent=1, default=str)
        print(md)
        return
    if args.quick:
        sparsities = args.sparsities or [0.0, 0.2, 0.4, 0.6, 0.8, 0.9]
        args.random_seeds = min(args.random_seeds, 1)
        out = Path(args.out or "results/_scratch/unstructured_quick")
    else:
        sparsities = args.sparsities or [round(float(s), 2) for s in np.arange(0, 0.96, 0.05)]
        out = Path(args.out or "results/unstructured")
    out.parent.mkdir(parents=True, exist_ok=True)
    res = Results()
    t0 = time.perf_counter()
    for pair in args.pairs:
        run_pair(pair, args, sparsities, res)
    scan = topk_scan(args.pairs[0], args, args.topk_scan) if args.topk_scan else []
    check = exact_check(args.pairs[0], args) if args.exact_check else None
    echeck = edge_check(args.pairs[0], args, args.edge_check) if args.edge_check else []
    write_csv(out.with_suffix(".csv"), res.rows)
    plot(res.rows, res.summary, out.with_suffix(".png"), sparsities)
    show = [s for s in sparsities if round(s * 100) % 10 == 0 and s > 0] or sparsities
    md = markdown(res.summary, res.timing, res.diag, args, show, res.layer_sp)
    if check:
        md += (f"\n## {check['backend']} against exact (POT emd2 loop), same {check['n_images']} "
               f"images, {check['pair']}\n\n"
               f"Per-weight scores: Spearman {check['spearman']:.5f}, max abs difference "
               f"{check['max_abs_diff']:.3f}, mean difference {check['mean_diff']:+.4f} "
               f"(scores span about [-6, 2]); wall time {check['seconds']:.1f} s against "
               f"{check['exact_seconds']:.1f} s exact.\n")
    if echeck:
        md += ("\n## Sampled edges: run settings against exact (same topk) and against topk=all "
               "exact (one image, one random tile per layer)\n\n| layer | tile | edges | max "
               "abs diff vs exact, same topk | max / mean abs diff vs topk=all exact |\n"
               "|---|---|---|---|---|\n")
        for r in echeck:
            md += (f"| {r['layer']} | {r['tile']} | {r['n']} | {r['max_abs_solver']:.4f} | "
                   f"{r['max_abs_vs_all']:.4f} / {r['mean_abs_vs_all']:.4f} |\n")
    if scan:
        md += ("\n## topk: time and agreement (one calibration image)\n\n| model / dataset | topk "
               "| seconds | Spearman with topk=" + str(scan[0]["ref"]) + " | max abs diff |\n"
               "|---|---|---|---|---|\n")
        for r in scan:
            md += (f"| {r['pair']} | {r['topk']} | {r['seconds']:.1f} | {r['spearman']:.4f} | "
                   f"{r['max_abs_diff']:.3f} |\n")
    md += (f"\nCommand: `python benchmarks/unstructured.py {' '.join(argv or sys.argv[1:])}` "
           f"({time.perf_counter() - t0:.0f} s in all; torch {args.threads} thread(s), Numba "
           f"{numba.get_num_threads()} thread(s)).\n")
    out.with_suffix(".md").write_text(md)
    with open(out.with_suffix(".json"), "w") as f:
        json.dump({"summary": res.summary, "timing": res.timing, "diagnostics": res.diag,
                   "topk_scan": scan,
                   "exact_check": check, "edge_check": echeck,
                   "layer_sparsity_at_50": res.layer_sp,
                   "args": vars(args)}, f, indent=1, default=str)
    print(md)
    print(f"wrote {out}.csv / .png / .md / .json")


if __name__ == "__main__":
    main()
