"""End-to-end cost of CurvatureImportance on real architectures (issue 3's model targets).

Two measurements, each in one process so the ratios compare like with like:

* ``resnet56``: CurvatureImportance of a CIFAR ResNet-56 on a calibration batch (default 256
  images, 32x32) against GroupTaylorImportance's forward + backward on the same batch and the
  same pruner; both times include scoring every group of one ``BasePruner`` step. Both run
  once on two images first, untimed (:func:`warm_up`: imports, Numba cache, first export).
  ``--repeat N`` makes N paired measurements in the process (a noisy machine's check).
* ``resnet50``: CurvatureImportance of torchvision ResNet-50 (random weights) at 224x224, wall
  time and peak resident memory (``ru_maxrss``) of the process.
* ``repair_resnet20`` (256 images, 32x32) and ``repair_resnet50`` (16 images, 224x224): the
  cost of ``tp_curvature.LeastSquaresRepair`` (calibration pass and repair after a one-shot L2
  pruning at 0.3) against one forward of the calibration batch (:func:`bench_repair`).
* ``vit_b_16`` (torchvision, random weights, 224x224, ``BasePruner`` with ``num_heads`` of each
  ``nn.MultiheadAttention``, the head ignored) and ``timm_efficientnet_b0`` (timm, random
  weights, 224x224): calibration time, wall time of scoring every group of one pruner step
  once (the curvature of the whole graph is computed at the first group), peak RSS, the
  connections (structural / solved), the scored groups and the coverage fallback list.
  ``--size`` changes the image size, ``--vit-layers N`` keeps N encoder blocks (a quick
  check; the full model has 12), ``--max-groups`` scores only the first groups and
  ``--dry-run`` stops after calibration (graph, connections, groups; no curvature).

The curvature definition is a library preset (``--preset default``: ``CurvatureConfig()``,
``--preset paper``: ``CurvatureConfig.paper()``) with the overrides ``--alpha``, ``--topk``,
``--backend``, ``--backend-options``; every row records the preset call and ``describe()`` of
what ran (``curvature``) and the table is printed under it.

Usage::

    python benchmarks/end_to_end.py                 # resnet56 and resnet50, library default
    python benchmarks/end_to_end.py --only resnet56 --calib 256
    python benchmarks/end_to_end.py --only resnet56 --repeat 5 --threads 2   # paired runs
    python benchmarks/end_to_end.py --only resnet50 --calib 16 --topk 8
    python benchmarks/end_to_end.py --only repair_resnet20 --threads 2
    python benchmarks/end_to_end.py --only repair_resnet50 --threads 2
    python benchmarks/end_to_end.py --only vit_b_16              # calib 8, 224x224
    python benchmarks/end_to_end.py --only timm_efficientnet_b0 --calib 8
    python benchmarks/end_to_end.py --only vit_b_16 --vit-layers 1 --size 32 --calib 1 --out /tmp/e.json
    # the README's timings: the paper's definition as they ran it (alpha 0.5, topk 32) ...
    python benchmarks/end_to_end.py --only resnet56 --threads 2 --preset paper --alpha 0.5 --topk 32
    # ... and the library default
    python benchmarks/end_to_end.py --only resnet56 --threads 2 --out results/end_to_end_flow.json

Writes ``results/end_to_end.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from engine.criteria import score_all_groups
from engine.models import resnet56
from engine.presets import add_curvature_arguments, config_from_args, recipe
from tp_curvature import CurvatureConfig, CurvatureImportance


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def n_scored(scores: dict) -> int:
    return sum(s is not None for s in scores.values())


def config_columns(config: CurvatureConfig) -> dict:
    """The definition's main fields, as row columns."""
    return dict(alpha=config.alpha, variant=config.variant, node_value=config.node_value,
                topk=config.topk, backend=config.backend)


def _resnet56_once(model: nn.Module, x, y, config: CurvatureConfig) -> dict:
    """One paired measurement: Taylor's forward+backward and scoring, an eager forward, then
    curvature's calibration and scoring, each on its own copy of ``model``."""
    example = x[:1]
    m_t = copy.deepcopy(model)
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(m_t(x), y)
    loss.backward()
    t_fb = time.perf_counter() - t0
    t1 = time.perf_counter()
    n_groups = n_scored(score_all_groups(m_t, example, tp.importance.GroupTaylorImportance())[0])
    t_taylor_score = time.perf_counter() - t1
    with torch.no_grad():  # an eager forward of the batch (what calibration is compared with)
        t0 = time.perf_counter()
        model(x)
        t_fwd = time.perf_counter() - t0
    m_c = copy.deepcopy(model)
    imp = CurvatureImportance(config)
    t0 = time.perf_counter()
    imp.calibrate(m_c, x)
    t_cal = time.perf_counter() - t0
    t1 = time.perf_counter()
    score_all_groups(m_c, example, imp)
    t_curv = time.perf_counter() - t1
    n_conn = sum(cc.n_solved for cc in imp.channel_curvatures().values())
    return dict(groups=n_groups, connections=n_conn, eager_forward_s=t_fwd,
                taylor_forward_backward_s=t_fb, taylor_total_s=t_fb + t_taylor_score,
                curvature_calibrate_s=t_cal, curvature_scoring_s=t_curv,
                curvature_total_s=t_cal + t_curv)


def bench_resnet56(calib: int, config: CurvatureConfig, seed: int = 0, repeat: int = 1) -> dict:
    """Curvature against Taylor on a CIFAR ResNet-56, ``repeat`` paired measurements in one
    process (:func:`_resnet56_once`). The row's times are the medians over the runs, its
    ratios the per-run ratios' mean (``_std``: their standard deviation) and the ratio of the
    best times (``ratio_vs_taylor_fb_of_best``), the least disturbed by other load."""
    import numpy as np

    torch.manual_seed(seed)
    model = resnet56(10, 3).eval()
    x = torch.randn(calib, 3, 32, 32)
    y = torch.randint(0, 10, (calib,))
    warm_up(model, x[:2], y[:2], config)
    runs = [_resnet56_once(model, x, y, config) for _ in range(repeat)]
    row = dict(model="resnet56", calib=calib, **config_columns(config), repeat=repeat,
               groups=runs[0]["groups"], connections=runs[0]["connections"])
    for key in runs[0]:
        if key.endswith("_s"):
            row[key] = float(np.median([r[key] for r in runs]))
            row[key + "_runs"] = [r[key] for r in runs]
    for name, ref in (("fb", "taylor_forward_backward_s"), ("total", "taylor_total_s")):
        ratios = np.array([r["curvature_total_s"] / r[ref] for r in runs])
        row[f"ratio_vs_taylor_{name}"] = float(ratios.mean())
        row[f"ratio_vs_taylor_{name}_std"] = float(ratios.std(ddof=1)) if repeat > 1 else 0.0
        row[f"ratio_vs_taylor_{name}_runs"] = ratios.tolist()
    row["ratio_vs_taylor_fb_of_best"] = (min(row["curvature_total_s_runs"])
                                         / min(row["taylor_forward_backward_s_runs"]))
    return row


def warm_up(model: nn.Module, x, y, config: CurvatureConfig) -> None:
    """Both criteria once on a copy and a tiny batch, untimed: the process's one-time costs
    (importing POT, loading the Numba cache, torch.export's and autograd's first calls) are
    paid before the clock starts, as in any process that prunes more than once."""
    m = copy.deepcopy(model)
    nn.functional.cross_entropy(m(x), y).backward()
    score_all_groups(m, x[:1], tp.importance.GroupTaylorImportance())
    m = copy.deepcopy(model)
    imp = CurvatureImportance(config)
    imp.calibrate(m, x)
    score_all_groups(m, x[:1], imp)


def bench_resnet50(calib: int, config: CurvatureConfig, seed: int = 0) -> dict:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(calib, 3, 224, 224)
    rss0 = peak_rss_mib()
    imp = CurvatureImportance(config, progress=True)
    t0 = time.perf_counter()
    imp.calibrate(model, x)
    t_cal = time.perf_counter() - t0
    t1 = time.perf_counter()
    curv = imp.channel_curvatures()                # what scoring computes and keeps
    t_curv = time.perf_counter() - t1
    n_conn = sum(cc.n_solved for cc in curv.values())
    return dict(model="resnet50", calib=calib, **config_columns(config),
                connections=n_conn, curvature_calibrate_s=t_cal, curvature_kappa_s=t_curv,
                curvature_total_s=t_cal + t_curv, connections_per_s=n_conn / t_curv,
                peak_rss_mib=peak_rss_mib(), peak_rss_before_mib=rss0)


def _vit_b_16(size: int, layers: int):
    from torchvision.models.vision_transformer import VisionTransformer
    m = VisionTransformer(image_size=size, patch_size=16, num_layers=layers, num_heads=12,
                          hidden_dim=768, mlp_dim=3072)          # vit_b_16 when layers == 12
    nh = {mm: mm.num_heads for mm in m.modules() if isinstance(mm, nn.MultiheadAttention)}
    return m, dict(num_heads=nh, ignored_layers=[m.heads.head])


def _timm_efficientnet_b0(size: int, layers: int):
    import timm
    m = timm.create_model("efficientnet_b0", pretrained=False)
    return m, dict(ignored_layers=[m.classifier])


ZOO = {"vit_b_16": _vit_b_16, "timm_efficientnet_b0": _timm_efficientnet_b0}


def bench_zoo(name: str, calib: int, config: CurvatureConfig, size: int = 224, vit_layers: int = 12,
              max_groups=None, dry_run: bool = False, seed: int = 0) -> dict:
    """Calibrate, then score every group of one BasePruner step once (see the module
    docstring); Torch-Pruning's dependency graph is built before the clock starts."""
    import warnings

    torch.manual_seed(seed)
    model, kw = ZOO[name](size, vit_layers)
    model.eval()
    x = torch.randn(calib, 3, size, size)
    rss0 = peak_rss_mib()
    imp = CurvatureImportance(config, progress=True)
    pruner = tp.pruner.BasePruner(model, x[:1], importance=imp, pruning_ratio=0.5, **kw)
    groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                           root_module_types=pruner.root_module_types))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imp.calibrate(model, x)
    t_cal = time.perf_counter() - t0
    graph = imp.graph
    scoreable = [l for l in graph.layers if graph.scoreable(l)]
    structural = int(sum(graph.node_weights(l, imp.config.p)[1].sum() for l in scoreable))
    row = dict(model=name, calib=calib, image_size=size, **config_columns(config),
               groups=len(groups), connections=structural,
               graph_fallback=sorted(l.name for l in graph.layers if not graph.scoreable(l)),
               curvature_calibrate_s=t_cal)
    if name == "vit_b_16":
        row["encoder_layers"] = vit_layers
    if not dry_run:
        todo = groups if max_groups is None else groups[:max_groups]
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scored = sum(imp(g) is not None for g in todo)
        t_score = time.perf_counter() - t1
        solved = sum(cc.n_solved for cc in imp.channel_curvatures().values())
        row.update(scored_groups=scored, groups_timed=len(todo), solved_connections=solved,
                   curvature_scoring_s=t_score, curvature_total_s=t_cal + t_score,
                   connections_per_s=solved / max(t_score, 1e-9),
                   fallback=imp.coverage()["fallback"])
    row.update(peak_rss_mib=peak_rss_mib(), peak_rss_before_mib=rss0)
    return row


def bench_repair(name: str, calib: int, ratio: float = 0.3, seed: int = 0) -> dict:
    """Cost of ``tp_curvature.LeastSquaresRepair`` after a one-shot L2 pruning: the
    calibration pass (export, one streaming pass, Gram matrices) and the repair (replay of
    the pruner's history, the solves, the assignment), against one forward of the calibration
    batch; random weights, ``resnet20`` at 32x32, ``resnet50`` (torchvision) at 224x224."""
    import torchvision
    from engine.models import resnet20
    from tp_curvature import LeastSquaresRepair

    torch.manual_seed(seed)
    if name == "repair_resnet20":
        model, size = resnet20(10, 3), 32
    else:
        model, size = torchvision.models.resnet50(), 224
    model.eval()
    x = torch.randn(calib, 3, size, size)
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(x)
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    repair = LeastSquaresRepair().calibrate(model, x)
    t_cal = time.perf_counter() - t0
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.BasePruner(model, x[:1], tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=ratio, ignored_layers=[head])
    pruner.step()
    t0 = time.perf_counter()
    _, log = repair.apply(model, pruner, log=True)
    t_apply = time.perf_counter() - t0
    gram_mib = sum(8 * m.gram.numel() for m in repair._moments.values()
                   if m.gram is not None) / 2 ** 20
    return dict(model=name, calib=calib, image_size=size, ratio=ratio,
                layers_repaired=len(log["layers"]), forward_s=t_fwd, repair_calibrate_s=t_cal,
                repair_apply_s=t_apply, repair_total_s=t_cal + t_apply, gram_mib=gram_mib,
                peak_rss_mib=peak_rss_mib(), peak_rss_before_mib=rss0)


REPAIR = ("repair_resnet20", "repair_resnet50")


def print_table(rows: list) -> None:
    """The Markdown table of the measured rows."""
    print("| model | calib | topk | connections | curvature total (s) | reference | ratio / peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["model"] in REPAIR:
            print(f"| {r['model']} | {r['calib']} | - | {r['layers_repaired']} layers | "
                  f"{r['repair_total_s']:.1f} (calibrate {r['repair_calibrate_s']:.1f} s, "
                  f"apply {r['repair_apply_s']:.1f} s) | one forward {r['forward_s']:.2f} s | "
                  f"Gram {r['gram_mib']:.0f} MiB, peak RSS {r['peak_rss_mib']:.0f} MiB |")
            continue
        if r["model"] == "resnet56":
            n = r["repeat"]
            spread = (f" ± {r['ratio_vs_taylor_fb_std']:.2f} (mean of {n} paired runs; best "
                      f"times {r['ratio_vs_taylor_fb_of_best']:.2f}x)" if n > 1 else "")
            print(f"| resnet56 | {r['calib']} | {r['topk']} | {r['connections']} | "
                  f"{r['curvature_total_s']:.2f} | Taylor fwd+bwd {r['taylor_forward_backward_s']:.2f} s"
                  f" (+ scoring {r['taylor_total_s']:.2f} s) | {r['ratio_vs_taylor_fb']:.2f}x"
                  f"{spread} fwd+bwd, {r['ratio_vs_taylor_total']:.2f}x total |")
        elif r["model"] in ZOO:
            if "curvature_total_s" not in r:
                print(f"| {r['model']} | {r['calib']} | {r['topk']} | {r['connections']} | "
                      f"(dry run: calibration {r['curvature_calibrate_s']:.1f} s) | "
                      f"{r['groups']} groups, graph fallback {r['graph_fallback']} | "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB |")
                continue
            print(f"| {r['model']} | {r['calib']} | {r['topk']} | {r['connections']} | "
                  f"{r['curvature_total_s']:.1f} | calibration {r['curvature_calibrate_s']:.1f} s,"
                  f" scoring {r['curvature_scoring_s']:.1f} s ({r['scored_groups']}/"
                  f"{r['groups']} groups, fallback {r['fallback']}) | "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB |")
        else:
            print(f"| resnet50 | {r['calib']} | {r['topk']} | {r['connections']} | "
                  f"{r['curvature_total_s']:.1f} | {r['connections_per_s']:.0f} connections/s | "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["resnet56", "resnet50", *ZOO, *REPAIR], default=None,
                    help="one measurement (default: resnet56 and resnet50)")
    ap.add_argument("--calib", type=int, default=None,
                    help="calibration images (default 256 for resnet56, 16 for resnet50, 8 for "
                         "vit_b_16 and timm_efficientnet_b0)")
    ap.add_argument("--size", type=int, default=224,
                    help="image size for vit_b_16 / timm_efficientnet_b0 (a multiple of 16)")
    ap.add_argument("--vit-layers", type=int, default=12,
                    help="encoder blocks of vit_b_16 (12 = the real model; fewer: quick check)")
    ap.add_argument("--max-groups", type=int, default=None,
                    help="score only the first N groups (the whole graph's curvature is still "
                         "computed at the first one)")
    ap.add_argument("--dry-run", action="store_true",
                    help="vit_b_16 / timm_efficientnet_b0: stop after calibration")
    add_curvature_arguments(ap.add_argument_group("curvature (the definition timed)"))
    ap.add_argument("--repeat", type=int, default=1,
                    help="resnet56: paired Taylor / curvature measurements in the process "
                         "(times: medians; ratio: mean ± std of the pairs, and of the best times)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/end_to_end.json")
    args = ap.parse_args(argv)
    config, how = config_from_args(args), recipe(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.only in (None, "resnet56"):
        rows.append(bench_resnet56(args.calib or 256, config, repeat=args.repeat))
    if args.only in (None, "resnet50"):
        rows.append(bench_resnet50(args.calib or 16, config))
    if args.only in REPAIR:
        rows.append(bench_repair(args.only, args.calib or (256 if "20" in args.only else 16)))
    if args.only in ZOO:
        rows.append(bench_zoo(args.only, args.calib or 8, config, args.size,
                              args.vit_layers, args.max_groups, args.dry_run))
    import numba
    for r in rows:          # the definition and the thread counts every row was measured with
        r["curvature"] = how
        r["torch_threads"] = torch.get_num_threads()
        r["numba_threads"] = numba.get_num_threads()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    for r in rows:
        old[r["model"]] = r
    out.write_text(json.dumps(old, indent=2))
    print(f"curvature: {how}\n")
    print_table(rows)


if __name__ == "__main__":
    main()
