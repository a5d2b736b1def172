"""End-to-end cost of CurvatureImportance on real architectures (issue 3's model targets).

Two measurements, each in one process so the ratios compare like with like:

* ``resnet56``: CurvatureImportance of a CIFAR ResNet-56 on a calibration batch (default 256
  images, 32x32) against GroupTaylorImportance's forward + backward on the same batch and the
  same pruner; both times include scoring every group of one ``BasePruner`` step.
* ``resnet50``: CurvatureImportance of torchvision ResNet-50 (random weights) at 224x224, wall
  time and peak resident memory (``ru_maxrss``) of the process.

Usage::

    python benchmarks/end_to_end.py                 # both
    python benchmarks/end_to_end.py --only resnet56 --calib 256
    python benchmarks/end_to_end.py --only resnet50 --calib 16 --topk 8

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
from tp_curvature import CurvatureImportance


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def n_scored(scores: dict) -> int:
    return sum(s is not None for s in scores.values())


def bench_resnet56(calib: int, topk, backend: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = resnet56(10, 3).eval()
    x = torch.randn(calib, 3, 32, 32)
    y = torch.randint(0, 10, (calib,))
    example = x[:1]

    # Taylor: forward + backward on the batch, then score every group
    m_t = copy.deepcopy(model)
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(m_t(x), y)
    loss.backward()
    t_fb = time.perf_counter() - t0
    taylor = tp.importance.GroupTaylorImportance()
    t1 = time.perf_counter()
    n_groups = n_scored(score_all_groups(m_t, example, taylor)[0])
    t_taylor_score = time.perf_counter() - t1

    # Curvature: calibrate (hooks + one forward) + graph + kernels + scoring
    m_c = copy.deepcopy(model)
    imp = CurvatureImportance(topk=topk, backend=backend)
    t0 = time.perf_counter()
    imp.calibrate(m_c, x)
    t_cal = time.perf_counter() - t0
    t1 = time.perf_counter()
    score_all_groups(m_c, example, imp)
    t_curv = time.perf_counter() - t1
    n_conn = int(sum(lc.solved.sum() for lc in imp.curvatures().values()))
    total_c = t_cal + t_curv
    total_t = t_fb + t_taylor_score
    return dict(model="resnet56", calib=calib, topk=topk, backend=backend, groups=n_groups,
                connections=n_conn, taylor_forward_backward_s=t_fb,
                taylor_total_s=total_t, curvature_calibrate_s=t_cal,
                curvature_scoring_s=t_curv, curvature_total_s=total_c,
                ratio_vs_taylor_fb=total_c / t_fb, ratio_vs_taylor_total=total_c / total_t)


def bench_resnet50(calib: int, topk, backend: str, seed: int = 0) -> dict:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(calib, 3, 224, 224)
    rss0 = peak_rss_mib()
    imp = CurvatureImportance(topk=topk, backend=backend, progress=True)
    t0 = time.perf_counter()
    imp.calibrate(model, x)
    t_cal = time.perf_counter() - t0
    t1 = time.perf_counter()
    curv = imp.curvatures()
    t_curv = time.perf_counter() - t1
    n_conn = int(sum(lc.solved.sum() for lc in curv.values()))
    return dict(model="resnet50", calib=calib, topk=topk, backend=backend,
                connections=n_conn, curvature_calibrate_s=t_cal, curvature_kappa_s=t_curv,
                curvature_total_s=t_cal + t_curv, connections_per_s=n_conn / t_curv,
                peak_rss_mib=peak_rss_mib(), peak_rss_before_mib=rss0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["resnet56", "resnet50"], default=None)
    ap.add_argument("--calib", type=int, default=None,
                    help="calibration images (default 256 for resnet56, 16 for resnet50)")
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--backend", default="sinkhorn")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/end_to_end.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.only in (None, "resnet56"):
        rows.append(bench_resnet56(args.calib or 256, args.topk, args.backend))
    if args.only in (None, "resnet50"):
        rows.append(bench_resnet50(args.calib or 16, args.topk, args.backend))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    for r in rows:
        old[r["model"]] = r
    out.write_text(json.dumps(old, indent=2))
    print("| model | calib | topk | connections | curvature total (s) | reference | ratio / peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["model"] == "resnet56":
            print(f"| resnet56 | {r['calib']} | {r['topk']} | {r['connections']} | "
                  f"{r['curvature_total_s']:.2f} | Taylor fwd+bwd {r['taylor_forward_backward_s']:.2f} s"
                  f" (+ scoring {r['taylor_total_s']:.2f} s) | {r['ratio_vs_taylor_fb']:.2f}x fwd+bwd,"
                  f" {r['ratio_vs_taylor_total']:.2f}x total |")
        else:
            print(f"| resnet50 | {r['calib']} | {r['topk']} | {r['connections']} | "
                  f"{r['curvature_total_s']:.1f} | {r['connections_per_s']:.0f} connections/s | "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
