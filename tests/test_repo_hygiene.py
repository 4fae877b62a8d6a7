"""The tree itself: no merge-conflict markers in any tracked text file.

A committed conflict once broke the README's configuration table (everything below the
marker rendered as loose text); nothing else checks for one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import REPO

OPENING, CLOSING, BASE = "<" * 7, ">" * 7, "|" * 7
"""Built, not written out, so that this file is not itself a hit."""


def conflict_markers(text: str) -> list[int]:
    """1-based line numbers of merge-conflict markers: ``<<<<<<< x``, ``||||||| x``,
    ``>>>>>>> x``, and a bare ``=======`` only between an opening and a closing marker (a
    Markdown heading may underline itself with ``=``)."""
    found, inside = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith(OPENING) and (len(line) == 7 or line[7] == " "):
            found.append(number)
            inside = True
        elif line.startswith((CLOSING, BASE)) and (len(line) == 7 or line[7] == " "):
            found.append(number)
            inside = line.startswith(BASE)
        elif inside and line.rstrip() == "=" * 7:
            found.append(number)
    return found


def tracked_files(root: Path) -> list[Path]:
    """Every file git tracks under ``root`` (a checkout; ``make test`` runs in one)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"{root} is not a git checkout (no tracked files to check)")
    return [root / name for name in out.decode().split("\0") if name]


def test_the_marker_finder_sees_a_conflict_and_not_a_heading():
    conflict = f"a\n{OPENING} HEAD\nmine\n=======\ntheirs\n{CLOSING} branch\nb\n"
    assert conflict_markers(conflict) == [2, 4, 6]
    diff3 = f"{OPENING} HEAD\nx\n{BASE} base\ny\n=======\nz\n{CLOSING} b\n"
    assert conflict_markers(diff3) == [1, 3, 5, 7]
    assert conflict_markers("Title\n=======\n\ntext <<<<<<< inline\n") == []


def test_no_tracked_text_file_holds_a_merge_conflict_marker():
    hits = []
    for path in tracked_files(REPO):
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary (or deleted in the working tree): not a text file
        for line in conflict_markers(text):
            hits.append(f"{path.relative_to(REPO)}:{line}")
    assert not hits, "merge-conflict markers committed:\n" + "\n".join(hits)
