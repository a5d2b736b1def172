"""Small helpers shared by the benchmark scripts."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence


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
