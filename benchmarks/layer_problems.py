"""Time the transport solver on the layer problems of a real network, held fixed.

End-to-end runs (``end_to_end.py``) drift by 10-15% between runs of the same code on this
machine; the solver's changes are measured here instead, on the same problems, each code
version run alternately. Two steps:

* ``dump``: run ``end_to_end.py`` (its arguments after ``--``) and pickle the
  :class:`~tp_curvature.problem.LayerPairProblem` of every layer whose name contains one of
  ``--layers`` (the first match of each), with the backend options of the run (for
  ``resnet56`` that is its two-image warm-up's problem: its clock starts after one).
* ``solve``: ``solve_w1`` on each pickled problem (optionally its first ``--columns``
  columns only), best of ``--repeat`` wall times, with the solver log's iterations,
  refinements and exact re-solves; JSON lines to ``--out``.

Usage::

    python benchmarks/layer_problems.py dump --out /tmp/r50.pkl \\
        --layers layer2.1.conv2 layer3.4.conv2 layer3.1.conv3 layer4.0.downsample.0 \\
        -- --only resnet50 --threads 2 --out /tmp/e2e.json
    python benchmarks/layer_problems.py solve /tmp/r50.pkl --repeat 3
    python benchmarks/layer_problems.py dump --out /tmp/vit.pkl --layers \\
        encoder_layer_0.mlp.3 -- --only vit_b_16 --vit-layers 2 --threads 2 --out /tmp/e.json
    python benchmarks/layer_problems.py solve /tmp/vit.pkl --columns 96 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import pickle
import runpy
import sys
import time
from pathlib import Path

from engine.utils import write_jsonl

LOG_KEYS = ("n_solved", "iterations_mean", "n_float64", "n_refined", "n_exact_fallback",
            "kappa_gap_max")


def dump(out: str, layers: list, e2e_args: list) -> None:
    """Run the end-to-end benchmark; pickle the first problem of each layer in ``layers``."""
    import tp_curvature.curvature as curvature

    solve_problem = curvature.solve_problem
    kept = {}

    def capture(prob, cfg):
        hit = [name for name in layers if name in prob.name and name not in kept]
        if hit:           # pickled before the solve (kappa overwrites the problem's arrays)
            kept[hit[0]] = pickle.dumps((prob, dict(cfg.backend_options)))
            print(f"kept {prob.name} {prob.d_xy.shape}", flush=True)
            if len(kept) == len(layers):
                Path(out).write_bytes(pickle.dumps(
                    {name: pickle.loads(b) for name, b in kept.items()}))
                raise SystemExit(0)
        return solve_problem(prob, cfg)

    curvature.solve_problem = capture
    try:
        sys.argv = ["end_to_end.py", *e2e_args]
        runpy.run_path(str(Path(__file__).with_name("end_to_end.py")), run_name="__main__")
    finally:
        curvature.solve_problem = solve_problem
    raise SystemExit(f"only {sorted(kept)} of {layers} were found")


def solve(path: str, columns: int | None, repeat: int, out: str | None) -> None:
    """Best-of-``repeat`` wall time of ``solve_w1`` on each pickled problem."""
    from tp_curvature.transport import solve_w1

    rows = []
    for name, (prob, opts) in pickle.loads(Path(path).read_bytes()).items():
        if columns:
            prob.solve[:, columns:] = False
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            _, log = solve_w1(prob, log=True, **opts)
            best = min(best, time.perf_counter() - t0)
        row = dict(layer=name, columns=columns, seconds=round(best, 3),
                   **{k: log[k] for k in LOG_KEYS})
        rows.append(row)
        print(json.dumps(row), flush=True)
    if out:
        write_jsonl(out, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="pickle layer problems from an end_to_end.py run")
    d.add_argument("--out", required=True)
    d.add_argument("--layers", nargs="+", required=True, help="substrings of layer names")
    s = sub.add_parser("solve", help="time solve_w1 on pickled layer problems")
    s.add_argument("pickle")
    s.add_argument("--columns", type=int, default=None, help="solve only the first columns")
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--out", default=None, help="JSON lines")
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        rest = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    a = p.parse_args(argv)
    if a.cmd == "dump":
        dump(a.out, a.layers, rest)
    else:
        solve(a.pickle, a.columns, a.repeat, a.out)


if __name__ == "__main__":
    main()
