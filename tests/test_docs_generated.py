"""The generated pages (``python -m snake_mpi.docgen``) and the code agree: the configuration
reference (the config dataclasses), the command line (the argparse parsers) and the site's
home page (the README). A page edited by hand, or code changed without regenerating the page,
fails here with the command that fixes it; no table of config keys is kept by hand elsewhere."""

from __future__ import annotations

import dataclasses
import re
import sys
import typing

import pytest

from conftest import REPO
from snake_mpi import docgen
from snake_mpi.config import RunConfig

PAGES = {
    "config": REPO / "docs" / "reference" / "configuration.md",
    "cli": REPO / "docs" / "reference" / "cli.md",
    "home": REPO / "docs" / "index.md",
}


def stale(kind: str) -> str:
    return (
        f"{PAGES[kind].relative_to(REPO)} differs from the code: regenerate it with "
        f"`python -m snake_mpi.docgen {kind} --out {PAGES[kind].relative_to(REPO)}` (make docs)"
    )


def test_the_configuration_page_is_the_generated_one():
    assert PAGES["config"].read_text() == docgen.config_page(), stale("config")


def test_the_home_page_is_the_readme():
    assert PAGES["home"].read_text() == docgen.home_page(), stale("home")


def test_the_command_line_page_is_the_generated_one():
    found = re.search(r"as Python (\d+\.\d+)'s argparse", PAGES["cli"].read_text())
    assert found, "the CLI page names no Python version"
    if found.group(1) != docgen.python_version():
        pytest.skip(
            f"the CLI page is argparse's layout of Python {found.group(1)}; this is "
            f"{docgen.python_version()}, whose layout differs"
        )
    assert PAGES["cli"].read_text() == docgen.cli_page(), stale("cli")


def test_the_check_command_fails_on_a_page_edited_by_hand(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text(docgen.config_page())
    assert docgen.main(["config", "--out", str(page), "--check"]) == 0
    page.write_text(page.read_text().replace("| `seed` | int | `0` |", "| `seed` | int | `1` |"))
    assert docgen.main(["config", "--out", str(page), "--check"]) == 1
    out, err = capsys.readouterr()
    assert "-| `seed` | int | `1` |" in out and "+| `seed` | int | `0` |" in out
    assert "python -m snake_mpi.docgen config --out" in err


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_every_config_key_has_a_row_with_a_meaning():
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(
            r"^\| `([\w.]+)` \| .*? \| `.*?` \| (.*) \|$", docgen.config_page(), re.M
        )
    }
    keys = leaf_keys(RunConfig)
    assert sorted(rows) == sorted(keys)
    assert not [k for k, meaning in rows.items() if not meaning.strip()], "a field has no docstring"


def test_a_literal_field_shows_its_choices_and_a_tuple_its_element_type():
    assert docgen.type_name(typing.Literal["p2p", "cs"]) == '`"p2p"` \\| `"cs"`'
    assert docgen.type_name(tuple[float, ...]) == "list of float"
    assert docgen.type_name(int | None) == "int"
    assert docgen.toml_value((3, 32, 32)) == "[3, 32, 32]"
    assert docgen.toml_value("snake") == '"snake"'
    assert docgen.toml_value(False) == "false"


def test_no_config_table_is_kept_by_hand():
    """A row whose first cell is a config key (``section.key``) and that gives a default lives
    only in the generated page (the README's hand-copied table once held a merge conflict)."""
    keys = set(leaf_keys(RunConfig))
    generated = {PAGES["config"]}
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        if page in generated:
            continue
        for line in page.read_text().splitlines():
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if len(cells) >= 3 and cells[0].strip("`") in keys:
                header_like = re.fullmatch(r"`[^`]*`", cells[1] or "")
                assert not header_like, f"{page.relative_to(REPO)}: a hand-kept key row: {line}"


def test_help_is_wrapped_the_same_on_any_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = docgen.cli_page()
    monkeypatch.setenv("COLUMNS", "200")
    assert docgen.cli_page() == narrow
    assert sys.version_info >= (3, 11)
