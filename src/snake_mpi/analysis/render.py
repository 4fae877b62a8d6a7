"""The report as a list of blocks (headings, paragraphs, tables, images), rendered to Markdown
and to HTML alike, so the two never disagree."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field


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
                out.append(f"![{caption}]({path})\n\n*{caption}*")
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
            if kind.startswith("h"):
                out.append(f"<{kind}>{e(str(body))}</{kind}>")
            elif kind == "p":
                out.append(f"<p>{e(str(body))}</p>")
            elif kind == "table":
                head, rows = body
                out.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in head) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            else:
                path, caption = body
                out.append(
                    f"<figure><img src='{e(path)}' alt='{e(caption)}'>"
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out)
