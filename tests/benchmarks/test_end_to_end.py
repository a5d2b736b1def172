"""benchmarks/end_to_end.py: the ResNet-56 measurement's paired runs."""
import end_to_end  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import numpy as np
import pytest

from tp_curvature import CurvatureConfig


@pytest.mark.slow
def test_resnet56_pairs_its_runs_and_summarises_them(capsys):
    """Three paired runs on two images (three, so that a median and a mean differ): every
    time is the median of its runs, the ratio the mean of the per-run ratios (with their
    standard deviation), the best-times ratio the ratio of the minima; the table prints the
    spread."""
    row = end_to_end.bench_resnet56(2, CurvatureConfig(), repeat=3)
    assert row["repeat"] == 3 and row["connections"] > 90_000 and row["groups"] > 0
    for key in ("taylor_forward_backward_s", "curvature_total_s", "curvature_scoring_s"):
        runs = row[key + "_runs"]
        assert len(runs) == 3 and min(runs) > 0 and row[key] == np.median(runs)
    pairs = np.array(row["curvature_total_s_runs"]) / row["taylor_forward_backward_s_runs"]
    assert np.allclose(row["ratio_vs_taylor_fb_runs"], pairs)
    assert np.isclose(row["ratio_vs_taylor_fb"], pairs.mean())
    assert np.isclose(row["ratio_vs_taylor_fb_std"], pairs.std(ddof=1))
    best = min(row["curvature_total_s_runs"]) / min(row["taylor_forward_backward_s_runs"])
    assert np.isclose(row["ratio_vs_taylor_fb_of_best"], best)
    end_to_end.print_table([row])
    assert "mean of 3 paired runs" in capsys.readouterr().out
