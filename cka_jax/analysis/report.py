"""One readable HTML page from the analyses' outputs: `analysis/report.html`.

Each analysis stores its section as `analysis/sections/<name>.json` (see
`cka_jax.analysis.outputs.Section`); the report is rebuilt from every stored section, so running
a subset of analyses keeps the sections of earlier runs. Figures and number files are
referenced by relative paths, so the directory can be moved or zipped as a whole.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence

from cka_jax.analysis.outputs import Section, Table, write_json, write_text

SECTIONS_DIR = "sections"
REPORT_NAME = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       line-height: 1.45; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 0.3em; }
.numbers { font-size: 0.88em; color: #555; } nav a { margin-right: 0.8em; }
"""


def save_section(outdir: str, section: Section) -> str:
    """Stores `section` for the report (atomically); returns its path."""
    return write_json(os.path.join(outdir, SECTIONS_DIR, f"{section.name}.json"), section.to_json())


def load_sections(outdir: str, order: Sequence[str] = ()) -> list[Section]:
    """Stored sections of `outdir`, those named in `order` first in that order, then the rest by name."""
    directory = os.path.join(outdir, SECTIONS_DIR)
    if not os.path.isdir(directory):
        return []
    names = sorted(f[:-5] for f in os.listdir(directory) if f.endswith(".json"))
    rank = {name: i for i, name in enumerate(order)}
    names.sort(key=lambda n: (rank.get(n, len(rank)), n))
    sections = []
    for name in names:
        with open(os.path.join(directory, f"{name}.json")) as f:
            sections.append(Section.from_json(json.load(f)))
    return sections


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(p.strip())}</p>" for p in text.split("\n\n") if p.strip())


def _section_html(section: Section) -> str:
    parts = [f'<h2 id="{html.escape(section.name)}">{html.escape(section.title)}</h2>', _paragraphs(section.text)]
    parts += [_table_html(t) for t in section.tables]
    for fig in section.figures:
        stem = os.path.splitext(fig)[0]
        parts.append(
            f'<a href="{html.escape(stem)}.pdf"><img src="{html.escape(fig)}" alt="{html.escape(section.title)}"></a>'
        )
    if section.numbers:
        links = ", ".join(f'<a href="{html.escape(p)}">{html.escape(p)}</a>' for p in section.numbers)
        parts.append(f'<p class="numbers">Numbers: {links}</p>')
    return "\n".join(parts)


def render_report(sections: Sequence[Section], title: str, intro: str = "") -> str:
    """The report page for `sections` (a self-contained HTML string)."""
    nav = " ".join(f'<a href="#{html.escape(s.name)}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(_section_html(s) for s in sections)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{_paragraphs(intro)}"
        f"\n<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )


def write_report(outdir: str, title: str, intro: str = "", order: Sequence[str] = ()) -> str:
    """Rebuilds `outdir/report.html` from every stored section; returns its path."""
    page = render_report(load_sections(outdir, order), title, intro)
    return write_text(os.path.join(outdir, REPORT_NAME), page)
