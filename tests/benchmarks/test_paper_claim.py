"""benchmarks/paper_claim.py: unstructured Wanda against a hand computation (Linear and a
padded, strided conv), and the report (cells, paired comparisons, verdicts, files) on
synthetic results."""
import json
import math

import numpy as np
import paper_claim as pc  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import torch
import torch.nn as nn


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 2, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()


def test_wanda_scores_equal_a_hand_computation():
    model = _tiny()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    got = pc.wanda_scores(model, x)
    assert list(got) == ["0.weight", "3.weight", "5.weight"]
    conv, fc1, fc2 = model[0], model[3], model[5]
    # conv: ||X_j|| over images and output positions of input channel c at tap (i, j)
    xp = np.pad(x.numpy().astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    H = (4 + 2 - 2) // 2 + 1
    want = np.zeros(conv.weight.shape)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                ss = sum(xp[n, c, 2 * oh + i, 2 * ow + j] ** 2
                         for n in range(3) for oh in range(H) for ow in range(H))
                want[:, c, i, j] = (np.abs(conv.weight.detach().double().numpy()[:, c, i, j])
                                    * math.sqrt(ss))
    np.testing.assert_allclose(got["0.weight"].numpy(), want, rtol=1e-12)
    # Linear layers: the norm of each input feature over the images
    with torch.no_grad():
        h1 = model[2](model[1](conv(x))).double()
        h2 = model[4](fc1(model[2](model[1](conv(x))))).double()
    for fc, h, key in ((fc1, h1, "3.weight"), (fc2, h2, "5.weight")):
        norm = np.sqrt((h.numpy() ** 2).sum(0))
        np.testing.assert_allclose(got[key].numpy(),
                                   np.abs(fc.weight.detach().double().numpy()) * norm[None],
                                   rtol=1e-6)
    # batching does not change the norms, and the model's mode is restored
    model.train()
    again = pc.wanda_scores(model, x)
    assert model.training
    for k in got:
        torch.testing.assert_close(again[k], got[k], rtol=1e-12, atol=0)


def _part(pair, seed, base, removed, per_class=(1,)):
    """A synthetic part: criterion -> removed weights (of 1000); curvature per class."""
    res = []
    for crit, v in removed.items():
        pcs = per_class if crit.startswith(("curvature", "wanda-calib")) else (None,)
        for p in pcs:
            res.append(dict(criterion=crit, per_class=p, removed=v + (p or 0), n_total=1000,
                            crossed=True, score_s=1.5 if crit.startswith("curv") else 0.0,
                            note="n", curve=[[0.0, 0, base], [0.5, 500, base - 0.2]]))
    return dict(pair=pair, seed=seed, base=base, n_test=100, per_class=list(per_class),
                results=res)


def test_report_tables_comparisons_and_verdict(tmp_path):
    parts = []
    for s in range(4):
        parts.append(_part("d:m", s, 0.9, {
            "curvature-library": 500 + 10 * s, "curvature-library-neg-first": 1,
            "curvature-authors": 300 - s, "curvature-authors-neg-first": 2,
            "wanda-calib": 400 + s, "wanda-256": 410 + 2 * s, "magnitude": 380 + s,
            "random#0": 20 + s, "random#1": 30 + s}))
    cs = pc.cells(parts)
    assert list(cs) == [("d:m", 1)]
    cell = cs[("d:m", 1)]
    assert cell["random"][2] == (22 + 32) / 2 / 1000          # mean of the draws per seed
    assert cell["magnitude"][3] == 0.383
    cmps = pc.comparisons(cell)
    best = [c for c in cmps if c["baseline"] == "best"]
    assert {c["against"] for c in best} == {"wanda-256"}        # highest mean baseline
    lib = next(c for c in best if c["curvature"] == "curvature-library")
    # library: 501+10s vs 410+2s -> +91 + 8s points of 1000 weights = 9.1 .. 11.5 pt
    assert lib["n"] == 4 and lib["wins"] == 4 and abs(lib["mean"] - (9.1 + 0.8 * 1.5)) < 1e-9
    assert pc.verdict_of(lib) == "more"
    auth = next(c for c in best if c["curvature"] == "curvature-authors")
    assert pc.verdict_of(auth) == "fewer"
    args = pc.parse_args(["--out", str(tmp_path), "--seeds", "0", "1", "2", "3"])
    md = pc.write_report(parts, args, tmp_path, "python benchmarks/paper_claim.py x", 1.0)
    for f in ("rows.csv", "rows.json", "summary.md", "plot.png"):
        assert (tmp_path / f).is_file()
    assert "**Verdict on the claim**" in md and "not supported" in md
    assert "`curvature-library` against the best of magnitude and Wanda" in md
    assert "python benchmarks/paper_claim.py x" in md
    data = json.loads((tmp_path / "rows.json").read_text())
    assert len(data["summary"]) == 4 * 9 and "d:m 1/class" in data["comparisons"]
    # two calibration settings: image-free criteria enter both
    two = [_part("d:m", s, 0.9, {"curvature-authors": 500 + s, "magnitude": 400 + 3 * s,
                                 "wanda-calib": 100, "wanda-256": 90},
                 per_class=(1, 10)) for s in range(3)]
    cs2 = pc.cells(two)
    assert set(cs2) == {("d:m", 1), ("d:m", 10)}
    assert cs2[("d:m", 10)]["magnitude"] == cs2[("d:m", 1)]["magnitude"]
    assert cs2[("d:m", 10)]["curvature-authors"][0] == 0.51
    md2 = pc.markdown(two, args, "cmd", 1.0)
    assert "**Verdict on the claim**" in md2 and ": supported" in md2


def test_quick_defaults_and_first_layer_option():
    a = pc.parse_args(["--quick"])
    assert a.pairs == ["fashion-mnist:paper_lenet"] and a.seeds == [0] and a.per_class == [1]
    assert a.epochs == 1 and a.train_subset == 6000 and a.test_images == 2000
    assert pc.first_layer_topk(a) is None
    assert pc.first_layer_topk(pc.parse_args(["--first-layer-topk", "off"])) is False
    assert pc.first_layer_topk(pc.parse_args(["--first-layer-topk", "16"])) == 16
    b = pc.parse_args([])
    assert pc.seeds_of("fashion-mnist:paper_vgg9", b) == [0, 1, 2]
    assert pc.per_class_of("fashion-mnist:paper_vgg9", b) == [1]
    assert pc.seeds_of("digits:mlp", b) == [0, 1, 2, 3, 4]
    assert pc.per_class_of("digits:mlp", b) == [1, 10]


def test_sparse_pair_rescores_the_first_layer_untruncated(one_thread):
    """On the sparse element graph the authors' criterion is also built with the first
    weight layer scored at --first-layer-topk (None: untruncated), the other layers kept."""
    import unstructured as U
    from tp_curvature.unstructured import sparse_weight_curvature
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    args = pc.parse_args(["--mode", "sparse", "--topk", "2", "--output", "logits"])
    pd = U.PairData("d:tiny", model, None, None, 0.9)
    crits = {c.name: c for c in pc.curvature_criteria(pd, x, 1, args, None)}
    assert list(crits) == ["curvature-library", "curvature-library-neg-first",
                           "curvature-authors", "curvature-authors-neg-first",
                           "curvature-authors-first-untruncated"]
    full = crits["curvature-authors"].ranking.scores
    mixed = crits["curvature-authors-first-untruncated"].ranking.scores
    want = sparse_weight_curvature(model, x, output="logits", conventions="authors",
                                   topk=None, layers=["0"], progress=False)
    assert torch.equal(mixed["0.weight"], want["0.weight"])
    assert not torch.equal(mixed["0.weight"], full["0.weight"])
    for k in ("2.weight", "5.weight"):
        assert torch.equal(mixed[k], full[k])
    assert crits["curvature-authors-first-untruncated"].ranking.order == "highest"
    assert crits["curvature-library-neg-first"].ranking.order == "lowest"
