"""The tests' launch helper (``conftest.run_job``): a launcher that could not start is started
once more; any other failure is the test's to judge."""

from __future__ import annotations

from conftest import LAUNCH_FLAKE, run_job


def _launcher(tmp_path, fail_times: int, exit_code: int = 213, line: str = LAUNCH_FLAKE):
    """A stand-in launcher that fails ``fail_times`` times with ``line``, then prints ok; each
    start is counted in ``starts``."""
    script = tmp_path / "launcher.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'echo x >> "{tmp_path}/starts"\n'
        f'if [ "$(wc -l < "{tmp_path}/starts")" -le {fail_times} ]; then\n'
        f'  echo "{line}" >&2; exit {exit_code}\n'
        "fi\n"
        "echo ok\n"
    )
    script.chmod(0o755)
    return [str(script)]


def starts(tmp_path) -> int:
    return len((tmp_path / "starts").read_text().splitlines())


def test_a_launcher_that_could_not_start_is_started_once_more(tmp_path):
    job = run_job(_launcher(tmp_path, fail_times=1), timeout_s=30)
    assert (job.returncode, job.stdout.strip(), starts(tmp_path)) == (0, "ok", 2)


def test_only_once_and_only_for_that_failure(tmp_path):
    twice = tmp_path / "twice"
    twice.mkdir()
    job = run_job(_launcher(twice, fail_times=5), timeout_s=30)
    assert (job.returncode, starts(twice)) == (213, 2)
    assert LAUNCH_FLAKE in job.stderr
    other = tmp_path / "other"
    other.mkdir()
    job = run_job(_launcher(other, fail_times=5, exit_code=1, line="rank 0: error"), timeout_s=30)
    assert (job.returncode, starts(other)) == (1, 1)
