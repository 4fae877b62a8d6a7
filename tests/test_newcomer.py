"""What a newcomer sees (issue 29, item 4): each check asserts the text a user now reads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_install_says_what_it_is_doing(tmp_path: Path) -> None:
    """`make install` names each step before it runs it, and pip shows its progress bar."""
    out = subprocess.run(
        ["make", "-n", "install", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    steps = [line for line in out.splitlines() if "snake-mpi install [" in line]
    assert [s.split("[", 1)[1][:3] for s in steps][:3] == ["1/4", "2/4", "3/4"]
    assert any("[4/4]" in s for s in steps)
    assert "--quiet" not in out
    assert "--progress-bar on" in out
