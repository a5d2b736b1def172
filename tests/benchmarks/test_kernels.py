"""benchmarks/kernels.py: the certified solver against POT's exact loop on random layers."""
import kernels  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import numpy as np
import pytest


@pytest.mark.parametrize("flag", [[], ["--no-bypass"]])
def test_rows_count_the_bypassed_connections_unless_disabled(flag):
    """One small random layer, the exact loop on a 0.2 s budget: the certified and raw rows
    carry ``n_bypass`` (connections solved by the bypass plan, some of the layer's), 0 with
    ``--no-bypass``; every row is within the certified accuracy of the exact values."""
    args = kernels.parse(["--sizes", "12", "--budget", "0.2", "--no-sinkhorn2", "--no-batch",
                          "--trained", *flag])
    rows = kernels.run(args)
    numba = [r for r in rows if r["backend"].startswith("numba")]
    assert [r["backend"] for r in numba] == ["numba", "numba-nocert"]
    for r in numba:
        assert (r["n_bypass"] == 0) if flag else (0 < r["n_bypass"] < r["layer_connections"])
        assert r["max_abs_dkappa"] <= 0.02 and np.isfinite(r["conn_per_s"])
