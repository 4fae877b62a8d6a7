"""The report as a list of blocks (headings, paragraphs, tables, images), rendered to Markdown
and to HTML alike, so the two never disagree."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field


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
    """The report as blocks, rendered to Markdown and HTML alike."""

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
                out.append(f"![{body.caption}]({body.path})\n\n*{body.caption}*")
            elif kind.startswith("h"):
                out.append("#" * int(kind[1]) + " " + str(body))
            else:
                out.append(str(body))
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{e(title)}</title><style>body{{font-family:sans-serif;max-width:1100px;"
            "margin:2em auto;line-height:1.4}table{border-collapse:collapse;font-size:0.85em;"
            "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
            "th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555}</style></head><body>",
        ]
        for kind, body in self.blocks:
            if isinstance(body, Table):
                head = "".join(f"<th>{e(c)}</th>" for c in body.head)
                out.append(f"<table><tr>{head}</tr>")
                out += [
                    "<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body.rows
                ]
                out.append("</table>")
            elif isinstance(body, Image):
                out.append(
                    f"<figure><img src='{e(body.path)}' alt='{e(body.caption)}'>"
                    f"<figcaption>{e(body.caption)}</figcaption></figure>"
                )
            elif kind.startswith("h"):
                out.append(f"<{kind}>{e(str(body))}</{kind}>")
            else:
                out.append(f"<p>{e(str(body))}</p>")
        out.append("</body></html>")
        return "\n".join(out)
