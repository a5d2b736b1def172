"""Time the transport solver on the layer problems of a real network, held fixed.

End-to-end runs (``end_to_end.py``) drift by 10-15% between runs of the same code on this
machine; the solver's changes are measured here instead, on the same problems, each code
version run alternately. Subcommands:

* ``dump``: run ``end_to_end.py`` (its arguments after ``--``) and pickle the
  :class:`~tp_curvature.problem.LayerPairProblem` of every layer whose name contains one of
  ``--layers`` (the first match of each), with the backend options of the run (for
  ``resnet56`` that is its two-image warm-up's problem: its clock starts after one).
* ``solve``: ``solve_w1`` on each pickled problem (optionally its first ``--columns``
  columns only), best of ``--repeat`` wall times, with the solver log's iterations,
  refinements and exact re-solves; JSON lines to ``--out``.
* ``exact``: an exact solver for the same small problems, POT's compiled network simplex
  (``ot.lp.emd_wrap.emd_c``, the C++ core without POT's Python-side checks), on runs of
  ``--run`` connections out of ``--sample // --run`` random x's, started cold and warm (from
  the previous connection's row potentials, the column ones by c-transform), against
  ``solve_w1`` per connection on the problem's first ``--columns`` columns; with the largest
  |kappa - exact kappa| of the certified values on the sample.

Usage::

    python benchmarks/layer_problems.py dump --out /tmp/r50.pkl \\
        --layers layer2.1.conv2 layer3.4.conv2 layer3.1.conv3 layer4.0.downsample.0 \\
        -- --only resnet50 --threads 2 --out /tmp/e2e.json
    python benchmarks/layer_problems.py solve /tmp/r50.pkl --repeat 3
    python benchmarks/layer_problems.py dump --out /tmp/vit.pkl --layers \\
        encoder_layer_0.mlp.3 -- --only vit_b_16 --vit-layers 2 --threads 2 --out /tmp/e.json
    python benchmarks/layer_problems.py solve /tmp/vit.pkl --columns 96 --repeat 3
    python benchmarks/layer_problems.py exact /tmp/vit.pkl --columns 96 --sample 2000
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

LOG_KEYS = ("n_solved", "iterations_mean", "n_float64", "n_bypass", "n_refined",
            "n_exact_fallback", "kappa_gap_max")


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


def _pickled(path: str, columns: int | None):
    """``(name, problem, backend options)`` of each pickled problem, restricted to its first
    ``columns`` columns."""
    for name, (prob, opts) in pickle.loads(Path(path).read_bytes()).items():
        if columns:
            prob.solve[:, columns:] = False
        yield name, prob, opts


def _timed_solve(prob, opts: dict, repeat: int) -> tuple:
    """``solve_w1`` with its log, and the best of ``repeat`` wall times: (W, log, seconds)."""
    from tp_curvature.transport import solve_w1

    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        W, log = solve_w1(prob, log=True, **opts)
        best = min(best, time.perf_counter() - t0)
    return W, log, best


def solve(path: str, columns: int | None, repeat: int, out: str | None,
          overrides: dict | None = None) -> None:
    """Best-of-``repeat`` wall time of ``solve_w1`` on each pickled problem (``overrides``:
    solver options replacing the run's, e.g. ``{"bypass": False}``)."""
    rows = []
    for name, prob, opts in _pickled(path, columns):
        _, log, best = _timed_solve(prob, {**opts, **(overrides or {})}, repeat)
        row = dict(layer=name, columns=columns, seconds=round(best, 3), **(overrides or {}),
                   **{k: log[k] for k in LOG_KEYS})
        rows.append(row)
        print(json.dumps(row), flush=True)
    if out:
        write_jsonl(out, rows)


def _runs(prob, columns: int | None, sample: int, run: int, seed: int) -> list:
    """Runs of up to ``run`` consecutive solved connections out of ``sample // run`` random
    x's (within the first ``columns`` columns), as lists of (x, y)."""
    import numpy as np

    solve = prob.solve[:, :columns] if columns else prob.solve
    xs = np.flatnonzero(solve.any(axis=1))
    rng = np.random.default_rng(seed)
    pick = rng.choice(xs, min(len(xs), max(1, sample // run)), replace=False)
    return [[(int(x), int(y)) for y in np.flatnonzero(solve[x])[:run]] for x in pick]


def _network_simplex(problems: list, warm: bool) -> tuple:
    """Exact W1 of each run's problems (``(a, b, M)`` lists) by POT's compiled network
    simplex, cold, or warm from the previous problem's row potentials (the runs share x, so
    the rows) with the columns' by c-transform; returns (costs, seconds)."""
    import numpy as np
    from ot.lp.emd_wrap import emd_c

    costs = []
    t0 = time.perf_counter()
    for run in problems:
        u = None
        for a, b, M in run:
            if u is None or not warm or u.shape[0] != a.shape[0]:
                _, cost, u, _, _ = emd_c(a, b, M, 10_000_000, 1, None, None)
            else:
                _, cost, u, _, _ = emd_c(a, b, M, 10_000_000, 1, u, (M - u[:, None]).min(axis=0))
            costs.append(cost)
    return np.array(costs), time.perf_counter() - t0


def exact(path: str, columns: int | None, sample: int, run: int, repeat: int,
          out: str | None) -> None:
    """Per-connection time of an exact solver (:func:`_network_simplex`) against the certified
    solver's on each pickled problem."""
    import numpy as np

    from tp_curvature.problem import kappa_from_w1
    from tp_curvature.transport import connection_problem

    rows = []
    for name, prob, opts in _pickled(path, columns):
        W, log, best = _timed_solve(prob, opts, repeat)
        runs = _runs(prob, columns, sample, run, seed=0)
        pairs = np.array([xy for r in runs for xy in r])
        problems = [[tuple(np.ascontiguousarray(t) for t in connection_problem(prob, x, y))
                     for x, y in r] for r in runs]
        cold = warm = float("inf")
        for _ in range(repeat):
            w_cold, t = _network_simplex(problems, warm=False)
            cold = min(cold, t)
            w_warm, t = _network_simplex(problems, warm=True)
            warm = min(warm, t)
        x, y = pairs[:, 0], pairs[:, 1]
        d = prob.d_xy[x, y]
        dk = np.abs(kappa_from_w1(W[x, y], d, prob.alpha) - kappa_from_w1(w_cold, d, prob.alpha))
        n = len(pairs)
        row = dict(layer=name, columns=columns, connections=n, runs=len(runs),
                   certified_us=round(best / log["n_solved"] * 1e6, 2),
                   network_simplex_us=round(cold / n * 1e6, 2),
                   network_simplex_warm_us=round(warm / n * 1e6, 2),
                   warm_max_abs_diff=float(np.abs(w_warm - w_cold).max()),
                   certified_max_abs_dkappa=float(dk.max()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if out:
        write_jsonl(out, rows)


def _overrides(pairs: list) -> dict:
    """``["bypass=false", "eps=0.01"]`` -> ``{"bypass": False, "eps": 0.01}`` (JSON values)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        out[key] = json.loads(value)
    return out


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
    s.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                   help="solver options replacing the run's, e.g. bypass=false")
    e = sub.add_parser("exact", help="time POT's network simplex against solve_w1")
    e.add_argument("pickle")
    e.add_argument("--columns", type=int, default=None, help="solve only the first columns")
    e.add_argument("--sample", type=int, default=2000, help="connections for the exact solver")
    e.add_argument("--run", type=int, default=50, help="connections out of each sampled x")
    e.add_argument("--repeat", type=int, default=3)
    e.add_argument("--out", default=None, help="JSON lines")
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        rest = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    a = p.parse_args(argv)
    if a.cmd == "dump":
        dump(a.out, a.layers, rest)
    elif a.cmd == "solve":
        solve(a.pickle, a.columns, a.repeat, a.out, _overrides(a.set))
    else:
        exact(a.pickle, a.columns, a.sample, a.run, a.repeat, a.out)


if __name__ == "__main__":
    main()
