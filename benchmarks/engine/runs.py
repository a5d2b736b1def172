"""Saved runs of ``benchmarks/compare.py``: writing ``rows.csv`` / ``rows.json`` /
``meta.json``, rewriting the reports of a saved run (``--report-only``), and adding criteria
to a saved run (``--add``).

``--add`` runs only the given criteria and adds their rows to the run already in the output
folder (its rows for those criteria are replaced): every option that defines the experiment
(:data:`EXPERIMENT_OPTIONS`) must equal the saved run's (checked, the mismatched option is
named), a criterion the saved run already holds must run what its saved note says (checked:
the curvature names changed meaning with the library presets, so ``curvature`` added to a run of
the first release, where it was the paper's definition, is refused rather than mixed), and
each seed's baseline accuracy must come out identical (checked: baselines, calibration batches,
test sets and the pruning are deterministic on CPU), so the added criteria are paired with the
saved ones seed by seed.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .experiment import row_fields
from .report import read_run, write_reports
from .utils import write_csv

#: options that define an experiment: ``--add`` requires them equal to the saved run's
EXPERIMENT_OPTIONS = ("dataset", "model", "epochs", "batch_size", "optimizer", "lr",
                      "weight_decay", "train_subset", "augment", "width", "model_kwargs", "seeds",
                      "ratios", "modes", "calib_size", "calib_per_class", "calib_correct",
                      "eval_subset", "stages", "finetune_epochs", "finetune_subset",
                      "finetune_lr", "repair_ridge", "repair_independent")


def nan_for_none(rows: list) -> list:
    """The rows with every None (a missing value in rows.json) as NaN, as a run makes them."""
    return [{k: (float("nan") if v is None else v) for k, v in r.items()} for r in rows]


def write_rows(rows: list, out: Path) -> None:
    """``rows.csv`` (NaN as an empty cell) and ``rows.json`` (NaN as null)."""
    fields = row_fields()
    rows = [{k: (None if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k))
             for k in fields} for r in rows]
    write_csv(out / "rows.csv", rows, fields)   # None is written as an empty cell
    with open(out / "rows.json", "w") as f:
        json.dump(rows, f, indent=1)


def save_run(rows: list, meta: dict, out: Path) -> None:
    """``rows.csv``, ``rows.json`` and ``meta.json`` in ``out``."""
    write_rows(rows, out)
    with open(out / "meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=str)


def report_only(out: Path, no_plot: bool = False) -> int:
    """Rewrite ``summary.md`` / ``accuracy.png`` from the saved ``rows.json`` + ``meta.json``;
    returns the exit status."""
    try:
        rows, meta = read_run(out)
    except FileNotFoundError as e:
        print(f"error: --report-only needs rows.json and meta.json in {out}: {e}", file=sys.stderr)
        return 1
    write_reports(nan_for_none(rows), meta, out, no_plot)
    print(f"rewrote {out}/summary.md" + ("" if no_plot else " and accuracy.png"))
    return 0


def load_for_add(out: Path, args, notes: dict = None) -> tuple:
    """``(rows, meta)`` of the saved run that ``--add`` extends; raises ``SystemExit`` naming
    the first option that differs, or a criterion whose saved note differs from ``notes``
    (criterion -> the note of what this run computes)."""
    try:
        rows, meta = read_run(out)
    except FileNotFoundError as e:
        raise SystemExit(f"error: --add needs rows.json and meta.json in {out}: {e}")
    now = vars(args)
    for k in EXPERIMENT_OPTIONS:
        if k in meta["args"] and json.dumps(meta["args"][k]) != json.dumps(now.get(k)):
            raise SystemExit(f"error: --add: option {k!r} is {now.get(k)!r} here but "
                             f"{meta['args'][k]!r} in the saved run {out}")
    _check_same_definitions(meta, notes or {}, out)
    return rows, meta


def _check_same_definitions(meta: dict, notes: dict, out: Path) -> None:
    saved = {}
    for sd in meta["seeds"]:
        saved.update(sd.get("notes", {}))
    for c, note in notes.items():
        if c in meta["args"]["criteria"] and saved.get(c, "") != note:
            raise SystemExit(f"error: --add: criterion {c!r} of the saved run {out} ran "
                             f"{saved.get(c, '')!r} but here runs {note!r}; use another --out "
                             "(or another name) rather than mixing two definitions")


def merge_added(old_rows, old_meta, rows, meta, args) -> tuple:
    """The saved run with the new criteria's rows (replacing any saved rows of them); raises
    ``SystemExit`` when a seed's baseline accuracy differs from the saved one."""
    for old, new in zip(old_meta["seeds"], meta["seeds"]):
        if old["seed"] != new["seed"] or abs(old["base_acc"] - new["base_acc"]) > 0:
            raise SystemExit(f"error: --add: seed {new['seed']}'s baseline accuracy "
                             f"{new['base_acc']} differs from the saved {old['base_acc']}: "
                             "the runs would not be paired")
        for key in ("importance_s", "spearman_vs_l2", "notes"):
            old.setdefault(key, {}).update(new.get(key, {}))
    added = set(args.criteria)
    kept = nan_for_none([r for r in old_rows if r["criterion"] not in added])
    merged = kept + rows
    crit = [c for c in old_meta["args"]["criteria"] if c not in added] + list(args.criteria)
    old_meta["args"]["criteria"] = crit
    old_meta.setdefault("added", []).append({"argv": meta["argv"], "wall_s": meta["wall_s"]})
    return merged, old_meta
