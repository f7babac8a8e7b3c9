"""A report page tying a run's outputs together: sections of text, PNG images, links and small tables.

    page = report_html("jaxlens demo", "What this run did.", [
        Section("Induction heads", "Mean attention from ...", images=["induction_scores.png"],
                links=[("induction_heads.html", "interactive attention patterns")],
                table=(["head", "score"], [["L4H3", "0.81"]])),
    ])
    Path(out / "index.html").write_text(page)

Images and links are relative paths to files beside the page; the page itself loads nothing else (no scripts,
no fonts, no network). Every piece of text is HTML-escaped.
"""

import dataclasses
import html
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Section:
    """One part of a report.

    Attributes:
        title: the section heading.
        text: paragraphs (separated by blank lines), plain text.
        images: relative paths of PNGs to show, in order.
        links: (relative href, link text) pairs.
        table: (column headers, rows of cells) or None.
    """

    title: str
    text: str = ""
    images: Sequence[str] = ()
    links: Sequence[tuple[str, str]] = ()
    table: tuple[Sequence[str], Sequence[Sequence[object]]] | None = None


def report_html(title: str, intro: str, sections: Sequence[Section], footer: str = "") -> str:
    """The page as a string: a title, an introduction, then each section (text, table, links, images).

    Args:
        title: page title and top heading.
        intro: paragraphs under the title (plain text, blank-line separated).
        sections: the sections, in order.
        footer: a last line in small print (e.g. timings).
    """
    parts = [f"<h1>{html.escape(title)}</h1>", _paragraphs(intro)]
    nav = " · ".join(f'<a href="#s{i}">{html.escape(s.title)}</a>' for i, s in enumerate(sections))
    if nav:
        parts.append(f'<p class="nav">{nav}</p>')
    for i, s in enumerate(sections):
        parts.append(f'<section id="s{i}"><h2>{html.escape(s.title)}</h2>')
        parts.append(_paragraphs(s.text))
        if s.table is not None:
            parts.append(_table(*s.table))
        if s.links:
            items = "".join(f'<li><a href="{html.escape(href, quote=True)}">{html.escape(text)}</a></li>'
                            for href, text in s.links)
            parts.append(f"<ul>{items}</ul>")
        for src in s.images:
            src = html.escape(src, quote=True)
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{src}"></a>'
                         f"<figcaption>{src}</figcaption></figure>")
        parts.append("</section>")
    if footer:
        parts.append(f'<p class="footer">{html.escape(footer)}</p>')
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}'
            f"</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _paragraphs(text: str) -> str:
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return "\n".join(f"<p>{html.escape(p)}</p>" for p in paras)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.nav { color: #666; } section { margin-bottom: 2.5em; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; } th { background: #f3f3f3; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #777; font-size: 0.85em; } .footer { color: #888; font-size: 0.85em; }
"""
