"""The report as a list of blocks (headings, paragraphs, tables, images), rendered to Markdown
and to HTML alike, so the two never disagree."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?( ?%)?$|^—$|^-$")
"""A cell that reads as a number (or the dash of a missing one): right-aligned in HTML."""

STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "line-height:1.4}"
    "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1em;max-width:100%}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;overflow-wrap:break-word}"
    "td.t,th.t{text-align:left}th{background:#f3f3f3}.wide{overflow-x:auto}"
    "img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}"
)
"""The page's CSS: tables wrap their cells (no sideways scrolling at a normal width); text
cells left, numbers right."""


def is_number(cell: str) -> bool:
    """Whether a table cell is a number (right-aligned) rather than text (left-aligned)."""
    return bool(NUMBER.match(cell.strip()))


@dataclass(frozen=True, slots=True)
class Table:
    """A table block: the header row and the rows, as text."""

    head: list[str]
    rows: list[list[str]]


@dataclass(frozen=True, slots=True)
class Image:
    """An image block: the file's path (relative to the report) and its caption."""

    path: str
    caption: str


@dataclass
class Doc:
    """The report as blocks (a heading ``h1``.. or paragraph ``p`` with its text, a table, an
    image), rendered to Markdown and HTML alike."""

    blocks: list[tuple[str, str | Table | Image]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", Table(list(head), [list(r) for r in rows])))

    def img(self, path: str, caption: str) -> None:
        self.blocks.append(("img", Image(path, caption)))

    def markdown(self) -> str:
        out = []
        for kind, body in self.blocks:
            if isinstance(body, Table):
                out.append("| " + " | ".join(body.head) + " |")
                out.append("|" + "---|" * len(body.head))
                out += ["| " + " | ".join(r) + " |" for r in body.rows]
            elif isinstance(body, Image):
                alt = body.caption.split(":")[0].split(".")[0]
                out.append(f"![{alt}]({body.path})\n\n*{body.caption}*")
            elif kind.startswith("h"):
                out.append("#" * int(kind[1]) + " " + body)
            else:
                out.append(body)
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{e(title)}</title><style>{STYLE}</style></head><body>",
        ]
        for kind, body in self.blocks:
            if isinstance(body, Table):
                out += _html_table(body)
            elif isinstance(body, Image):
                out.append(
                    f"<figure><img src='{e(body.path)}' alt='{e(body.caption)}'>"
                    f"<figcaption>{e(body.caption)}</figcaption></figure>"
                )
            elif kind.startswith("h"):
                out.append(f"<{kind}>{e(body)}</{kind}>")
            else:
                out.append(f"<p>{e(body)}</p>")
        out.append("</body></html>")
        return "\n".join(out)


def _html_table(t: Table) -> list[str]:
    """A table as HTML lines: text columns left-aligned, number columns right-aligned."""
    e = html.escape
    text = [not all(is_number(r[i]) for r in t.rows) for i in range(len(t.head))]

    def cls(i: int) -> str:
        return " class='t'" if text[i] else ""

    head = "".join(f"<th{cls(i)}>{e(c)}</th>" for i, c in enumerate(t.head))
    rows = [
        "<tr>" + "".join(f"<td{cls(i)}>{e(c)}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in t.rows
    ]
    return [f"<div class='wide'><table><tr>{head}</tr>", *rows, "</table></div>"]
