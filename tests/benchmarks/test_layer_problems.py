"""benchmarks/layer_problems.py: timing the solver on pickled layer problems."""
import json
import pickle

import layer_problems  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import pytest

from tp_curvature.testing import random_layer_pair


def test_solve_times_each_pickled_problem_with_its_own_options(tmp_path, capsys):
    """Each pickled problem is solved with its own backend options (``max_iter=1``, raw, for
    the first: at most one iteration per stage), restricted to its first columns; one JSON
    row per problem with the solver log's counts, printed and written."""
    P = random_layer_pair(12, seed=1, topk=6, measure="flow")
    Q = random_layer_pair(10, seed=2, topk=5)
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"a": (P, {"max_iter": 1, "kappa_tol": None}), "b": (Q, {})}))
    out = tmp_path / "rows.jsonl"
    layer_problems.solve(str(path), 4, 2, str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["layer"] for r in rows] == ["a", "b"]
    assert rows[0]["n_solved"] == int(P.solve[:, :4].sum())
    assert rows[1]["n_solved"] == int(Q.solve[:, :4].sum())
    assert rows[0]["iterations_mean"] <= 2 < rows[1]["iterations_mean"]
    assert all(r["seconds"] > 0 and r["columns"] == 4 for r in rows)
    assert capsys.readouterr().out.count("\n") == 2


def test_solve_overrides_the_pickled_options(tmp_path, capsys):
    """``--set KEY=JSON`` replaces the pickled run's solver options (here ``bypass``: the
    log's ``n_bypass`` is 0 without it) and is written in each row; a pair without ``=`` is
    refused with a message."""
    P = random_layer_pair(12, seed=1, topk=6, measure="flow")
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"a": (P, {"bypass": True})}))
    rows = {}
    for value in ("true", "false"):
        out = tmp_path / f"{value}.jsonl"
        layer_problems.solve(str(path), None, 1, str(out),
                             layer_problems._overrides([f"bypass={value}"]))
        rows[value] = json.loads(out.read_text())
    assert rows["true"]["bypass"] is True and rows["true"]["n_bypass"] > 0
    assert rows["false"]["bypass"] is False and rows["false"]["n_bypass"] == 0
    assert layer_problems._overrides(["eps=0.01", "kappa_tol=null"]) == dict(eps=0.01,
                                                                              kappa_tol=None)
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        layer_problems._overrides(["bypass"])


@pytest.mark.slow
def test_dump_pickles_the_named_layers_and_names_those_it_did_not_find(tmp_path):
    """A ResNet-56 run on two images: the named layer's problem is pickled before its solve
    (its distances intact) with the run's backend options; a name the run never builds is
    an error naming what was found, and the run's solver is restored."""
    import tp_curvature.curvature as curvature

    solve_problem = curvature.solve_problem
    args = ["--only", "resnet56", "--calib", "2", "--threads", "1",
            "--out", str(tmp_path / "e.json")]
    with pytest.raises(SystemExit) as ok:
        layer_problems.dump(str(tmp_path / "p.pkl"), ["layer2.0.conv2"], args)
    assert ok.value.code == 0
    (name, (prob, opts)), = pickle.loads((tmp_path / "p.pkl").read_bytes()).items()
    assert name == "layer2.0.conv2" and "layer2.0.conv2" in prob.name
    assert prob.solve.any() and (prob.d_xy[prob.solve] > 0).all()
    assert isinstance(opts, dict)
    with pytest.raises(SystemExit, match=r"only \[\] of \['no_such_layer'\]"):
        layer_problems.dump(str(tmp_path / "x.pkl"), ["no_such_layer"], args)
    assert curvature.solve_problem is solve_problem


def test_exact_times_the_network_simplex_on_runs_out_of_one_x(tmp_path, capsys):
    """The exact solver's sample is runs of connections out of one x each (solved ones,
    within the first columns); its W1 are the same cold and warm-started, the certified
    values are within kappa_tol of them, and one JSON row per problem is printed and
    written."""
    import numpy as np

    P = random_layer_pair(12, seed=1, topk=6, measure="flow")
    runs = layer_problems._runs(P, 8, 20, 5, seed=0)
    assert len(runs) == 4
    for run in runs:
        assert 0 < len(run) <= 5 and len({x for x, _ in run}) == 1
        assert all(P.solve[x, y] and y < 8 for x, y in run)
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"a": (P, {})}))
    out = tmp_path / "rows.jsonl"
    layer_problems.exact(str(path), 8, 20, 5, 1, str(out))
    row, = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["layer"] == "a" and row["connections"] == sum(map(len, runs)) and row["runs"] == 4
    assert row["warm_max_abs_diff"] < 1e-9
    assert 0 <= row["certified_max_abs_dkappa"] <= 0.02
    assert min(row["certified_us"], row["network_simplex_us"], row["network_simplex_warm_us"]) > 0
    assert capsys.readouterr().out.count("\n") == 1
    # the exact values are the network simplex's: the same as POT's emd2 on a connection
    from ot.lp.emd_wrap import emd_c

    from tp_curvature.transport import connection_problem
    from tp_curvature.transport._exact import exact_w1
    x, y = runs[0][0]
    a, b, M = connection_problem(P, x, y)
    assert np.isclose(emd_c(a, b, M, 10_000_000, 1, None, None)[1], exact_w1(P, x, y))


def test_the_exchange_greedy_falls_short_of_the_exact_profit_within_the_bracket():
    """Two predecessors and two successors of unit capacity: the greedy exchange takes the
    best detour (gain 3) and blocks the pair of gain 2 + 2; the exact profit is 4, the cheap
    bound min(sum p max_w G, sum r max_z G) = 5. Non-gaining entries never count."""
    import numpy as np

    G = np.array([[3.0, 2.0], [2.0, -1.0]])
    one = np.ones(2)
    assert layer_problems._greedy_exchange(G, one, one) == 3.0
    assert np.isclose(layer_problems._exchange_profit(G, one, one), 4.0)
    assert np.isclose(layer_problems._exchange_profit(-G, one, one), 1.0)   # only the -(-1)
    assert layer_problems._greedy_exchange(-np.abs(G), one, one) == 0.0


def test_detours_reduce_each_connection_to_its_exchange_exactly(tmp_path, capsys):
    """On a random flow-measure layer pair at alpha 0.7 (forced mass 0.4 along the connection),
    the reduction ``W1 = U - (1-alpha) profit`` matches ``ot.emd2`` of the whole problem on
    every checked connection; the shares and quantiles are ordered (greedy shortfall >= 0,
    the bracket at least the shortfall); a layer at alpha < 1/2 is skipped with a message."""
    P = random_layer_pair(14, seed=3, topk=6, measure="flow", alpha=0.7)
    Q = random_layer_pair(10, seed=2, topk=5, alpha=0.3)
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"a": (P, {}), "b": (Q, {})}))
    out = tmp_path / "rows.jsonl"
    layer_problems.detours(str(path), 150, 150, 0, str(out))
    row, = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["layer"] == "a" and row["sampled"] == 150 and 0 < row["bypassed"] < 1
    assert row["reduction_max_err"] < 1e-9
    lo, mid, hi = row["greedy_short_p10_50_90"]
    assert 0 <= lo <= mid <= hi
    assert all(b >= g for b, g in zip(row["bracket_p10_50_90"], row["greedy_short_p10_50_90"]))
    assert 0 < row["gaining_share_p10_50_90"][1] <= 1
    assert "b: alpha 0.3 < 1/2" in capsys.readouterr().out
    assert row["pred_k"] == 6 and 6 <= row["pred_union_of_4"] <= min(24, row["pred_union"])


def test_support_unions_count_live_atoms_of_consecutive_rows():
    """Rows {0, 1}, {1, 2}, {5, 6}, {6 (and a zero-mass 7)}: unions of two rows 3 and 2
    (padding and zero-mass atoms not counted), of all rows 5; an incomplete last group is left
    out."""
    import numpy as np

    idx = np.array([[0, 1], [1, 2], [5, 6], [6, 7], [9, -1]])
    mass = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0]])
    assert layer_problems._support_unions(idx, mass, group=2) == (2.5, 6)
    assert layer_problems._support_unions(idx[:4], mass[:4], group=2) == (2.5, 5)


@pytest.mark.slow
def test_times_reports_every_layer_problem_solved_and_restores_the_solver(tmp_path):
    """A ResNet-56 run on two images: one row per layer problem solved (its warm-up's and the
    clock's), each with its solved connections and a positive time; the solver is restored."""
    import tp_curvature.curvature as curvature

    solve_problem = curvature.solve_problem
    args = ["--only", "resnet56", "--calib", "2", "--threads", "1",
            "--out", str(tmp_path / "e.json")]
    rows = layer_problems.times(str(tmp_path / "t.jsonl"), args)
    assert curvature.solve_problem is solve_problem
    assert len(rows) >= 2 * 55 and len(rows) == len((tmp_path / "t.jsonl").read_text()
                                                    .splitlines())
    assert all(r["seconds"] > 0 for r in rows)
    assert sum(r["connections"] for r in rows) > 2 * 90_000
    assert any("layer3" in r["layer"] for r in rows)
