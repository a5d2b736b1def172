"""Benchmark of the W1 kernels on random dense layer pairs.

For each layer width n (random dense layers Z -> X -> Y -> W with n channels each, lengths
1/|w|, the paper's measures p ~ exp(-1/a^2) over active neighbours, or ``--measure flow``;
see :mod:`tp_curvature.testing`), on the SAME problems:

* ``numba``: :func:`tp_curvature.transport.solve_w1` (default backend) on the whole layer pair
  (or on a random subset of ``--max-numba`` connections for very wide layers), wall clock,
  the fastest of ``--repeat`` calls;
* ``pot-emd2``: the exact ``ot.emd2`` loop (the reference; on a random subset of connections
  for wide layers, until ``--budget`` seconds), reported as connections/s;
* ``pot-sinkhorn2``: ``ot.sinkhorn2`` loop on ``M / d`` with the same relative eps;
* ``pot-solve_batch``: POT 0.9.7's batched entropic solver ``ot.batch.solve_batch`` (one call
  on up to ``--batch`` connections of the exact subset, cost scaled by 1/d, same eps).

Accuracy is measured against ``pot-emd2`` on its subset: max |delta kappa| and the Spearman
rank correlation of kappa = (1 - W1/d) / (1 - alpha). With ``--topk K`` the solvers other than
``pot-emd2`` get measures truncated to their K heaviest atoms (renormalised) and their accuracy
is measured against the exact W1 of the untruncated problem.

The measures, ``alpha`` and ``topk`` come from a library preset (``--preset paper``, the default:
``CurvatureConfig.paper()``, the paper's measures, alpha 0.9, untruncated; ``--preset default``:
``CurvatureConfig()``, flow measures, alpha 0.5, topk 32) with the overrides ``--alpha`` and
``--topk``; the trained problems use the preset's node values. The preset call and
``describe()`` are printed, in the figure's title and in the CSV's ``curvature`` column.

Writes ``results/kernels.csv`` and ``results/kernels.png`` and prints a Markdown table.

    python benchmarks/kernels.py                # default run
    python benchmarks/kernels.py --quick        # smoke run (widths <= 64, 1 s POT budget)
    python benchmarks/kernels.py --topk 32 --sizes 64 128 256
    python benchmarks/kernels.py --alpha 0.5    # the README's run (paper measures, alpha 0.5)
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from tp_curvature import transport as K  # noqa: E402
from tp_curvature.transport import connection_problem, pot_sinkhorn_w1, solve_w1  # noqa: E402
from tp_curvature.testing import random_layer_pair, truncate_topk  # noqa: E402
from engine.presets import add_curvature_arguments, config_from_args, recipe  # noqa: E402

FIELDS = ["source", "layer", "n", "measure", "alpha", "topk", "backend", "layer_connections", "timed_connections",
          "seconds", "conn_per_s", "speedup_vs_emd2", "acc_connections", "max_abs_dkappa",
          "mean_dkappa", "spearman", "iterations_mean", "eps", "tol", "threads", "density",
          "kappa_tol", "n_refined", "n_exact_fallback", "kappa_gap_max", "alpha_solved",
          "n_bypass", "curvature"]


def with_solve(problem, pairs):
    """A shallow copy of ``problem`` that solves only ``pairs`` (k, 2)."""
    from dataclasses import replace

    solve = np.zeros_like(problem.solve)
    if len(pairs):
        solve[pairs[:, 0], pairs[:, 1]] = True
    return replace(problem, solve=solve)


def truncated(problem, k):
    from dataclasses import replace

    if not k:
        return problem
    pi, pm = truncate_topk(problem.pred_idx, problem.pred_mass, k)
    si, sm = truncate_topk(problem.succ_idx, problem.succ_mass, k)
    return replace(problem, pred_idx=pi, pred_mass=pm, succ_idx=si, succ_mass=sm)


def pot_loop(problem, pairs, budget, kind, eps, tol, max_iter=1000):
    """ot.emd2 / ot.sinkhorn2 loop over ``pairs`` until ``budget`` seconds; (W dict, n, secs)."""
    import ot

    out = {}
    t0 = time.perf_counter()
    for i, j in pairs:
        a, b, M = connection_problem(problem, i, j)
        if kind == "emd2":
            w = ot.emd2(a, b, M, numItermax=10_000_000)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w = pot_sinkhorn_w1(a, b, M, problem.d_xy[i, j], eps, tol, max_iter)
        out[(int(i), int(j))] = float(w)
        if time.perf_counter() - t0 > budget:
            break
    return out, len(out), time.perf_counter() - t0


def pot_batch(problem, pairs, eps, tol, max_iter=1000):
    """One ot.batch.solve_batch call on the connections of ``pairs`` with the most common
    problem shape (the batch needs equal shapes). Returns (W dict, n, seconds)."""
    from ot.batch import solve_batch

    probs = [connection_problem(problem, i, j) for i, j in pairs]
    shapes = [p[2].shape for p in probs]
    if not shapes:
        return {}, 0, 0.0
    vals, counts = np.unique(np.array(shapes), axis=0, return_counts=True)
    shape = tuple(vals[np.argmax(counts)])
    keep = [k for k, s in enumerate(shapes) if s == shape]
    d = np.array([problem.d_xy[pairs[k][0], pairs[k][1]] for k in keep])
    a = np.stack([probs[k][0] for k in keep])
    b = np.stack([probs[k][1] for k in keep])
    M = np.stack([probs[k][2] for k in keep]) / d[:, None, None]
    method = "sinkhorn" if M.max() / eps < 600 else "log_sinkhorn"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = solve_batch(M, reg=eps, a=a, b=b, max_iter=max_iter, tol=tol, method=method,
                          grad="detach")
    secs = time.perf_counter() - t0
    val = np.asarray(res.value_linear) * d
    return {(int(pairs[k][0]), int(pairs[k][1])): float(v) for k, v in zip(keep, val)}, \
        len(keep), secs


def accuracy(problem, ref, got):
    """max |dkappa|, mean dkappa (exact - approx), Spearman on the common connections."""
    from scipy.stats import spearmanr

    keys = [k for k in ref if k in got and np.isfinite(got[k])]
    if len(keys) < 3:
        return len(keys), np.nan, np.nan, np.nan
    al = problem.alpha
    d = np.array([problem.d_xy[k] for k in keys])
    ke = (1 - np.array([ref[k] for k in keys]) / d) / (1 - al)
    ka = (1 - np.array([got[k] for k in keys]) / d) / (1 - al)
    rho = spearmanr(ke, ka).statistic
    return len(keys), float(np.abs(ka - ke).max()), float((ke - ka).mean()), float(rho)


def run(args):
    from numba import get_num_threads, set_num_threads
    from tqdm.auto import tqdm

    if args.threads:
        set_num_threads(args.threads)
    threads = get_num_threads()
    opts = dict(eps=args.eps, tol=args.tol, max_iter=args.max_iter, precision=args.precision,
                half_idleness=not args.solve_at_alpha, bypass=not args.no_bypass)
    # compile (or load the cache) outside the timings
    t0 = time.perf_counter()
    solve_w1(random_layer_pair(8, 0, measure=args.measure), **opts)
    print(f"numba warm-up (compile or cache load): {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for n in tqdm(args.sizes, desc="layer widths"):
        P = random_layer_pair(n, args.seed, measure=args.measure, alpha=args.alpha,
                              density=args.density)
        rows += bench_problem(P, dict(source="random", n=n), args, opts, threads)
    for spec in tqdm(args.trained, desc="trained models"):
        for name, P in trained_layer_problems(spec, args).items():
            if P.n_connections >= 16:
                rows += bench_problem(P, dict(source=spec, layer=name, n=int(np.sqrt(P.n_x * P.n_y))),
                                      args, opts, threads)
    return rows


def trained_layer_problems(spec: str, args) -> dict:
    """The untruncated layer-pair problems of a trained baseline ``dataset:model``.

    Trains (or reloads from ``checkpoints/``) with :func:`engine.training.train_or_load`
    and builds every layer's problem with the preset's ``CurvatureImportance`` (``topk=None``)
    on 256 calibration images, so they are the problems the importance really solves.
    """
    from tp_curvature import CurvatureImportance
    from engine.data import calibration_batch, load_dataset
    from engine.training import TrainConfig, train_or_load

    dataset, model_name = spec.split(":", 1)
    model, _ = train_or_load(TrainConfig(dataset=dataset, model=model_name), progress=False,
                             verbose=False)
    train, _, _ = load_dataset(dataset)
    x, _ = calibration_batch(train, 256, seed=args.seed)
    imp = CurvatureImportance(args.config.replace(topk=None))
    return imp.calibrate(model.eval(), x).layer_problems()


def bench_problem(P, where: dict, args, opts, threads) -> list:
    """Time every backend on the same layer-pair problem ``P``; accuracy vs the exact loop."""
    rows = []
    n = where["n"]
    Pk = truncated(P, args.topk)
    rng = np.random.default_rng(args.seed + n)
    pairs = np.argwhere(P.solve)
    perm = pairs[rng.permutation(len(pairs))]
    n_layer = len(pairs)
    common = dict(where, measure=args.measure, alpha=P.alpha, topk=args.topk or 0,
                  layer_connections=n_layer, threads=threads, density=args.density,
                  curvature=args.curvature)
    # ---- exact reference (on a random subset, time budget)
    ref, n_e, t_e = pot_loop(P, perm, args.budget, "emd2", args.eps, args.tol)
    rate_e = n_e / t_e
    rows.append(dict(common, backend="pot-emd2", timed_connections=n_e, seconds=t_e,
                     conn_per_s=rate_e, speedup_vs_emd2=1.0, acc_connections=n_e,
                     max_abs_dkappa=0.0, mean_dkappa=0.0, spearman=1.0,
                     iterations_mean=np.nan, eps=np.nan, tol=np.nan))
    sub = perm[:n_e]
    # ---- numba on the whole layer pair (or a subset that contains the exact subset)
    if n_layer > args.max_numba:
        extra = perm[n_e:args.max_numba]
        Pn = with_solve(Pk, np.concatenate([sub, extra]))
    else:
        Pn = Pk
    # "numba": the default (certified, kappa_tol); "numba-nocert": kappa_tol=None (the raw
    # Sinkhorn values, as before the certificate)
    for be, kt in (("numba", args.kappa_tol), ("numba-nocert", None)):
        t_n = np.inf  # best of --repeat calls (as timeit): a call of a few ms is mostly jitter
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            W, st = solve_w1(Pn, **opts, kappa_tol=kt, log=True)
            t_n = min(t_n, time.perf_counter() - t0)
        got = {(int(i), int(j)): float(W[i, j]) for i, j in sub}
        n_acc, mx, mean, rho = accuracy(P, ref, got)
        rows.append(dict(common, backend=be, timed_connections=Pn.n_connections,
                         seconds=t_n, conn_per_s=Pn.n_connections / t_n,
                         speedup_vs_emd2=Pn.n_connections / t_n / rate_e, acc_connections=n_acc,
                         max_abs_dkappa=mx, mean_dkappa=mean, spearman=rho,
                         iterations_mean=st.get("iterations_mean", np.nan), eps=args.eps,
                         tol=args.tol, kappa_tol=kt, n_refined=st.get("n_refined", 0),
                         n_exact_fallback=st["n_exact_fallback"],
                         kappa_gap_max=st["kappa_gap_max"], alpha_solved=st["alpha_solved"],
                         n_bypass=st.get("n_bypass", 0)))
        if st.get("n_not_converged"):
            print(f"  n={n}: {be}: {st['n_not_converged']} problems hit max_iter", flush=True)
    # ---- POT sinkhorn2 loop on the exact subset
    if not args.no_sinkhorn2:
        got, n_s, t_s = pot_loop(Pk, sub, args.budget, "sinkhorn2", args.eps, args.tol)
        n_acc, mx, mean, rho = accuracy(P, ref, got)
        rows.append(dict(common, backend="pot-sinkhorn2", timed_connections=n_s,
                         seconds=t_s, conn_per_s=n_s / t_s,
                         speedup_vs_emd2=n_s / t_s / rate_e, acc_connections=n_acc,
                         max_abs_dkappa=mx, mean_dkappa=mean, spearman=rho,
                         iterations_mean=np.nan, eps=args.eps, tol=args.tol))
    # ---- POT batched entropic solver on (part of) the exact subset
    if not args.no_batch:
        m = (Pk.pred_mass > 0).sum(1).max() + 1
        nbytes = 8 * m * m * 6  # M, kernel, plan and temporaries per problem
        nb = int(min(args.batch, len(sub), max(8, args.batch_mem_mb * 2**20 // nbytes)))
        got, n_b, t_b = pot_batch(Pk, sub[:nb], args.eps, args.tol)
        n_acc, mx, mean, rho = accuracy(P, ref, got)
        rows.append(dict(common, backend="pot-solve_batch", timed_connections=n_b,
                         seconds=t_b, conn_per_s=n_b / t_b if t_b else np.nan,
                         speedup_vs_emd2=n_b / t_b / rate_e if t_b else np.nan,
                         acc_connections=n_acc, max_abs_dkappa=mx, mean_dkappa=mean,
                         spearman=rho, iterations_mean=np.nan, eps=args.eps, tol=args.tol))
    return rows


def write_outputs(rows, args):
    from engine.utils import write_csv

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(out / f"{args.name}.csv", rows, FIELDS)
    # ---- figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for be in dict.fromkeys(r["backend"] for r in rows):
        rr = [r for r in rows if r["backend"] == be and r.get("source", "random") == "random"]
        ns = [r["n"] for r in rr]
        ax[0].plot(ns, [r["conn_per_s"] for r in rr], "o-", label=be)
        if be != "pot-emd2":
            ax[1].plot(ns, [r["max_abs_dkappa"] for r in rr], "o-", label=be)
    ax[0].set(yscale="log", xlabel="channels per layer",
              ylabel="connections / s", title="W1 throughput (wall clock)")
    ax[1].axhline(0.02, color="grey", ls="--", lw=1)
    ax[1].set(yscale="log", xlabel="channels per layer",
              ylabel="max |delta kappa| vs exact", title="accuracy")
    from matplotlib.ticker import NullFormatter, NullLocator

    for a in ax:
        a.set_xscale("log", base=2)
        a.xaxis.set_minor_locator(NullLocator())
        a.xaxis.set_minor_formatter(NullFormatter())
        a.set_xticks(args.sizes, [str(s) for s in args.sizes])
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.suptitle(f"{args.curvature.split(' = ')[0]}: measure={args.measure}, alpha={args.alpha}, "
                 f"eps={args.eps}, tol={args.tol}, {args.precision}, "
                 f"topk={args.topk or 'none'}, threads={rows[0]['threads'] if rows else '?'}",
                 fontsize=10)
    fig.tight_layout()
    png_path = out / f"{args.name}.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path


def markdown(rows):
    head = ("| n | backend | conns timed | conn/s | x emd2 | max abs dkappa | Spearman | "
            "mean iters | refined | exact fallbacks | max certified gap |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        it = r["iterations_mean"]
        its = f"{it:.1f}" if np.isfinite(it) else ""
        where = r['n'] if r.get("source", "random") == "random" else f"{r['source']} {r['layer']}"
        lines.append(
            f"| {where} | {r['backend']} | {r['timed_connections']} | "
            f"{r['conn_per_s']:,.0f} | {r['speedup_vs_emd2']:.1f} | "
            f"{r['max_abs_dkappa']:.4f} | {r['spearman']:.5f} | {its} | "
            f"{r.get('n_refined', '')} | {r.get('n_exact_fallback', '')} | "
            + (f"{r['kappa_gap_max']:.4f} |" if 'kappa_gap_max' in r else " |"))
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    add_curvature_arguments(p, preset="paper", solver=False)
    p.add_argument("--density", type=float, default=1.0,
                   help="keep each random weight with this probability (sparse layers; "
                        "unreachable pairs get capped costs as in the graph code)")
    p.add_argument("--kappa-tol", type=float, default=K.DEFAULTS["kappa_tol"],
                   help="certified kappa accuracy of the numba row (numba-nocert: None)")
    p.add_argument("--eps", type=float, default=K.DEFAULTS["eps"])
    p.add_argument("--tol", type=float, default=K.DEFAULTS["tol"])
    p.add_argument("--max-iter", type=int, default=K.DEFAULTS["max_iter"])
    p.add_argument("--precision", choices=["float32", "float64", "log"], default="float32",
                   help="numba engine precision (float64: for small eps / alpha near 1)")
    p.add_argument("--budget", type=float, default=6.0,
                   help="seconds per POT loop and width (random subset of connections)")
    p.add_argument("--repeat", type=int, default=3,
                   help="time the numba solver this many times on the layer, keep the fastest")
    p.add_argument("--max-numba", type=int, default=70_000,
                   help="solve at most this many connections of a layer pair with numba")
    p.add_argument("--batch", type=int, default=256, help="max problems in one solve_batch")
    p.add_argument("--batch-mem-mb", type=int, default=256)
    p.add_argument("--solve-at-alpha", action="store_true",
                   help="numba: solve at alpha itself, not at the equivalent idleness 1/2 "
                        "(half_idleness=False; for the comparison)")
    p.add_argument("--no-bypass", action="store_true",
                   help="numba: iterate on every connection, also where the bypass plan is "
                        "optimal (bypass=False; for the comparison)")
    p.add_argument("--no-sinkhorn2", action="store_true")
    p.add_argument("--no-batch", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="numba threads (0: numba default)")
    p.add_argument("--trained", nargs="*", default=["digits:mlp", "digits:lenet5"],
                   help="dataset:model baselines whose real layers are benchmarked too "
                        "(trained or reloaded with benchmarks/train.py's cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: widths <= 64, 1 s per POT loop, batch <= 64")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--name", default="kernels", help="output file stem")
    args = p.parse_args(argv)
    # the preset, resolved: what the rest of the script reads
    args.config, args.curvature = config_from_args(args), recipe(args)
    args.measure, args.alpha, args.topk = args.config.variant, args.config.alpha, args.config.topk
    if args.quick:
        args.sizes = [s for s in args.sizes if s <= 64] or [16, 32, 64]
        args.budget = min(args.budget, 1.0)
        args.batch = min(args.batch, 64)
    return args


def main(argv=None):
    args = parse(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.perf_counter()
    print(f"curvature: {args.curvature}", flush=True)
    rows = run(args)
    csv_path, png_path = write_outputs(rows, args)
    print()
    print(markdown(rows))
    print(f"\nwrote {csv_path} and {png_path} in {time.perf_counter() - t0:.0f} s")
    ok = [r for r in rows if r["backend"] == "numba" and 64 <= r["n"] <= 256
          and r.get("source") == "random"]
    if ok:
        good = all(r["speedup_vs_emd2"] >= 50 and r["spearman"] >= 0.995
                   and r["max_abs_dkappa"] <= 0.02 for r in ok)
        print("target (64-256 channels: >= 50x emd2, Spearman >= 0.995, max |dkappa| <= 0.02):",
              "MET" if good else "NOT met")


if __name__ == "__main__":
    main()
