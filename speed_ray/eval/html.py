"""A static HTML page beside a markdown report: the same text, tables and plots, for a browser.

``report.md`` stays the source (it reads well on GitHub and in a terminal); ``report.html`` is rendered
from it with markdown-it (CommonMark plus tables), with the plots linked by the same relative paths,
so the folder can be copied or served as it is.
"""

from __future__ import annotations

import html
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.45; color: #1b1b1b; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f0f0f0; }
td:not(:first-child) { font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 0.2rem; }
pre code { display: block; padding: 0.6rem; overflow-x: auto; }
"""


def render_html(markdown: str) -> str:
    """The whole page for ``markdown``; its title is the first heading. Raw HTML in the markdown is
    escaped, not passed through (reports quote model outputs)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    title = next((line.lstrip("#").strip() for line in markdown.splitlines() if line.startswith("#")), "")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )


def write_report(path: Path, markdown: str) -> None:
    """``path`` (report.md) and the page beside it (report.html), each written whole or not at all."""
    from speed_ray.io.schemas import write_text_atomic

    write_text_atomic(path, markdown)
    write_text_atomic(path.with_suffix(".html"), render_html(markdown))
