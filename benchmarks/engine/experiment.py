"""The experiment of ``benchmarks/compare.py``: at the same compression, which criterion keeps
the most accuracy?

For every seed (:func:`run_seed`) a baseline is trained (or reloaded from ``checkpoints/`` by
:func:`engine.training.train_or_load`, the cache ``benchmarks/train.py`` fills), a calibration
batch is drawn from its training set, and every criterion scores the channels of that same
network on that same batch, once (:func:`score_criterion`; the time of that one computation is
``importance_s``). The scores are reused for every pruning mode and ratio (keyed by the root
layer's qualified name and the pruning handler; valid for deep copies of that baseline): a
fresh copy of the baseline is pruned by ``tp.pruner.BasePruner`` (one shot, final classifier
ignored) and its test accuracy is measured at every stage of :data:`STAGES` that applies.

Stages
------
A stage is one entry of :data:`STAGES`, added with ``@register_stage(name, title, ...)`` on a
function ``produce(run, model) -> model``: ``run`` is the :class:`PruneRun` (the seed's data,
the cached scores, mode and ratio; ``run.prune()`` gives a fresh pruned copy) and ``model`` a
copy of the model of its parent stage (None for a stage without parent). Rows get one column
per stage (:func:`stage_col`: ``acc_<name>`` with ``+`` as ``_``) and the summary one table. To
add a stage, write its function and register it after its parent.

``pruned``   right after pruning (the paper's post-training setting: no repair at all);
             always evaluated;
``bias``     after FLAP's bias compensation (An et al., AAAI 2024), available to every
             criterion: a second copy is pruned identically and every consumer layer whose input
             channels ``J`` were removed gets ``mean(X_J) @ W[:, J]^T`` added to its bias (convs:
             mean over samples and positions times the kernel slice summed over the kernel; the
             bias is created where absent), with ``mean(X_J)`` measured on the *unpruned*
             baseline over the calibration batch (:mod:`engine.peers`). Exact for a channel
             that is constant on that batch, except at the borders of a zero-padded conv (the
             padding contributed zero there but the full kernel sum is added: approximation);
``bn``       after re-estimating BatchNorm statistics on the calibration batch (models with BN);
``bias+bn``  bias compensation first, then BN recalibration (models with BN). For a consumer
             conv followed by BatchNorm the recalibrated mean absorbs the added bias, so there
             ``bias+bn`` equals ``bn``; it differs where a consumer has no BN after it (the
             fully connected layers);
``ft``       after a short fine-tune (``--finetune-epochs`` on ``--finetune-subset`` images),
             starting from the ``bn`` state (the ``pruned`` one without BN, or when ``bn`` is
             not among ``--stages``).

Modes: ``uniform`` (local pruning, every group loses ``ratio`` of its channels) and ``global``
(one ranking over all groups; every group keeps at least its best-scored channel so that no
layer is emptied -- Torch-Pruning would otherwise silently skip such a group -- the same rule
for every criterion).
"""
from __future__ import annotations

import copy
import json
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from .criteria import CachedImportance, compute_scores, make_criterion, make_pruner
from .data import calibration_batch, load_dataset, stratified_subset
from .peers import input_means, prune_with_bias_compensation
from .presets import PRESETS, CurvatureOverrides
from .training import (TrainConfig, evaluate, finetune, make_loader, recalibrate_bn, set_seed,
                       train_or_load)

DEFAULT_CRITERIA = ("random", "l1", "l2", "lamp", "taylor", "hessian", "activation", "wanda",
                    "flap", "curvature", "curvature-paper")
MODES = ("uniform", "global")


# ============================================================================================
# stages
# ============================================================================================
@dataclass(frozen=True)
class Stage:
    """One evaluation point of a pruned copy.

    ``produce(run, model)`` returns the model to evaluate, from a copy of the model of the
    first stage of ``parents`` evaluated in this run (else of the last one, produced without
    being evaluated); a stage without parents starts from the baseline (``run.prune()``).
    ``group`` is the report's stage group (``pruned``, ``repaired``, ``fine-tuned``)."""
    name: str
    title: str
    produce: Callable
    parents: tuple = ()
    needs_bn: bool = False
    needs_finetune: bool = False
    always: bool = False
    group: str = "repaired"


#: every stage, in evaluation and column order (parents before their children)
STAGES: dict = {}


def register_stage(name: str, title: str, *, parents: tuple = (), needs_bn: bool = False,
                   needs_finetune: bool = False, always: bool = False, group: str = "repaired"):
    """Decorator adding ``produce`` as stage ``name`` (see :class:`Stage`)."""
    def add(produce: Callable) -> Callable:
        if name in STAGES:
            raise ValueError(f"stage {name!r} is already registered")
        missing = [p for p in parents if p not in STAGES]
        if missing:
            raise ValueError(f"stage {name!r}: register its parents {missing} first")
        STAGES[name] = Stage(name, title, produce, tuple(parents), needs_bn, needs_finetune,
                             always, group)
        return produce
    return add


def stage_col(stage: str) -> str:
    """Row column of a stage: ``acc_pruned``, ``acc_bias``, ``acc_bn``, ``acc_bias_bn``, ..."""
    return "acc_" + stage.replace("+", "_")


@register_stage("pruned", "right after pruning (no repair)", always=True, group="pruned")
def _pruned(run: "PruneRun", model) -> nn.Module:
    return run.prune()


@register_stage("bias", "after FLAP's bias compensation (no other repair)")
def _bias_compensated(run: "PruneRun", model) -> nn.Module:
    # the same pruning (cached scores) on a second copy, compensating biases group by group as
    # the pruner removes input channels
    return run.prune(compensate_bias=True)


def _recalibrated(run: "PruneRun", model: nn.Module) -> nn.Module:
    return recalibrate_bn(model, run.seed.x, run.seed.device)


register_stage("bn", "after BN recalibration on the calibration batch", parents=("pruned",),
               needs_bn=True)(_recalibrated)
register_stage("bias+bn", "after bias compensation, then BN recalibration", parents=("bias",),
               needs_bn=True)(_recalibrated)


@register_stage("lsq", "after least-squares repair of every layer reading a pruned channel")
def _least_squares(run: "PruneRun", model) -> nn.Module:
    # the same pruning (cached scores) on another copy, then tp_curvature's repair from the
    # unpruned baseline's second moments on the calibration batch
    return run.prune(repair=run.seed.repair())


register_stage("lsq+bn", "after least-squares repair, then BN recalibration",
               parents=("lsq",), needs_bn=True)(_recalibrated)


@register_stage("ft", "after a short fine-tune", parents=("bn", "pruned"), needs_finetune=True,
                group="fine-tuned")
def _finetuned(run: "PruneRun", model: nn.Module) -> nn.Module:
    s, a = run.seed, run.seed.args
    # the same batches in the same order (and augmentation) for every run
    set_seed(s.seed)
    loader = make_loader(s.finetune_data, a.batch_size, shuffle=True, seed=s.seed)
    return finetune(model, loader, epochs=a.finetune_epochs, lr=a.finetune_lr, device=s.device)


@dataclass(frozen=True)
class PlannedStage:
    stage: Stage
    evaluated: bool
    parent: Optional[str]


def stage_plan(wanted, has_bn: bool, can_finetune: bool) -> list:
    """The stages to produce for one seed, in order: those of ``wanted`` that apply (plus the
    ``always`` ones), evaluated, and the parents they need."""
    def applies(st: Stage) -> bool:
        return (st.always or st.name in wanted) and (has_bn or not st.needs_bn) \
            and (can_finetune or not st.needs_finetune)
    evaluated = [n for n, st in STAGES.items() if applies(st)]
    needed, parent = set(evaluated), {}
    for name in reversed(list(STAGES)):          # children are registered after their parents
        st = STAGES[name]
        if name in needed and st.parents:
            parent[name] = next((p for p in st.parents if p in evaluated), st.parents[-1])
            needed.add(parent[name])
    return [PlannedStage(st, n in evaluated, parent.get(n)) for n, st in STAGES.items()
            if n in needed]


# ============================================================================================
# one seed: baseline, calibration batch, data
# ============================================================================================
@dataclass
class SeedData:
    """What every criterion of one seed shares: the baseline, its data, the calibration batch
    ``x, y`` (and ``example = x[:1]``), the fine-tune data (None without a fine-tune) and the
    baseline's mean inputs for the bias compensation (:meth:`input_means`)."""
    args: object
    seed: int
    config: TrainConfig
    base: nn.Module
    info: dict
    train: object
    test: object
    device: torch.device
    base_acc: float
    x: torch.Tensor
    y: torch.Tensor
    base_macs: int
    base_params: int
    has_bn: bool
    finetune_data: object = None
    _means: Optional[dict] = None
    _repair: object = None

    @property
    def example(self) -> torch.Tensor:
        return self.x[:1]

    def repair(self):
        """:class:`tp_curvature.LeastSquaresRepair` calibrated on the unpruned baseline with
        the calibration batch (once per seed, on first use; ``--repair-ridge``,
        ``--repair-independent``)."""
        if self._repair is None:
            from tp_curvature import LeastSquaresRepair
            self._repair = LeastSquaresRepair(
                ridge=getattr(self.args, "repair_ridge", None),
                sequential=not getattr(self.args, "repair_independent", False))
            self._repair.calibrate(self.base, self.x)
        return self._repair

    def input_means(self) -> dict:
        """The unpruned baseline's mean input of every consumer layer on the calibration batch
        (FLAP's bias compensation; one pass per seed, on first use)."""
        if self._means is None:
            self._means = input_means(self.base, self.x)
        return self._means


def build_train_config(args, seed: int) -> TrainConfig:
    mk = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if args.width is not None:
        mk["width"] = args.width
    return TrainConfig(
        dataset=args.dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, seed=seed,
        train_subset=args.train_subset, augment=args.augment, model_kwargs=mk,
        data_root=args.data_root, download=args.download, device=args.device,
        checkpoint_dir=args.checkpoint_dir)


def load_data(args):
    """``(train, test, meta)`` of the full dataset, and the fixed evaluation set."""
    train, test, meta = load_dataset(args.dataset, args.data_root, args.download)
    if args.eval_subset is not None and args.eval_subset < len(test):
        test = test.subset(stratified_subset(test.targets.numpy(), args.eval_subset, 0))
    return train, test, meta


def _subset(ds, n: Optional[int], seed: int):
    """A stratified subset of ``n`` examples (the dataset itself when ``n`` is None or too big)."""
    if n is not None and n < len(ds):
        return ds.subset(stratified_subset(ds.targets.numpy(), n, seed))
    return ds


def prepare_seed(args, seed: int, data, progress: bool = False) -> SeedData:
    """Baseline (trained or reloaded), its accuracy, the calibration batch, the fine-tune set."""
    cfg = build_train_config(args, seed)
    base, info = train_or_load(cfg, progress=progress, verbose=False)
    base.eval()
    train_ds, test_ds, _ = data
    # the training subset this seed's baseline saw (as engine.data.load_dataset draws it)
    train_ds = _subset(train_ds, cfg.train_subset, seed)
    train_ds.augment = bool(cfg.augment)
    dev = torch.device(args.device)
    base_acc = evaluate(base, test_ds, dev)
    x, y = calibration_batch(train_ds, args.calib_size, seed=seed,
                             per_class=args.calib_per_class,
                             model=base if args.calib_correct else None)
    x, y = x.to(dev), y.to(dev)
    base_macs, base_params = count_ops(base, x[:1])
    return SeedData(
        args=args, seed=seed, config=cfg, base=base, info=info, train=train_ds, test=test_ds,
        device=dev, base_acc=base_acc, x=x, y=y, base_macs=base_macs, base_params=base_params,
        has_bn=has_batchnorm(base),
        finetune_data=(_subset(train_ds, args.finetune_subset, seed)
                       if args.finetune_epochs > 0 else None))


def seed_plan(sd: SeedData) -> list:
    return stage_plan(set(sd.args.stages), sd.has_bn, sd.finetune_data is not None)


def seed_meta(sd: SeedData) -> dict:
    """The seed's entry of ``meta.json`` (timings, Spearman and notes filled per criterion)."""
    info = sd.info
    return {"seed": sd.seed, "checkpoint": info.get("checkpoint"), "cached": info.get("cached"),
            "train_time_s": info.get("train_time_s"), "test_acc_full": info.get("test_acc"),
            "base_acc": sd.base_acc, "base_params": sd.base_params, "base_macs": sd.base_macs,
            "calib_n": int(len(sd.x)), "importance_s": {}, "spearman_vs_l2": {}, "notes": {}}


# ============================================================================================
# one criterion x mode x ratio: the pruned copies and their stages
# ============================================================================================
@dataclass
class PruneRun:
    """One criterion's cached scores applied at one mode and ratio. :meth:`prune` gives a
    pruned copy of the baseline; the first one sets the compression and ``prune_s`` of the
    row, and every later one must be pruned identically."""
    seed: SeedData
    criterion: str
    scores: CachedImportance
    mode: str
    ratio: float
    shapes: Optional[list] = None
    prune_s: float = float("nan")
    macs: int = 0
    params: int = 0

    def prune(self, compensate_bias: bool = False, repair=None) -> nn.Module:
        s = self.seed
        m = copy.deepcopy(s.base).to(s.device)
        t0 = time.perf_counter()
        pruner = make_pruner(m, s.example,
                             self.scores.bind(m, keep_best=(self.mode == "global")),
                             self.ratio, self.mode)
        if compensate_bias:
            prune_with_bias_compensation(m, pruner, s.input_means())
        elif repair is not None:
            repair.step(pruner)                  # the groups recorded as they are pruned
        else:
            pruner.step()
        elapsed = time.perf_counter() - t0
        if repair is not None:
            repair.apply(m, pruner)
        shapes = _weight_shapes(m)
        if self.shapes is None:
            self.shapes, self.prune_s = shapes, elapsed
            self.macs, self.params = count_ops(m, s.example)
        elif shapes != self.shapes:
            raise RuntimeError(f"{self.criterion}: a copy was pruned differently "
                               f"({'bias-compensated' if compensate_bias else 'plain'})")
        return m


def run_stages(run: PruneRun, plan: list) -> dict:
    """``{stage: test accuracy}`` of the evaluated stages of ``plan``."""
    models, accs = {}, {}
    for p in plan:
        src = None if p.parent is None else copy.deepcopy(models[p.parent])
        models[p.stage.name] = p.stage.produce(run, src)
        if p.evaluated:
            accs[p.stage.name] = evaluate(models[p.stage.name], run.seed.test, run.seed.device)
    return accs


def make_row(run: PruneRun, accs: dict, importance_s: float) -> dict:
    """One row of ``rows.csv`` / ``rows.json`` (see :func:`row_fields`)."""
    s = run.seed
    row = {"dataset": s.config.dataset, "model": s.config.model, "seed": s.seed,
           "criterion": run.criterion, "mode": run.mode, "ratio": run.ratio}
    row.update({stage_col(n): accs.get(n, float("nan")) for n in STAGES})
    row.update({"params": run.params, "macs": run.macs,
                "params_kept": run.params / s.base_params, "macs_kept": run.macs / s.base_macs,
                "importance_s": importance_s, "prune_s": run.prune_s, "base_acc": s.base_acc,
                "base_params": s.base_params, "base_macs": s.base_macs})
    return row


def row_fields() -> tuple:
    """The columns of a row, in order: one accuracy column per registered stage."""
    return (("dataset", "model", "seed", "criterion", "mode", "ratio")
            + tuple(stage_col(n) for n in STAGES)
            + ("params", "macs", "params_kept", "macs_kept", "importance_s", "prune_s",
               "base_acc", "base_params", "base_macs"))


# ============================================================================================
# the experiment
# ============================================================================================
def score_criterion(sd: SeedData, name: str) -> tuple:
    """``(scores, seconds, note)`` of criterion ``name`` on a copy of the seed's baseline."""
    crit = make_criterion(name, sd.seed, sd.args)
    work = copy.deepcopy(sd.base)
    scores, secs = compute_scores(work, sd.example, crit, sd.x, sd.y)
    return scores, secs, crit.note


def sweep(sd: SeedData, name: str, scores: dict, importance_s: float, bar) -> list:
    """The rows of criterion ``name`` over every mode and ratio."""
    plan, rows = seed_plan(sd), []
    cached = CachedImportance(scores, name)
    for mode in sd.args.modes:
        for ratio in sd.args.ratios:
            bar.set_description(f"seed {sd.seed}: {name} {mode} {ratio:g}")
            run = PruneRun(sd, name, cached, mode, ratio)
            rows.append(make_row(run, run_stages(run, plan), importance_s))
            bar.update(1)
    return rows


def run_seed(args, seed: int, data, rows: list, meta: dict, bar) -> None:
    """Everything for one seed: baseline, calibration batch, scores, pruning sweep."""
    bar.set_description(f"seed {seed}: baseline")
    sd = prepare_seed(args, seed, data, progress=args.progress)
    meta["n_eval"] = len(sd.test)
    sm = seed_meta(sd)
    meta["seeds"].append(sm)
    tqdm_write(f"seed {seed}: baseline {100 * sd.base_acc:.2f}% on {len(sd.test)} test images "
               f"({'cached' if sd.info.get('cached') else 'trained'} "
               f"{sd.info.get('checkpoint')}), {sd.base_params:,} params, {sd.base_macs:,} MACs, "
               f"calibration {len(sd.x)} images")
    all_scores = {}
    for name in args.criteria:
        bar.set_description(f"seed {seed}: score {name}")
        scores, secs, note = score_criterion(sd, name)
        all_scores[name] = scores
        sm["importance_s"][name] = secs
        if note:
            sm["notes"][name] = note
        rows += sweep(sd, name, scores, secs, bar)
    if "l2" in all_scores:
        for name, sc in all_scores.items():
            if name != "l2":
                sm["spearman_vs_l2"][name] = mean_group_spearman(sc, all_scores["l2"])


def new_meta(args, argv) -> dict:
    """``meta.json`` before the seeds: the arguments, versions, platform and threads."""
    return {"args": vars(args), "argv": sys.argv if argv is None else ["compare.py", *argv],
            "seeds": [], "torch": torch.__version__, "torch_pruning": tp.__version__,
            "platform": f"{platform.machine()} {platform.processor() or platform.system()}",
            "threads": torch.get_num_threads()}


def run_comparison(args, data, argv=None) -> tuple:
    """``(rows, meta)`` of every seed of ``args`` on ``data`` (:func:`load_data`)."""
    from tqdm.auto import tqdm
    meta = new_meta(args, argv)
    rows: list = []
    total = len(args.seeds) * len(args.criteria) * len(args.modes) * len(args.ratios)
    t0 = time.perf_counter()
    warm_up_kernels(args)   # Numba's one-time compilation is not charged to the first seed
    with tqdm(total=total, desc="compare", unit="run", dynamic_ncols=True) as bar:
        for seed in args.seeds:
            run_seed(args, seed, data, rows, meta, bar)
    meta["wall_s"] = time.perf_counter() - t0
    return rows, meta


# ============================================================================================
# helpers
# ============================================================================================
def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def count_ops(model, example_inputs) -> tuple[int, int]:
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def _weight_shapes(model: nn.Module) -> list:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if n.endswith("weight")]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if len(a) < 3:
        return float("nan")
    from scipy.stats import spearmanr
    r = spearmanr(a.numpy(), b.numpy()).statistic
    return float(r) if np.isfinite(r) else float("nan")


def mean_group_spearman(sa: dict, sb: dict) -> float:
    vals = [spearman(sa[k], sb[k]) for k in sa
            if sa[k] is not None and sb.get(k) is not None]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def warm_up_kernels(args) -> None:
    """With a curvature criterion on the Sinkhorn backend, run the solver once on a tiny
    network (compiles the Numba kernels)."""
    config = PRESETS["default"](**CurvatureOverrides.from_args(args).changes())
    if config.backend != "sinkhorn" or not any(c.startswith("curvature") for c in args.criteria):
        return
    from tp_curvature import CurvatureImportance
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                          nn.Linear(4, 3)).eval()
    imp = CurvatureImportance(config)
    imp.calibrate(model, torch.randn(8, 6, generator=g))
    imp.curvatures()


def tqdm_write(msg: str) -> None:
    from tqdm.auto import tqdm
    tqdm.write(msg)
