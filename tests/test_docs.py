"""Every ```python block of README.md, docs/*.md and integrations/README.md runs as written.

A block preceded by ``<!-- not run: reason -->`` (a fragment of a larger script) is skipped; one preceded by
``<!-- slow -->`` runs in the slow job. Blocks of one page run in order in one namespace, in a temporary folder.
"""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "integrations" / "README.md"]
BLOCK = re.compile(r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: Path):
    for match in BLOCK.finditer(page.read_text()):
        marker = match.group("marker") or ""
        yield marker, match.group("code")


CASES = []
for page in PAGES:
    found = list(blocks(page))
    if not found:
        continue
    slow = any(marker.startswith("slow") for marker, _ in found)
    marks = [pytest.mark.slow] if slow else []
    CASES.append(pytest.param(page, id=str(page.relative_to(REPO)), marks=marks))


def test_every_block_is_marked_or_runs():
    """Markers are deliberate: only the two kinds above exist."""
    for page in PAGES:
        for marker, _ in blocks(page):
            assert marker == "" or marker.startswith(("not run:", "slow")), (page, marker)


@pytest.mark.parametrize("page", CASES)
def test_page_blocks_run(page, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": "__docs__"}
    for marker, code in blocks(page):
        if marker.startswith("not run:"):
            continue
        exec(compile(code, f"{page.name} block", "exec"), namespace)  # noqa: S102
    assert os.getcwd() == str(tmp_path)
