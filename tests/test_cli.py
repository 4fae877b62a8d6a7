"""The ``snake-mpi`` command: one table of commands, and the config checks that need a scheme
(``schemes.rules``) reached from the command line as before."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from conftest import REPO
from snake_mpi import cli
from snake_mpi.config import EXIT_CONFIG

TINY = REPO / "tests" / "configs" / "tiny.toml"


def _cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue() + err.getvalue()


def test_every_command_of_the_table_is_in_the_help_in_its_order():
    code, text = _cli("--help")
    assert code == 0
    listed = re.findall(r"^    (\w+)\s", text, flags=re.MULTILINE)
    assert listed == list(cli.COMMANDS)


def test_a_command_gets_the_rest_of_its_line_from_the_table(monkeypatch):
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "compare", (lambda argv: seen.append(argv) or 7, "x"))
    assert _cli("compare", "results", "--by", "scheme")[0] == 7
    assert seen == [["results", "--by", "scheme"]]


def test_an_unknown_command_is_a_usage_error():
    code, text = _cli("gossip")
    assert code == 2 and "invalid choice: 'gossip'" in text


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (['scheme="gossip"'], "unknown scheme 'gossip'; choose one of: snake, fedavg"),
        (
            ['model.family="lm"', 'model.preset="opt-7b"', 'data.name="text"'],
            "unknown model.preset 'opt-7b'; known presets: ",
        ),
        (
            ['scheme="split"', 'model.family="lm"', 'model.preset="opt-tiny"', 'data.name="text"'],
            "scheme 'split' does not support language models",
        ),
        (['scheme="split"', "eval.after_each_turn=true"], "eval.after_each_turn: scheme 'split'"),
        (['model.family="resnet"'], "unknown model.family 'resnet'; choose one of: cnn, mlp"),
        (["model.family=3"], "model.family must be a string, got 3"),
    ],
)
def test_validate_refuses_what_only_the_scheme_rules_can_tell(sets, message):
    args = [x for s in sets for x in ("--set", s)]
    code, text = _cli("validate", str(TINY), "--no-data", *args)
    assert code == EXIT_CONFIG, text
    assert f"snake-mpi: config error: {message}" in text, text


def test_exit_config_is_defined_once():
    src = REPO / "src" / "snake_mpi"
    defined = [p for p in src.rglob("*.py") if re.search(r"^EXIT_CONFIG\s*=", p.read_text(), re.M)]
    assert [p.relative_to(src).as_posix() for p in defined] == ["config.py"]
