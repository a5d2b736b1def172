"""benchmarks/minplus.py: timing the min-plus product."""
import json
import math

import minplus  # benchmarks/ is on pytest's pythonpath (pyproject.toml)


def test_each_shape_gets_a_row_with_its_rate(tmp_path, capsys):
    """One row per shape, in order, with a positive best time and the rate it implies; the
    Markdown table and the JSON lines carry the same rows."""
    out = tmp_path / "rows.jsonl"
    rows = minplus.main(["--shapes", "5,7,9", "12,3,40", "--repeat", "2", "--out", str(out)])
    assert [r["shape"] for r in rows] == ["5x7x9", "12x3x40"]
    for r, (n, m, p) in zip(rows, [(5, 7, 9), (12, 3, 40)]):
        assert r["seconds"] > 0
        assert math.isclose(r["gterms_per_s"] * 1e9 * r["seconds"], n * m * p, rel_tol=1e-9)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and table[2].startswith("| 5x7x9 |")
