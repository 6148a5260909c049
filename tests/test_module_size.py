"""Module size rule (issue 13): a first-party module over ~400 lines says at its top why it is one.

Why a test: long modules grow by accretion; the rule only holds if a new one fails CI until its
author either splits it or writes the reason down where the next reader sees it first."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 420  # "~400": a little slack so a docstring edit does not flip the rule


def _tracked_python() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:  # not a git checkout (e.g. an sdist): scan the tree instead
        return [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts]
    return [ROOT / line for line in out.stdout.splitlines() if line]


def test_long_modules_say_why() -> None:
    offenders = []
    for path in _tracked_python():
        if "tests" in path.relative_to(ROOT).parts or not path.exists():
            continue  # tests are tables of cases; the rule is for product code
        text = path.read_text(encoding="utf-8")
        n = text.count("\n")
        head = text[:4000]
        if n > LIMIT and "Why one module" not in head:
            offenders.append(f"{path.relative_to(ROOT)} ({n} lines)")
    assert offenders == [], f"over {LIMIT} lines without a 'Why one module' reason at the top: {offenders}"
