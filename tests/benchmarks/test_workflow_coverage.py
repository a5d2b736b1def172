"""benchmarks/workflow_coverage.py: the workflow lists and the report (summary per list,
one row per workflow, the command kept by --update) on synthetic rows."""
import importlib
import sys


def _module():
    path = list(sys.path)          # the script drops benchmarks/ from sys.path on import
    try:
        return importlib.import_module("workflow_coverage")
    finally:
        sys.path[:] = path


def _row(name, imp, pruned=True, n_fb=0, fallback="", error=""):
    return dict(workflow=name, group="", importance=imp, pruned=pruned, params_before=100,
                params_after=50 if pruned else 100, n_curvature=3 if imp == "curvature" else None,
                n_fallback=n_fb if imp == "curvature" else None, fallback=fallback,
                seconds=1.5, error=error, config="num_classes 10")


def test_lists_cover_the_examples():
    wc = _module()
    names = wc.all_workflows()
    assert len([n for n in names if n.startswith("timm:")]) >= 30
    assert {"hf_vit", "hf_bert", "hf_llama"} <= set(names)
    assert {wc.group_of(n) for n in names} == {"tv-cls", "tv-seg", "tv-det", "timm", "hf"}
    assert set(wc.all_workflows(heavy=False)) == set(names) - set(wc.HEAVY)


def test_report_counts_and_round_trips(tmp_path):
    wc = _module()
    rows = [_row("tv:resnet18", "magnitude"), _row("tv:resnet18", "curvature"),
            _row("timm:ghostnet_050", "magnitude"),
            _row("timm:ghostnet_050", "curvature", n_fb=2, fallback="a.b c.d"),
            _row("hf_bert", "magnitude", pruned=False, error="ZeroDivisionError: x"),
            _row("hf_bert", "curvature", pruned=False, error="ZeroDivisionError: x")]
    wc.write_report(rows, tmp_path, "python benchmarks/workflow_coverage.py --quick", 90.0, 1)
    md = (tmp_path / "coverage.md").read_text()
    assert "| tv-cls | 1 | 1 | 1 | 1 | 0 |" in md
    assert "| timm | 1 | 1 | 1 | 0 | 2 |" in md
    assert "| hf | 1 | 0 | 0 | 0 | 0 |" in md
    assert "| all | 3 | 2 | 2 | 1 | 2 |" in md
    assert "| timm:ghostnet_050 | yes | yes | 3 | 2: `a.b`, `c.d` |" in md
    assert "| hf_bert | **no** | **no** |" in md and "magnitude: ZeroDivisionError" in md
    assert wc.read_command(tmp_path / "coverage.md") == (
        "python benchmarks/workflow_coverage.py --quick", 90.0)
    back = wc.read_rows(tmp_path / "coverage.csv")
    assert [(r["workflow"], r["pruned"], r["n_fallback"]) for r in back] == [
        (r["workflow"], r["pruned"], r["n_fallback"]) for r in rows]
