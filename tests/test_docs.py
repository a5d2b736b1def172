"""The documentation keeps its promises: the README's code runs as written and prints what its
comments say, the docstring examples pass, the README stays short, and every relative link
(and its ``#anchor``) resolves.

A ``print(...)  # -> text`` line in a README block promises that the print writes ``text``
(``...`` matches anything, as in doctest); a print without ``# ->`` may write anything.
"""
import contextlib
import doctest
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").rglob("*.md"))
#: modules whose docstrings hold ``>>>`` examples; add a module here when it gains some
DOCTEST_MODULES = ["tp_curvature.config", "tp_curvature.curvature", "tp_curvature.importance",
                   "tp_curvature.unstructured._scores", "tp_curvature.repair._repair",
                   "tp_curvature.repair._batchnorm", "tp_curvature.transport._primitives"]
MAX_README_LINES = 260

PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
ANY_BLOCK = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\s*\d+", re.I)
PROMISE = re.compile(r"#\s*->\s?(.*)$")


def python_blocks(path: Path) -> list:
    return PYTHON_BLOCK.findall(path.read_text(encoding="utf-8"))


def promised_output(code: str) -> str:
    """What a block's prints promise, in order (``...`` for a print that promises nothing)."""
    out = []
    for line in code.splitlines():
        if line.lstrip().startswith("print("):
            m = PROMISE.search(line)
            out.append((m.group(1).rstrip() if m else "...") + "\n")
    return "".join(out)


README_BLOCKS = python_blocks(README)


def test_readme_has_python_blocks():
    assert len(README_BLOCKS) >= 2, "the README should show the quickstart and the per-weight mode"


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_block_runs_as_written(index):
    code = README_BLOCKS[index]
    namespace = {"__name__": f"readme_block_{index}"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    want, got = promised_output(code), stdout.getvalue()
    checker = doctest.OutputChecker()
    assert checker.check_output(want, got, doctest.ELLIPSIS), (
        f"README block {index} printed\n{got}\nbut its '# ->' comments promise\n{want}")


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no >>> examples: drop it from DOCTEST_MODULES"
    assert result.failed == 0, report.getvalue()


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"


@pytest.mark.parametrize("path", [README, *DOC_PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers(path):
    hits = [(i, line.strip()) for i, line in enumerate(path.read_text(encoding="utf-8")
                                                      .splitlines(), 1)
            if ISSUE_NUMBER.search(line)]
    assert not hits, f"{path.name}: write plain statements, not issue numbers: {hits}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set:
    text = ANY_BLOCK.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M)}


def _links(path: Path) -> list:
    text = ANY_BLOCK.sub("", path.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub("", text)
    return LINK.findall(text)


@pytest.mark.parametrize("path", [README, *DOC_PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in _links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):      # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"
