"""README and docs/: every relative link reaches a file, and every #anchor a heading in it (GitHub's rules); the
quick test run README offers still tests every front end."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "bsmamba2" / "pretrained").glob("*.md")),
         *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set:
    """GitHub's heading ids: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def links(page: Path) -> list:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+://", target)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_readme_stays_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


# README's quick run, `-m "not slow"`, must keep a test of each front end
FRONT_ENDS = {"CLI": "tests/test_separate.py", "API": "tests/test_api.py", "ONNX": "tests/test_onnx.py",
              "web page": "tests/test_ui.py", "training": "tests/training/test_loop.py",
              "evaluate": "tests/test_evaluate.py"}


def quick_tests(path: Path) -> list:
    """The test functions of a file not marked `slow`."""
    def slow(function) -> bool:
        return any(ast.unparse(decorator) == "pytest.mark.slow" for decorator in function.decorator_list)

    tree = ast.parse(path.read_text())
    return [node.name for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and not slow(node)]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_the_quick_run_tests_every_front_end(front_end):
    assert '-m "not slow"' in (REPO / "README.md").read_text()
    assert quick_tests(REPO / FRONT_ENDS[front_end]), f"every test of the {front_end} is marked slow"
