"""Time the min-plus product that builds every layer pair's ground costs.

``tp_curvature.shortest_paths.minplus`` on random float64 factors (5% infinite entries:
missing edges) of the given shapes ``n,m,p`` (``n x m`` times ``m x p``), best of
``--repeat`` wall times, in G min-plus terms (n m p) per second. Run it on two commits
(a ``git worktree`` of the older one, with ``PYTHONPATH`` set to it) to compare kernels.

Usage::

    python benchmarks/minplus.py --shapes 768,3072,768 1024,1024,2048 64,64,64 --repeat 3
"""
from __future__ import annotations

import argparse
import timeit

import numba
import numpy as np

from engine.utils import write_jsonl
from tp_curvature.shortest_paths import minplus

#: a ViT-B/16 MLP pair's product, ResNet-50 layer4 sizes, a ResNet-56 stage
DEFAULT_SHAPES = ("768,3072,768", "1024,1024,2048", "512,512,2048", "64,64,64")


def time_shape(n: int, m: int, p: int, repeat: int, seed: int = 0) -> dict:
    """Best wall time of ``minplus`` on one shape (after a call that compiles / loads it)."""
    rng = np.random.default_rng(seed)
    a = np.where(rng.random((n, m)) < 0.05, np.inf, rng.random((n, m)) * 10)
    b = np.where(rng.random((m, p)) < 0.05, np.inf, rng.random((m, p)) * 10)
    minplus(a[:2], b)
    best = min(timeit.repeat(lambda: minplus(a, b), number=1, repeat=repeat))
    return dict(shape=f"{n}x{m}x{p}", seconds=best, gterms_per_s=n * m * p / best / 1e9,
                threads=numba.get_num_threads())


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="n,m,p")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", help="JSON lines")
    args = ap.parse_args(argv)
    rows = [time_shape(*map(int, s.split(",")), args.repeat) for s in args.shapes]
    print("| shape | seconds | G terms/s | threads |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['seconds']:.4f} | {r['gterms_per_s']:.2f} | {r['threads']} |")
    if args.out:
        write_jsonl(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
