"""The documentation stays a map plus manuals inside the repository: README.md stays short (the
manual lives in docs/), every relative Markdown link resolves to a file of the checkout, and no
tracked file outside tests/ points at a directory beside the checkout (readers of a clone or a
wheel do not have it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 16 * 1024
# [text](target) and ![alt](target); reference definitions `[id]: target` as well
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    """README.md, docs/*.md and every Markdown file under samples/ (the model card)."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "samples").rglob("*.md"))
    return [f for f in files if f.is_file()]


def relative_links(text: str) -> list[str]:
    """Link targets that name a file of the checkout (no scheme, no pure #anchor, no mailto)."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", text))  # links inside code are not links
    targets = _INLINE.findall(text) + _REFDEF.findall(text)
    out = []
    for t in targets:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) or t.startswith("#"):
            continue
        out.append(t.split("#", 1)[0].split("?", 1)[0])
    return [t for t in out if t]


def missing_link_targets(md: Path, root: Path = REPO) -> list[str]:
    """Relative links of `md` whose file does not exist (or lies outside `root`, the checkout)."""
    bad = []
    for target in relative_links(md.read_text(encoding="utf-8")):
        path = (root / target.lstrip("/")) if target.startswith("/") else (md.parent / target)
        path = path.resolve()
        if not path.is_relative_to(root.resolve()) or not path.exists():
            bad.append(target)
    return bad


def tracked_text_files() -> list[Path]:
    """Files git tracks (or, without git, every file) outside tests/ and .git/, text only."""
    if shutil.which("git") and (REPO / ".git").exists():
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout.decode()
        paths = [REPO / p for p in out.split("\0") if p]
    else:  # an sdist or a copy without .git: look at what is there
        paths = [p for p in REPO.rglob("*") if ".git" not in p.parts]
    keep = []
    for p in paths:
        rel = p.relative_to(REPO)
        if not p.is_file() or rel.parts[0] == "tests" or "egg-info" in rel.parts[0]:
            continue
        head = p.read_bytes()[:8192]
        if b"\0" in head:  # binary (model weights, videos, images)
            continue
        keep.append(p)
    return keep


def test_readme_is_a_map_not_a_manual() -> None:
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (limit {README_MAX_BYTES}): move the detail into docs/"
    )


def test_readme_keeps_the_ci_test_command() -> None:
    assert 'pytest -q -m "not slow"' in (REPO / "README.md").read_text(encoding="utf-8")


def test_relative_links_point_at_files_in_the_checkout() -> None:
    broken = {
        str(md.relative_to(REPO)): bad for md in markdown_files() if (bad := missing_link_targets(md))
    }
    assert not broken, f"broken relative links: {broken}"


def test_nothing_outside_tests_points_beside_the_checkout() -> None:
    hits = []
    for p in tracked_text_files():
        text = p.read_text(encoding="utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if "../shared" in line:
                hits.append(f"{p.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see [ops](docs/OPERATORS.md#pose), ![cm](confusion.png)", ["docs/OPERATORS.md", "confusion.png"]),
        ("[web](https://example.org/x.md) [top](#quick-start) [m](mailto:a@b)", []),
        ("`[not](a-link.md)`\n```\n[nor](this.md)\n```\n[ref]: ../README.md", ["../README.md"]),
    ],
)
def test_link_extraction(text: str, expected: list[str]) -> None:
    """The checker sees the links a reader can click, and only those."""
    assert relative_links(text) == expected


def test_a_missing_target_is_reported(tmp_path: Path) -> None:
    """The link check can fail: a link to a file that is not there is named."""
    md = tmp_path / "x.md"
    md.write_text("[gone](does-not-exist.md) [here](x.md) [up](../x.md)\n")
    assert missing_link_targets(md, root=tmp_path) == ["does-not-exist.md", "../x.md"]
