"""benchmarks/llm.py and engine.text: the module split of the byte corpus, held-out windows,
perplexity, pruning the decoder with prune_llm.py's arguments (widths, fix-ups, the
Torch-Pruning 1.6.1 configurations it refuses), and the --quick path end to end on a tiny
synthetic corpus (never the real standard library)."""
import copy
import csv
import json
import math

import llm  # benchmarks/llm.py: benchmarks/ is on pytest's pythonpath (pyproject.toml)
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from engine import text
from engine.models import llama_decoder


# ----------------------------------------------------------------------------- corpus
def _corpus_dir(tmp_path):
    """A few modules, plus files every rule must skip."""
    root = text.write_synthetic_corpus(tmp_path / "lib", n_files=24, n_funcs=2)
    for skipped in ("tests", "test", "idlelib", "site-packages/pkg"):
        (root / skipped).mkdir(parents=True)
        (root / skipped / "skip_me.py").write_text("SKIPPED = True\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "inner.py").write_text("x = 1\n")
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")                # not UTF-8
    (root / "notes.txt").write_text("not python\n")
    return root


def test_sources_skip_tests_site_packages_idlelib(tmp_path):
    files = text.list_sources(_corpus_dir(tmp_path))
    assert "pkg/inner.py" in files and "latin1.py" in files
    assert not any("skip_me" in f or f.endswith(".txt") for f in files)
    assert files == sorted(files)


def test_split_is_deterministic_and_disjoint(tmp_path):
    root = _corpus_dir(tmp_path)
    a = text.load_text_corpus(root, cache_dir=None)
    b = text.load_text_corpus(root, cache_dir=tmp_path / "cache")
    c = text.load_text_corpus(root, cache_dir=tmp_path / "cache")       # from the cache
    for other in (b, c):
        assert np.array_equal(a.train, other.train) and np.array_equal(a.heldout, other.heldout)
        assert other.digest == a.digest
    assert list((tmp_path / "cache" / "text").glob("lib-*.npz"))
    files = [f for f in text.list_sources(root) if f != "latin1.py"]
    held = [f for f in files if text.split_of(f) == "heldout"]
    train = [f for f in files if text.split_of(f) == "train"]
    assert a.stats["heldout_files"] == held and held and train
    assert not set(held) & set(train)
    assert a.stats["skipped_non_utf8"] == ["latin1.py"]
    assert a.stats["files"] == {"train": len(train), "heldout": len(held)}
    size = {s: sum((root / f).stat().st_size for f in fs) for s, fs in
            (("train", train), ("heldout", held))}
    assert a.stats["bytes"] == size == {"train": len(a.train), "heldout": len(a.heldout)}
    assert a.train.dtype == np.uint8
    # the rule depends on the path alone
    assert text.split_of("json/decoder.py") == text.split_of("json/decoder.py")
    shares = [text.split_of(f"m{i}.py") == "heldout" for i in range(2000)]
    assert 0.07 < np.mean(shares) < 0.13


def test_heldout_windows_fixed_and_non_overlapping():
    data = np.random.default_rng(0).integers(0, 256, 1000).astype(np.uint8)
    w = text.heldout_windows(data, n=5, context=16, seed=0)
    assert w.shape == (5, 17) and w.dtype == torch.int64
    assert torch.equal(w, text.heldout_windows(data, n=5, context=16, seed=0))
    slots = [next(k for k in range(1000 // 17)
                  if np.array_equal(data[17 * k:17 * (k + 1)], row.numpy())) for row in w]
    assert len(set(slots)) == 5 and slots == sorted(slots)       # distinct slots: no overlap
    assert len(text.heldout_windows(data, n=500, context=16)) == 1000 // 17   # capped
    cal = text.calibration_windows(data, n=4, context=8, seed=1)
    assert cal.shape == (4, 8)
    assert torch.equal(cal, text.calibration_windows(data, n=4, context=8, seed=1))
    assert not torch.equal(cal, text.calibration_windows(data, n=4, context=8, seed=2))


# ----------------------------------------------------------------------------- perplexity
class _Uniform(nn.Module):
    def forward(self, ids):
        return torch.zeros(*ids.shape, text.VOCAB)


def test_uniform_model_has_perplexity_256():
    w = torch.randint(0, 256, (10, 9))
    out = text.perplexity(_Uniform(), w, batch_size=3)
    assert out["ppl"] == pytest.approx(256.0) and out["bpb"] == pytest.approx(8.0)
    assert out["ce"] == pytest.approx(math.log(256))


def test_lm_config_hash_and_training_step(tmp_path, one_thread):
    cfg = text.LMConfig(corpus="t", corpus_digest="d", dim=16, n_heads=2, n_kv_heads=2,
                        n_layers=1, hidden=32, context=8, batch_size=4, steps=6, warmup=2,
                        checkpoint_dir=str(tmp_path))
    same = text.LMConfig.from_dict(cfg.to_dict())
    assert text.lm_config_hash(same) == text.lm_config_hash(cfg)
    other = text.LMConfig.from_dict({**cfg.to_dict(), "seed": 1})
    assert text.lm_config_hash(other) != text.lm_config_hash(cfg)
    assert [round(text._lr_factor(s, cfg), 6) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert text._lr_factor(cfg.steps, cfg) == pytest.approx(cfg.min_lr_ratio)
    torch.manual_seed(0)
    model = text.build_lm(cfg)
    data = np.frombuffer(b"def f(x):\n    return x\n" * 20, dtype=np.uint8)
    rec = text.train_lm(model, data, cfg, progress=False)
    assert rec["tokens"] == 6 * 4 * 8 and rec["history"][-1]["step"] == 6
    assert not model.training


# ----------------------------------------------------------------------------- pruning
def _pruned(n_heads, n_kv_heads, ratio, dim=64, hidden=96):
    torch.manual_seed(0)
    m = llama_decoder(vocab=256, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=2,
                      hidden=hidden).eval()
    x = torch.randint(0, 256, (2, 12))
    pruner = text.llm_pruner(m, x, tp.importance.GroupMagnitudeImportance(p=2), ratio)
    for g in pruner.step(interactive=True):
        g.prune()
    return m, pruner, x


@pytest.mark.parametrize("heads,kv,ratio", [(4, 4, 0.2), (4, 4, 0.5), (8, 2, 0.2), (8, 2, 0.5)])
def test_prune_llm_arguments_widths_and_fixups(heads, kv, ratio, one_thread):
    m, pruner, x = _pruned(heads, kv, ratio)
    text.fix_attention(m, pruner)
    want = text.expected_widths(64, 96, heads, kv, ratio)
    got = text.widths(m)
    assert {k: got[k] for k in want} == want
    for block in m.layers:
        a = block.self_attn
        assert (a.n_heads, a.n_kv_heads) == (want["n_heads"], want["n_kv_heads"])
        assert block.mlp.down_proj.in_features == want["hidden"]
    assert m.lm_head.out_features == 256 and m.lm_head.in_features == want["dim"]
    assert m(x).shape == (2, 12, 256)


def test_expected_widths_follow_torch_pruning():
    assert text.expected_widths(256, 688, 8, 8, 0.2) == {"dim": 204, "hidden": 548,
                                                        "n_heads": 6, "n_kv_heads": 6}
    assert text.expected_widths(256, 688, 8, 2, 0.1) == {"dim": 228, "hidden": 616,
                                                        "n_heads": 6, "n_kv_heads": 2}
    assert text.expected_widths(256, 688, 8, 8, 0.5, prune_residual=False)["dim"] == 256


def test_half_as_many_kv_heads_is_refused(one_thread):
    """8 heads / 4 kv heads: Torch-Pruning 1.6.1 keeps every head yet counts half of them
    gone; check_head_config refuses the configuration, fix_attention catches the mismatch."""
    with pytest.raises(text.PruningConfigError, match="skip head pruning"):
        text.check_head_config(8, 4, [0.2])
    text.check_head_config(8, 2, [0.1, 0.5])
    text.check_head_config(8, 8, [0.5])
    m, pruner, _ = _pruned(8, 4, 0.2)
    assert m.layers[0].self_attn.q_proj.out_features == 64           # no head was pruned
    with pytest.raises(text.PruningConfigError, match="the pruner counts"):
        text.fix_attention(m, pruner)


def test_recorded_scores_replay_to_the_same_pruning(one_thread):
    """Scoring once (interactive step, nothing pruned) and replaying the scores gives the
    model the importance itself gives."""
    torch.manual_seed(0)
    base = llama_decoder(vocab=256, dim=32, n_heads=4, n_kv_heads=4, n_layers=1,
                         hidden=48).eval()
    x = torch.randint(0, 256, (2, 8))
    a = llm.parse_args(["--quick", "--dim", "32", "--hidden", "48", "--n-heads", "4",
                        "--n-kv-heads", "4", "--ratios", "0.5"])
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    rec = llm.RecordingImportance(imp, base)
    pruner = text.llm_pruner(base, x, rec, 0.5)
    for _ in pruner.step(interactive=True):
        pass
    assert text.widths(base)["dim"] == 32 and rec.scores                # nothing pruned
    scored = llm.Scored("l2", rec.scores, 0.0, "")
    replayed, _ = llm.prune_copy(base, scored, 0.5, x, a)
    direct = copy.deepcopy(base)
    pr = text.llm_pruner(direct, x, imp, 0.5)
    for g in pr.step(interactive=True):
        g.prune()
    for (n, p), (_, q) in zip(replayed.named_parameters(), direct.named_parameters()):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_quick_end_to_end_on_a_synthetic_corpus(tmp_path, one_thread):
    """--quick with 20 training steps on 24 generated modules (about 15 s in a fresh process,
    mostly the first torch.export of the repair and imports: marked slow)."""
    root = text.write_synthetic_corpus(tmp_path / "lib", n_files=24, n_funcs=12)
    out = tmp_path / "out"
    rc = llm.main(["--quick", "--corpus-dir", str(root), "--steps", "20", "--criteria", "l2",
                   "flap", "--ratios", "0.2", "--eval-windows", "8",
                   "--calib-windows", "8", "--context", "32", "--threads", "1",
                   "--data-dir", str(tmp_path / "data"), "--checkpoint-dir",
                   str(tmp_path / "ckpt"), "--out", str(out), "--no-progress"])
    assert rc == 0
    for name in ("rows.csv", "rows.json", "meta.json", "summary.md", "perplexity.png"):
        assert (out / name).is_file(), name
    with open(out / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["criterion"] for r in rows] == ["l2", "flap"]
    for r in rows:
        assert float(r["ppl_pruned"]) > 1 and float(r["ppl_lsq"]) > 1
        assert 0 < float(r["params_kept"]) < 1 and int(r["n_heads"]) == 3
    meta = json.loads((out / "meta.json").read_text())
    assert meta["corpus"]["name"] == "lib" and meta["seeds"][0]["tokens"] == 20 * 16 * 32
    assert meta["seeds"][0]["tokens_per_s"] > 0 and not meta["seeds"][0]["cached"]
    md = (out / "summary.md").read_text()
    assert "Training cost" in md and "## Goal" in md and "after LeastSquaresRepair" in md
    assert list((tmp_path / "ckpt").glob("text-lib-llama-*.pt"))
    # --report-only rewrites the reports from the saved run
    (out / "summary.md").unlink()
    assert llm.main(["--report-only", "--out", str(out), "--no-plot"]) == 0
    assert (out / "summary.md").read_text() == md
    # --merge adds the seeds of another run of the same experiment, and refuses a repeated
    # seed or another experiment
    other = tmp_path / "other"
    other.mkdir()
    rows2 = [{**r, "seed": 1} for r in json.loads((out / "rows.json").read_text())]
    (other / "rows.json").write_text(json.dumps(rows2))
    meta2 = {**meta, "seeds": [{**meta["seeds"][0], "seed": 1}], "command": "second"}
    (other / "meta.json").write_text(json.dumps(meta2))
    assert llm.main(["--merge", str(other), "--out", str(out), "--no-plot"]) == 0
    merged = json.loads((out / "meta.json").read_text())
    assert [s["seed"] for s in merged["seeds"]] == [0, 1] and merged["args"]["seeds"] == [0, 1]
    assert merged["command"].endswith("; second")
    assert len(json.loads((out / "rows.json").read_text())) == 4
    assert "over 2 seed(s)" in (out / "summary.md").read_text()
    with pytest.raises(SystemExit, match="already in"):
        llm.main(["--merge", str(other), "--out", str(out), "--no-plot"])
    meta2["args"] = {**meta2["args"], "dim": 999}
    meta2["seeds"] = [{**meta["seeds"][0], "seed": 2}]
    (other / "meta.json").write_text(json.dumps(meta2))
    with pytest.raises(SystemExit, match="differs in dim"):
        llm.main(["--merge", str(other), "--out", str(out), "--no-plot"])
