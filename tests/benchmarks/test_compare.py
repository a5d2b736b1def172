"""benchmarks/compare.py (tiny end-to-end runs, marked slow: they train baselines), engine.runs
(--add, --report-only), engine.report (the condensed tables of compare_report.py) and
engine.criteria (the fixed Hessian baseline, the score cache)."""
import copy
import csv
import json

import compare  # benchmarks/compare.py: benchmarks/ is on pytest's pythonpath (pyproject.toml)
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from engine import criteria, report
from tp_curvature import CurvatureConfig


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_end_to_end_digits_mlp(tmp_path):
    out = tmp_path / "out"
    rc = compare.main([
        "--dataset", "digits", "--model", "mlp", "--model-kwargs", '{"hidden": [32, 16]}',
        "--epochs", "3", "--seeds", "0", "--criteria", "l2", "curvature",
        "--ratios", "0.5", "--modes", "uniform", "--finetune-epochs", "0",
        "--calib-size", "32", "--topk", "8", "--backend", "exact", "--threads", "1",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(out),
    ])
    assert rc == 0
    for name in ("rows.csv", "rows.json", "summary.md", "accuracy.png", "meta.json"):
        assert (out / name).is_file(), name
    rows = _read_csv(out / "rows.csv")
    assert len(rows) == 2                                   # 1 seed x 2 criteria x 1 mode x 1 ratio
    assert {r["criterion"] for r in rows} == {"l2", "curvature"}
    for r in rows:
        assert r["mode"] == "uniform" and float(r["ratio"]) == 0.5 and r["seed"] == "0"
        assert 0.0 <= float(r["acc_pruned"]) <= 1.0
        assert r["acc_bn"] == "" and r["acc_ft"] == ""      # no BatchNorm, no fine-tune
        assert r["acc_bias"] != "" and r["acc_bias_bn"] == ""   # bias compensation: no BN
        assert int(r["params"]) < int(r["base_params"])
        assert 0.0 < float(r["base_acc"]) <= 1.0
    # each criterion scored once per seed: one recorded time per criterion, the rows' time
    meta = json.loads((out / "meta.json").read_text())
    (seed,) = meta["seeds"]
    assert set(seed["importance_s"]) == {"l2", "curvature"}
    for r in rows:
        assert float(r["importance_s"]) == seed["importance_s"][r["criterion"]]
    assert seed["importance_s"]["curvature"] > 0.0       # calibration + curvature take time
    # the curvature note says which preset ran, with the command line's overrides
    note = seed["notes"]["curvature"]
    ran = CurvatureConfig(topk=8, backend="exact")
    assert note == (f"CurvatureConfig(topk=8, backend='exact') = {ran.describe()}; "
                    "reduction=mean, sides=both")
    # uniform pruning removes the same number of channels whatever the criterion
    assert rows[0]["params"] == rows[1]["params"] and rows[0]["macs"] == rows[1]["macs"]
    js = json.loads((out / "rows.json").read_text())
    assert len(js) == 2 and js[0]["acc_ft"] is None
    assert {"acc_pruned", "acc_bn", "acc_ft", "params", "macs", "importance_s",
            "base_acc"} <= set(js[0])
    md = (out / "summary.md").read_text()
    assert "| criterion | 0.5 | mean |" in md and "| curvature |" in md and "| l2 |" in md
    assert f"- `curvature`: {note}" in md
    assert "**" in md                                       # best per column in bold
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the reports can be rewritten from rows.json / meta.json alone
    (out / "summary.md").unlink()
    assert compare.main(["--report-only", "--out", str(out), "--no-plot"]) == 0
    assert (out / "summary.md").read_text() == md


@pytest.mark.slow
def test_end_to_end_bn_global(tmp_path):
    """A CNN with BatchNorm: global mode, BN recalibration and fine-tune stages."""
    out = tmp_path / "out"
    rc = compare.main([
        "--dataset", "digits", "--model", "vgg9", "--width", "0.125", "--epochs", "2",
        "--seeds", "0", "--criteria", "random", "taylor", "wanda", "--ratios", "0.5",
        "--modes", "uniform", "global", "--finetune-epochs", "1", "--finetune-subset", "200",
        "--calib-size", "16", "--threads", "1", "--no-plot",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(out),
    ])
    assert rc == 0
    rows = _read_csv(out / "rows.csv")
    assert len(rows) == 6
    for r in rows:
        for stage in ("acc_pruned", "acc_bias", "acc_bn", "acc_bias_bn", "acc_ft"):
            assert r[stage] != "" and 0.0 <= float(r[stage]) <= 1.0, stage
        assert int(r["params"]) < int(r["base_params"])
    assert not (out / "accuracy.png").exists()
    md = (out / "summary.md").read_text()
    assert "after BN recalibration" in md and "global pruning" in md and "MACs / params" in md
    assert "after bias compensation, then BN recalibration" in md


@pytest.mark.slow
def test_peer_criteria_and_paired_table(tmp_path):
    """The calibration-data peers, the bias stage and the curvature-vs-best-other table."""
    out = tmp_path / "out"
    rc = compare.main([
        "--dataset", "digits", "--model", "mlp", "--model-kwargs", '{"hidden": [32, 16]}',
        "--epochs", "3", "--seeds", "0", "1", "--criteria", "l2", "activation", "wanda",
        "flap", "curvature-paper", "--ratios", "0.3", "0.6", "--modes", "uniform", "global",
        "--finetune-epochs", "0", "--calib-size", "32", "--topk", "8", "--backend", "exact",
        "--threads", "1", "--no-plot", "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--out", str(out)])
    assert rc == 0
    rows = _read_csv(out / "rows.csv")
    assert len(rows) == 2 * 5 * 2 * 2
    assert {r["criterion"] for r in rows} == {"l2", "activation", "wanda", "flap",
                                              "curvature-paper"}
    assert all(r["acc_bias"] != "" for r in rows)
    md = (out / "summary.md").read_text()
    assert "after FLAP's bias compensation" in md
    assert "## Curvature vs the best other criterion" in md and "t-test p" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| curvature-paper | uniform |")
             or ln.startswith("| curvature-paper | global |")]
    assert len(table) == 2 * 3 * 2              # modes x stages (pruned, bias, lsq) x ratios
    assert any("| lsq | 0.6 |" in ln for ln in table)
    # --stages restricts the evaluation
    out2 = tmp_path / "out2"
    assert compare.main([
        "--dataset", "digits", "--model", "mlp", "--model-kwargs", '{"hidden": [32, 16]}',
        "--epochs", "3", "--seeds", "0", "--criteria", "flap", "--ratios", "0.5",
        "--modes", "uniform", "--stages", "pruned", "--finetune-epochs", "0",
        "--calib-size", "32", "--threads", "1", "--no-plot",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(out2)]) == 0
    assert _read_csv(out2 / "rows.csv")[0]["acc_bias"] == ""


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    rc = compare.main(["--dataset", "mnist", "--data-root", str(tmp_path), "--seeds", "0",
                       "--criteria", "l2", "--out", str(tmp_path / "out")])
    assert rc == 1
    assert "mnist" in capsys.readouterr().err


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def _group(model):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 4))
    return DG.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(5)))


def _scores_from_grad2(model, grad2):
    """Score the group with Torch-Pruning's own Hessian code fed ``p.grad = grad2[p]``."""
    m = copy.deepcopy(model)
    for (_, p), (_, g) in zip(m.named_parameters(), grad2):
        p.grad = g.clone()
    return tp.importance.GroupHessianImportance()(_group(m))


def test_fixed_hessian_averages_over_samples():
    model = _tiny_model()
    torch.manual_seed(1)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    # per-sample gradients by hand
    per_sample = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_sample.append([(n, p.grad.detach().clone()) for n, p in model.named_parameters()])
    mean_g2 = [(n, torch.stack([s[k][1] ** 2 for s in per_sample]).mean(0))
               for k, (n, _) in enumerate(per_sample[0])]
    last_g2 = [(n, g ** 2) for n, g in per_sample[-1]]
    want_mean = _scores_from_grad2(model, mean_g2)
    want_last = _scores_from_grad2(model, last_g2)
    assert not torch.allclose(want_mean, want_last)

    fixed_model = copy.deepcopy(model)
    fixed = criteria.FixedHessianImportance()
    assert criteria.per_sample_squared_grads(fixed_model, x, y, fixed) == len(x)
    # batched chunks give the same per-sample gradients
    fixed_chunked = criteria.FixedHessianImportance()
    chunk_model = copy.deepcopy(model)
    criteria.per_sample_squared_grads(chunk_model, x, y, fixed_chunked, chunk=4)
    torch.testing.assert_close(fixed(_group(fixed_model)), want_mean)
    torch.testing.assert_close(fixed_chunked(_group(chunk_model)), want_mean)

    # Torch-Pruning 1.6.1 as shipped keeps only the last sample
    orig_model = copy.deepcopy(model)
    orig = tp.importance.GroupHessianImportance()
    criteria.per_sample_squared_grads(orig_model, x, y, orig)
    torch.testing.assert_close(orig(_group(orig_model)), want_last)


def test_cached_scores_replay_the_same_pruning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    crit = criteria.Criterion("l2", tp.importance.GroupMagnitudeImportance(p=2))
    scores, secs = criteria.compute_scores(copy.deepcopy(model), x[:1], crit, x, None)
    assert secs >= 0 and len(scores) == 2
    direct = copy.deepcopy(model)
    criteria.make_pruner(direct, x[:1], tp.importance.GroupMagnitudeImportance(p=2), 0.5).step()
    cached = copy.deepcopy(model)
    criteria.make_pruner(cached, x[:1], criteria.CachedImportance(scores, "l2").bind(cached),
                        0.5).step()
    sd_direct, sd_cached = direct.state_dict(), cached.state_dict()
    assert sd_direct.keys() == sd_cached.keys()
    for k in sd_direct:
        torch.testing.assert_close(sd_direct[k], sd_cached[k])
    # global, 75% of the 16 channels: every group keeps its best channel (no layer emptied)
    glob = copy.deepcopy(model)
    imp = criteria.CachedImportance(scores, "l2").bind(glob, keep_best=True)
    criteria.make_pruner(glob, x[:1], imp, 0.75, "global").step()
    kept = [m.out_channels for m in glob.modules() if isinstance(m, nn.Conv2d)]
    assert sum(kept) == 4 and min(kept) >= 1
    assert glob(x).shape == (2, 3)
    # scores of another model do not silently apply
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    imp = criteria.CachedImportance(scores, "l2").bind(other)
    with pytest.raises(KeyError):
        criteria.make_pruner(other, torch.randn(1, 4), imp, 0.5).step()


def test_compare_report_tables_from_synthetic_runs(tmp_path):
    """compare_report: per-stage means over ratios, and the best curvature variant against the
    best non-random other criterion of each cell, paired over seeds."""
    from scipy.stats import ttest_rel
    acc = {  # criterion -> seed -> ratio -> acc_bias
        "random": {0: {0.3: .99, 0.5: .50}, 1: {0.3: .99, 0.5: .50}, 2: {0.3: .99, 0.5: .50}},
        "l1": {0: {0.3: .80, 0.5: .60}, 1: {0.3: .82, 0.5: .62}, 2: {0.3: .81, 0.5: .58}},
        "wanda": {0: {0.3: .85, 0.5: .50}, 1: {0.3: .86, 0.5: .51}, 2: {0.3: .84, 0.5: .52}},
        "curvature": {0: {0.3: .86, 0.5: .40}, 1: {0.3: .87, 0.5: .40}, 2: {0.3: .83, 0.5: .40}},
        "curvature-flow": {0: {0.3: .70, 0.5: .61}, 1: {0.3: .70, 0.5: .60}, 2: {0.3: .70, 0.5: .55}},
    }
    rows = [{"criterion": c, "seed": s, "mode": "uniform", "ratio": r, "acc_pruned": 0.5,
             "acc_bias": a, "acc_bn": None, "acc_bias_bn": None, "acc_ft": None}
            for c, by_seed in acc.items() for s, by_r in by_seed.items() for r, a in by_r.items()]
    meta = {"args": {"dataset": "digits", "model": "mlp", "epochs": 3, "width": None,
                     "train_subset": None},
            "seeds": [{"seed": s, "test_acc_full": 0.9 + 0.01 * s, "train_time_s": 10.0,
                       "base_acc": 0.9} for s in range(3)]}
    run = tmp_path / "digits-mlp"           # labelled by the folder name: "mlp"
    run.mkdir()
    (run / "rows.json").write_text(json.dumps(rows))
    (run / "meta.json").write_text(json.dumps(meta))
    text = report.condensed_report([run])
    assert "| mlp | 3, full training set | 91.0 ± 1.0 | 10 s |" in text
    # l1 over ratios: seeds 70, 72, 69.5 -> 70.5 ± 1.3
    assert "| l1 | **50.0 ± 0.0** | 70.5 ± 1.3 |" in text     # a tie for best is bold
    # ratio 0.3: best curvature = curvature (85.3) vs wanda (85.0), random is not a peer
    p = ttest_rel([86, 87, 83], [85, 86, 84]).pvalue
    assert (f"| mlp | uniform | bias | 0.3 | yes | curvature 85.3 | wanda 85.0 | +0.33 ± 1.15 | "
            f"2/0/1 | {p:.3f} | at or above |") in text
    # mean ranks: all tie right after pruning; after repair (bias) l1 ranks 4 and 1,
    # curvature-flow 5 and 2
    assert "| l1 | 1.0 | 2.5 |" in text and "| curvature-flow | 1.0 | 3.5 |" in text
    # ratio 0.5: best curvature = curvature-flow (58.7) vs l1 (60.0): below, not significant
    assert ("| mlp | uniform | bias | 0.5 | no | curvature-flow 58.7 | l1 60.0 | -1.33 ± 2.08 | "
            "1/0/2 |") in text
    # the verdict counts the usable cells only (some criterion within 10 points of 90%)
    assert ("Verdict over the 1 usable cells (of 2): at or above 1, below, n.s. 0, "
            "below (p<0.05) 0.") in text


@pytest.mark.slow
def test_add_criteria_to_a_saved_run_pairs_them_seed_by_seed(tmp_path):
    """``--add``: a criterion re-run into a saved run reproduces its saved rows exactly (the
    pairing ``--add`` relies on), new criteria join the tables, and a run with different
    experiment options is refused naming the option."""
    base = ["--dataset", "digits", "--model", "mlp", "--model-kwargs", '{"hidden": [32, 16]}',
            "--epochs", "3", "--seeds", "0", "1", "--ratios", "0.3", "0.6", "--modes",
            "uniform", "--calib-size", "32", "--topk", "8", "--backend", "exact",
            "--threads", "1", "--no-plot", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--out", str(tmp_path / "out")]
    assert compare.main([*base, "--criteria", "l2", "wanda"]) == 0
    before = {(r["criterion"], r["seed"], r["ratio"]): r
              for r in _read_csv(tmp_path / "out" / "rows.csv")}
    assert compare.main([*base, "--criteria", "wanda", "curvature-meanabs-consumer", "--add"]) == 0
    after = _read_csv(tmp_path / "out" / "rows.csv")
    assert len(after) == 3 * 2 * 2
    for r in after:
        if r["criterion"] in ("l2", "wanda"):
            old = before[r["criterion"], r["seed"], r["ratio"]]
            assert {k: r[k] for k in r if k.startswith("acc_")} == \
                   {k: old[k] for k in old if k.startswith("acc_")}
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| curvature-meanabs-consumer | uniform |" in md
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["args"]["criteria"] == ["l2", "wanda", "curvature-meanabs-consumer"]
    assert len(meta["added"]) == 1
    with pytest.raises(SystemExit, match="ratios"):
        compare.main([*base[:-2], "--out", str(tmp_path / "out"), "--criteria", "l1",
                       "--add", "--ratios", "0.5"])


def test_add_refuses_a_criterion_that_changed_meaning(tmp_path):
    """A run of the first release named the paper's definition ``curvature``: ``--add`` of
    today's ``curvature`` (the library default) into it is refused, naming both definitions;
    a criterion whose note is unchanged (``wanda``) passes the check."""
    from engine import runs
    args = compare.parse_args(["--criteria", "curvature", "--seeds", "0", "--out",
                               str(tmp_path)])
    saved_args = dict(vars(args), criteria=["wanda", "curvature"])
    old_note = ("alpha=0.5, variant=paper, reduction=mean, node_value=mean_abs, sides=both, "
                "topk=32, backend=sinkhorn")
    wanda_note = criteria.make_criterion("wanda", 0).note
    meta = {"args": saved_args, "seeds": [{"seed": 0, "notes": {"curvature": old_note,
                                                                "wanda": wanda_note}}]}
    (tmp_path / "rows.json").write_text("[]")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert runs.load_for_add(tmp_path, args, {"wanda": wanda_note})[1]["seeds"]
    new_note = criteria.make_criterion("curvature", 0, args).note
    with pytest.raises(SystemExit, match="criterion 'curvature' of the saved run .* ran "
                                         "'alpha=0.5, variant=paper"):
        runs.load_for_add(tmp_path, args, {"curvature": new_note})


def test_repair_ratio_table_shows_pruned_earlier_and_least_squares_repairs():
    """Per ratio: the mean over seeds right after pruning, after bias+bn (BN model) and after
    lsq+bn, best of each ratio and stage in bold; ratios not run are left out."""
    def row(c, s, r, p, lsq):
        return {"criterion": c, "seed": s, "mode": "uniform", "ratio": r, "acc_pruned": p,
                "acc_bias": None, "acc_bn": None, "acc_bias_bn": p + 0.1, "acc_lsq": lsq,
                "acc_lsq_bn": lsq + 0.01, "acc_ft": None}
    rows = [row("l2", 0, 0.1, .50, .80), row("l2", 1, 0.1, .60, .82),
            row("l2", 0, 0.3, .30, .70), row("l2", 1, 0.3, .20, .72),
            row("wanda", 0, 0.1, .40, .90), row("wanda", 1, 0.1, .40, .90),
            row("wanda", 0, 0.3, .40, .60), row("wanda", 1, 0.3, .40, .60)]
    lines = report.repair_ratio_table(rows, {"label": "vgg9", "seeds": [0, 1]})
    assert lines[0] == "**vgg9**: accuracy (%) at ratio 0.1 / 0.3, uniform pruning, mean over 2 seeds"
    assert "| criterion | pruned | bias+bn | lsq+bn |" in lines
    assert "| l2 | **55.0** / 25.0 | **65.0** / 35.0 | 82.0 / **72.0** |" in lines
    assert "| wanda | 40.0 / **40.0** | 50.0 / **50.0** | **91.0** / 61.0 |" in lines
