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
