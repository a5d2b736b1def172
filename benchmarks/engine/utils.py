"""Small helpers shared by the benchmark scripts."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import torch


def write_csv(path, rows: list, fields: Sequence[str] | None = None) -> Path:
    """Write ``rows`` (dicts) to ``path``; columns ``fields`` (default: the first row's keys),
    missing values left empty."""
    path = Path(path)
    fields = list(fields) if fields is not None else list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    return path


def write_jsonl(path, rows: list) -> Path:
    """Write ``rows`` (dicts) to ``path`` as JSON lines, one row per line."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def forward_with_hooks(model, x, batch_size: int, pre_hooks: dict, post_hooks: dict = None):
    """Run ``x`` (a tensor) through ``model`` in eval mode, ``batch_size`` samples at a time,
    with ``pre_hooks`` / ``post_hooks`` (``{module: hook}``, forward pre- / forward hooks)
    registered for the pass. Afterwards the hooks are removed and every submodule gets back
    its own ``training`` flag, also when the forward raises."""
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(h) for m, h in pre_hooks.items()]
    handles += [m.register_forward_hook(h) for m, h in (post_hooks or {}).items()]
    try:
        model.eval()
        for s in range(0, len(x), batch_size):
            model(x[s:s + batch_size])
    finally:
        for h in handles:
            h.remove()
        for m, was in modes:
            m.training = was
