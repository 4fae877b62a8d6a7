"""Config loading and validation: every bad input is rejected with a message naming it."""

import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, snake_mpi
from snake_mpi.config import (
    CommConfig,
    ConfigError,
    RunConfig,
    check_output,
    from_dict,
    load_config,
    to_toml,
)
from snake_mpi.schemes.rules import check, validate_for_world

DEMO = Path(__file__).resolve().parents[1] / "bench" / "configs" / "demo.toml"


def test_demo_config_loads_and_round_trips_through_toml():
    cfg = load_config(DEMO)
    assert cfg.scheme == "snake" and cfg.train.rounds >= 1
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg
    validate_for_world(cfg, 4)


@pytest.mark.parametrize(
    "odd", ["two\nlines", "tab\tand\rcr", "nul\x00 bell\x07 del\x7f", 'quote" back\\slash', "π ☃ 𝄞"]
)
def test_a_config_with_odd_strings_writes_valid_toml_that_loads_back_identical(odd):
    cfg = from_dict({"data": {"path": odd}, "model": {"checkpoint": odd}})
    text = to_toml(cfg)
    assert from_dict(tomllib.loads(text)) == cfg
    assert cfg.data.path == odd


def test_overrides_parse_toml_values_and_bare_strings():
    cfg = load_config(
        DEMO,
        [
            "train.rounds=7",
            "train.lr=0.5",
            "snake.transfer=full",
            "snake.capabilities=[1, 2.5]",
            "probes.enabled=false",
        ],
    )
    assert cfg.train.rounds == 7 and cfg.train.lr == 0.5
    assert cfg.snake.transfer == "full" and cfg.snake.capabilities == (1.0, 2.5)
    assert cfg.probes.enabled is False


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"train": {"roundz": 3}}, "unknown key 'train.roundz'"),
        ({"scheme": "gossip"}, "unknown scheme 'gossip'"),
        ({"model": {"family": "resnet"}}, "unknown model.family 'resnet'"),
        ({"data": {"name": "imagenet"}}, "unknown data.name 'imagenet'"),
        ({"data": {"alpha": 0.0}}, "data.alpha"),
        ({"data": {"alpha": -1.0}}, "data.alpha"),
        ({"data": {"alpha": math.nan}}, "NaN"),
        ({"data": {"alpha": math.inf}}, "infinite"),
        ({"data": {"noise": 1.7e308}}, "data.noise must be a number from 0 to 1e"),  # overflows
        ({"data": {"noise": -1.0}}, "data.noise must be a number from 0 to 1e"),
        ({"train": {"rounds": 0}}, "train.rounds must be a positive"),
        ({"train": {"rounds": -2}}, "train.rounds must be a positive"),
        ({"train": {"local_epochs": 0}}, "train.local_epochs"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"lr": 0.0}}, "train.lr"),
        ({"train": {"lr": -0.1}}, "train.lr"),
        ({"train": {"lr": math.nan}}, "train.lr"),
        ({"train": {"rounds": 2.5}}, "train.rounds must be an integer"),
        ({"train": {"rounds": True}}, "train.rounds must be an integer"),
        ({"snake": {"ends": "some"}}, "unknown snake.ends"),
        ({"snake": {"transfer": "zip"}}, "unknown snake.transfer"),
        ({"snake": {"capabilities": [1, 0]}}, "snake.capabilities[1]"),
        ({"model": {"family": "cnn"}, "data": {"sample_shape": [64]}}, "needs image-shaped"),
        ({"comm": {"deadline_s": 0}}, "comm.deadline_s"),
        ({"comm": {"pipelined_min_bytes": -1}}, "comm.pipelined_min_bytes must be an integer >= 0"),
        ({"comm": {"pipelined_min_bytes": 1.5}}, "comm.pipelined_min_bytes must be an integer"),
        ({"train": "fast"}, "train must be a table"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check(from_dict(raw))


def test_world_size_checks():
    cfg = RunConfig()
    with pytest.raises(ConfigError, match="needs at least 2 MPI ranks, got 1"):
        validate_for_world(cfg, 1)
    with pytest.raises(ConfigError, match="middle_blocks = 4 is fewer than the 5 nodes"):
        validate_for_world(cfg, 5)
    cfg = from_dict({"snake": {"capabilities": [1, 1, 1]}})
    with pytest.raises(ConfigError, match="3 entries but there are 4 nodes"):
        validate_for_world(cfg, 4)
    with pytest.raises(ConfigError, match="fail_rank = 4"):
        validate_for_world(from_dict({"debug": {"fail_rank": 4}}), 4)
    validate_for_world(RunConfig(), 4)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.rounds"])


def test_output_checks(tmp_path):
    out = tmp_path / "r.h5"
    assert check_output(out, overwrite=False) == out
    out.write_bytes(b"x")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        check_output(out, overwrite=False)
    assert check_output(out, overwrite=True) == out
    with pytest.raises(ConfigError, match="does not exist"):
        check_output(tmp_path / "missing" / "r.h5", overwrite=False)
    with pytest.raises(ConfigError, match="is a directory"):
        check_output(tmp_path, overwrite=False)


def test_an_output_that_is_a_symbolic_link_is_refused_and_left_alone(tmp_path):
    """The red team's case: a dangling ``--out`` link was replaced by a regular file and its
    target never written. Links are refused (dangling or not, with or without --overwrite)."""
    dangling = tmp_path / "r.h5"
    dangling.symlink_to(tmp_path / "elsewhere" / "target.h5")
    with pytest.raises(ConfigError, match=r"is a symbolic link \(to .*target.h5, which does not"):
        check_output(dangling, overwrite=True)
    target = tmp_path / "old.h5"
    target.write_bytes(b"old")
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="give the path of the file itself"):
        check_output(link, overwrite=True)
    assert dangling.is_symlink() and link.is_symlink() and target.read_bytes() == b"old"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_unwritable_output_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        check_output(d / "r.h5", overwrite=False)


def test_cli_version_and_a_reader_that_stops_early(tmp_path):
    """``--version`` names the installed package; ``show FILE | head -1`` ends with 141 (128 +
    SIGPIPE) and no traceback, as other command-line tools do."""
    done = subprocess.run([*snake_mpi(), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("snake-mpi "), done
    help_text = subprocess.run([*snake_mpi(), "suite", "--help"], capture_output=True, text=True)
    assert help_text.stdout.startswith("usage: snake-mpi suite"), help_text.stdout
    code = "import sys; from snake_mpi.cli import main\nsys.exit(main(['validate', sys.argv[1]]))\n"
    tiny = str(REPO / "tests" / "configs" / "tiny.toml")
    with subprocess.Popen(
        [sys.executable, "-c", code, tiny], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as p:
        p.stdout.close()  # the reader went away before the first line
        err = p.stderr.read().decode()
        rc = p.wait(timeout=60)
    assert rc == 141, (rc, err)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_stored_config_from_before_the_transport_settings_reads_as_it_ran():
    """A result or checkpoint written before ``comm.hop_plans`` and
    ``comm.pipelined_min_bytes`` existed ran without plans and with plain messages."""
    from snake_mpi.config import stored_config

    text = to_toml(RunConfig(comm=CommConfig(pipelined_min_bytes=64 << 20)))
    assert "pipelined_min_bytes = 67108864" in text and "hop_plans = true" in text
    old = "\n".join(
        line for line in text.splitlines() if not line.startswith(("pipelined_min", "hop_plans"))
    )
    cfg = stored_config(old)
    assert (cfg.comm.pipelined_min_bytes, cfg.comm.hop_plans) == (0, False)
    assert stored_config(text).comm.pipelined_min_bytes == 64 << 20
