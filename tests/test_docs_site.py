"""The documentation site builds with ``mkdocs build --strict`` (as ``.ci/run`` does), a broken
link or a page left out of the nav fails that build, every page of the nav is built, every
image on a page is a decodable file, and, where Chromium can be had (tests/chromium.sh), a
headless Chromium loads every page with its title and heading and sees every image with a
natural width above zero. Without mkdocs (the ``docs`` extra) the tests skip with the reason;
without Chromium only the browser part does."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO

pytest.importorskip("mkdocs", reason="the docs extra (mkdocs) is not installed")
yaml = pytest.importorskip("yaml")

HARNESS = """<!doctype html><html><body><pre id="site-check"></pre>
<iframe id="page" style="width:1280px;height:900px"></iframe>
<script>
const pages = %s, results = [], frame = document.getElementById("page");
let i = 0;
function next() {
  if (i >= pages.length) {
    document.getElementById("site-check").textContent = JSON.stringify(results);
    return;
  }
  const url = pages[i++];
  frame.onload = () => {
    const d = frame.contentDocument, h1 = d && d.querySelector("article h1, h1");
    results.push({url, title: d ? d.title : null, h1: h1 ? h1.textContent : null,
      imgs: d ? Array.from(d.images).map(
        (im) => ({src: im.getAttribute("src"), complete: im.complete, width: im.naturalWidth}))
        : null});
    next();
  };
  frame.src = url;
}
next();
</script></body></html>"""
"""Loads every page of the site in turn in an iframe and writes, for each, its title, its
first heading and every image's naturalWidth into the DOM, where ``--dump-dom`` prints it
(one Chromium start for the whole site; ``--allow-file-access-from-files`` lets the page read
its iframe's document)."""


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config)]
        + ["--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=config.parent,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = mkdocs_build(REPO / "mkdocs.yml", out)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def nav_pages() -> list[str]:
    """Every Markdown page the nav of mkdocs.yml names."""

    def walk(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in walk(item)]
        if isinstance(node, dict):
            return [p for value in node.values() for p in walk(value)]
        return []

    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    return walk(config["nav"])


def built_page(site: Path, page: str) -> Path:
    stem = page.removesuffix(".md")
    if stem == "index" or stem.endswith("/index"):
        return site / stem.removesuffix("index") / "index.html"
    return site / stem / "index.html"


def built_pages(site: Path) -> list[Path]:
    return [built_page(site, p) for p in nav_pages()]


def test_every_page_of_the_nav_is_built(site):
    pages = nav_pages()
    assert len(pages) >= 30 and "results-schema.md" in pages
    missing = [p for p in pages if not built_page(site, p).is_file()]
    assert not missing, missing


def test_every_markdown_file_is_in_the_nav():
    listed = set(nav_pages())
    files = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert files - listed == set(), "pages outside the nav (mkdocs --strict refuses them)"


def test_a_broken_link_or_a_page_outside_the_nav_fails_the_strict_build(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "src").symlink_to(REPO / "src")  # mkdocstrings reads the package from src/
    with (docs / "guide" / "suites.md").open("a") as f:
        f.write("\nSee [the missing page](no-such-page.md) and [an anchor](slurm.md#no-such).\n")
    (docs / "orphan.md").write_text("# Not in the nav\n")
    built = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    log = built.stdout + built.stderr
    assert built.returncode != 0, log[-3000:]
    assert "no-such-page.md" in log and "#no-such" in log and "orphan.md" in log, log[-3000:]


def image_sources(page: Path) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]+)"', page.read_text())


def test_every_image_on_a_page_is_a_decodable_file(site):
    from matplotlib import image

    pngs = 0
    for page in built_pages(site):
        for src in image_sources(page):
            if src.startswith(("http:", "https:", "data:")):
                continue
            path = (page.parent / src).resolve()
            assert path.is_file() and path.stat().st_size > 0, (page, src)
            if path.suffix == ".png":
                pixels = image.imread(path)
                assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100, (page, src)
                pngs += 1
    assert pngs >= 4  # the label-skew figures at least


def chromium() -> str:
    """A Chromium binary, installed first where root may (tests/chromium.sh); else skip."""
    from test_report_browser import chromium as find

    return find()


def dump_dom(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``test_report_browser.dump_dom``: one headless Chromium invocation for both tests."""
    from test_report_browser import dump_dom as run

    return run(*args, **kwargs)


@pytest.mark.xdist_group("system")  # Chromium may be installed with apt-get (one apt lock)
def test_every_page_loads_in_headless_chromium(site, tmp_path):
    binary = chromium()
    pages = [p.relative_to(site).as_posix() for p in built_pages(site)]
    harness = site / "zz-site-check.html"
    harness.write_text(HARNESS % json.dumps(pages))
    got = dump_dom(
        binary,
        harness,
        tmp_path / "profile",
        budget_ms=20000,
        timeout_s=300,
        flags=("--allow-file-access-from-files",),
    )
    found = re.search(r'<pre id="site-check">(.*?)</pre>', got.stdout, re.S)
    assert found, f"no result in the page (exit {got.returncode}): {got.stderr[-1500:]}"
    seen = json.loads(html.unescape(found.group(1)))
    assert [s["url"] for s in seen] == pages
    unloaded = [s["url"] for s in seen if not s["title"] or not (s["h1"] or "").strip()]
    assert not unloaded, f"pages without a title or heading in Chromium: {unloaded}"
    broken = [
        (s["url"], i) for s in seen for i in s["imgs"] if not i["complete"] or i["width"] <= 0
    ]
    assert not broken, broken
    assert sum(len(s["imgs"]) for s in seen) >= 4
