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


def test_validate_says_for_how_many_ranks_and_what_np_changes(capsys) -> None:
    """Without ``--np`` the verdict names the rank count it checked and says what ``--np``
    adds; with it, the count given."""
    from snake_mpi import cli

    demo = str(ROOT / "bench" / "configs" / "demo.toml")
    assert cli.main(["validate", demo, "--no-data"]) == 0
    out = capsys.readouterr().out
    assert "valid for 2 ranks, the fewest scheme 'snake' runs on" in out
    assert "--np N checks it for N ranks" in out
    assert cli.main(["validate", demo, "--no-data", "--np", "4"]) == 0
    assert "valid for 4 ranks (about " in capsys.readouterr().out


def test_suite_cell_help_says_how_progress_counts_it(capsys) -> None:
    """``--cell K`` is 0-based (Slurm's array index) and its progress reads ``[K+1/N]``
    (tests/test_suite.py runs it: ``--cell 1`` of 2 prints ``[2/2]``)."""
    from snake_mpi.suite import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0-based, as --list numbers them" in text and "[K+1/N]" in text
