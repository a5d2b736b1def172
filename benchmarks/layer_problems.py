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
* ``detours``: what a connection the bypass plan leaves to the solver looks like (alpha >=
  1/2). Its W1 is ``U - (1-alpha) * profit``, the bypass plan's cost less the best exchange:
  the transport of at most ``p_z`` out of each predecessor and ``r_w`` into each successor,
  gaining ``G_zw = c_zy + c_xw - c_zw - d`` per unit where that is positive. Per layer, on
  ``--sample`` random connections: the share bypassed; of the rest, how many of the ``kz x
  kw`` detours gain (a sparse gain matrix would make the exchange a small exact problem), the
  greedy exchange's shortfall and the bracket between it and the cheap upper bound
  ``min(sum_z p_z max_w G_zw, sum_w r_w max_z G_zw)``, in kappa units; on ``--check`` of
  them the reduction against ``ot.emd2`` of the whole problem. Also how little the supports
  of neighbouring rows share (what solving them together on one block would need): the
  median size of the union of 4 consecutive rows' supports, and of all rows'.
* ``times``: run ``end_to_end.py`` (its arguments after ``--``) and time the solve of every
  layer problem (wall seconds, microseconds per solved connection), in the order solved.

Usage::

    python benchmarks/layer_problems.py dump --out /tmp/r50.pkl \\
        --layers layer2.1.conv2 layer3.4.conv2 layer3.1.conv3 layer4.0.downsample.0 \\
        -- --only resnet50 --threads 2 --out /tmp/e2e.json
    python benchmarks/layer_problems.py solve /tmp/r50.pkl --repeat 3
    python benchmarks/layer_problems.py dump --out /tmp/vit.pkl --layers \\
        encoder_layer_0.mlp.3 -- --only vit_b_16 --vit-layers 2 --threads 2 --out /tmp/e.json
    python benchmarks/layer_problems.py solve /tmp/vit.pkl --columns 96 --repeat 3
    python benchmarks/layer_problems.py exact /tmp/vit.pkl --columns 96 --sample 2000
    python benchmarks/layer_problems.py detours /tmp/vit.pkl --sample 3000
    python benchmarks/layer_problems.py times --out /tmp/t.jsonl \\
        -- --only vit_b_16 --vit-layers 2 --threads 2 --out /tmp/e.json
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


def _run_end_to_end(wrap, e2e_args: list) -> None:
    """Run ``end_to_end.py`` with ``e2e_args``, the library's ``solve_problem`` replaced by
    ``wrap(solve_problem)`` for the run and restored after it, also after an error."""
    import tp_curvature.curvature as curvature

    solve_problem = curvature.solve_problem
    curvature.solve_problem = wrap(solve_problem)
    try:
        sys.argv = ["end_to_end.py", *e2e_args]
        runpy.run_path(str(Path(__file__).with_name("end_to_end.py")), run_name="__main__")
    finally:
        curvature.solve_problem = solve_problem


def dump(out: str, layers: list, e2e_args: list) -> None:
    """Run the end-to-end benchmark; pickle the first problem of each layer in ``layers``."""
    kept = {}

    def wrap(solve_problem):
        def capture(prob, cfg):
            hit = [name for name in layers if name in prob.name and name not in kept]
            if hit:       # pickled before the solve (kappa overwrites the problem's arrays)
                kept[hit[0]] = pickle.dumps((prob, dict(cfg.backend_options)))
                print(f"kept {prob.name} {prob.d_xy.shape}", flush=True)
                if len(kept) == len(layers):
                    Path(out).write_bytes(pickle.dumps(
                        {name: pickle.loads(b) for name, b in kept.items()}))
                    raise SystemExit(0)
            return solve_problem(prob, cfg)
        return capture

    _run_end_to_end(wrap, e2e_args)
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


def _greedy_exchange(G, p, r) -> float:
    """Profit of the greedy exchange: the gaining detours in decreasing gain, each taking as
    much as its predecessor's and successor's capacities left (``p``, ``r``) allow."""
    import numpy as np

    p = p.copy()
    r = r.copy()
    zs, ws = np.nonzero(G > 0)
    profit = 0.0
    for k in np.argsort(-G[zs, ws], kind="stable"):
        z, w = zs[k], ws[k]
        t = min(p[z], r[w])
        if t > 0:
            profit += t * G[z, w]
            p[z] -= t
            r[w] -= t
    return profit


def _exchange_profit(G, p, r) -> float:
    """Exact best exchange (a transport with a slack row and column, by ``ot.emd2``)."""
    import numpy as np
    import ot

    M = np.zeros((G.shape[0] + 1, G.shape[1] + 1))
    M[:-1, :-1] = -np.maximum(G, 0.0)
    return -float(ot.emd2(np.append(p, 1.0), np.append(r, 1.0), M))


def _detour_stats(prob, x: int, y: int, check: bool):
    """One connection's exchange problem: None if it is trivial (a delta side), else a dict
    (``gaining`` = 0: bypassed)."""
    import numpy as np
    import ot

    from tp_curvature.transport import connection_problem
    from tp_curvature.transport._drivers import BYPASS_GAP
    from tp_curvature.transport._primitives import bypass

    a, b, M = connection_problem(prob, x, y)
    if a.size < 2 or b.size < 2:
        return None
    al = prob.alpha
    d = M[-1, -1]
    p, r = a[:-1] / (1.0 - al), b[:-1] / (1.0 - al)
    G = M[:-1, -1][:, None] + M[-1, :-1][None, :] - M[:-1, :-1] - d
    gains = G > BYPASS_GAP * d
    row = dict(gaining=int(gains.sum()), entries=G.size, rows=int(gains.any(1).sum()),
               cols=int(gains.any(0).sum()))
    if not row["gaining"]:
        return row
    G = np.where(gains, G, 0.0)
    profit = _exchange_profit(G, p, r)
    greedy = _greedy_exchange(G, p, r)
    row["greedy_short"] = (profit - greedy) / d
    row["bracket"] = (min(p @ G.max(1), r @ G.max(0)) - greedy) / d
    if check:         # the bypass plan's cost U from the solver's own primitive
        u, _ = bypass(np.ascontiguousarray(M[:-1, :-1]), np.arange(p.size), np.arange(r.size),
                      M[:-1, -1].copy(), M[-1, :-1].copy(), p, r, d, al, np.inf)
        row["reduction_err"] = abs(float(ot.emd2(a, b, M)) - (u - (1.0 - al) * profit)) / d
    return row


def _support_unions(idx, mass, group: int = 4) -> tuple:
    """Median size of the union of ``group`` consecutive rows' supports, and the size of the
    union of all rows' (atoms of positive mass)."""
    import numpy as np

    sizes = [np.unique(idx[i:i + group][mass[i:i + group] > 0]).size
             for i in range(0, idx.shape[0] - group + 1, group)]
    return float(np.median(sizes)) if sizes else 0.0, int(np.unique(idx[mass > 0]).size)


def detours(path: str, sample: int, check: int, seed: int, out: str | None) -> None:
    """The bypassed share and the structure of the other connections' exchange problems on
    ``sample`` random connections of each pickled problem (module docstring)."""
    import numpy as np
    from tqdm import tqdm

    q = [10, 50, 90]
    rows = []
    for name, prob, _ in _pickled(path, None):
        if prob.alpha < 0.5:
            print(f"{name}: alpha {prob.alpha} < 1/2, no forced mass: skipped", flush=True)
            continue
        xs, ys = np.nonzero(prob.solve)
        pick = np.random.default_rng(seed).choice(xs.size, min(sample, xs.size), replace=False)
        stats = [_detour_stats(prob, xs[k], ys[k], n < check)
                 for n, k in enumerate(tqdm(pick, desc=name, leave=False))]
        stats = [s for s in stats if s is not None]
        rest = [s for s in stats if s["gaining"]]
        row = dict(layer=name, alpha=prob.alpha, sampled=len(stats),
                   bypassed=round(1.0 - len(rest) / max(len(stats), 1), 4))
        for side, idx, mass in (("pred", prob.pred_idx, prob.pred_mass),
                                ("succ", prob.succ_idx, prob.succ_mass)):
            row[f"{side}_k"] = int(idx.shape[1])
            row[f"{side}_union_of_4"], row[f"{side}_union"] = _support_unions(idx, mass)
        if rest:
            col = {k: np.array([s[k] for s in rest], dtype=float)
                   for k in ("gaining", "entries", "rows", "cols", "greedy_short", "bracket")}
            share = col["gaining"] / col["entries"]
            row.update(
                gaining_share_p10_50_90=np.percentile(share, q).round(3).tolist(),
                gaining_median=float(np.median(col["gaining"])),
                gaining_rows_cols_median=[float(np.median(col["rows"])),
                                          float(np.median(col["cols"]))],
                one_row_or_column=round(float(((col["rows"] == 1) | (col["cols"] == 1))
                                              .mean()), 4),
                greedy_short_p10_50_90=np.percentile(col["greedy_short"], q).round(4).tolist(),
                bracket_p10_50_90=np.percentile(col["bracket"], q).round(4).tolist(),
                bracket_within_0_02=round(float((col["bracket"] <= 0.02).mean()), 4))
            err = [s["reduction_err"] for s in rest if "reduction_err" in s]
            if err:
                row["reduction_max_err"] = float(max(err))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if out:
        write_jsonl(out, rows)


def times(out: str | None, e2e_args: list) -> list:
    """Run the end-to-end benchmark; the wall time of each layer problem's solve."""
    rows = []

    def wrap(solve_problem):
        def timed(prob, cfg):
            t0 = time.perf_counter()
            result = solve_problem(prob, cfg)
            seconds = time.perf_counter() - t0
            n = int(prob.solve.sum())
            rows.append(dict(layer=prob.name, shape=list(prob.d_xy.shape),
                             k_z=int(prob.pred_idx.shape[1]), k_w=int(prob.succ_idx.shape[1]),
                             connections=n, seconds=round(seconds, 4),
                             us_per_connection=round(seconds / n * 1e6, 3) if n else None))
            print(json.dumps(rows[-1]), flush=True)
            return result
        return timed

    _run_end_to_end(wrap, e2e_args)
    if out:
        write_jsonl(out, rows)
    return rows


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
    t = sub.add_parser("detours", help="the exchange problems the bypass plan leaves")
    t.add_argument("pickle")
    t.add_argument("--sample", type=int, default=3000, help="random connections per layer")
    t.add_argument("--check", type=int, default=200,
                   help="of them, check the reduction against ot.emd2")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="JSON lines")
    m = sub.add_parser("times", help="time each layer problem's solve in an end_to_end.py run")
    m.add_argument("--out", default=None, help="JSON lines")
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
    elif a.cmd == "exact":
        exact(a.pickle, a.columns, a.sample, a.run, a.repeat, a.out)
    elif a.cmd == "detours":
        detours(a.pickle, a.sample, a.check, a.seed, a.out)
    else:
        times(a.out, rest)


if __name__ == "__main__":
    main()
