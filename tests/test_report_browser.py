"""Every image of report.html loads: each ``<img src>`` is a decodable, non-empty PNG on disk,
and, where Chromium can be had (tests/chromium.sh: found, or installed with apt-get as root),
a headless Chromium that loads the page sees every image with a natural width above zero.
Only the browser part is skipped, with the reason, where Chromium cannot be had."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from conftest import REPO  # noqa: E402
from snake_mpi.analysis import report  # noqa: E402
from snake_mpi.config import load_config  # noqa: E402
from snake_mpi.run import execute  # noqa: E402
from snake_mpi.transport.localcomm import ThreadWorld  # noqa: E402

TINY = REPO / "tests" / "configs" / "tiny.toml"
CHROMIUM_SH = REPO / "tests" / "chromium.sh"
RUNS = {  # file -> (ranks, overrides): Snake at two N (the scaling figure), and centralised
    "snake-n2": (2, ['scheme="snake"']),
    "snake-n3": (3, ['scheme="snake"']),
    "centralised-n1": (1, ['scheme="centralised"']),
}
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images).map(
    (i) => ({src: i.getAttribute("src"), complete: i.complete, width: i.naturalWidth}));
  const out = document.createElement("pre");
  out.id = "img-check";
  out.textContent = JSON.stringify(imgs);
  document.body.appendChild(out);
});
</script>"""
"""Appended to a copy of report.html: once the page has loaded, writes every image's
naturalWidth into the DOM, where ``--dump-dom`` prints it."""


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    for name, (n, sets) in RUNS.items():
        cfg = load_config(TINY, ["probes.enabled=false", "train.rounds=2", *sets])
        ThreadWorld(n).run(lambda c, cfg=cfg, name=name: execute(cfg, c, runs / f"{name}.h5"))
    out = tmp_path_factory.mktemp("report")
    assert report.main([str(runs), "--out", str(out)]) == 0
    return out


def image_sources(html: str) -> list[str]:
    return re.findall(r"<img src='([^']+)'", html)


def test_every_image_of_the_page_is_a_decodable_png(report_dir):
    from matplotlib import image

    srcs = image_sources((report_dir / "report.html").read_text())
    assert len(srcs) >= 5, srcs  # bytes, memory, time, accuracy, scaling
    for src in srcs:
        path = report_dir / src
        assert path.is_file() and path.stat().st_size > 0, src
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
        pixels = image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, src


def chromium() -> str:
    """A Chromium binary, installed first where root may (tests/chromium.sh); else skip."""
    for name in ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0:
        pytest.skip("no Chromium; installing it (tests/chromium.sh, apt-get) needs root")
    if shutil.which("apt-get") is None:
        pytest.skip("no Chromium and no apt-get to install it")
    got = subprocess.run([str(CHROMIUM_SH)], capture_output=True, text=True, timeout=900)
    if got.returncode != 0:
        pytest.skip(f"could not install Chromium: {got.stderr[-800:]}")
    return got.stdout.strip().splitlines()[-1]


def dump_dom(
    binary: str,
    page: Path,
    profile: Path,
    *,
    budget_ms: int,
    timeout_s: float,
    flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Load ``page`` in headless Chromium with a fresh ``profile`` (nothing of a user's browser
    is touched) and return the DOM it printed after ``budget_ms`` of virtual time."""
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",  # as root, Chromium refuses to start sandboxed
            "--disable-gpu",
            "--disable-crash-reporter",
            "--no-first-run",
            *flags,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_every_image_loads_in_headless_chromium(report_dir, tmp_path):
    binary = chromium()
    page = (report_dir / "report.html").read_text().replace("</body>", PROBE + "</body>")
    check = report_dir / "img-check.html"
    check.write_text(page)
    profile = tmp_path / "profile"  # a fresh profile: nothing of a user's browser is touched
    got = dump_dom(binary, check, profile, budget_ms=10000, timeout_s=120)
    found = re.search(r'<pre id="img-check">(.*?)</pre>', got.stdout, re.S)
    assert found, f"no result in the page (exit {got.returncode}): {got.stderr[-1500:]}"
    imgs = json.loads(html.unescape(found.group(1)))
    assert [i["src"] for i in imgs] == image_sources(page)
    broken = [i for i in imgs if not i["complete"] or i["width"] <= 0]
    assert not broken, broken
