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


@dataclass
class Doc:
    """The report as blocks, rendered to Markdown and HTML alike."""

    blocks: list[tuple[str, object]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(head), [list(r) for r in rows])))

    def img(self, path: str, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def markdown(self) -> str:
        out = []
        for kind, body in self.blocks:
            if kind.startswith("h"):
                out.append("#" * int(kind[1]) + " " + str(body))
            elif kind == "p":
                out.append(str(body))
            elif kind == "table":
                head, rows = body
                out.append("| " + " | ".join(head) + " |")
                out.append("|" + "---|" * len(head))
                out += ["| " + " | ".join(r) + " |" for r in rows]
            else:
                path, caption = body
                alt = caption.split(":")[0].split(".")[0]
                out.append(f"![{alt}]({path})\n\n*{caption}*")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{e(title)}</title><style>{STYLE}</style></head><body>",
        ]
        for kind, body in self.blocks:
            if kind.startswith("h"):
                out.append(f"<{kind}>{e(str(body))}</{kind}>")
            elif kind == "p":
                out.append(f"<p>{e(str(body))}</p>")
            elif kind == "table":
                head, rows = body
                text = [not all(is_number(r[i]) for r in rows) for i in range(len(head))]

                def cls(i: int, text: list[bool] = text) -> str:
                    return " class='t'" if text[i] else ""

                out.append(
                    "<div class='wide'><table><tr>"
                    + "".join(f"<th{cls(i)}>{e(c)}</th>" for i, c in enumerate(head))
                    + "</tr>"
                )
                out += [
                    "<tr>" + "".join(f"<td{cls(i)}>{e(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                    for r in rows
                ]
                out.append("</table></div>")
            else:
                path, caption = body
                out.append(
                    f"<figure><img src='{e(path)}' alt='{e(caption)}'>"
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out)
