#!/usr/bin/env python
"""Pruning a small LLaMA-shaped decoder on real text, where Wanda-sp and FLAP were designed to work.

For every seed a byte-level decoder (``engine.models.llama_decoder``: embedding, RMSNorm,
grouped-query attention, SwiGLU, no positional encoding) is trained on the Python standard
library's own sources (``engine.text``: ~90% of the modules train, the other ~10% are held out
for perplexity; byte tokens, vocabulary 256) or cached. Every criterion scores the groups of
Torch-Pruning's ``examples/LLMs/prune_llm.py`` pruner once on 128 calibration windows of the
training split (the same windows for every criterion and for the repair); fresh copies are
then pruned at every ratio with ``prune_llm.py``'s arguments (``engine.text.llm_pruner``: the
residual width, every SwiGLU hidden layer and whole attention heads at the same ratio,
``round_to=4``, LM head ignored), its attribute fix-ups applied and the widths checked, and the
held-out perplexity measured after pruning (stage ``pruned``) and after
``tp_curvature.LeastSquaresRepair`` (stage ``lsq``: calibrated once per seed on the unpruned
model, applied with the pruner, the library's defaults unless ``--repair-ridge`` /
``--repair-independent``; it refits every Linear whose inputs lost features: attention output
and MLP down projections, and, since the residual width is pruned too, the q/k/v, gate/up
projections and the LM head).

Grouped-query attention: 8 query heads share 2 key-value heads by default. Torch-Pruning
1.6.1 edits such a head group after building it (the key / value heads are kept), which its
pruning history does not record, so the copies are pruned through
``LeastSquaresRepair.record`` (every group recorded just before it is pruned) and the repair
follows exactly what was pruned. With ``n_heads = 2 n_kv_heads`` Torch-Pruning prunes no head
at all (``engine.text.check_head_config`` refuses that configuration).

Criteria (``engine.criteria.make_criterion``): ``l2`` (``GroupMagnitudeImportance(p=2)``,
``prune_llm.py``'s), ``wanda`` (Wanda-sp) and ``flap`` (``engine.peers``), ``curvature-paper``
(``CurvatureConfig.paper()``) and ``curvature`` (the library default). ``--topk`` / ``--alpha``
/ ``--backend`` / ``--backend-options`` override every curvature criterion (each criterion's
note in meta.json / summary.md says what ran).

Outputs in ``results/llm/`` (or ``--out``): ``rows.csv`` / ``rows.json`` (one row per seed x
criterion x ratio), ``meta.json`` (configuration, corpus statistics, training cost per seed,
timings, notes, the command), ``summary.md`` (mean +- std over seeds per criterion x ratio x
stage; the goal check at 20%; every curvature criterion against the best other criterion of
each cell, paired over seeds; the training cost) and ``perplexity.png``. ``--report-only``
rewrites the last two from the saved rows and meta; ``--merge DIR ...`` first adds the seeds
of other runs of the same experiment (for example run in parallel, one seed each).

Cost, measured on this project's 2-core machine with one torch / Numba thread while two other
one-thread jobs ran: training 1,200 steps of 16 x 128 bytes (2.46M bytes, 0.24 epochs of the
10.3 MB training split) took 15.5 min at 2,640 tokens/s (3,400 tokens/s over a few steps
without contention, about 12 min); scoring per seed: l2 0.1 s, wanda and flap 10 s each,
curvature-paper (``topk=None``, 3.2M connections) 96-132 s, curvature 84-87 s; the repair
(sequential) about 11 s per pruned model; one held-out evaluation 6 s. One seed: about 26 min
from scratch, 10.5 min with its baseline cached; the three seeds about 80 min.

Examples::

    python benchmarks/llm.py --quick --threads 1          # smoke run: tiny decoder, 1 seed
    python benchmarks/llm.py --seeds 0 --threads 1        # one seed of the full experiment
    python benchmarks/llm.py --threads 1                  # the full experiment (3 seeds)
    python benchmarks/llm.py --threads 1 --keep-residual --out results/llm-keep-residual
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp

from engine.criteria import CRITERIA, CachedImportance, group_key, make_criterion
from engine.presets import add_repair_arguments, parse_comparison_args
from engine.report import mean_std
from engine.stats import format_p, paired_comparison
from engine.text import (LMConfig, calibration_windows, check_head_config, expected_widths,
                         fix_attention, heldout_windows, llm_pruner, load_text_corpus,
                         perplexity, train_or_load_lm, widths)
from engine.utils import write_csv

DEFAULT_CRITERIA = ("l2", "wanda", "flap", "curvature-paper", "curvature")
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
STAGES = {"pruned": "right after pruning", "lsq": "after LeastSquaresRepair"}
#: the goal of the issue: with lsq at this ratio, perplexity within GOAL_TOLERANCE of the base
GOAL_RATIO, GOAL_TOLERANCE, GOAL_CRITERIA = 0.2, 0.10, ("l2", "curvature")
#: the full configuration (measured: about 3,400 tokens/s for training on one thread of this
#: machine, so 1,200 steps of 16 x 128 bytes = 2.46M bytes take about 12 minutes). As many
#: key-value heads as heads: see the module docstring on grouped-query attention
FULL = dict(dim=256, n_heads=8, n_kv_heads=2, n_layers=4, hidden=688, context=128,
            batch_size=16, steps=1200, warmup=60, eval_windows=256, calib_windows=128)
#: --quick: a tiny decoder for smoke tests
QUICK = dict(dim=64, n_heads=4, n_kv_heads=1, n_layers=2, hidden=172, context=64,
             batch_size=16, steps=300, warmup=20, eval_windows=64, calib_windows=32)
ROW_FIELDS = ("seed", "criterion", "ratio", "ppl_pruned", "ppl_lsq", "bpb_pruned", "bpb_lsq",
              "params_kept", "params", "dim", "hidden", "n_heads", "n_kv_heads",
              "importance_s", "repair_s", "base_ppl", "base_bpb")


# ============================================================================================
# command line
# ============================================================================================
def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("corpus, decoder and training (default: the full configuration; "
                             "--quick: a tiny one); baselines are cached in --checkpoint-dir")
    g.add_argument("--corpus-dir", default=None,
                   help="directory of .py files (default: this Python's standard library)")
    for name, kind in (("dim", int), ("n-heads", int), ("n-kv-heads", int), ("n-layers", int),
                       ("hidden", int), ("context", int), ("batch-size", int), ("steps", int),
                       ("warmup", int)):
        g.add_argument(f"--{name}", type=kind, default=None,
                       help=f"default {FULL[name.replace('-', '_')]} "
                            f"(--quick: {QUICK[name.replace('-', '_')]})")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--data-dir", default="data", help="corpus cache (default: data)")
    g.add_argument("--checkpoint-dir", default="checkpoints")
    g.add_argument("--retrain", action="store_true", help="ignore cached baselines")


def _experiment_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning experiment")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    g.add_argument("--criteria", nargs="+", default=list(DEFAULT_CRITERIA),
                   help=f"default: {' '.join(DEFAULT_CRITERIA)}")
    g.add_argument("--ratios", type=float, nargs="+", default=None,
                   help="default: 0.1 0.2 0.3 0.4 0.5 (--quick: 0.2 0.5)")
    g.add_argument("--eval-windows", type=int, default=None,
                   help=f"held-out windows for perplexity (default {FULL['eval_windows']})")
    g.add_argument("--calib-windows", type=int, default=None,
                   help=f"calibration windows (default {FULL['calib_windows']})")
    add_repair_arguments(g, "LeastSquaresRepair")
    g.add_argument("--keep-residual", action="store_true",
                   help="do not prune the residual width (prune_llm.py does)")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default="results/llm")
    g.add_argument("--threads", type=int, default=None,
                   help="torch and Numba threads (default: theirs)")
    g.add_argument("--quick", action="store_true",
                   help="smoke run: dim 64, 2 layers, 300 steps, 1 seed, ratios 0.2 0.5")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    g.add_argument("--report-only", action="store_true",
                   help="rewrite summary.md / perplexity.png from the saved rows and meta")
    g.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="add the seeds of these saved runs (same experiment, other seeds) to "
                        "the run in --out, then rewrite its reports")


def _apply_defaults(a: argparse.Namespace) -> None:
    """The full or ``--quick`` configuration for every option left unset."""
    preset = QUICK if a.quick else FULL
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.seeds = a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])
    a.ratios = a.ratios if a.ratios is not None else ([0.2, 0.5] if a.quick
                                                     else list(DEFAULT_RATIOS))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2]
                                + "\ncriteria (engine.criteria.CRITERIA):\n" + CRITERIA.help())
    return parse_comparison_args(p, (_model_arguments, _experiment_arguments, _run_arguments),
                                 _apply_defaults, argv)


def set_threads(n) -> None:
    """torch and Numba threads (``None``: leave both alone)."""
    if not n:
        return
    torch.set_num_threads(int(n))
    import numba
    numba.set_num_threads(min(int(n), numba.config.NUMBA_NUM_THREADS))


def lm_config(a: argparse.Namespace, corpus, seed: int) -> LMConfig:
    """The baseline of one seed."""
    return LMConfig(corpus=corpus.name, corpus_digest=corpus.digest, dim=a.dim,
                    n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, n_layers=a.n_layers,
                    hidden=a.hidden, context=a.context, batch_size=a.batch_size,
                    steps=a.steps, lr=a.lr, weight_decay=a.weight_decay, warmup=a.warmup,
                    seed=seed, checkpoint_dir=a.checkpoint_dir)


# ============================================================================================
# scoring once, pruning every ratio
# ============================================================================================
class RecordingImportance(tp.importance.Importance):
    """Calls ``importance`` and keeps every group's scores by
    :func:`engine.criteria.group_key` (replayed later by ``CachedImportance``)."""

    def __init__(self, importance, model: torch.nn.Module):
        self.importance = importance
        self.names = {id(m): n for n, m in model.named_modules()}
        self.scores: dict = {}

    @torch.no_grad()
    def __call__(self, group):
        s = self.importance(group)
        self.scores[group_key(group, self.names)] = (None if s is None
                                                     else s.detach().float().cpu().clone())
        return s


@dataclass
class Scored:
    """One criterion's scores of every group of the unpruned model."""
    name: str
    scores: dict
    seconds: float
    note: str


def _fingerprint(model: torch.nn.Module) -> list:
    return [(n, tuple(p.shape), float(p.detach().double().sum())) for n, p in
            model.named_parameters()]


def score_criterion(model, name: str, seed: int, calib: torch.Tensor,
                    a: argparse.Namespace) -> Scored:
    """Build criterion ``name`` (``make_criterion``), calibrate it on ``calib`` and score every
    group the ``prune_llm.py`` pruner scores, without pruning: the pruner's interactive step
    scores all groups before it yields the first, and no yielded group is pruned. The time
    covers the calibration and the scoring, not the dependency graph."""
    crit = make_criterion(name, seed, a)
    rec = RecordingImportance(crit.importance, model)
    pruner = llm_pruner(model, calib[:1], rec, max(a.ratios),
                        prune_residual=not a.keep_residual)
    before = _fingerprint(model)
    t0 = time.perf_counter()
    crit.prepare(model, calib, None)
    for _ in pruner.step(interactive=True):
        pass
    seconds = time.perf_counter() - t0
    if _fingerprint(model) != before:
        raise RuntimeError(f"{name}: scoring changed the model")
    return Scored(crit.name, rec.scores, seconds, crit.note)


def calibrate_repair(model, calib: torch.Tensor, a: argparse.Namespace) -> tuple:
    """``(LeastSquaresRepair calibrated on the unpruned model, seconds)``: ``--repair-ridge``
    (default: the library's) and ``--repair-independent`` (default: sequential)."""
    from tp_curvature import LeastSquaresRepair
    t0 = time.perf_counter()
    repair = LeastSquaresRepair(ridge=a.repair_ridge, sequential=not a.repair_independent)
    repair.calibrate(model, calib)
    return repair, time.perf_counter() - t0


def prune_copy(base, scored: Scored, ratio: float, example: torch.Tensor,
               a: argparse.Namespace, repair=None) -> tuple:
    """A pruned copy of ``base`` at ``ratio`` with ``scored``'s scores -> ``(model, pruner)``:
    ``prune_llm.py``'s pruner (each group recorded by ``repair`` just before it is pruned), its
    fix-ups, and the widths checked against :func:`engine.text.expected_widths`."""
    m = copy.deepcopy(base)
    imp = CachedImportance(scored.scores, scored.name).bind(m)
    pruner = llm_pruner(m, example, imp, ratio, prune_residual=not a.keep_residual)
    for g in pruner.step(interactive=True):
        if repair is not None:
            repair.record(pruner, g)
        g.prune()
    fix_attention(m, pruner)
    want = expected_widths(a.dim, a.hidden, a.n_heads, a.n_kv_heads, ratio,
                           prune_residual=not a.keep_residual)
    got = {k: v for k, v in widths(m).items() if k in want}
    if got != want:
        raise RuntimeError(f"{scored.name} at {ratio}: widths {got}, expected {want}")
    return m, pruner


def repair_and_evaluate(m, pruner, repair, eval_w) -> tuple:
    """``(perplexity dict, seconds, error message or None)`` after ``repair.apply``; a
    :class:`~tp_curvature.RepairError` (grouped-query head pruning, see the module
    docstring) gives NaNs and its message."""
    from tp_curvature import RepairError
    t0 = time.perf_counter()
    try:
        repair.apply(m, pruner)
    except RepairError as e:
        return {"ppl": math.nan, "bpb": math.nan}, math.nan, str(e)
    seconds = time.perf_counter() - t0
    return perplexity(m, eval_w), seconds, None


def evaluate_ratio(base, scored: Scored, ratio: float, repair, eval_w, example,
                   a: argparse.Namespace) -> dict:
    """One row's measurements: perplexity after pruning and after the repair, the widths
    (``repair_error``: the repair's refusal, if any)."""
    m, pruner = prune_copy(base, scored, ratio, example, a, repair)
    pruned = perplexity(m, eval_w)
    w = widths(m)
    lsq, repair_s, error = repair_and_evaluate(m, pruner, repair, eval_w)
    return {"ppl_pruned": pruned["ppl"], "ppl_lsq": lsq["ppl"], "bpb_pruned": pruned["bpb"],
            "bpb_lsq": lsq["bpb"], "params": w["params"], "dim": w["dim"],
            "hidden": w["hidden"], "n_heads": w["n_heads"], "n_kv_heads": w["n_kv_heads"],
            "repair_s": repair_s, "repair_error": error}


def _seed_meta(seed: int, info: dict, scored: dict, repair, repair_s: float,
               errors: set) -> dict:
    """What meta.json keeps of one seed: the baseline, its training cost, the timings."""
    return {"seed": seed, "hash": info["hash"], "checkpoint": info["checkpoint"],
            "cached": info["cached"], "num_params": info["num_params"],
            "train_time_s": info["train_time_s"], "tokens": info["tokens"],
            "tokens_per_s": info["tokens_per_s"], "train_threads": info.get("threads"),
            "final_train_loss": info["history"][-1]["loss"], "history": info["history"],
            "base_ppl": info["base"]["ppl"], "base_bpb": info["base"]["bpb"],
            "importance_s": {c: s.seconds for c, s in scored.items()},
            "notes": {c: s.note for c, s in scored.items()},
            "repair": {"ridge": repair.ridge, "sequential": repair.sequential},
            "repair_calibrate_s": repair_s, "repair_errors": sorted(errors)}


def run_seed(a: argparse.Namespace, corpus, eval_w: torch.Tensor, seed: int) -> tuple:
    """Train / load one seed's baseline, score every criterion, prune every ratio ->
    ``(rows, seed meta)``."""
    from tqdm.auto import tqdm

    model, info = train_or_load_lm(lm_config(a, corpus, seed), corpus, eval_w,
                                   force=a.retrain, progress=not a.no_progress)
    calib = calibration_windows(corpus.train, a.calib_windows, a.context, seed)
    repair, repair_cal_s = calibrate_repair(model, calib, a)
    scored = {}
    for c in a.criteria:
        scored[c] = score_criterion(model, c, seed, calib, a)
        print(f"seed {seed}: {c} scored in {scored[c].seconds:.1f} s")
    base_params = widths(model)["params"]
    rows, errors = [], set()
    cells = [(c, r) for c in a.criteria for r in a.ratios]
    for c, r in tqdm(cells, desc=f"sweep seed {seed}", disable=a.no_progress):
        row = {"seed": seed, "criterion": c, "ratio": r,
               **evaluate_ratio(model, scored[c], r, repair, eval_w, calib[:1], a)}
        err = row.pop("repair_error")
        if err:
            errors.add(err)
        row.update(params_kept=row["params"] / base_params, importance_s=scored[c].seconds,
                   base_ppl=info["base"]["ppl"], base_bpb=info["base"]["bpb"])
        rows.append(row)
    return rows, _seed_meta(seed, info, scored, repair, repair_cal_s, errors)


def run_experiment(a: argparse.Namespace, argv=None) -> tuple:
    """Every seed -> ``(rows, meta)``."""
    t0 = time.perf_counter()
    check_head_config(a.n_heads, a.n_kv_heads, a.ratios)
    corpus = load_text_corpus(a.corpus_dir, cache_dir=a.data_dir, verbose=True)
    eval_w = heldout_windows(corpus.heldout, a.eval_windows, a.context, seed=0)
    rows, seeds = [], []
    for seed in a.seeds:
        r, s = run_seed(a, corpus, eval_w, seed)
        rows += r
        seeds.append(s)
    cmd = "python benchmarks/llm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"args": {k: v for k, v in vars(a).items()}, "command": cmd.strip(),
            "corpus": corpus.stats, "n_eval_windows": len(eval_w),
            "lm_config": lm_config(a, corpus, 0).to_dict(), "seeds": seeds,
            "wall_s": time.perf_counter() - t0, "platform": platform.platform(),
            "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "torch_pruning": tp.__version__}
    return rows, meta


# ============================================================================================
# reports
# ============================================================================================
def _cell(rows, c, r, stage) -> list:
    """``(seed, perplexity)`` of criterion ``c`` at ratio ``r`` and ``stage``."""
    return [(x["seed"], x[f"ppl_{stage}"]) for x in rows
            if x["criterion"] == c and abs(x["ratio"] - r) < 1e-9]


def _fmt(m, s, n, digits=2) -> str:
    if not np.isfinite(m):
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def _axes(rows) -> tuple:
    crits = list(dict.fromkeys(x["criterion"] for x in rows))
    return crits, sorted({x["ratio"] for x in rows}), sorted({x["seed"] for x in rows})


def _repair_text(seeds: list) -> str:
    """The repair's settings as run (``ridge``, sequential or independent refit)."""
    runs = {json.dumps(s.get("repair"), sort_keys=True) for s in seeds}
    texts = []
    for r in map(json.loads, sorted(runs)):
        texts.append("settings not recorded" if r is None else
                     f"{'sequential' if r['sequential'] else 'independent'} refit, "
                     f"ridge {r['ridge']:g}")
    return "; ".join(texts)


def _header(meta) -> list:
    c, lm, st = meta["corpus"], meta["lm_config"], meta["seeds"]
    a = meta["args"]
    tm, ts, tn = mean_std([s["train_time_s"] / 60 for s in st])
    km, ks, kn = mean_std([s["tokens_per_s"] for s in st])
    bm, bs, bn = mean_std([s["base_ppl"] for s in st])
    bbm, bbs, _ = mean_std([s["base_bpb"] for s in st])
    return [
        "# Pruning a LLaMA-shaped decoder on Python source (byte level)", "",
        f"Corpus `{c['name']}` ({c['root']}, Python {c['python']}): the `.py` files without "
        f"{', '.join(c['skipped_dirs'])} directories and {len(c['skipped_non_utf8'])} "
        f"non-UTF-8 file(s); {c['tokens']}. Split by module ({c['split_rule']}): train "
        f"{c['files']['train']} files / {c['bytes']['train']:,} bytes, held out "
        f"{c['files']['heldout']} files / {c['bytes']['heldout']:,} bytes.", "",
        f"Decoder `llama_decoder(vocab=256, dim={lm['dim']}, n_heads={lm['n_heads']}, "
        f"n_kv_heads={lm['n_kv_heads']}, n_layers={lm['n_layers']}, hidden={lm['hidden']})`, "
        f"{st[0]['num_params']:,} parameters, context {lm['context']} bytes. Training: AdamW "
        f"(lr {lm['lr']}, betas {tuple(lm['betas'])}, weight decay {lm['weight_decay']} on "
        f"matrices), {lm['warmup']} warm-up steps then cosine to {lm['min_lr_ratio']} x lr, "
        f"gradient clip {lm['grad_clip']}, {lm['steps']} steps of {lm['batch_size']} random "
        f"windows = {lm['steps'] * lm['batch_size'] * lm['context']:,} bytes "
        f"({lm['steps'] * lm['batch_size'] * lm['context'] / c['bytes']['train']:.2f} epochs).",
        "",
        f"**Training cost**: {_fmt(tm, ts, tn, 1)} min per seed at {_fmt(km, ks, kn, 0)} "
        f"tokens/s (torch threads: {sorted({s['train_threads'] for s in st}, key=str)}; "
        f"measured when each baseline was trained). **Baseline** held-out perplexity "
        f"{_fmt(bm, bs, bn, 3)} ({_fmt(bbm, bbs, bn, 3)} bits/byte) on "
        f"{meta['n_eval_windows']} non-overlapping held-out windows of {lm['context']} bytes "
        f"(fixed by seed 0).", "",
        "Pruner: `tp.pruner.BasePruner` with `examples/LLMs/prune_llm.py`'s arguments "
        "(`pruning_ratio=r`, `num_heads={q_proj: H, k_proj: H_kv, v_proj: H_kv}`, "
        "`prune_num_heads=True`, `prune_head_dims=False`, `head_pruning_ratio=r`, `round_to=4`, "
        "`ignored_layers=[lm_head]`), then its attribute fix-ups"
        + (", residual width kept (`--keep-residual`, not prune_llm.py)"
           if a.get("keep_residual") else
           "; as in prune_llm.py the residual width is pruned too") +
        f". Calibration: {a['calib_windows']} windows of {lm['context']} bytes of the "
        "training split per seed, the same for every criterion and for the repair "
        f"(`LeastSquaresRepair`, {_repair_text(st)}, calibrated once per seed on the "
        "unpruned model).", "",
    ]


def _widths_table(rows) -> list:
    _, ratios, _ = _axes(rows)
    lines = ["Widths after pruning (every block; the same for every criterion): ratio -> "
             "residual width / SwiGLU hidden / query heads / kv heads / parameters kept.", "",
             "| ratio | residual | hidden | heads | kv heads | params kept |",
             "|---|---|---|---|---|---|"]
    for r in ratios:
        x = next(x for x in rows if abs(x["ratio"] - r) < 1e-9)
        lines.append(f"| {r:g} | {x['dim']} | {x['hidden']} | {x['n_heads']} | "
                     f"{x['n_kv_heads']} | {100 * x['params_kept']:.1f}% |")
    return lines + [""]


def _ppl_table(rows, stage: str) -> list:
    """criterion x ratio, mean ± std of the perplexity over seeds, best (lowest) in bold."""
    crits, ratios, seeds = _axes(rows)
    lines = [f"## Held-out perplexity {STAGES[stage]} (mean ± std over {len(seeds)} seed(s); "
             "lower is better)", "",
             "| criterion | " + " | ".join(f"{r:g}" for r in ratios) + " |",
             "|---" * (len(ratios) + 1) + "|"]
    cells = {(c, r): mean_std([v for _, v in _cell(rows, c, r, stage)])
             for c in crits for r in ratios}
    for c in crits:
        out = []
        for r in ratios:
            best = np.nanmin([cells[o, r][0] for o in crits] + [np.inf])
            t = _fmt(*cells[c, r])
            out.append(f"**{t}**" if cells[c, r][0] <= best + 1e-12 else t)
        lines.append(f"| {c} | " + " | ".join(out) + " |")
    return lines + [""]


def _goal_lines(rows) -> list:
    """The issue's goal: with lsq at :data:`GOAL_RATIO`, perplexity within
    :data:`GOAL_TOLERANCE` of the unpruned model's, for every criterion (l2 and curvature
    named by the goal)."""
    crits, ratios, seeds = _axes(rows)
    if not any(abs(r - GOAL_RATIO) < 1e-9 for r in ratios):
        return []
    lines = [f"## Goal: perplexity after lsq at {GOAL_RATIO:g} within "
             f"{100 * GOAL_TOLERANCE:.0f}% of the unpruned model's", "",
             "Per seed: ppl_lsq / base_ppl - 1; the goal names "
             f"{' and '.join(GOAL_CRITERIA)}.", "",
             "| criterion | increase (mean ± std) | seeds within | met |", "|---|---|---|---|"]
    for c in crits:
        inc = [x["ppl_lsq"] / x["base_ppl"] - 1 for x in rows
               if x["criterion"] == c and abs(x["ratio"] - GOAL_RATIO) < 1e-9
               and np.isfinite(x["ppl_lsq"])]
        m, s, n = mean_std(inc)
        ok = sum(v <= GOAL_TOLERANCE for v in inc)
        pct = _fmt(100 * m, 100 * s, n, 1)
        lines.append(f"| {c}{' (goal)' if c in GOAL_CRITERIA else ''} | "
                     f"{pct + '%' if n else pct} | {ok}/{n} | "
                     f"{'yes' if n and ok == n else 'no'} |")
    return lines + [""]


def _best_other_lines(rows) -> list:
    """Every curvature criterion against the best (lowest mean perplexity) other criterion of
    each stage x ratio cell, paired by seed (``engine.stats.paired_comparison``)."""
    crits, ratios, seeds = _axes(rows)
    curv = [c for c in crits if c.startswith("curvature")]
    others = [c for c in crits if not c.startswith("curvature")]
    if not curv or not others:
        return []
    lines = ["## Curvature vs the best other criterion of each cell (paired over seeds)", "",
             "Best other: the non-curvature criterion with the lowest mean perplexity in the "
             "cell. Difference = curvature - best other (perplexity, mean ± std over seeds; "
             "negative favours curvature); W/T/L = seeds where curvature was lower / equal / "
             "higher; p = two-sided paired t-test (`scipy.stats.ttest_rel`), Wilcoxon "
             "signed-rank for reference (both need 2+ seeds).", "",
             "| curvature | stage | ratio | best other | difference | W/T/L | t-test p | "
             "Wilcoxon p |", "|---|---|---|---|---|---|---|---|"]
    for c in curv:
        for stage in STAGES:
            for r in ratios:
                per = {o: {s: v for s, v in _cell(rows, o, r, stage) if np.isfinite(v)}
                       for o in others + [c]}
                ranked = [o for o in others if per[o]]
                if not ranked or not per[c]:
                    continue
                best = min(ranked, key=lambda o: np.mean(list(per[o].values())))
                common = [s for s in seeds if s in per[c] and s in per[best]]
                st = paired_comparison([per[best][s] for s in common],
                                       [per[c][s] for s in common])
                lines.append(f"| {c} | {stage} | {r:g} | {best} | {-st['mean']:+.3f} ± "
                             f"{st['std']:.3f} | {st['wins']}/{st['ties']}/{st['losses']} | "
                             f"{format_p(st['p_t'])} | {format_p(st['p_wilcoxon'])} |")
    return lines + [""]


def _cost_lines(meta) -> list:
    """Training cost per seed, scoring and repair timings, notes, wall time."""
    lines = ["## Cost", "",
             "| seed | baseline ppl | bits/byte | training (min) | tokens/s | cached | "
             "repair calibration (s) |", "|---|---|---|---|---|---|---|"]
    for s in meta["seeds"]:
        lines.append(f"| {s['seed']} | {s['base_ppl']:.3f} | {s['base_bpb']:.3f} | "
                     f"{s['train_time_s'] / 60:.1f} | {s['tokens_per_s']:,.0f} | "
                     f"{'yes' if s['cached'] else 'no'} | {s['repair_calibrate_s']:.1f} |")
    lines += ["", "Scoring time per seed (calibration + every group of one pruner step, s):",
              "", "| criterion | seconds |", "|---|---|"]
    for c in meta["seeds"][0]["importance_s"]:
        lines.append(f"| {c} | "
                     f"{_fmt(*mean_std([s['importance_s'][c] for s in meta['seeds']]), 1)} |")
    lines += ["", "Notes:", ""] + [f"- `{c}`: {t}" for c, t in
                                   meta["seeds"][0]["notes"].items() if t]
    return lines + ["", f"Total wall time {meta['wall_s'] / 60:.1f} min on {meta['platform']} "
                        f"({meta['threads']} torch threads). Command: `{meta['command']}`."]


def summary_markdown(rows: list, meta: dict) -> str:
    """``summary.md`` (see the module docstring)."""
    lines = _header(meta) + _widths_table(rows)
    for stage in STAGES:
        lines += _ppl_table(rows, stage)
    lines += _goal_lines(rows) + _best_other_lines(rows)
    rep = mean_std([x["repair_s"] for x in rows])
    lines += [f"Repair (`apply`) per pruned model: {_fmt(*rep, 2)} s.", ""]
    errors = sorted({e for s in meta["seeds"] for e in s.get("repair_errors", [])})
    if errors:
        lines += ["The repair refused some pruned models (their lsq cells are empty):", ""]
        lines += [f"- {e}" for e in errors] + [""]
    lines += _cost_lines(meta)
    return "\n".join(lines) + "\n"


def plot(rows: list, meta: dict, out_png: Path) -> None:
    """Perplexity against ratio (log y), one line per criterion, after pruning and after lsq;
    the baseline dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crits, ratios, seeds = _axes(rows)
    base = float(np.mean([s["base_ppl"] for s in meta["seeds"]]))
    fig, axes = plt.subplots(1, len(STAGES), figsize=(10, 3.8), sharey=True)
    cmap = plt.get_cmap("tab10")
    for ax, stage in zip(axes, STAGES):
        for k, c in enumerate(crits):
            ms = [mean_std([v for _, v in _cell(rows, c, r, stage)]) for r in ratios]
            curv = c.startswith("curvature")
            ax.errorbar(ratios, [t[0] for t in ms], yerr=[t[1] for t in ms], label=c,
                        marker="o", ms=3.5, capsize=3, color=cmap(k % 10),
                        linestyle="-" if curv else "--", lw=2.2 if curv else 1.3)
        ax.axhline(base, color="k", lw=0.8, ls=":", label="unpruned")
        ax.set_yscale("log")
        ax.set_title(STAGES[stage], fontsize=10)
        ax.set_xlabel("pruning ratio")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("held-out perplexity (bytes, log)")
    axes[-1].legend(fontsize=8, frameon=False)
    fig.suptitle(f"{meta['corpus']['name']} decoder: perplexity vs ratio "
                 f"(mean ± std over {len(seeds)} seed(s))", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def _none_for_nan(rows: list) -> list:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in rows]


def save_run(rows: list, meta: dict, out: Path) -> None:
    """``rows.csv``, ``rows.json`` and ``meta.json`` in ``out`` (NaN as an empty cell / null)."""
    rows = _none_for_nan(rows)
    write_csv(out / "rows.csv", rows, ROW_FIELDS)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))


def read_run(out: Path) -> tuple:
    """``(rows, meta)`` saved in ``out`` (null read back as NaN)."""
    rows = json.loads((out / "rows.json").read_text())
    rows = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in rows]
    return rows, json.loads((out / "meta.json").read_text())


def write_reports(rows: list, meta: dict, out: Path, no_plot: bool = False) -> str:
    """``summary.md`` (returned) and, unless ``no_plot``, ``perplexity.png``."""
    md = summary_markdown(rows, meta)
    (out / "summary.md").write_text(md)
    if not no_plot:
        plot(rows, meta, out / "perplexity.png")
    return md


#: options that may differ between runs merged by --merge (they do not change a seed's rows)
MERGE_FREE = ("seeds", "out", "threads", "no_plot", "no_progress", "report_only", "merge",
              "retrain", "checkpoint_dir", "data_dir")


def merge_runs(out: Path, others: list) -> tuple:
    """The run in ``out`` with the seeds of the runs in ``others`` added: the experiment
    options must be equal (those of :data:`MERGE_FREE` aside) and no seed may repeat."""
    rows, meta = read_run(out)
    for other in map(Path, others):
        rows2, meta2 = read_run(other)
        diff = [k for k in meta["args"] if k not in MERGE_FREE
                and meta["args"][k] != meta2["args"].get(k)]
        if diff or meta["corpus"] != meta2["corpus"]:
            raise SystemExit(f"--merge: {other} is another experiment (differs in "
                             f"{', '.join(diff) or 'the corpus'})")
        seeds = {s["seed"] for s in meta["seeds"]}
        repeated = sorted(seeds & {s["seed"] for s in meta2["seeds"]})
        if repeated:
            raise SystemExit(f"--merge: seed(s) {repeated} of {other} are already in {out}")
        rows = rows + rows2
        meta = {**meta, "seeds": meta["seeds"] + meta2["seeds"],
                "command": f"{meta['command']}; {meta2['command']}",
                "wall_s": meta["wall_s"] + meta2["wall_s"]}
        meta["args"] = {**meta["args"], "seeds": [s["seed"] for s in meta["seeds"]]}
    return rows, meta


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    if a.merge:
        rows, meta = merge_runs(out, a.merge)
        save_run(rows, meta, out)
        print(write_reports(rows, meta, out, a.no_plot))
        return 0
    if a.report_only:
        rows, meta = read_run(out)
        print(write_reports(rows, meta, out, a.no_plot))
        return 0
    set_threads(a.threads)
    for c in a.criteria:        # fail early on a bad criterion name or option
        make_criterion(c, 0, a)
    out.mkdir(parents=True, exist_ok=True)
    rows, meta = run_experiment(a, argv)
    save_run(rows, meta, out)
    print(write_reports(rows, meta, out, a.no_plot))
    print(f"wrote {out}/rows.csv, rows.json, meta.json, summary.md"
          + ("" if a.no_plot else ", perplexity.png") + f" in {meta['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
