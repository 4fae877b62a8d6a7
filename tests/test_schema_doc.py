"""docs/results-schema.md and a real result file agree: every documented dataset and attribute
is in the file, and everything in the file is documented."""

from __future__ import annotations

import re

import h5py
import pytest

from conftest import REPO, mpi_run

SCHEMA = REPO / "docs" / "results-schema.md"
TINY = REPO / "tests" / "configs" / "tiny.toml"


def documented() -> dict[str, list[str]]:
    """Section -> the names its table documents (placeholders such as ``seed_<name>`` kept)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in SCHEMA.read_text().splitlines():
        if line.startswith("## "):
            m = re.search(r"`(/[^`]*)`", line)
            current = m.group(1) if m else line[3:].strip()
            sections.setdefault(current, [])
        elif current is not None and line.startswith("| `"):
            first_cell = line.split("|")[1]
            sections[current] += re.findall(r"`([^`]+)`", first_cell)
    return sections


def pattern(name: str) -> re.Pattern[str]:
    """``seed_<name>`` -> a regex that matches ``seed_model`` and the like."""
    return re.compile(r"\w+".join(re.escape(part) for part in re.split(r"<[^>]+>", name)) + "$")


def check(where: str, doc: list[str], present: list[str]) -> None:
    pats = [pattern(d) for d in doc]
    missing = [d for d, p in zip(doc, pats, strict=True) if not any(p.match(x) for x in present)]
    undocumented = [x for x in present if not any(p.match(x) for p in pats)]
    assert not missing, f"{where}: documented but not in the file: {missing}"
    assert not undocumented, f"{where}: in the file but not documented: {undocumented}"


def test_the_schema_document_has_the_sections_the_writer_uses():
    doc = documented()
    for section in (
        "Root attributes",
        "/provenance",
        "/rounds/<field>",
        "/eval/<field>",
        "/blocks/<column>",
        "/ranks/<column>",
        "/final_sync/<dataset>",
        "/assignment/<dataset>",
        "/series/rank_<k>/<dataset>",
    ):
        assert doc.get(section), f"no table for {section} in {SCHEMA.name}"


SNAKE_ONLY_ATTRS = {"mode", "transfer", "ends", "keep"}  # documented as "Snake runs only"


SCHEMA_RUNS = {
    # Snake with measured capabilities: every /assignment dataset is written
    "snake": mpi_run(3, TINY, 'scheme="snake"', 'snake.capability="measure"'),
    "fedavg": mpi_run(3, TINY, 'scheme="fedavg"'),
    "split": mpi_run(3, TINY, 'scheme="split"'),
}


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", list(SCHEMA_RUNS))
def test_a_result_file_has_exactly_the_documented_datasets_and_attributes(mpi_runs, scheme):
    out = mpi_runs(SCHEMA_RUNS[scheme]).path
    doc = documented()
    snake = scheme == "snake"
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "complete"
        root = doc["Root attributes"]
        check(
            "root attributes",
            root if snake else [a for a in root if a not in SNAKE_ONLY_ATTRS],
            list(f.attrs),
        )
        check("/provenance", doc["/provenance"], list(f["provenance"].attrs))
        groups = [
            ("/rounds/<field>", "rounds"),
            ("/eval/<field>", "eval"),
            ("/blocks/<column>", "blocks"),
            ("/ranks/<column>", "ranks"),
            ("/attempts/<column>", "attempts"),
        ]
        if snake:  # the final sync is Snake's (final_sync = true in the default config)
            groups.append(("/final_sync/<dataset>", "final_sync"))
            groups.append(("/assignment/<dataset>", "assignment"))
        for section, group in groups:
            assert all(isinstance(v, h5py.Dataset) for v in f[group].values()), group
            check(f"/{group}", doc[section], list(f[group]))
        assert sorted(f["series"]) == [f"rank_{k}" for k in range(3)]
        for k in range(3):
            series = f[f"series/rank_{k}"]
            check(f"/series/rank_{k}", doc["/series/rank_<k>/<dataset>"], list(series))
            assert len(series["t_s"]) > 0  # probes on: the sampler took samples
        expected_groups = {"provenance", "rounds", "eval", "blocks", "ranks", "series", "attempts"}
        assert set(f) == expected_groups | ({"final_sync", "assignment"} if snake else set())


def test_the_metric_tables_are_generated_from_schema_py():
    """The page's metric tables are exactly what ``python -m snake_mpi.schema --write`` makes."""
    from snake_mpi import schema

    page = SCHEMA.read_text()
    assert schema.render(page) == page, (
        "docs/results-schema.md differs from src/snake_mpi/schema.py; run "
        "python -m snake_mpi.schema --write docs/results-schema.md"
    )


def test_every_group_of_the_schema_has_its_section_on_the_page():
    from snake_mpi import schema

    doc = documented()
    for g in schema.GROUPS:
        (section,) = [s for s in doc if s.startswith(f"/{g.key}/")]
        assert doc[section] == list(schema.names(g.metrics)), g.key
