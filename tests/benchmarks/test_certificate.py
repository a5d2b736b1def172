"""benchmarks/certificate.py: the bound it reads from the solver's log covers the true error
it measures against the exact solution, and the table has one row per class."""
import csv

import certificate  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import numpy as np
from tp_curvature.testing import random_layer_pair


def test_bound_covers_the_true_error():
    p = random_layer_pair(12, 3, alpha=0.9, density=0.5, topk=8)
    e = certificate.kappa_errors(p, 0.9)
    assert e["true"].shape == e["bound"].shape == (int(p.solve.sum()),)
    assert np.all(e["true"] <= e["bound"] + 1e-9)
    assert e["n_refined"] >= 0 and e["n_exact_fallback"] >= 0


def test_table_has_a_row_per_class(tmp_path):
    assert certificate.main(["--sizes", "8", "--seeds", "0", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "certificate.csv")))
    assert [r["class"] for r in rows] == [c[0] for c in certificate.CLASSES]
    for r in rows:
        assert float(r["true_max"]) <= float(r["bound_max"]) + 1e-9
    assert "Command: `python benchmarks/certificate.py" in (tmp_path / "certificate.md").read_text()
